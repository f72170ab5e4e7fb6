"""Triton kernel for upfirdn2d (math in fastgen/ops/upfirdn2d.py).

Polyphase, straight from the input: each program owns a tile of output pixels and, for
every output row oy, walks only the filter taps that land on real input rows,
i = i0(oy) + k*up_y (k < TAPS_Y = ceil(fh / up_y)), reading input row
ry = (oy*down_y - py0 + i) / up_y, and the same along x. Neither the zero-upsampled image nor
the padded one exists anywhere: padding and cropping are bounds checks on ry / rx, and
the zeros of the upsampling are taps never visited. A 2x upsampling with a 4-tap filter
costs 2 x 2 taps per output, not 4 x 4. No tap is multiplied by a zero of the padding
either (a tap off x weighs 0, and a row off x is skipped), so a NaN or infinite tap reaches
exactly the outputs that weight a pixel of x by it: the op's contract for non-finite taps.

Tiles are 3-D blocks (channels, rows, columns) of about 1024 outputs, ordered so that the
block's last axis is the one with unit stride: (C, H, W) for NCHW, (H, W, C) for
channels_last, so neighbouring lanes read and write neighbouring addresses in both layouts.
The grid is 1-D over (batch, channel tiles, row tiles, column tiles), columns fastest, so
programs that run together share input rows in L2. Every tensor is addressed through its
strides (views are read in place); every offset is int64, so any view of storage under 2^63
bytes is addressed without overflow.

Filters. A 2-D filter is gathered per (tap, output) from the small filter tensor (L1
resident). A separable (1-D) filter applies its row taps inside the column-tap loop, so one
fused pass costs TAPS_Y * TAPS_X loads per output. When that product exceeds
_MAX_FUSED_TAPS (a 12-tap filter: 36 taps at up=2, 144 at down=2), two 1-D passes are run
instead: along x into a float32 intermediate (B, C, H, out_w), then along y; that costs
TAPS_X + TAPS_Y loads per output plus one write and one read of the intermediate, which is
cheaper once the product is large. StyleGAN2's 4-tap resampling (4 taps at up=2, 16 at
down=2) always takes the fused pass. The threshold follows from these load counts; the
benchmark's 4-tap (fused) and 12-tap (two passes) cases are the timings that would move it.

Arithmetic is float32: loaded values are converted before use (the Triton CPU interpreter
computes bfloat16 arithmetic wrongly), the gain is applied once to the accumulator, and the
result is rounded once to the output dtype.
"""
import torch
import triton
import triton.language as tl

from fastgen.kernels import LAUNCH_OPTIONS
from fastgen.ops.upfirdn2d import parse_padding, parse_scaling

_MAX_FUSED_TAPS = 16
_OUTPUTS_PER_PROGRAM = 1024


@triton.jit
def _polyphase(o, DOWN: tl.constexpr, UP: tl.constexpr, shift, lift):
    """For output coordinates o: the first tap index i0 that lands on an input pixel, and
    that pixel's input coordinate r0. `shift` = lift*UP - pad0 keeps the modulo arguments
    non-negative (Triton's % truncates like C)."""
    t = o * DOWN + shift
    i0 = (UP - t % UP) % UP
    r0 = (t + i0) // UP - lift
    return i0, r0


