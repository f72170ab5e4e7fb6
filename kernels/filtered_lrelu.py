"""Triton kernels for filtered_lrelu (math in fastgen/ops/filtered_lrelu.py).

One kernel serves the forward and the backward, because both have the same shape: a linear
upsampling FIR (stage 1), a pointwise factor, a linear downsampling FIR (stage 2).

    forward:   x + b --[fu, up]--> z --lrelu, clamp (codes out)--> a --[fd, down]--> y
    backward:  dy ----[fd^T, down]--> da --* d(codes in)---------> dz --[fu^T, up]--> dx

Each program owns one channel plane's tile of outputs and does everything on chip:

1. Load the input tile plus its halo once (BI x BI, masked at the borders: padding, cropping
   and the zeros of the upsampling are never materialised; the bias goes on real pixels only).
2. Stage 1 as two small matrix products, Z = Uy @ X @ Ux^T. A 1-D FIR along one axis of a tile
   is a banded matrix whose entry [t, s] is the tap linking mid sample t to input sample s, zero
   off the band and between the upsampling phases: the polyphase structure lives in that
   matrix. tl.dot multiplies its zeros too (about BI / (taps / up) times more products than the
   taps alone), but on tensor cores and with every operand in registers, where gathering taps
   from a shared tile one by one is not expressible in Triton. Z stays on chip: the
   up^2-larger intermediate never reaches global memory.
3. The pointwise step in float32: the forward applies gain, leaky ReLU and clamp and (when the
   backward will need it) stores a 2-bit code per sample of z; the backward multiplies by the
   derivative the code stands for.
4. Stage 2 the same way, Y = Dy @ A @ Dx^T, and one masked store of the valid outputs. The
   backward also stores its tile's float32 sum of dx, one partial per program, which torch
   reduces to db per channel (deterministic, no atomics, no second read of dx, and no float16
   rounding of dx before the sum).

A non-separable (2-D) filter is split on the host into a sum of separable ones by its SVD
(rank <= min(fh, fw), exact in float64; terms below float32 resolution dropped), and each stage
loops over those terms (a real loop: unrolled, 12 terms compile for minutes and spill); a 1-D
filter is rank 1, None the 1 x 1 identity. The tables are built once per filter tensor
(fastgen.ops.filtered_lrelu.filter_tables, shared with the CUDA kernel).

Tiles overlap by the filters' halo: a tile of BO outputs per axis computes BM mid samples from
BI inputs, of which only VO outputs (VO <= BO, host-computed from the filter lengths so that
every tap a valid output needs is inside the tile) are stored; tile t covers outputs
[t*VO, (t+1)*VO). The wasted work is the price of power-of-two blocks; _blocks() picks the
(BI, BM, BO) with the fewest multiply-adds per stored output. The forward's codes are stored by
the tile that "owns" them (mid samples [t*VO*down, (t+1)*VO*down), the last tile up to the end)
so every code is written exactly once.

Codes are 2 bits per sample of z (as in StyleGAN3's CUDA kernel), four consecutive columns to a
byte, so they cost an eighth of z's bytes in float16 (int8 codes would cost half). The forward
tiles columns so that a tile's owned span VO*down is a multiple of 4: no byte is shared by two
tiles, and each is written once, whole. Codes are written only when a gradient is needed.

Operand precision. Stage 1 of the forward runs in float32 (input_precision="ieee": exact float32
FMA) for every dtype, because z decides the codes: a float16 z would flip the sign of samples
within float16 rounding of 0, where the gradient jumps, and disagree with the reference
(measured: a few per 10^4 samples, each a visible error in dx). Stage 2, and both stages of the
backward, run in float16 on tensor cores for float16 inputs (float32 accumulation; operands
rounded to float16) when the stage's filter is one term (1-D or a separable 2-D filter); a 2-D
filter of several terms stays in float32: the terms of an SVD split cancel each other, and
rounding each to float16 cost 2x-3x the result's tolerance (measured); so does a stage whose
filter, or the previous stage's, has a tap past 2^14 (_taps_fit_float16). A float16 stage
scales its input by a power of two where a huge input would overflow float16, and a tap table by
another where its largest tap passes 2^14 (only inside CUDA graph capture, _taps_fit_float16),
so an overflow gives the reference's infinity, not NaN. Everything else runs in float32:
bfloat16 has too few mantissa bits to round the intermediate to, and the Triton CPU interpreter
cannot multiply bfloat16 matrices.

Non-finite inputs: tl.dot also multiplies the zeros off the band, and 0 * inf is NaN, so an
Inf or NaN in a stage's input or taps turns its whole tile's outputs to NaN, where the op's
contract reaches only the filters' support over real samples (and may clamp an Inf to a finite
value): the op's docstring states this weaker promise. A NaN never comes out finite: the clamp
propagates it, as torch.clamp does. The codes must be exact all the same (the backward's slopes
come from them), so the forward with codes computes stage 1 of a tile whose z holds NaN or inf
(from its input, a tap or an overflow) again as a direct sum over real samples (_real_samples_upsampling_fir, one masked load per tap:
slow, but only for such tiles). Only the with-codes variants compile it; ptxas for sm_90: the
float16 12-tap layer's 77 -> 111 registers, no spills; the float32 and bfloat16 ones, which
spilled before (120 / 172 bytes), now 164 / 132.

Every tensor, the bias included, is addressed through its strides (NCHW, channels_last, sliced
views); every offset is int64. channels_last tensors are read with a stride of C between
neighbours: correct, not coalesced.
"""
import math
import weakref

