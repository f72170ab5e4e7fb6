"""Benchmarks of the channel RMSNorm `trms2d` at the shapes SANA's DC-AE f32c32 gives it.

That autoencoder's stages have widths 128, 256, 512, 512, 1024, 1024 and stage i works at
(image side) / 2^i pixels; its RMSNorms (ResBlock and GLUMBConv norms, the decoder's norm_out)
normalize each stage's maps over channels, with weight and bias (diffusers' get_normalization
and norm_out both pass bias=True). Shape labels give the batch, channels and side in pixels.

Bytes per call: x read once, y written once (weight and bias are negligible); fwd+bwd adds
reading dy and x again and writing dx.
"""
from __future__ import annotations

import itertools

import torch

from fastgen.ops import rms_norm_2d

from .harness import Case, op_benchmark

_WIDTHS = (128, 256, 512, 512, 1024, 1024)
_IMAGE_SIDE = 1024


def _case(batch: int, channels: int, side: int, dtype: torch.dtype, direction: str) -> Case:
    shape = (batch, channels, side, side)

    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return {
            "x": torch.randn(shape, generator=generator, device=device, dtype=dtype),
            "weight": torch.randn(channels, generator=generator, device=device, dtype=dtype),
            "bias": torch.randn(channels, generator=generator, device=device, dtype=dtype),
        }

    elements = batch * channels * side * side
    passes = 5 if direction == "fwd+bwd" else 2
    return Case(f"B{batch} C{channels} {side}px", dtype, direction, make_inputs, passes * elements * dtype.itemsize)


def _cases(quick: bool) -> list:
    stages = [(channels, _IMAGE_SIDE >> i) for i, channels in enumerate(_WIDTHS)]
    directions = ("fwd", "fwd+bwd")
    if quick:  # the largest map and the smallest, widest one
        return [_case(1, c, side, torch.bfloat16, d) for (c, side), d in itertools.product(stages[::5], directions)]
    bf16 = [_case(batch, c, side, torch.bfloat16, d)
            for batch, (c, side), d in itertools.product((1, 8), stages, directions)]
    others = [_case(1, c, side, dtype, d)
              for dtype, (c, side), d in itertools.product((torch.float16, torch.float32), stages, directions)]
    return bf16 + others


def benchmarks(quick: bool = False) -> list:
    return [op_benchmark("trms2d", _cases(quick), rms_norm_2d.trms2d, rms_norm_2d.trms2d_reference)]