@triton.jit
def _tap_weight(f_ptr, i, FH, stride, valid, FLIP: tl.constexpr):
    """Weight of tap i of a 1-D filter of FH taps: convolution reads it back to front."""
    tap = i if FLIP else FH - 1 - i
    return tl.load(f_ptr + tap.to(tl.int64) * stride, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _upfirdn2d_kernel(
    x_ptr, f_ptr, y_ptr,
    C, H, W, OUT_H, OUT_W,
    x_sb, x_sc, x_sh, x_sw,
    y_sb, y_sc, y_sh, y_sw,
    f_sy, f_sx, FH, FW,
    shift_x, lift_x, shift_y, lift_y,
    gain,
    tiles_x, tiles_y, tiles_c,
    UP_X: tl.constexpr, UP_Y: tl.constexpr, DOWN_X: tl.constexpr, DOWN_Y: tl.constexpr,
    TAPS_X: tl.constexpr, TAPS_Y: tl.constexpr,
    FILTER_2D: tl.constexpr, FILTER_X: tl.constexpr, FILTER_Y: tl.constexpr, FLIP: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    tile_x = pid % tiles_x
    rest = pid // tiles_x
    tile_y = rest % tiles_y
    rest = rest // tiles_y
    tile_c = rest % tiles_c
    b = (rest // tiles_c).to(tl.int64)

    if CHANNELS_LAST:
        oy = tile_y * BLOCK_H + tl.arange(0, BLOCK_H)[:, None, None]
        ox = tile_x * BLOCK_W + tl.arange(0, BLOCK_W)[None, :, None]
        c = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)[None, None, :]
    else:
        c = tile_c * BLOCK_C + tl.arange(0, BLOCK_C)[:, None, None]
        oy = tile_y * BLOCK_H + tl.arange(0, BLOCK_H)[None, :, None]
        ox = tile_x * BLOCK_W + tl.arange(0, BLOCK_W)[None, None, :]
    c_valid = c < C
    x_plane = x_ptr + b * x_sb + c.to(tl.int64) * x_sc

    i0_y, r0_y = _polyphase(oy, DOWN_Y, UP_Y, shift_y, lift_y)
    i0_x, r0_x = _polyphase(ox, DOWN_X, UP_X, shift_x, lift_x)

    acc = tl.zeros((BLOCK_C, BLOCK_H, BLOCK_W) if not CHANNELS_LAST else (BLOCK_H, BLOCK_W, BLOCK_C), tl.float32)
    for ky in tl.static_range(TAPS_Y):
        i = i0_y + ky * UP_Y
        ry = r0_y + ky
        tap_y = i < FH
        row_real = tap_y & (ry >= 0) & (ry < H)
        x_row = x_plane + ry.to(tl.int64) * x_sh
        row_acc = tl.zeros_like(acc)
        for kx in tl.static_range(TAPS_X):
            j = i0_x + kx * UP_X
            rx = r0_x + kx
            column_real = (j < FW) & (rx >= 0) & (rx < W)
            values = tl.load(x_row + rx.to(tl.int64) * x_sw, mask=row_real & column_real & c_valid,
                             other=0.0).to(tl.float32)
            # A tap off x (padding) weighs 0: 0 * 0 forms no product with it.
            if FILTER_2D:
                row_i = i if FLIP else FH - 1 - i
                col_j = j if FLIP else FW - 1 - j
                weight = tl.load(f_ptr + row_i.to(tl.int64) * f_sy + col_j.to(tl.int64) * f_sx,
                                 mask=row_real & column_real, other=0.0).to(tl.float32)
                row_acc += weight * values
            elif FILTER_X:
                row_acc += _tap_weight(f_ptr, j, FW, f_sx, column_real, FLIP) * values
            else:
                row_acc += values
        if FILTER_Y and not FILTER_2D:
            # A row off x is skipped, not weighted: its row_acc may hold inf * 0 from the taps.
            acc += tl.where(row_real, _tap_weight(f_ptr, i, FH, f_sy, tap_y, FLIP) * row_acc, 0.0)
        else:
            acc += row_acc

    out_valid = (oy < OUT_H) & (ox < OUT_W) & c_valid
    y_offsets = b * y_sb + c.to(tl.int64) * y_sc + oy.to(tl.int64) * y_sh + ox.to(tl.int64) * y_sw
    tl.store(y_ptr + y_offsets, (acc * gain).to(y_ptr.dtype.element_ty), mask=out_valid)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _block_shape(channels: int, out_h: int, out_w: int, channels_last: bool) -> tuple:
    """(BLOCK_C, BLOCK_H, BLOCK_W), powers of two with about _OUTPUTS_PER_PROGRAM outputs,
    widest along the unit-stride axis and never much wider than the tensor."""
    pow2 = triton.next_power_of_2
    if channels_last:
        block_c = min(pow2(channels), 64)
        block_w = min(pow2(out_w), max(1, 256 // block_c))
        block_h = min(pow2(out_h), max(1, _OUTPUTS_PER_PROGRAM // (block_c * block_w)))
    else:
        block_w = min(pow2(out_w), 64)
        block_h = min(pow2(out_h), max(1, 256 // block_w))
        block_c = min(pow2(channels), max(1, _OUTPUTS_PER_PROGRAM // (block_h * block_w)))
    return block_c, block_h, block_w


def _polyphase_origin(pad0: int, up: int) -> tuple:
    """(shift, lift) for _polyphase: lift*up >= pad0, so oy*down + shift is never negative."""
    lift = max(0, -(-pad0 // up))
    return lift * up - pad0, lift


def _launch(x, f, y, up, down, pad0, flip_filter, gain, filter_2d, filter_x, filter_y):
    """One pass: y = upfirdn2d(x) with up = (ux, uy), down = (dx, dy), pad0 = (px0, py0);
    the filter applies along the axes whose filter_* flag is set."""
    batch, channels, height, width = x.shape
    out_h, out_w = y.shape[2], y.shape[3]
    if y.numel() == 0:
        return
    if f is None:
        f_tensor, f_sy, f_sx, fh, fw = y, 0, 0, 1, 1  # never read: every axis is unfiltered
    elif filter_2d:
        f_tensor, (f_sy, f_sx), (fh, fw) = f, f.stride(), f.shape
    else:
        f_tensor, f_sy, f_sx = f, f.stride(0), f.stride(0)
        fh = f.shape[0] if filter_y else 1
        fw = f.shape[0] if filter_x else 1
    channels_last = _is_channels_last(y)
    block_c, block_h, block_w = _block_shape(channels, out_h, out_w, channels_last)
    tiles = (triton.cdiv(out_w, block_w), triton.cdiv(out_h, block_h), triton.cdiv(channels, block_c))
    shift_x, lift_x = _polyphase_origin(pad0[0], up[0])
    shift_y, lift_y = _polyphase_origin(pad0[1], up[1])
    grid = (batch * tiles[0] * tiles[1] * tiles[2],)
    _upfirdn2d_kernel[grid](
        x, f_tensor, y,
        channels, height, width, out_h, out_w,
        *x.stride(), *y.stride(),
        f_sy, f_sx, fh, fw,
        shift_x, lift_x, shift_y, lift_y,
        gain,
        *tiles,
        UP_X=up[0], UP_Y=up[1], DOWN_X=down[0], DOWN_Y=down[1],
        TAPS_X=triton.cdiv(fw, up[0]), TAPS_Y=triton.cdiv(fh, up[1]),
        FILTER_2D=filter_2d, FILTER_X=filter_x, FILTER_Y=filter_y, FLIP=flip_filter,
        CHANNELS_LAST=channels_last,
        BLOCK_C=block_c, BLOCK_H=block_h, BLOCK_W=block_w,
        num_warps=4, **LAUNCH_OPTIONS,
    )


def upfirdn2d(x, f, up, down, padding, flip_filter: bool, gain, *, out) -> None:
    """out = upfirdn2d(x, f, ...), up / down and padding in any form the op takes."""
    up, down = parse_scaling("up", up), parse_scaling("down", down)
    px0, px1, py0, py1 = parse_padding(padding)
    gain = float(gain)
    separable = f is not None and f.dim() == 1
    taps = triton.cdiv(f.shape[0], up[0]) * triton.cdiv(f.shape[0], up[1]) if separable else 0
    if taps <= _MAX_FUSED_TAPS:
        filtered = f is not None
        _launch(x, f, out, up, down, (px0, py0), flip_filter, gain, not separable and filtered, filtered, filtered)
        return
    batch, channels, height, _ = x.shape
    layout = torch.channels_last if _is_channels_last(out) else torch.contiguous_format
    along_x = torch.empty((batch, channels, height, out.shape[3]), dtype=torch.float32, device=x.device,
                          memory_format=layout)
    _launch(x, f, along_x, (up[0], 1), (down[0], 1), (px0, 0), flip_filter, 1.0, False, True, False)
    _launch(along_x, f, out, (1, up[1]), (1, down[1]), (0, py0), flip_filter, gain, False, False, True)