import torch
import triton
import triton.language as tl

from fastgen.kernels import LAUNCH_OPTIONS
from fastgen.kernels._convert import to_float32
from fastgen.ops.filtered_lrelu import FusedPass, backward_pass, forward_pass

_FORWARD, _FORWARD_WITH_CODES, _BACKWARD = 0, 1, 2
# Half-filtered float16 rows stay below this (_separable_fir): 2^14, a factor 2 under
# float16's largest power of two, for log2's rounding.
_FLOAT16_SAFE_ROW = tl.constexpr(16384.0)
_MAX_MID_BLOCK = 128
# A tap table holds fewer taps than a mid tile has samples (_blocks).
_MAX_TABLE_TAPS = tl.constexpr(_MAX_MID_BLOCK)
_CODE_ALIGNMENT = 4  # codes per byte


@triton.jit
def _banded(w_ptr, K, k):
    """Filter taps w[k] where 0 <= k < K, zero elsewhere (off the band, between phases)."""
    return tl.load(w_ptr + k, mask=(k >= 0) & (k < K), other=0.0)


@triton.jit
def _float16_safe_exponent(size):
    """The power of two e >= 0 with size / 2^e <= 2^14 (_FLOAT16_SAFE_ROW): 0 for a size
    already there, and for a non-finite one, which has no scale to find."""
    exponent = tl.where(size > _FLOAT16_SAFE_ROW, tl.ceil(tl.log2(size / _FLOAT16_SAFE_ROW)), 0.0)
    return tl.where(exponent < 128.0, exponent, 0.0)


