"""Benchmarks of ReLU linear attention (math in fastgen/ops/linear_attention.py) at SANA's shapes.

SANA-0.6B has 36 heads and SANA-1.6B 70 heads, both of head dim 32; with the f32 DC-AE the
sequence is N = (image side / 32)^2 tokens: 1024 at 1024 px, 4096 at 2048 px (the 64x64
latent of SANA's published 2.3x forward / 2.5x backward Triton anchor) and 16384 at 4096 px.
q, k and v are views of one fused (B, N, 3, H, D) projection output, as SANA's LiteLA passes
them; the eager baseline is the SANA/diffusers formulation (linear_attention_reference).

Bytes per call: q, k, v read once and out written once; fwd+bwd adds reading q, k, v and the
output gradient once and writing dq, dk, dv once (the D x D states are negligible).
"""
from __future__ import annotations

import itertools

import torch

from fastgen.ops import linear_attention

from .harness import Case, op_benchmark

_HEAD_DIM = 32
_TENSORS_MOVED = {"fwd": 4, "fwd+bwd": 4 + 7}


def _case(batch: int, tokens: int, heads: int, dtype: torch.dtype, direction: str) -> Case:
    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        qkv = torch.randn(batch, tokens, 3, heads, _HEAD_DIM, generator=generator, device=device, dtype=dtype)
        q, k, v = qkv.unbind(2)
        return {"q": q, "k": k, "v": v}

    tensor_bytes = batch * tokens * heads * _HEAD_DIM * dtype.itemsize
    label = f"B{batch} N{tokens} H{heads}x{_HEAD_DIM}"
    return Case(label, dtype, direction, make_inputs, _TENSORS_MOVED[direction] * tensor_bytes)


def _cases(quick: bool) -> list:
    directions = ("fwd", "fwd+bwd")
    if quick:
        shapes = ((1, 4096, 36), (1, 16384, 70), (16, 1024, 36))
        return [_case(b, n, h, torch.bfloat16, d) for (b, n, h), d in itertools.product(shapes, directions)]
    # bf16 (the models' dtype) over the grid; fp16 (the anchor's dtype) and fp32 at SANA-0.6B, B1.
    bf16 = [_case(b, n, h, torch.bfloat16, d)
            for h, n, b, d in itertools.product((36, 70), (1024, 4096, 16384), (1, 4, 16), directions)]
    others = [_case(1, n, 36, dtype, d)
              for dtype, n, d in itertools.product((torch.float16, torch.float32), (1024, 4096, 16384), directions)]
    return bf16 + others


def benchmarks(quick: bool = False) -> list:
    return [op_benchmark("linear_attention", _cases(quick), linear_attention.linear_attention,
                         linear_attention.linear_attention_reference)]
