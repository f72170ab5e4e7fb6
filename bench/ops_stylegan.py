"""Benchmarks of upfirdn2d, bias_act and filtered_lrelu (math in their modules of fastgen/ops) at StyleGAN2 /
StyleGAN3 layer shapes, against the eager formulation (zero insertion + pad + depthwise conv2d;
separate bias, activation, gain and clamp ops) and torch.compile of it.

Shapes follow StyleGAN2 at 1024 px: 512 channels up to 64 px, then 256, 128, 64 and 32 at
128, 256, 512 and 1024 px; batch 4 (32 images over 8 GPUs, the paper's setup). The generator
upsamples 2x (its skip / toRGB path and each up-conv layer), the residual discriminator
downsamples 2x. The filters are StyleGAN2's 4-tap [1, 3, 3, 1] (padding as its upsample2d /
downsample2d pad it, gain up^2 for upsampling) and a 12-tap one, StyleGAN3's longest
resampling filter. Labels give the batch, channels, input side, filter taps and direction
(up2 / down2). bias_act is measured as the layers use it: lrelu with StyleGAN's conv_clamp
256 on every synthesis conv output, and on the mapping network's FC layers (8 x 512).

Mixed precision as StyleGAN2-ADA trains: float16 channels_last for the high-resolution layers,
and float32 NCHW at a few sizes for comparison.

filtered_lrelu is measured as StyleGAN3's synthesis layers run it: 12-tap up and down filters
(fu, fd), the 2x temporary upsampling (up 2, down 2, padding 11/10 so the output keeps the
input's side), conv_clamp 256, a bias; plus the two ends of the network, up 2 / down 1 and
up 1 / down 2. Channels go from 512 at 16-128 px to 32 at 1024 px (StyleGAN3-T 1024 narrows
as the resolution grows), batch 4. Its eager formulation is StyleGAN3's reference path in the
input dtype: bias add, upfirdn2d(fu) (zero insertion, pad, conv2d), lrelu * gain, clamp,
upfirdn2d(fd), each op reading and writing the 4x-larger intermediate.

Bytes per call: x read and y written once (bias_act also reads b); fwd+bwd adds dy read and
dx written (bias_act's backward reads y or x once more). The filter stays constant (a buffer,
as in StyleGAN), so no filter gradient is computed. filtered_lrelu's fused kernels also write
and read a 2-bit code per intermediate sample in fwd+bwd: their own overhead, not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fastgen.ops import bias_act as bias_act_ops
from fastgen.ops import filtered_lrelu as filtered_lrelu_ops
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


def _resampling_case(channels, side, resampling, dtype, channels_last, direction) -> Case:
    shape = (_BATCH, channels, side, side)
    out_side = side * resampling.up // resampling.down

    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return {"x": _random(shape, channels_last, device, dtype, generator), "resampling": resampling}

    tensors = (1 + (out_side / side) ** 2) * (2 if direction == "fwd+bwd" else 1)
    work = int(tensors * _BATCH * channels * side * side * dtype.itemsize)
    kind = f"up{resampling.up}" if resampling.up > 1 else f"down{resampling.down}"
    label = f"B{_BATCH} C{channels} {side}px {resampling.taps}-tap {kind}" + (" cl" if channels_last else "")
    return Case(label, dtype, direction, make_inputs, work)


def _bias_act_case(shape, clamp, dtype, channels_last, direction) -> Case:
    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return {"x": _random(shape, channels_last, device, dtype, generator),
                "b": torch.randn(shape[1], generator=generator, device=device, dtype=dtype),
                "act": "lrelu", "clamp": clamp}

    elements = 1
    for size in shape:
        elements *= size
    work = elements * dtype.itemsize * (5 if direction == "fwd+bwd" else 2)
    label = "B{} ".format(shape[0]) + (f"C{shape[1]} {shape[2]}px" if len(shape) == 4 else f"FC {shape[1]}")
    label += " lrelu" + (f" clamp{clamp:g}" if clamp is not None else "") + (" cl" if channels_last else "")
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


def _bias_act_cases(quick: bool) -> list:
    cases = []
    for dtype, channels_last, stages in _layouts(quick):
        shapes = [(_BATCH, channels, side, side) for channels, side in stages] + [(_BATCH, 512)]
        for shape in shapes:
            for direction in ("fwd", "fwd+bwd"):
                cases.append(_bias_act_case(shape, 256.0, dtype, channels_last, direction))
                if not quick and len(shape) == 2:
                    cases.append(_bias_act_case(shape, None, dtype, channels_last, direction))
    return cases


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
    out_side = side * layer.up // layer.down

    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return {"x": _random(shape, channels_last, device, dtype, generator),
                "b": torch.randn(channels, generator=generator, device=device, dtype=dtype), "layer": layer}

    tensors = (1 + (out_side / side) ** 2) * (2 if direction == "fwd+bwd" else 1)
    work = int(tensors * _BATCH * channels * side * side * dtype.itemsize)
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
    return [
        op_benchmark("upfirdn2d", _resampling_cases(quick), _upfirdn2d_fused, _upfirdn2d_eager),
        op_benchmark("bias_act", _bias_act_cases(quick), bias_act_ops.bias_act, bias_act_ops.bias_act_reference),
        op_benchmark("filtered_lrelu", _filtered_lrelu_cases(quick), _filtered_lrelu_fused, _filtered_lrelu_eager),
    ]