@triton.jit
def _separable_fir(src, wy_ptr, wx_ptr, KY, KX, ky, kx_t, RANK: tl.constexpr, DTYPE: tl.constexpr,
                   ROWS: tl.constexpr, COLS: tl.constexpr):
    """sum_r Wy_r @ src @ Wx_r^T in float32: Wy_r[i, s] is tap ky[i, s] of term r's row table,
    Wx_r^T[s, j] tap kx_t[s, j] of its column table (_banded), operands rounded to DTYPE.

    In float16 (one term, _launch), the taps, src and the half-filtered rows Wy @ src must
    stay inside float16's range: rounded to infinities (a huge tap or input), the next
    product's zeros off the band would turn them to NaN where the float32 sum is an infinity
    or finite. So each table whose largest tap passes 2^14 enters divided by the power of two
    that brings it there, src by the one that bounds the half-filtered rows by 2^14 (exact,
    and 1 for every filter and tile below those sizes), and the float32 sum is scaled back. A
    table so divided rounds its taps below 2^-24 of its largest to float16 subnormals or 0."""
    row_exponent = 0.0
    column_exponent = 0.0
    exponent = 0.0
    if DTYPE == tl.float16:
        taps = tl.arange(0, _MAX_TABLE_TAPS)
        row_taps = tl.abs(tl.load(wy_ptr + taps, mask=taps < KY, other=0.0))
        row_exponent = _float16_safe_exponent(tl.max(row_taps))
        column_exponent = _float16_safe_exponent(tl.max(tl.abs(tl.load(wx_ptr + taps, mask=taps < KX, other=0.0))))
        row_taps_l1 = tl.sum(row_taps) * tl.exp2(-row_exponent)
        exponent = _float16_safe_exponent(tl.max(tl.abs(src)) * tl.maximum(row_taps_l1, 1.0))
        src = src * tl.exp2(-exponent)
    src = src.to(DTYPE)
    total = tl.zeros((ROWS, COLS), tl.float32)
    for r in range(RANK):  # a loop, not unrolled: 12 unrolled terms spill and compile for minutes
        w_y = (_banded(wy_ptr + r * KY, KY, ky) * tl.exp2(-row_exponent)).to(DTYPE)
        w_x_t = (_banded(wx_ptr + r * KX, KX, kx_t) * tl.exp2(-column_exponent)).to(DTYPE)
        rows_done = tl.dot(w_y, src, input_precision="ieee").to(DTYPE)
        total += tl.dot(rows_done, w_x_t, input_precision="ieee")
    if DTYPE == tl.float16:
        # One factor at a time: each is finite where their product could overflow float32.
        total = total * tl.exp2(exponent) * tl.exp2(row_exponent) * tl.exp2(column_exponent)
    return total


@triton.jit
def _real_samples_upsampling_fir(src_plane, src_sh, src_sw, bias, IN_H, IN_W, wy_ptr, wx_ptr, KY, KX, m_y, m_x,
                                 pad_y, pad_x, UP: tl.constexpr, RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
                                 ROWS: tl.constexpr, COLS: tl.constexpr):
    """Stage 1 of the mid samples (m_y, m_x) as the op's contract states it, one masked product
    per tap: tap (ky, kx) meets input q = (m - pad + k) / UP only where that division is exact
    and q lies inside the input, so a NaN or infinite input reaches exactly the mid samples
    that weight it. For a tile holding one (_filtered_lrelu_kernel), where _separable_fir's
    zeros off the band would make the whole tile NaN and its codes wrong."""
    total = tl.zeros((ROWS, COLS), tl.float32)
    for ky in range(0, KY):
        ny = m_y - pad_y + ky
        q_y = ny // UP
        row_real = (ny % UP == 0) & (q_y >= 0) & (q_y < IN_H)  # C remainder: 0 exactly when UP divides ny
        for kx in range(0, KX):
            nx = m_x - pad_x + kx
            q_x = nx // UP
            real = row_real & (nx % UP == 0) & (q_x >= 0) & (q_x < IN_W)
            # A part's zero factor adds nothing: a non-finite filter is split by rows, and a NaN
            # of row r's part times the other rows' zero factors would be NaN in every row.
            tap = 0.0
            for r in range(RANK):
                wy = tl.load(wy_ptr + r * KY + ky)
                wx = tl.load(wx_ptr + r * KX + kx)
                tap += tl.where((wy == 0.0) | (wx == 0.0), 0.0, wy * wx)
            v = to_float32(tl.load(src_plane + q_y.to(tl.int64) * src_sh + q_x.to(tl.int64) * src_sw, mask=real,
                                    other=0.0))
            if HAS_BIAS:
                v += bias
            total += tl.where(real, tap * v, 0.0)
    return total


@triton.jit
def _stage1_origin(o0, DOWN: tl.constexpr, UP: tl.constexpr, pad1, pad2, lift):
    """(m0, q0): first mid and input sample of a tile whose first output is o0. q0 is the
    first input whose upsampled position m0 - pad1 + k can reach, ceil((m0 - pad1) / UP);
    `lift` keeps the division's argument non-negative (Triton's // truncates like C)."""
    m0 = o0 * DOWN - pad2
    q0 = (m0 - pad1 + lift * UP + UP - 1) // UP - lift
    return m0, q0


