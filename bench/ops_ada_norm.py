"""Benchmarks of adaptive normalization (math in fastgen/ops/ada_norm.py) at the shapes of the models that use it.

- AdaGN, ADM imagenet256 (guided diffusion, use_scale_shift_norm): every ResBlock's out_layers
  normalize with GroupNorm(32) (affine), modulate with the timestep/class embedding and apply
  SiLU. That UNet has 512 channels at 64 and 32 px and 1024 at 16 and 8 px; batches 8..64.
  The eager baseline is ADM's own sequence: GroupNorm, * (1 + scale) + shift, SiLU.
- AdaIN, StyleGAN (v1) ffhq-1024 generator: instance norm (G = C, no affine, eps 1e-8) then
  the style's (1 + y_s), y_b after every convolution, from 4 to 1024 px with the official
  channel counts min(512, 8192 / side): 512 up to 32 px, halving per octave to 16 at 1024 px.
- GroupNorm + SiLU, the AutoencoderKL decoder of SD 1.5 / SDXL / FLUX.1 (every ResnetBlock2D's
  norm1 and norm2 and the output norm: 32 groups, affine, eps 1e-6, no modulation): at a P px
  output its levels hold 512 channels at P/8 and P/4, 256 at P/2 and 128 at P; batch 1 at 512,
  1024 and 2048 px, NCHW and channels_last, bfloat16 and float16, forward (decoding). The
  fastgen call is what `accelerate` and the model run, ada_group_norm with zero scale and shift;
  the eager baseline is GroupNorm then SiLU, two kernels.
- adaLN: DiT-XL/2 (C 1152; N 256 tokens at 256 px, 1024 at 512 px) and SANA 0.6B / 1.6B
  (C 1152 / 2240; N 1024 at 1024 px, 4096 at 2048 px).
- Gated residual + adaLN, the joint blocks of the MM-DiTs at 1024 px, each stream a call of its
  own: FLUX.1 [dev] (C 3072; 4096 image and 512 T5 tokens; batch 1, guidance is distilled) and
  SD3 medium (C 1536; 4096 image and 77 + 256 text tokens; batch 2, the classifier-free
  guidance pair of one call). The baseline is the two steps as diffusers writes them,
  h = x + gate * branch and then ada_layer_norm's eager math, eager and under torch.compile:
  the fused op is kept where it measures faster than the compiled pair (issue #19).

Bytes per call: x read and y written once (scale, shift, weight and bias are a rounding error
but counted); fwd+bwd adds reading x and dy and writing dx once (the statistics are recomputed
from x, which is the read already counted). The gated residual reads x and branch and writes h
and y; its backward reads x, branch and both output gradients and writes dx and dbranch.
"""
from __future__ import annotations

import itertools

import torch

from fastgen.ops import ada_norm

from .harness import Case, op_benchmark

_ADM_LEVELS = ((512, 64), (512, 32), (1024, 16), (1024, 8))  # (channels, side) of imagenet256's ResBlocks
_STYLEGAN_SIDES = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TENSORS_MOVED = {"fwd": 2, "fwd+bwd": 5}


def _stylegan_channels(side: int) -> int:
    return min(512, 8192 // side)


def _modulation_bytes(batch: int, channels: int, affine: bool, dtype: torch.dtype) -> int:
    return (2 * batch * channels + (2 * channels if affine else 0)) * dtype.itemsize


def _group_norm_case(label: str, batch: int, channels: int, side: int, groups: int, affine: bool, act,
                     eps: float, layout: str, dtype: torch.dtype, direction: str, modulated: bool = True) -> Case:
    shape = (batch, channels, side, side)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)

        def randn(*size):
            return torch.randn(size, generator=generator, device=device, dtype=dtype)

        def zeros(*size):
            return torch.zeros(size, device=device, dtype=dtype)

        return {
            "x": randn(*shape).contiguous(memory_format=memory_format),
            "scale": randn(batch, channels) if modulated else zeros(batch, channels),
            "shift": randn(batch, channels) if modulated else zeros(batch, channels),
            "num_groups": groups,
            "weight": randn(channels) if affine else None, "bias": randn(channels) if affine else None,
            "eps": eps, "act": act,
        }

    work = (_TENSORS_MOVED[direction] * batch * channels * side * side * dtype.itemsize
            + _modulation_bytes(batch, channels, affine, dtype))
    suffix = " channels_last" if layout == "channels_last" else ""
    return Case(f"{label} B{batch} C{channels} {side}px G{groups}{suffix}", dtype, direction, make_inputs, work)


def _adm_case(batch, channels, side, layout, dtype, direction):
    return _group_norm_case("ADM", batch, channels, side, 32, True, "silu", 1e-5, layout, dtype, direction)


def _stylegan_case(batch, side, dtype, direction):
    channels = _stylegan_channels(side)
    return _group_norm_case("StyleGAN", batch, channels, side, channels, False, None, 1e-8, "contiguous", dtype,
                            direction)


def _group_norm_silu(x, scale, shift, num_groups, weight, bias, eps, act):
    """The eager VAE sequence the fused call replaces (scale and shift are zero: unused)."""
    return torch.nn.functional.silu(torch.nn.functional.group_norm(x, num_groups, weight, bias, eps))


_VAE_LEVELS = ((512, 8), (512, 4), (256, 2), (128, 1))  # (channels, P / side) of the decoder's norms


