"""Triton kernels for the channel RMSNorm `trms2d` (math in fastgen/ops/rms_norm_2d.py).

Each program holds a (BLOCK_C, BLOCK_P) tile: all C channels (BLOCK_C = C rounded up to a
power of two) of BLOCK_P pixels of one image, so the per-pixel channel reduction happens in
registers and x is read once, y written once. Tiles never straddle images, so the pixel index
s = h*W + w within an image is contiguous along the tile whenever W*stride_w == stride_h
(`FLAT_PIXELS`); Triton specializes stride arguments equal to 1, so for NCHW the pixel axis is
the one it vectorizes and coalesces, for channels_last the channel axis. The tile is shaped
for that: NCHW gets at least 16 pixels per row (32 bytes of bf16, one DRAM sector), channels_last
only as many pixels as keep the tile at ~4096 elements.

The backward is one pass too: each of a fixed number of programs walks tiles pid, pid + G, ...,
writes dx and keeps per-channel sums of dy * x * r and dy in registers, stored as one row of
a (G, C) float32 partial buffer; torch sums its rows, so dweight and dbias do not depend on
scheduling. Every tensor, weight and bias included, is addressed through its strides. Offsets
are int64 (DC-AE decoder maps at 2048 px exceed 2^31 elements), and so are the image, channel
and pixel indices they are built from (an image can hold 2^31 pixels); arithmetic is float32
only, loads converted first (the CPU interpreter gets bfloat16 arithmetic wrong).
"""
import torch
import triton
import triton.language as tl

from fastgen.kernels import LAUNCH_OPTIONS, sm_count