@triton.jit
def _filtered_lrelu_kernel(
    src_ptr, bias_ptr, dst_ptr, codes_ptr, partial_ptr,
    w1y_ptr, w1x_ptr, w2y_ptr, w2x_ptr,
    C, IN_H, IN_W, MID_H, MID_W, OUT_H, OUT_W,
    src_sb, src_sc, src_sh, src_sw,
    dst_sb, dst_sc, dst_sh, dst_sw,
    codes_sb, codes_sc, codes_sh, codes_sw,
    bias_s,
    K1Y, K1X, K2Y, K2X,
    pad1_y, pad1_x, pad2_y, pad2_x, lift_y, lift_x,
    VO_Y, VO_X, tiles_y, tiles_x,
    gain, slope, clamp,
    UP: tl.constexpr, DOWN: tl.constexpr, RANK1: tl.constexpr, RANK2: tl.constexpr,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CLAMP: tl.constexpr, PARTIAL_SUMS: tl.constexpr,
    STAGE1_DTYPE: tl.constexpr, STAGE2_DTYPE: tl.constexpr,
    BI: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr,
):
    pid = tl.program_id(0)
    tile_x = pid % tiles_x
    rest = pid // tiles_x
    tile_y = rest % tiles_y
    plane = rest // tiles_y
    b = (plane // C).to(tl.int64)
    c = plane % C

    o0_y, o0_x = tile_y * VO_Y, tile_x * VO_X
    m0_y, q0_y = _stage1_origin(o0_y, DOWN, UP, pad1_y, pad2_y, lift_y)
    m0_x, q0_x = _stage1_origin(o0_x, DOWN, UP, pad1_x, pad2_x, lift_x)

    s_col = tl.arange(0, BI)[:, None]   # input samples as rows of a matrix
    s_row = tl.arange(0, BI)[None, :]   # ... and as columns
    t_col = tl.arange(0, BM)[:, None]
    t_row = tl.arange(0, BM)[None, :]
    o_col = tl.arange(0, BO)[:, None]
    o_row = tl.arange(0, BO)[None, :]

    # 1. The input tile, halo included.
    q_y = q0_y + s_col
    q_x = q0_x + s_row
    inside = (q_y >= 0) & (q_y < IN_H) & (q_x >= 0) & (q_x < IN_W)
    src_plane = src_ptr + b * src_sb + c.to(tl.int64) * src_sc
    x = to_float32(tl.load(src_plane + q_y.to(tl.int64) * src_sh + q_x.to(tl.int64) * src_sw, mask=inside,
                            other=0.0))
    bias = 0.0
    if HAS_BIAS:
        bias = to_float32(tl.load(bias_ptr + c.to(tl.int64) * bias_s))
        x = tl.where(inside, x + bias, 0.0)

    # 2. Stage 1: mid sample m reads input q through tap k = q*UP + pad1 - m. The codes decide the
    # gradient, so a tile whose z holds NaN or inf (z - z is not 0: a non-finite input or tap
    # met the band's zeros, or a sum overflowed) computes z again over real samples only, as the
    # contract does, rather than as the banded products, NaN throughout.
    z = _separable_fir(x, w1y_ptr, w1x_ptr, K1Y, K1X, (q0_y + s_row) * UP + pad1_y - (m0_y + t_col),
                       (q0_x + s_col) * UP + pad1_x - (m0_x + t_row), RANK1, STAGE1_DTYPE, BM, BM)
    if MODE == 1:
        if tl.sum(((z - z) != 0).to(tl.int32)) > 0:
            z = _real_samples_upsampling_fir(src_plane, src_sh, src_sw, bias, IN_H, IN_W, w1y_ptr, w1x_ptr, K1Y,
                                             K1X, m0_y + t_col, m0_x + t_row, pad1_y, pad1_x, UP, RANK1, HAS_BIAS,
                                             BM, BM)

    # 3. The pointwise step on the mid tile. Codes: 2 bits each, 4 consecutive columns a byte.
    m_y = m0_y + t_col
    m_x = m0_x + t_row
    codes_rows = codes_ptr + b * codes_sb + c.to(tl.int64) * codes_sc + m_y.to(tl.int64) * codes_sh
    in_mid = (m_y >= 0) & (m_y < MID_H) & (m_x >= 0) & (m_x < MID_W)
    if MODE == 2:
        packed = tl.load(codes_rows + (m_x >> 2).to(tl.int64) * codes_sw, mask=in_mid, other=0).to(tl.int32)
        code = (packed >> ((m_x & 3) * 2)) & 3
        # A select for clamped samples: their gradient is 0 even where z is NaN or infinite.
        a = tl.where(in_mid & (code != 2), z * tl.where(code == 1, gain, gain * slope), 0.0)
    else:
        v = z * gain
        positive = v > 0
        a = tl.where(positive, v, v * slope)
        code = positive.to(tl.int8)
        if HAS_CLAMP:
            code = tl.where(tl.abs(a) <= clamp, code, 2).to(tl.int8)  # a NaN is clamped, as in torch.clamp's mask
            # PropagateNan.ALL: the default min/max.f32 return the non-NaN operand, which would
            # turn a NaN into -clamp on the GPU where torch.clamp keeps it NaN.
            a = tl.minimum(tl.maximum(a, -clamp, propagate_nan=tl.PropagateNan.ALL), clamp,
                           propagate_nan=tl.PropagateNan.ALL)
        if MODE == 1:
            # Each byte is written by the one tile that owns it (module docstring); m0_x is a
            # multiple of 4 here, so the tile's bytes start at a byte boundary.
            shifts = 2 * tl.arange(0, 4)[None, None, :]
            packed = tl.sum(tl.reshape(code.to(tl.int32), (BM, BM // 4, 4)) << shifts, axis=2)
            byte = tl.arange(0, BM // 4)[None, :]
            first_x = m0_x + 4 * byte
            owned_y = t_col < VO_Y * DOWN + (tile_y == tiles_y - 1).to(tl.int32) * BM
            owned_x = 4 * byte < VO_X * DOWN + (tile_x == tiles_x - 1).to(tl.int32) * BM
            inside = (m_y < MID_H) & (first_x < MID_W) & owned_y & owned_x
            tl.store(codes_rows + (first_x >> 2).to(tl.int64) * codes_sw, packed.to(tl.uint8), mask=inside)

    # 4. Stage 2: output o reads mid sample m through tap k = m + pad2 - o*DOWN = t - o_local*DOWN.
    y = _separable_fir(a, w2y_ptr, w2x_ptr, K2Y, K2X, t_row - o_col * DOWN, t_col - o_row * DOWN, RANK2,
                       STAGE2_DTYPE, BO, BO)

    out_y = o0_y + o_col
    out_x = o0_x + o_row
    valid = (o_col < VO_Y) & (o_row < VO_X) & (out_y < OUT_H) & (out_x < OUT_W)
    dst_offsets = b * dst_sb + c.to(tl.int64) * dst_sc + out_y.to(tl.int64) * dst_sh + out_x.to(tl.int64) * dst_sw
    tl.store(dst_ptr + dst_offsets, y.to(dst_ptr.dtype.element_ty), mask=valid)
    if PARTIAL_SUMS:
        # The bias gradient's share of this tile, summed before rounding to the output dtype.
        tl.store(partial_ptr + pid, tl.sum(tl.sum(tl.where(valid, y, 0.0), axis=1), axis=0))


def _blocks(k1: int, k2: int, up: int, down: int) -> tuple:
    """(BI, BM, BO): power-of-two input / mid / output tile sides (>= 16, tl.dot's minimum)
    with the fewest multiply-adds per stored output (_valid_outputs of them per axis)."""
    best = None
    for bi in (16, 32, 64, 128):
        bm = max(16, triton.next_power_of_2(bi * up))
        if bm > _MAX_MID_BLOCK:
            break
        vo = _valid_outputs(bi, up, down, k1, k2, bo=None)
        if vo < _CODE_ALIGNMENT:  # room to round VO down to whole code bytes (_launch)
            continue
        bo = max(16, triton.next_power_of_2(vo))
        macs = bm * bi * (bi + bm) + bo * bm * (bm + bo)
        if best is None or macs / vo**2 < best[0]:
            best = (macs / vo**2, (bi, bm, bo))
    if best is None:
        raise ValueError(
            f"filtered_lrelu: the Triton kernel supports filters of up to about {_MAX_MID_BLOCK} upsampled taps "
            f"(fu {k1} taps, fd {k2} taps at up={up}, down={down}); use the reference backend"
        )
    return best[1]


def _valid_outputs(bi: int, up: int, down: int, k1: int, k2: int, bo) -> int:
    """VO: of the up * BI mid samples a tile computes from BI inputs (BM rounds that up to a
    power of two for tl.arange; no stored output or code depends on the samples past it), the
    last k1 - 1 lack taps, and VO outputs need (VO - 1) * down + k2 good ones; at most BO (when
    given). Also
    VO * down <= the good ones, because the tile owns (and stores the codes of) VO * down mid
    samples: when down > k2 the span past the last output's taps must be good too."""
    good = bi * up - k1 + 1
    vo = min((good - k2) // down + 1, good // down)
    return vo if bo is None else min(vo, bo)


def _lift(pad1: int, pad2: int, up: int) -> int:
    return max(0, -(-(pad1 + pad2) // up)) + 1


# id(rows table) -> (weak reference to it, whether its taps fit a float16 stage), filled once per
# table: the tables of a filter are built once and kept with it (filter_tables).
_float16_fits: dict = {}


def _taps_fit_float16(rows: torch.Tensor, cols: torch.Tensor) -> bool:
    """Whether no tap of these tables passes 2^14 (_FLOAT16_SAFE_ROW). A larger table divided to
    fit float16's range would round its taps below 2^-24 of the largest to float16 subnormals or
    0, and the stage after it would get an input spread as wide: either loses the outputs the
    large tap reaches through small values (a 1-D filter with a 4e9 tap: dx 0 where float64
    gives -1.1e8). Reading the taps synchronises with the GPU, once per table; where they cannot
    be read (inside CUDA graph capture, meta tensors), they are taken to fit."""
    key = id(rows)
    entry = _float16_fits.get(key)
    if entry is not None and entry[0]() is rows:
        return entry[1]
    if rows.is_meta or (rows.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return True
    fits = bool(torch.maximum(rows.abs().max(), cols.abs().max()) <= _FLOAT16_SAFE_ROW)

    def forget(ref, key=key):
        if _float16_fits.get(key, (None,))[0] is ref:
            del _float16_fits[key]

    _float16_fits[key] = (weakref.ref(rows, forget), fits)
    return fits


def _launch(mode, src, bias, dst, codes, fused: FusedPass, gain, slope, clamp, channel_sums=None):
    """One fused pass over every plane (fastgen.ops.filtered_lrelu.FusedPass).
    channel_sums (C,), when given, receives dst summed over (B, H, W) in float32."""
    batch, channels, in_h, in_w = src.shape
    out_h, out_w = dst.shape[2:]
    if dst.numel() == 0:
        if channel_sums is not None:
            channel_sums.zero_()
        return
    (w1y, w1x), (w2y, w2x) = fused.stage1, fused.stage2
    up, down, pads1, pads2 = fused.up, fused.down, fused.pads1, fused.pads2
    k1y, k1x, k2y, k2x = w1y.shape[1], w1x.shape[1], w2y.shape[1], w2x.shape[1]
    bi, bm, bo = _blocks(max(k1y, k1x), max(k2y, k2x), up, down)
    vo_y = _valid_outputs(bi, up, down, k1y, k2y, bo)
    vo_x = _valid_outputs(bi, up, down, k1x, k2x, bo)
    if mode == _FORWARD_WITH_CODES:
        # A tile's columns of z, vo_x * down, fill whole bytes of codes: no byte is shared.
        step = _CODE_ALIGNMENT // math.gcd(_CODE_ALIGNMENT, down)
        vo_x -= vo_x % step
    tiles_y, tiles_x = triton.cdiv(out_h, vo_y), triton.cdiv(out_w, vo_x)
    half = src.dtype == torch.float16
    # A stage runs in float16 where its filter is one term and its taps, and the previous
    # stage's (which spread its input), fit float16 (_taps_fit_float16).
    stage1_fits = half and _taps_fit_float16(w1y, w1x)
    stage1_half = stage1_fits and mode == _BACKWARD and w1y.shape[0] == 1
    stage2_half = stage1_fits and w2y.shape[0] == 1 and _taps_fit_float16(w2y, w2x)
    codes_arg = codes if codes is not None else dst
    codes_strides = codes.stride() if codes is not None else (0, 0, 0, 0)
    grid = (batch * channels * tiles_y * tiles_x,)
    partials = None if channel_sums is None else torch.empty(grid, dtype=torch.float32, device=dst.device)
    _filtered_lrelu_kernel[grid](
        src, bias if bias is not None else src, dst, codes_arg, partials if partials is not None else dst,
        w1y, w1x, w2y, w2x,
        channels, in_h, in_w, fused.mid_shape[0], fused.mid_shape[1], out_h, out_w,
        *src.stride(), *dst.stride(), *codes_strides, bias.stride(0) if bias is not None else 0,
        k1y, k1x, k2y, k2x,
        pads1[0], pads1[1], pads2[0], pads2[1], _lift(pads1[0], pads2[0], up), _lift(pads1[1], pads2[1], up),
        vo_y, vo_x, tiles_y, tiles_x,
        gain, slope, 0.0 if clamp is None else clamp,
        UP=up, DOWN=down, RANK1=w1y.shape[0], RANK2=w2y.shape[0],
        MODE=mode, HAS_BIAS=bias is not None, HAS_CLAMP=clamp is not None, PARTIAL_SUMS=partials is not None,
        STAGE1_DTYPE=tl.float16 if stage1_half else tl.float32,
        STAGE2_DTYPE=tl.float16 if stage2_half else tl.float32,
        BI=bi, BM=bm, BO=bo,
        # ptxas for sm_90 on StyleGAN3's 12-tap layers (BM 64): 4 warps spill up to 27 KB per
        # thread (float16 up1/down2, float32 stages); 8 warps spill nothing in float16 and at
        # most about 1.4 KB where both stages are float32 (float32 / bfloat16 x).
        num_warps=8 if bm >= 64 else 4, **LAUNCH_OPTIONS,
    )
    if partials is not None:
        channel_sums.copy_(partials.view(batch, channels, -1).sum((0, 2)))


def filtered_lrelu(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter, *, out) -> None:
    """out = filtered_lrelu(x, ...)."""
    fused = forward_pass(fu, fd, up, down, padding, flip_filter, out.shape, x.device)
    _launch(_FORWARD, x, b, out, None, fused, gain, slope, clamp)


def filtered_lrelu_with_codes(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter, *, out) -> None:
    """out = (y, codes): y = filtered_lrelu(x, ...) and the codes (packed uint8
    (B, C, zh, ceil(zw / 4))) its backward reads."""
    y, codes = out
    fused = forward_pass(fu, fd, up, down, padding, flip_filter, y.shape, x.device)
    _launch(_FORWARD_WITH_CODES, x, b, y, codes, fused, gain, slope, clamp)


def filtered_lrelu_backward(dy, codes, fu, fd, up, down, padding, gain, slope, flip_filter, x_height, x_width,
                            bias_grad, *, out) -> None:
    """out = (dx, db): dx = U^T (d(codes) * D^T dy), db (empty: not wanted) = dx summed over
    (B, H, W): the forward's kernel run as backward_pass describes."""
    dx, db = out
    fused = backward_pass(fu, fd, up, down, padding, flip_filter, dy.shape, dy.device)
    _launch(_BACKWARD, dy, None, dx, codes, fused, gain, slope, None, db if db.numel() else None)
