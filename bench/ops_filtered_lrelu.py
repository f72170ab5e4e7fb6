"""Benchmarks of filtered_lrelu (math in fastgen/ops/filtered_lrelu.py) at StyleGAN3 layer
shapes, against its eager formulation and torch.compile of it.

filtered_lrelu is measured as StyleGAN3's synthesis layers run it: 12-tap up and down filters
(fu, fd; the 12-tap resampling filters of ops_upfirdn2d.py), the 2x temporary upsampling (up 2,
down 2, padding 11/10 so the output keeps the input's side), conv_clamp 256, a bias; plus the
two ends of the network, up 2 / down 1 and up 1 / down 2. Channels go from 512 at 16-128 px to
32 at 1024 px (StyleGAN3-T 1024 narrows as the resolution grows), batch 4. Its eager
formulation is StyleGAN3's reference path in the input dtype: bias add, upfirdn2d(fu) (zero
insertion, pad, conv2d), lrelu * gain, clamp, upfirdn2d(fd), each op reading and writing the
4x-larger intermediate. Labels give the batch, channels, input side, filter taps, up and down
factors and the layout.

Bytes per call: x read and y written once; fwd+bwd adds dy read and dx written. The filters
stay constant (buffers, as in StyleGAN), so no filter gradient is computed. The fused kernels
also write and read a 2-bit code per intermediate sample in fwd+bwd: their own overhead, not
counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fastgen.ops import bias_act as bias_act_ops
from fastgen.ops import filtered_lrelu as filtered_lrelu_ops
from fastgen.ops import upfirdn2d as upfirdn2d_ops

from .harness import Case, op_benchmark
from .ops_upfirdn2d import _BATCH, _random, _resampled_bytes, _Resampling

# StyleGAN3 (channels, side in px) for the up 2 / down 2 layers, from 16 px up.
_STYLEGAN3_LAYERS = ((512, 16), (512, 32), (512, 64), (512, 128), (256, 256), (128, 512), (64, 1024), (32, 1024))
_STYLEGAN3_CLAMP = 256.0


@dataclass(frozen=True)
class _FilteredLayer:
    """A StyleGAN3 layer's constant filtered_lrelu arguments (filters shared like _Resampling's)."""

    up: int
    down: int
    fu: _Resampling = field(default_factory=lambda: _Resampling(12, 2, 1))
    fd: _Resampling = field(default_factory=lambda: _Resampling(12, 1, 2))

    def filters(self, device) -> tuple:
        return (self.fu.filter(device) if self.up > 1 else None, self.fd.filter(device) if self.down > 1 else None)

    @property
    def padding(self) -> list:
        """Output side = input side * up / down, as StyleGAN3 pads for its 'valid' layers."""
        halo = 11 * (self.up > 1) + 11 * (self.down > 1)  # (taps - 1) of each filter that exists
        total = halo - self.down + 1
        return [(total + 1) // 2, total // 2] * 2


def _filtered_lrelu_eager(x, b, layer):
    """StyleGAN3's reference path in x's dtype: every step a separate eager op."""
    fu, fd = layer.filters(x.device)
    z = upfirdn2d_ops.upfirdn2d_reference(x + b[:, None, None], fu, layer.up, 1, layer.padding, False,
                                          float(layer.up**2))
    a = bias_act_ops.bias_act_reference(z, None, "lrelu", gain=math.sqrt(2), clamp=_STYLEGAN3_CLAMP)
    return upfirdn2d_ops.upfirdn2d_reference(a, fd, 1, layer.down, 0, False, 1.0)


def _filtered_lrelu_fused(x, b, layer):
    fu, fd = layer.filters(x.device)
    return filtered_lrelu_ops.filtered_lrelu(x, fu, fd, b, layer.up, layer.down, layer.padding,
                                             clamp=_STYLEGAN3_CLAMP)


def _filtered_lrelu_case(channels, side, layer, dtype, channels_last, direction) -> Case:
    shape = (_BATCH, channels, side, side)

    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return {"x": _random(shape, channels_last, device, dtype, generator),
                "b": torch.randn(channels, generator=generator, device=device, dtype=dtype), "layer": layer}

    work = _resampled_bytes(channels, side, side * layer.up // layer.down, dtype, direction)
    label = f"B{_BATCH} C{channels} {side}px 12-tap up{layer.up} down{layer.down}" + (" cl" if channels_last else "")
    return Case(label, dtype, direction, make_inputs, work)


def _filtered_lrelu_cases(quick: bool) -> list:
    """float16 NCHW (StyleGAN3's high-resolution layers run in float16) at every layer, the two
    ends of the network, and float32 / channels_last at a few sizes."""
    body = _FilteredLayer(2, 2)
    layers = [(c, side, body, torch.float16, False) for c, side in _STYLEGAN3_LAYERS]
    layers += [(64, 512, _FilteredLayer(2, 1), torch.float16, False),
               (64, 1024, _FilteredLayer(1, 2), torch.float16, False)]
    layers += [(c, side, body, dtype, channels_last) for c, side in ((512, 64), (128, 512))
               for dtype, channels_last in ((torch.float32, False), (torch.float16, True))]
    if quick:
        layers = [layers[i] for i in (2, 5, 6)]
    return [_filtered_lrelu_case(*layer, direction) for layer in layers for direction in ("fwd", "fwd+bwd")]


def benchmarks(quick: bool = False) -> list:
    return [op_benchmark("filtered_lrelu", _filtered_lrelu_cases(quick), _filtered_lrelu_fused, _filtered_lrelu_eager)]
