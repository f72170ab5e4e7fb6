"""Benchmarks of upfirdn2d (math in fastgen/ops/upfirdn2d.py) at StyleGAN2 / StyleGAN3 layer
shapes, against the eager formulation (zero insertion + pad + depthwise conv2d) and
torch.compile of it.

Shapes follow StyleGAN2 at 1024 px: 512 channels up to 64 px, then 256, 128, 64 and 32 at
128, 256, 512 and 1024 px; batch 4 (32 images over 8 GPUs, the paper's setup). The generator
upsamples 2x (its skip / toRGB path and each up-conv layer), the residual discriminator
downsamples 2x. The filters are StyleGAN2's 4-tap [1, 3, 3, 1] (padding as its upsample2d /
downsample2d pad it, gain up^2 for upsampling) and a 12-tap one, StyleGAN3's longest
resampling filter. Labels give the batch, channels, input side, filter taps and direction
(up2 / down2).

Mixed precision as StyleGAN2-ADA trains: float16 channels_last for the high-resolution layers,
and float32 NCHW at a few sizes for comparison.

Bytes per call: x read and y written once; fwd+bwd adds dy read and dx written. The filter
stays constant (a buffer, as in StyleGAN), so no filter gradient is computed.

The batch, stages, layouts and resampling filters defined here are also those of
ops_bias_act.py (the same StyleGAN2 layers) and ops_filtered_lrelu.py (the 12-tap filters and
the byte count of a layer that resamples x).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastgen.ops import upfirdn2d as upfirdn2d_ops

from .harness import Case, op_benchmark

_BATCH = 4
# (channels, side in px) of StyleGAN2-1024's stages, from 4 px up.
_STAGES = ((512, 4), (512, 8), (512, 16), (512, 32), (512, 64), (256, 128), (128, 256), (64, 512), (32, 1024))
_STYLEGAN2_TAPS = (1.0, 3.0, 3.0, 1.0)


@dataclass(frozen=True)
class _Resampling:
    """One resampling layer's constant arguments; the filter is made once per device and
    shared by every input copy (torch.compile then guards on one object, not hundreds)."""

    taps: int
    up: int
    down: int
    filters: dict = field(default_factory=dict, compare=False, hash=False)

    def filter(self, device) -> torch.Tensor:
        if device not in self.filters:
            taps = torch.tensor(_STYLEGAN2_TAPS) if self.taps == 4 else torch.kaiser_window(self.taps, periodic=False)
            self.filters[device] = (taps / taps.sum()).to(device)
        return self.filters[device]

    @property
    def padding(self) -> list:
        """StyleGAN's upsample2d / downsample2d padding: output side = input side * up / down."""
        if self.up > 1:
            return [(self.taps + self.up - 1) // 2, (self.taps - self.up) // 2] * 2
        return [(self.taps - self.down + 1) // 2, (self.taps - self.down) // 2] * 2

    @property
    def gain(self) -> float:
        return float(self.up * self.up)


def _upfirdn2d_eager(x, resampling):
    return upfirdn2d_ops.upfirdn2d_reference(x, resampling.filter(x.device), resampling.up, resampling.down,
                                             resampling.padding, False, resampling.gain)


def _upfirdn2d_fused(x, resampling):
    return upfirdn2d_ops.upfirdn2d(x, resampling.filter(x.device), resampling.up, resampling.down,
                                   resampling.padding, False, resampling.gain)


def _random(shape, channels_last, device, dtype, generator):
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _resampled_bytes(channels, side, out_side, dtype, direction) -> int:
    """The bytes of x (batch _BATCH, `channels`, side x side) read and y (out_side x out_side)
    written once; fwd+bwd adds dy read and dx written."""
    tensors = (1 + (out_side / side) ** 2) * (2 if direction == "fwd+bwd" else 1)
    return int(tensors * _BATCH * channels * side * side * dtype.itemsize)


def _resampling_case(channels, side, resampling, dtype, channels_last, direction) -> Case:
    shape = (_BATCH, channels, side, side)

    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return {"x": _random(shape, channels_last, device, dtype, generator), "resampling": resampling}

    work = _resampled_bytes(channels, side, side * resampling.up // resampling.down, dtype, direction)
    kind = f"up{resampling.up}" if resampling.up > 1 else f"down{resampling.down}"
    label = f"B{_BATCH} C{channels} {side}px {resampling.taps}-tap {kind}" + (" cl" if channels_last else "")
    return Case(label, dtype, direction, make_inputs, work)


def _layouts(quick: bool) -> list:
    """(dtype, channels_last, stages): float16 channels_last everywhere, float32 NCHW at a few."""
    if quick:
        return [(torch.float16, True, ((512, 32), (128, 256), (32, 1024)))]
    return [(torch.float16, True, _STAGES), (torch.float32, False, ((512, 16), (256, 128), (64, 512)))]


def _resampling_cases(quick: bool) -> list:
    cases = []
    for dtype, channels_last, stages in _layouts(quick):
        for channels, side in stages:
            # StyleGAN2 resamples with 4 taps; 12-tap filters are StyleGAN3's, in filtered_lrelu.
            for taps in (4,) if quick else (4, 12):
                for direction in ("fwd", "fwd+bwd"):
                    if side < 1024:  # the generator's last upsampling leaves 1024 px
                        cases.append(_resampling_case(channels, side, _Resampling(taps, 2, 1), dtype, channels_last,
                                                      direction))
                    if side > 4:  # the discriminator downsamples down to 4 px
                        cases.append(_resampling_case(channels, side, _Resampling(taps, 1, 2), dtype, channels_last,
                                                      direction))
    return cases


def benchmarks(quick: bool = False) -> list:
    return [op_benchmark("upfirdn2d", _resampling_cases(quick), _upfirdn2d_fused, _upfirdn2d_eager)]
