"""Benchmarks of bias_act (math in fastgen/ops/bias_act.py) at StyleGAN2 layer shapes, against
the eager formulation (separate bias, activation, gain and clamp ops) and torch.compile of it.

bias_act is measured as the layers use it: lrelu with StyleGAN's conv_clamp 256 on every
synthesis conv output, and on the mapping network's FC layers (8 x 512). The conv outputs are
StyleGAN2-1024's stages at batch 4, in the layouts of ops_upfirdn2d.py (its docstring gives the
shapes): float16 channels_last for the high-resolution layers, as StyleGAN2-ADA trains, and
float32 NCHW at a few sizes for comparison. Labels give the batch, channels and side (or FC
width), the activation, the clamp and the layout.

Bytes per call: x read and y written once (b, one value per channel, is not counted); fwd+bwd
adds dy read and dx written, and the backward reads y or x once more.
"""
from __future__ import annotations

import torch

from fastgen.ops import bias_act as bias_act_ops

from .harness import Case, op_benchmark
from .ops_upfirdn2d import _BATCH, _layouts, _random


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
    label = f"B{shape[0]} " + (f"C{shape[1]} {shape[2]}px" if len(shape) == 4 else f"FC {shape[1]}")
    label += " lrelu" + (f" clamp{clamp:g}" if clamp is not None else "") + (" cl" if channels_last else "")
    return Case(label, dtype, direction, make_inputs, work)


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


def benchmarks(quick: bool = False) -> list:
    return [op_benchmark("bias_act", _bias_act_cases(quick), bias_act_ops.bias_act, bias_act_ops.bias_act_reference)]