@triton.jit
def _tile(tile_index, C, HW, W, TILES_PER_IMAGE, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Image, channel and pixel indices of one tile, and its in-bounds mask."""
    b = (tile_index // TILES_PER_IMAGE).to(tl.int64)
    s = (tile_index % TILES_PER_IMAGE).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (c[:, None] < C) & (s[None, :] < HW)
    return b, c, s, mask


@triton.jit
def _offsets(b, c, s, W, sb, sc, sh, sw, FLAT_PIXELS: tl.constexpr):
    if FLAT_PIXELS:
        pixel = s * sw
    else:
        pixel = (s // W) * sh + (s % W) * sw
    return b * sb + c[:, None] * sc + pixel[None, :]


@triton.jit
def _trms2d_forward_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    C, HW, W, TILES_PER_IMAGE, eps,
    x_sb, x_sc, x_sh, x_sw,
    y_sb, y_sc, y_sh, y_sw,
    w_s, bias_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FLAT_PIXELS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b, c, s, mask = _tile(tl.program_id(0), C, HW, W, TILES_PER_IMAGE, BLOCK_C, BLOCK_P)
    x = tl.load(x_ptr + _offsets(b, c, s, W, x_sb, x_sc, x_sh, x_sw, FLAT_PIXELS), mask=mask, other=0.0)
    x = x.to(tl.float32)
    y = x * tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)[None, :]
    if HAS_WEIGHT:
        y *= tl.load(w_ptr + c * w_s, mask=c < C).to(tl.float32)[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + c * bias_s, mask=c < C).to(tl.float32)[:, None]
    y_offsets = _offsets(b, c, s, W, y_sb, y_sc, y_sh, y_sw, FLAT_PIXELS)
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _trms2d_backward_kernel(
    dy_ptr, x_ptr, w_ptr, dx_ptr, partial_ptr,
    C, HW, W, TILES_PER_IMAGE, NUM_TILES, eps,
    dy_sb, dy_sc, dy_sh, dy_sw,
    x_sb, x_sc, x_sh, x_sw,
    dx_sb, dx_sc, dx_sh, dx_sw,
    w_s,
    HAS_WEIGHT: tl.constexpr, FLAT_PIXELS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    channels = tl.arange(0, BLOCK_C)
    weight = tl.full((BLOCK_C,), 1.0, tl.float32)
    if HAS_WEIGHT:
        weight = tl.load(w_ptr + channels.to(tl.int64) * w_s, mask=channels < C, other=0.0).to(tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dy = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for tile_index in range(pid, NUM_TILES, tl.num_programs(0)):
        b, c, s, mask = _tile(tile_index, C, HW, W, TILES_PER_IMAGE, BLOCK_C, BLOCK_P)
        x = tl.load(x_ptr + _offsets(b, c, s, W, x_sb, x_sc, x_sh, x_sw, FLAT_PIXELS), mask=mask, other=0.0)
        dy = tl.load(dy_ptr + _offsets(b, c, s, W, dy_sb, dy_sc, dy_sh, dy_sw, FLAT_PIXELS), mask=mask, other=0.0)
        x = x.to(tl.float32)
        dy = dy.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)[None, :]
        xhat = x * rstd
        g = dy * weight[:, None]
        # dx = r*g - x*r^3*mean(g*x) = r * (g - xhat * mean(g * xhat))
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / C)[None, :])
        dx_offsets = _offsets(b, c, s, W, dx_sb, dx_sc, dx_sh, dx_sw, FLAT_PIXELS)
        tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        sum_dy_xhat += tl.sum(dy * xhat, axis=1)
        sum_dy += tl.sum(dy, axis=1)
    row = partial_ptr + pid.to(tl.int64) * 2 * C
    tl.store(row + channels, sum_dy_xhat, mask=channels < C)
    tl.store(row + C + channels, sum_dy, mask=channels < C)


class _Plan:
    """Tile shape, warps and tile count of one call (see the module docstring)."""

    def __init__(self, tensors, channels: int, height: int, width: int):
        self.flat_pixels = all(t.stride(2) == width * t.stride(3) or height == 1 for t in tensors)
        pixels_coalesce = self.flat_pixels and all(t.stride(3) == 1 for t in tensors)
        self.block_c = triton.next_power_of_2(channels)
        min_pixels = 16 if pixels_coalesce else 1
        self.block_p = min(max(min_pixels, 4096 // self.block_c), triton.next_power_of_2(height * width))
        self.num_warps = min(16, max(4, self.block_c * self.block_p // 512))
        self.tiles_per_image = triton.cdiv(height * width, self.block_p)

    def meta(self) -> dict:
        return dict(FLAT_PIXELS=self.flat_pixels, BLOCK_C=self.block_c, BLOCK_P=self.block_p,
                    num_warps=self.num_warps)


def _geometry(x: torch.Tensor) -> tuple:
    _, channels, height, width = x.shape
    return channels, height * width, width


def _channel_vector(vector, x) -> tuple:
    """(pointer, stride) of a (C,) weight or bias, any view; an absent one is never read and x
    stands in for its pointer."""
    return (x, 0) if vector is None else (vector, vector.stride(0))


def trms2d_forward(x, weight, bias, eps: float, *, out) -> None:
    """out = trms2d(x, weight, bias, eps)."""
    y = out
    if y.numel() == 0:
        return
    batch, channels, height, width = x.shape
    plan = _Plan((x, y), channels, height, width)
    (weight_arg, weight_stride), (bias_arg, bias_stride) = _channel_vector(weight, x), _channel_vector(bias, x)
    _trms2d_forward_kernel[(batch * plan.tiles_per_image,)](
        x, weight_arg, bias_arg, y,
        *_geometry(x), plan.tiles_per_image, eps,
        *x.stride(), *y.stride(), weight_stride, bias_stride,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **plan.meta(), **LAUNCH_OPTIONS,
    )


def _backward_programs(device: torch.device, num_tiles: int) -> int:
    """Enough programs to fill the GPU (4 per SM), fewer when there are fewer tiles; on the
    interpreter, which runs programs one after another, a few suffice."""
    sms = sm_count(device)
    per_device = 4 if sms is None else 4 * sms
    return max(1, min(num_tiles, per_device))


def trms2d_backward(grad, x, weight, bias, eps: float, *, out) -> None:
    """out = (dx, dweight, dbias) of trms2d for the output gradient grad; the bias does not
    enter them."""
    dx, dweight, dbias = out
    batch, channels, height, width = x.shape
    if x.numel() == 0:
        dx.zero_()
        dweight.zero_()
        dbias.zero_()
        return
    plan = _Plan((grad, x, dx), channels, height, width)
    num_tiles = batch * plan.tiles_per_image
    programs = _backward_programs(x.device, num_tiles)
    partial = torch.empty(programs, 2, channels, dtype=torch.float32, device=x.device)
    weight_arg, weight_stride = _channel_vector(weight, x)
    _trms2d_backward_kernel[(programs,)](
        grad, x, weight_arg, dx, partial,
        *_geometry(x), plan.tiles_per_image, num_tiles, eps,
        *grad.stride(), *x.stride(), *dx.stride(), weight_stride,
        HAS_WEIGHT=weight is not None, **plan.meta(), **LAUNCH_OPTIONS,
    )
    sums = partial.sum(0)
    dweight.copy_(sums[0])
    dbias.copy_(sums[1])
