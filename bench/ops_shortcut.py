"""Benchmarks of the DC-AE residual shortcuts (math in fastgen/ops/shortcut.py) at the shapes SANA's DC-AE
f32c32 gives them.

That autoencoder's stages have widths 128, 256, 512, 512, 1024, 1024; stage i works at
(image side) / 2^i pixels and the latent has 32 channels. Each encoder stage change adds a
pixel_unshuffle_channel_avg shortcut (factor 2) to its strided conv, the encoder output adds
one with factor 1 (1024 -> 32 channels) to the output conv, and the decoder mirrors both with
channel_dup_pixel_shuffle. In the model every shortcut is summed with its conv branch, which
is the `residual` argument; the cases without it measure the op alone. Shape labels give the
batch, the channels in -> out, the factor and the input's side in pixels.

Bytes per call: x and residual read once, y written once; fwd+bwd adds reading dy and writing
dx (the residual's gradient is dy itself, no copy).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from fastgen.ops import shortcut

from .harness import Case, op_benchmark

_WIDTHS = (128, 256, 512, 512, 1024, 1024)
_LATENT_CHANNELS = 32
_UNSHUFFLE = "pixel_unshuffle_channel_avg"
_DUPLICATE = "channel_dup_pixel_shuffle"


@dataclass(frozen=True)
class _Shortcut:
    op: str
    in_channels: int
    out_channels: int
    factor: int
    side: int  # input height = width, in pixels

    @property
    def out_side(self) -> int:
        return self.side // self.factor if self.op == _UNSHUFFLE else self.side * self.factor


def _dcae_shortcuts(image_side: int) -> list:
    """Every shortcut of the encoder and decoder for one image size, encoder first."""
    stages = range(len(_WIDTHS) - 1)
    top = image_side >> len(stages)  # the latent's side
    return (
        [_Shortcut(_UNSHUFFLE, _WIDTHS[i], _WIDTHS[i + 1], 2, image_side >> i) for i in stages]
        + [_Shortcut(_UNSHUFFLE, _WIDTHS[-1], _LATENT_CHANNELS, 1, top),
           _Shortcut(_DUPLICATE, _LATENT_CHANNELS, _WIDTHS[-1], 1, top)]
        + [_Shortcut(_DUPLICATE, _WIDTHS[i + 1], _WIDTHS[i], 2, image_side >> (i + 1)) for i in reversed(stages)]
    )


def _case(layer: _Shortcut, batch: int, residual: bool, dtype: torch.dtype, direction: str) -> Case:
    x_shape = (batch, layer.in_channels, layer.side, layer.side)
    y_shape = (batch, layer.out_channels, layer.out_side, layer.out_side)

    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return {
            "x": torch.randn(x_shape, generator=generator, device=device, dtype=dtype),
            "factor": layer.factor,
            "out_channels": layer.out_channels,
            "residual": torch.randn(y_shape, generator=generator, device=device, dtype=dtype) if residual else None,
        }

    x_elements, y_elements = batch * layer.in_channels * layer.side**2, batch * layer.out_channels * layer.out_side**2
    elements = x_elements + y_elements * (2 if residual else 1)
    if direction == "fwd+bwd":
        elements += y_elements + x_elements
    label = f"B{batch} C{layer.in_channels}->{layer.out_channels} f{layer.factor} {layer.side}px"
    return Case(label + (" +res" if residual else ""), dtype, direction, make_inputs, elements * dtype.itemsize)


def _quick_layers() -> list:
    """The first encoder shortcut (the largest), both latent ends at 1024 and 2048 px images,
    and the decoder's last (largest) shortcut."""
    return [
        _Shortcut(_UNSHUFFLE, 128, 256, 2, 1024),
        _Shortcut(_UNSHUFFLE, 1024, _LATENT_CHANNELS, 1, 32),
        _Shortcut(_UNSHUFFLE, 1024, _LATENT_CHANNELS, 1, 64),
        _Shortcut(_DUPLICATE, _LATENT_CHANNELS, 1024, 1, 32),
        _Shortcut(_DUPLICATE, 256, 128, 2, 512),
    ]


def _cases(quick: bool) -> list:
    """(layer, batch, residual, dtype, direction) for every case of the suite."""
    directions = ("fwd", "fwd+bwd")
    if quick:
        return [(layer, 1, True, torch.bfloat16, d) for layer in _quick_layers() for d in directions]
    # bf16 everywhere (the models' dtype); fp16 and fp32 at one size, with the residual.
    sizes = ((1, 1024), (1, 2048), (8, 512))  # (batch, image side)
    bf16 = [(layer, batch, residual, torch.bfloat16, d)
            for (batch, side), residual, d in itertools.product(sizes, (True, False), directions)
            for layer in _dcae_shortcuts(side)]
    others = [(layer, 1, True, dtype, d)
              for dtype, d in itertools.product((torch.float16, torch.float32), directions)
              for layer in _dcae_shortcuts(1024)]
    return bf16 + others


def benchmarks(quick: bool = False) -> list:
    ops = {
        _UNSHUFFLE: (shortcut.pixel_unshuffle_channel_avg, shortcut.pixel_unshuffle_channel_avg_reference),
        _DUPLICATE: (shortcut.channel_dup_pixel_shuffle, shortcut.channel_dup_pixel_shuffle_reference),
    }
    cases = _cases(quick)
    return [op_benchmark(name, [_case(*c) for c in cases if c[0].op == name], op, reference)
            for name, (op, reference) in ops.items()]
