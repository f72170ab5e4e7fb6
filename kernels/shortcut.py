"""Triton kernels for the DC-AE shortcuts (math in fastgen/ops/shortcut.py).

Both kernels give each program BLOCK output elements in the output's own memory order (NCHW
or channels_last: whichever makes consecutive lanes write consecutive addresses) and address
every tensor through its strides, so views and channels_last inputs are read in place.
Offsets are int64: DC-AE decoder activations at 2048 px exceed 2^31 elements.

Arithmetic happens in float32 only (loads are converted before use): besides being the
contract, the Triton CPU interpreter computes bfloat16 arithmetic wrongly, while conversions
are exact.
"""
import torch
import triton
import triton.language as tl

from fastgen.kernels import LAUNCH_OPTIONS
from fastgen.ops.shortcut import shuffle_scale, unshuffle_scale


@triton.jit
def _output_coordinates(n, C, H, W, CHANNELS_LAST: tl.constexpr):
    """Split a linear index in the output's memory order into (b, c, h, w)."""
    if CHANNELS_LAST:
        c = n % C
        rest = n // C
        w = rest % W
        rest = rest // W
        h = rest % H
        b = rest // H
    else:
        w = n % W
        rest = n // W
        h = rest % H
        rest = rest // H
        c = rest % C
        b = rest // C
    return b, c, h, w


@triton.jit
def _pixel_unshuffle_channel_sum_kernel(
    x_ptr, residual_ptr, y_ptr,
    total, OUT_C, OUT_H, OUT_W, GROUP,
    x_sb, x_sc, x_sh, x_sw,
    r_sb, r_sc, r_sh, r_sw,
    y_sb, y_sc, y_sh, y_sw,
    scale,
    FACTOR: tl.constexpr, HAS_RESIDUAL: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_GROUP: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = n < total
    b, o, h, w = _output_coordinates(n, OUT_C, OUT_H, OUT_W, CHANNELS_LAST)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t0 in range(0, GROUP, BLOCK_GROUP):
        t = t0 + tl.arange(0, BLOCK_GROUP)
        # unshuffled channel k = o*GROUP + t  ->  source channel and sub-pixel (i, j)
        k = o[:, None] * GROUP + t[None, :]
        c = k // (FACTOR * FACTOR)
        sub = k % (FACTOR * FACTOR)
        i = sub // FACTOR
        j = sub % FACTOR
        offsets = (b[:, None] * x_sb + c * x_sc + (h[:, None] * FACTOR + i) * x_sh
                   + (w[:, None] * FACTOR + j) * x_sw)
        mask = in_range[:, None] & (t[None, :] < GROUP)
        values = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(values, axis=1)
    y = acc * scale
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + b * r_sb + o * r_sc + h * r_sh + w * r_sw, mask=in_range).to(tl.float32)
    tl.store(y_ptr + b * y_sb + o * y_sc + h * y_sh + w * y_sw, y.to(y_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _channel_dup_pixel_shuffle_kernel(
    x_ptr, residual_ptr, y_ptr,
    total, OUT_C, OUT_H, OUT_W, REPEATS,
    x_sb, x_sc, x_sh, x_sw,
    r_sb, r_sc, r_sh, r_sw,
    y_sb, y_sc, y_sh, y_sw,
    scale,
    FACTOR: tl.constexpr, HAS_RESIDUAL: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = n < total
    b, o, hy, wy = _output_coordinates(n, OUT_C, OUT_H, OUT_W, CHANNELS_LAST)
    h = hy // FACTOR
    w = wy // FACTOR
    # shuffled channel k = o*f*f + i*f + j holds the duplicate of source channel k // REPEATS
    k = o * (FACTOR * FACTOR) + (hy % FACTOR) * FACTOR + (wy % FACTOR)
    c = k // REPEATS
    y = tl.load(x_ptr + b * x_sb + c * x_sc + h * x_sh + w * x_sw, mask=in_range).to(tl.float32) * scale
    if HAS_RESIDUAL:
        y += tl.load(residual_ptr + b * r_sb + o * r_sc + hy * r_sh + wy * r_sw, mask=in_range).to(tl.float32)
    tl.store(y_ptr + b * y_sb + o * y_sc + hy * y_sh + wy * y_sw, y.to(y_ptr.dtype.element_ty), mask=in_range)


# Elements per program: enough loads in flight to cover DRAM latency without spilling registers.
_ELEMENTS_PER_PROGRAM = 1024


def _residual_args(residual, y):
    # Without a residual the kernel never reads it; y stands in for the pointer.
    return (y, (0, 0, 0, 0)) if residual is None else (residual, residual.stride())


def _launch(kernel, x, y, residual, factor, scale, channel_ratio, block=_ELEMENTS_PER_PROGRAM, **meta):
    residual_tensor, residual_strides = _residual_args(residual, y)
    total = y.numel()
    if total == 0:
        return
    channels_last = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    grid = (triton.cdiv(total, block),)
    kernel[grid](
        x, residual_tensor, y,
        total, y.shape[1], y.shape[2], y.shape[3], channel_ratio,
        *x.stride(), *residual_strides, *y.stride(),
        scale,
        FACTOR=factor, HAS_RESIDUAL=residual is not None, CHANNELS_LAST=channels_last,
        BLOCK=block, **meta, **LAUNCH_OPTIONS,
    )


def pixel_unshuffle_channel_avg(x, factor: int, out_channels: int, residual, scale, *, out) -> None:
    """out = scale * (group sums of pixel_unshuffle(x)) (+ residual); scale defaults to the
    group's 1 / size, an average."""
    group = x.shape[1] * factor * factor // out.shape[1]
    block_group = min(triton.next_power_of_2(group), 16)
    _launch(_pixel_unshuffle_channel_sum_kernel, x, out, residual, factor,
            unshuffle_scale(x, factor, out_channels, scale), group,
            block=_ELEMENTS_PER_PROGRAM // block_group, BLOCK_GROUP=block_group)


def channel_dup_pixel_shuffle(x, factor: int, out_channels: int, residual, scale, *, out) -> None:
    """out = scale * pixel_shuffle(repeat_interleave(x)) (+ residual)."""
    repeats = out.shape[1] * factor * factor // x.shape[1]
    _launch(_channel_dup_pixel_shuffle_kernel, x, out, residual, factor, shuffle_scale(scale), repeats)
