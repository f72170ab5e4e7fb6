"""DC-AE residual-autoencoding shortcuts: space-to-channel with channel averaging, and its
adjoint, channel duplication followed by channel-to-space.

For x of shape (B, C, H, W) and an integer factor f:

`pixel_unshuffle_channel_avg(x, f, O, residual=None, scale=None)` -> (B, O, H/f, W/f)
    u[b, c*f*f + i*f + j, h, w] = x[b, c, h*f + i, w*f + j]      (pixel_unshuffle)
    g = C*f*f / O
    y[b, o, h, w] = scale * sum_{t<g} u[b, o*g + t, h, w]         (scale = 1/g: the mean)
    y += residual                                                 (the conv branch, if given)

`channel_dup_pixel_shuffle(x, f, O, residual=None, scale=None)` -> (B, O, H*f, W*f)
    r = O*f*f / C
    u[b, k, h, w] = x[b, k // r, h, w]                            (repeat_interleave by r)
    y[b, o, h*f + i, w*f + j] = scale * u[b, o*f*f + i*f + j, h, w]   (scale = 1: a copy)
    y += residual

The SPEC defines both ops without `scale`; it exists because each op is the other's adjoint up
to that factor, so each backward is one call of the other op with the right scale instead of a
call plus a separate multiply pass. f = 1 is the pure channel averaging / duplication at
DC-AE's latent ends. Sums accumulate in float32; outputs take x's dtype and memory layout
(channels_last in, channels_last out). Inputs and residual may have any strides: the kernels
index through strides and never copy.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastgen import _cuda
from fastgen.ops.registry import (CheckCase, Op, check_float_tensor, check_same_dtype_and_device, define_custom_op,
                                  random_tensor, register, register_autograd)


def _check_x_and_factor(op_name: str, x: torch.Tensor, factor: int, out_channels: int) -> None:
    check_float_tensor(op_name, "x", x)
    if x.dim() != 4:
        raise ValueError(f"{op_name}: x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if factor < 1:
        raise ValueError(f"{op_name}: factor must be >= 1, got {factor}")
    if out_channels < 1:
        raise ValueError(f"{op_name}: out_channels must be >= 1, got {out_channels}")


def _allocate_checked_output(op_name: str, x: torch.Tensor, shape: tuple, residual: Optional[torch.Tensor]) -> torch.Tensor:
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{op_name}: residual must be a tensor or None, got {type(residual).__name__}")
        if tuple(residual.shape) != shape:
            raise ValueError(f"{op_name}: residual must have the output shape {shape}, got {tuple(residual.shape)}")
        check_same_dtype_and_device(op_name, "residual", residual, x, "x")
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=layout)


def _unshuffle_group(x: torch.Tensor, factor: int, out_channels: int) -> int:
    _check_x_and_factor("pixel_unshuffle_channel_avg", x, factor, out_channels)
    _, channels, height, width = x.shape
    if height % factor or width % factor:
        raise ValueError(
            f"pixel_unshuffle_channel_avg: H={height} and W={width} must be divisible by factor={factor}"
        )
    if (channels * factor * factor) % out_channels:
        raise ValueError(
            f"pixel_unshuffle_channel_avg: C*factor^2 = {channels}*{factor}^2 = {channels * factor * factor} "
            f"must be a multiple of out_channels={out_channels}"
        )
    return channels * factor * factor // out_channels


def _duplication_repeats(x: torch.Tensor, factor: int, out_channels: int) -> int:
    _check_x_and_factor("channel_dup_pixel_shuffle", x, factor, out_channels)
    channels = x.shape[1]
    if (out_channels * factor * factor) % channels:
        raise ValueError(
            f"channel_dup_pixel_shuffle: out_channels*factor^2 = {out_channels}*{factor}^2 = "
            f"{out_channels * factor * factor} must be a multiple of C={channels}"
        )
    return out_channels * factor * factor // channels


def _allocate_unshuffle_output(x, factor, out_channels, residual=None, scale=None):
    _unshuffle_group(x, factor, out_channels)
    batch, _, height, width = x.shape
    shape = (batch, out_channels, height // factor, width // factor)
    return _allocate_checked_output("pixel_unshuffle_channel_avg", x, shape, residual)


def _allocate_shuffle_output(x, factor, out_channels, residual=None, scale=None):
    _duplication_repeats(x, factor, out_channels)
    batch, _, height, width = x.shape
    shape = (batch, out_channels, height * factor, width * factor)
    return _allocate_checked_output("channel_dup_pixel_shuffle", x, shape, residual)


def unshuffle_scale(x, factor, out_channels, scale) -> float:
    return 1.0 / _unshuffle_group(x, factor, out_channels) if scale is None else float(scale)


def shuffle_scale(scale) -> float:
    return 1.0 if scale is None else float(scale)


# torch.nn.functional.pixel_unshuffle and pixel_shuffle as reshape and permute: for a tensor without
# elements torch's pixel_unshuffle returns its input unchanged, in the wrong shape, and
# pixel_shuffle's backward calls it, so neither the reference nor its autograd would handle
# an empty batch or image.
def _pixel_unshuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    blocks = x.reshape(batch, channels, height // factor, factor, width // factor, factor)
    return blocks.permute(0, 1, 3, 5, 2, 4).reshape(batch, channels * factor * factor, height // factor,
                                                   width // factor)


def _pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    blocks = x.reshape(batch, channels // (factor * factor), factor, factor, height, width)
    return blocks.permute(0, 1, 4, 2, 5, 3).reshape(batch, channels // (factor * factor), height * factor,
                                                   width * factor)


def pixel_unshuffle_channel_avg_reference(x, factor, out_channels, residual=None, scale=None):
    """Eager formulation as DC-AE writes it: pixel_unshuffle, view into groups, mean, add."""
    group = _unshuffle_group(x, factor, out_channels)
    groups = _pixel_unshuffle(x, factor).unflatten(1, (out_channels, group))
    y = groups.mean(2) if scale is None else groups.sum(2) * scale
    return y if residual is None else y + residual


def channel_dup_pixel_shuffle_reference(x, factor, out_channels, residual=None, scale=None):
    """Eager formulation as DC-AE writes it: repeat_interleave, pixel_shuffle, add."""
    repeats = _duplication_repeats(x, factor, out_channels)
    y = x.repeat_interleave(repeats, dim=1) if repeats > 1 else x
    y = _pixel_shuffle(y, factor)
    y = y if scale is None else y * scale
    return y if residual is None else y + residual


def _check_case(label, x_shape, factor, out_channels, out_shape, layout="contiguous", with_residual=False, scale=None):
    def make_args(device, dtype, generator):
        x = random_tensor(x_shape, layout, device, dtype, generator)
        residual = random_tensor(out_shape, layout, device, dtype, generator) if with_residual else None
        return (x, factor, out_channels, residual, scale)

    return CheckCase(label, make_args)


def _unshuffle_cases():
    return [
        _check_case("down block f2 C8->16", (2, 8, 8, 12), 2, 16, (2, 16, 4, 6)),
        _check_case("latent f1 C24->4 +res", (1, 24, 5, 7), 1, 4, (1, 4, 5, 7), with_residual=True),
        _check_case("f2 channels_last +res", (2, 6, 6, 10), 2, 8, (2, 8, 3, 5), "channels_last", True),
        _check_case("f4 sliced scale=0.5", (1, 3, 8, 4), 4, 12, (1, 12, 2, 1), "sliced", scale=0.5),
    ]


def _shuffle_cases():
    return [
        _check_case("up block f2 C16->8", (2, 16, 4, 6), 2, 8, (2, 8, 8, 12)),
        _check_case("latent f1 C4->24 +res", (1, 4, 5, 7), 1, 24, (1, 24, 5, 7), with_residual=True),
        _check_case("f2 channels_last +res", (2, 8, 3, 5), 2, 6, (2, 6, 6, 10), "channels_last", True),
        _check_case("f4 sliced scale=2", (1, 12, 2, 3), 4, 3, (1, 3, 8, 12), "sliced", scale=2.0),
    ]


PIXEL_UNSHUFFLE_CHANNEL_AVG = register(Op(name="pixel_unshuffle_channel_avg",
                                          reference=pixel_unshuffle_channel_avg_reference,
                                          allocate_output=_allocate_unshuffle_output, check_cases=_unshuffle_cases))
CHANNEL_DUP_PIXEL_SHUFFLE = register(Op(name="channel_dup_pixel_shuffle", reference=channel_dup_pixel_shuffle_reference,
                                        allocate_output=_allocate_shuffle_output, check_cases=_shuffle_cases))


PIXEL_UNSHUFFLE_CHANNEL_AVG.implement_at("triton", "fastgen.kernels.shortcut:pixel_unshuffle_channel_avg")
CHANNEL_DUP_PIXEL_SHUFFLE.implement_at("triton", "fastgen.kernels.shortcut:channel_dup_pixel_shuffle")


@PIXEL_UNSHUFFLE_CHANNEL_AVG.implement("cuda")
def _unshuffle_cuda(x, factor, out_channels, residual, scale, *, out):
    _cuda.launch("pixel_unshuffle_channel_avg", x=x, y=out, residual=residual, factor=factor,
                 scale=unshuffle_scale(x, factor, out_channels, scale))


@CHANNEL_DUP_PIXEL_SHUFFLE.implement("cuda")
def _shuffle_cuda(x, factor, out_channels, residual, scale, *, out):
    _cuda.launch("channel_dup_pixel_shuffle", x=x, y=out, residual=residual, factor=factor, scale=shuffle_scale(scale))


@define_custom_op(PIXEL_UNSHUFFLE_CHANNEL_AVG)
def pixel_unshuffle_channel_avg(
    x: torch.Tensor,
    factor: int,
    out_channels: int,
    residual: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """y = scale * group sums of pixel_unshuffle(x, factor) (+ residual); scale None: the mean."""


@define_custom_op(CHANNEL_DUP_PIXEL_SHUFFLE)
def channel_dup_pixel_shuffle(
    x: torch.Tensor,
    factor: int,
    out_channels: int,
    residual: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """y = scale * pixel_shuffle(repeat_interleave(x), factor) (+ residual); scale None: 1."""


def _save_shape_and_scale(ctx, inputs, output, effective_scale):
    x, factor, _, residual, _ = inputs
    ctx.x_channels = x.shape[1]
    ctx.factor = factor
    ctx.scale = effective_scale
    ctx.has_residual = residual is not None


def _unshuffle_setup_context(ctx, inputs, output):
    x, factor, out_channels, _, scale = inputs
    _save_shape_and_scale(ctx, inputs, output, unshuffle_scale(x, factor, out_channels, scale))


def _shuffle_setup_context(ctx, inputs, output):
    _save_shape_and_scale(ctx, inputs, output, shuffle_scale(inputs[4]))


def _adjoint_backward(adjoint_op):
    """d/dx of scale * A(x) + residual is scale * A^T(grad); A^T is the other op."""
    def backward(ctx, grad):
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = adjoint_op(grad, ctx.factor, ctx.x_channels, None, ctx.scale)
        grad_residual = grad if ctx.has_residual and ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_residual, None

    return backward


register_autograd(pixel_unshuffle_channel_avg, _adjoint_backward(channel_dup_pixel_shuffle), _unshuffle_setup_context)
register_autograd(channel_dup_pixel_shuffle, _adjoint_backward(pixel_unshuffle_channel_avg), _shuffle_setup_context)