def _vae_cases(quick: bool) -> list:
    cases = []
    for (layout, dtype), size, (channels, divisor) in itertools.product(
            itertools.product(("contiguous", "channels_last"), (torch.bfloat16, torch.float16)), (512, 1024, 2048),
            _VAE_LEVELS):
        if quick and (size != 1024 or dtype != torch.bfloat16 or divisor not in (8, 1)):
            continue
        cases.append(_group_norm_case(f"VAE decoder {size}px", 1, channels, size // divisor, 32, True, "silu", 1e-6,
                                      layout, dtype, "fwd", modulated=False))
    return cases


def _layer_norm_case(label: str, batch: int, tokens: int, channels: int, dtype: torch.dtype, direction: str) -> Case:
    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return {
            "x": torch.randn(batch, tokens, channels, generator=generator, device=device, dtype=dtype),
            "scale": torch.randn(batch, channels, generator=generator, device=device, dtype=dtype),
            "shift": torch.randn(batch, channels, generator=generator, device=device, dtype=dtype),
        }

    work = (_TENSORS_MOVED[direction] * batch * tokens * channels * dtype.itemsize
            + _modulation_bytes(batch, channels, False, dtype))
    return Case(f"{label} B{batch} N{tokens} C{channels}", dtype, direction, make_inputs, work)


_LAYER_NORM_SHAPES = (("DiT-XL/2 256px", 32, 256, 1152), ("DiT-XL/2 512px", 8, 1024, 1152),
                      ("SANA-0.6B 1024px", 4, 1024, 1152), ("SANA-0.6B 2048px", 4, 4096, 1152),
                      ("SANA-1.6B 1024px", 4, 1024, 2240), ("SANA-1.6B 2048px", 4, 4096, 2240))
_DIRECTIONS = ("fwd", "fwd+bwd")


_GATED_TENSORS_MOVED = {"fwd": 4, "fwd+bwd": 10}
# (label, batch, tokens, channels) of each stream of a joint block at 1024 px.
_GATED_RESIDUAL_SHAPES = (("FLUX.1-dev 1024px image", 1, 4096, 3072), ("FLUX.1-dev 1024px text", 1, 512, 3072),
                          ("SD3-medium 1024px image", 2, 4096, 1536), ("SD3-medium 1024px text", 2, 333, 1536))


def _gated_residual_case(label: str, batch: int, tokens: int, channels: int, dtype: torch.dtype,
                         direction: str) -> Case:
    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)

        def randn(*size):
            return torch.randn(size, generator=generator, device=device, dtype=dtype)

        return {"x": randn(batch, tokens, channels), "branch": randn(batch, tokens, channels),
                "gate": randn(batch, channels), "scale": randn(batch, channels), "shift": randn(batch, channels)}

    per_sample_vectors = 3 if direction == "fwd" else 6  # gate, scale, shift read; their gradients written
    work = (_GATED_TENSORS_MOVED[direction] * batch * tokens * channels + per_sample_vectors * batch * channels
            ) * dtype.itemsize
    return Case(f"{label} B{batch} N{tokens} C{channels}", dtype, direction, make_inputs, work)


def _residual_then_ada_layer_norm(x, branch, gate, scale, shift):
    """The eager pair the fused op replaces, as diffusers' joint blocks write it."""
    h = x + gate.unsqueeze(1) * branch
    return h, ada_norm.ada_layer_norm_reference(h, scale, shift)


def _gated_residual_cases(quick: bool) -> list:
    shapes = _GATED_RESIDUAL_SHAPES[:1] if quick else _GATED_RESIDUAL_SHAPES
    return [_gated_residual_case(*shape, torch.bfloat16, d) for shape, d in itertools.product(shapes, _DIRECTIONS)]


def _group_norm_cases(quick: bool) -> list:
    bf16 = torch.bfloat16
    if quick:
        return ([_adm_case(32, c, s, "contiguous", bf16, d) for (c, s), d in itertools.product(_ADM_LEVELS[::3], _DIRECTIONS)]
                + [_stylegan_case(1, s, bf16, d) for s, d in itertools.product((32, 1024), _DIRECTIONS)])
    adm = [_adm_case(b, c, s, "contiguous", bf16, d)
           for b, (c, s), d in itertools.product((8, 32, 64), _ADM_LEVELS, _DIRECTIONS)]
    # ADM samples in float16; channels_last is how a cuDNN-friendly UNet holds its maps.
    adm += [_adm_case(32, c, s, layout, dtype, d)
            for (layout, dtype), (c, s), d in itertools.product(
                (("contiguous", torch.float16), ("channels_last", bf16), ("contiguous", torch.float32)),
                _ADM_LEVELS, _DIRECTIONS)]
    stylegan = [_stylegan_case(b, s, bf16, d) for b, s, d in itertools.product((1, 8), _STYLEGAN_SIDES, _DIRECTIONS)]
    return adm + stylegan


def _layer_norm_cases(quick: bool) -> list:
    shapes = _LAYER_NORM_SHAPES[::3] if quick else _LAYER_NORM_SHAPES
    return [_layer_norm_case(*shape, torch.bfloat16, d) for shape, d in itertools.product(shapes, _DIRECTIONS)]


def benchmarks(quick: bool = False) -> list:
    return [
        op_benchmark("ada_group_norm", _group_norm_cases(quick), ada_norm.ada_group_norm,
                     ada_norm.ada_group_norm_reference),
        op_benchmark("ada_group_norm", _vae_cases(quick), ada_norm.ada_group_norm, _group_norm_silu),
        op_benchmark("ada_layer_norm", _layer_norm_cases(quick), ada_norm.ada_layer_norm,
                     ada_norm.ada_layer_norm_reference),
        op_benchmark("gated_residual_ada_layer_norm", _gated_residual_cases(quick),
                     ada_norm.gated_residual_ada_layer_norm, _residual_then_ada_layer_norm),
    ]
