"""Benchmarks of `qk_norm_rope` at the attention shapes of FLUX.1-dev and SD3.5 at 1024 px.

- FLUX.1-dev: 4096 image tokens (a 128 x 128 latent in 2 x 2 patches) and 512 T5 tokens, 24
  heads of 128, RMSNorm on q and k, then interleaved RoPE over the joint sequence. Batch 1
  (guidance-distilled: no classifier-free guidance batch).
- SD3.5-medium and -large: 4096 image tokens and 333 text tokens (77 + 77 CLIP, 256 T5), 24 and
  38 heads of 64, RMSNorm on q and k, no RoPE. Batch 2 (classifier-free guidance).

q and k are views of one fused QKV projection output, as diffusers' fused projections give
them. The eager baseline is what diffusers runs: its RMSNorm (float32 statistics, the result
rounded to the weight's dtype before the weight multiplies) then `apply_rotary_emb` with its
full (L, D) tables, as separate ops; "compile" is torch.compile of it.

Bytes per call: q and k read once, the two outputs written once (the weights and angle tables
are negligible); fwd+bwd adds reading both output gradients, q and k again and writing dq, dk.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import torch

from fastgen.ops import qk_norm_rope

from .harness import Case, op_benchmark

_EPS = 1e-6


@dataclass(frozen=True)
class _Rope:
    """One set of angles as the op takes them, (L, D/2), and as diffusers keeps them, (L, D)
    with each angle repeated at both features of its pair. Not a tensor argument, so the
    harness leaves the constant tables out of the gradient leaves."""

    cos: torch.Tensor
    sin: torch.Tensor
    freqs_cos: torch.Tensor
    freqs_sin: torch.Tensor
    layout: str


def _flux_rope(length: int, head_dim: int, device) -> _Rope:
    """RoPE angles of positions 0..length-1 at theta 10000; FLUX.1 splits D among three
    position axes, which changes the angles, not the work."""
    frequencies = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float64, device=device)[:, None] * frequencies
    cos, sin = angles.cos().float(), angles.sin().float()
    return _Rope(cos, sin, cos.repeat_interleave(2, dim=1), sin.repeat_interleave(2, dim=1), "interleaved")


def _fused(q, k, weight_q, weight_k, rope: Optional[_Rope]):
    if rope is None:
        return qk_norm_rope.qk_norm_rope(q, k, weight_q, weight_k, eps=_EPS)
    return qk_norm_rope.qk_norm_rope(q, k, weight_q, weight_k, rope.cos, rope.sin, _EPS, rope.layout)


def _diffusers_rms_norm(x, weight):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + _EPS)).to(weight.dtype) * weight


def _diffusers_rotary(x, rope: _Rope):
    """apply_rotary_emb(x, (freqs_cos, freqs_sin), use_real_unbind_dim=-1, sequence_dim=1)."""
    cos, sin = rope.freqs_cos[None, :, None, :], rope.freqs_sin[None, :, None, :]
    real, imaginary = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imaginary, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _eager(q, k, weight_q, weight_k, rope: Optional[_Rope]):
    q, k = _diffusers_rms_norm(q, weight_q), _diffusers_rms_norm(k, weight_k)
    if rope is not None:
        q, k = _diffusers_rotary(q, rope), _diffusers_rotary(k, rope)
    return q, k


def _case(label: str, batch: int, length: int, heads: int, head_dim: int, rope: bool, dtype: torch.dtype,
          direction: str) -> Case:
    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        qkv = torch.randn(batch, length, 3, heads, head_dim, generator=generator, device=device, dtype=dtype)
        weight_q, weight_k = (1 + 0.1 * torch.randn(head_dim, generator=generator, device=device, dtype=dtype)
                              for _ in "qk")
        return {"q": qkv[:, :, 0], "k": qkv[:, :, 1], "weight_q": weight_q, "weight_k": weight_k,
                "rope": _flux_rope(length, head_dim, device) if rope else None}

    elements = batch * length * heads * head_dim
    passes = 2 * (5 if direction == "fwd+bwd" else 2)  # per tensor: fwd reads x, writes y; bwd reads dy, x, writes dx
    shape = f"{label} B{batch} L{length} H{heads}x{head_dim}" + ("" if rope else " norm only")
    return Case(shape, dtype, direction, make_inputs, passes * elements * dtype.itemsize)


_FLUX = ("FLUX.1-dev 1024px", 1, 4096 + 512, 24, 128, True)
_SD35_MEDIUM = ("SD3.5-medium 1024px", 2, 4096 + 333, 24, 64, False)
_SD35_LARGE = ("SD3.5-large 1024px", 2, 4096 + 333, 38, 64, False)


def _cases(quick: bool) -> list:
    directions = ("fwd", "fwd+bwd")
    if quick:
        return [_case(*model, torch.bfloat16, d) for model, d in itertools.product((_FLUX, _SD35_LARGE), directions)]
    bf16 = [_case(*model, torch.bfloat16, d)
            for model, d in itertools.product((_FLUX, _SD35_MEDIUM, _SD35_LARGE), directions)]
    return bf16 + [_case(*_FLUX, torch.float16, d) for d in directions]


def benchmarks(quick: bool = False) -> list:
    return [op_benchmark("qk_norm_rope", _cases(quick), _fused, _eager)]
