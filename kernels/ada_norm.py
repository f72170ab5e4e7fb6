"""Triton kernels for adaptive group / layer normalization (math in fastgen/ops/ada_norm.py).

ada_group_norm views x as (B, C, S) with S the flattened spatial positions (a view for
contiguous, channels_last and sliced inputs; only a layout whose spatial dims cannot be
flattened by strides alone is copied). A program owns GPP consecutive groups of one sample
and walks them in (BLOCK_C, BLOCK_S) tiles, BLOCK_C = GPP * CPG_TILE channel rows by BLOCK_S
positions, with CPG_TILE the group's channel count rounded up to a power of two (capped: a
wider group is walked in several channel tiles). Rows past a group's channels are masked.
Several groups per program matter for channels_last, where one group's channels are a short
contiguous run (AdaIN: a single element) and a tile of several groups reads whole sectors.

Two paths, chosen per call by how much work one group block is:
  fused  one launch, one program per group block (B * group blocks): each program computes its
         groups' statistics, then re-reads its tiles (from L2, at most _MAX_FUSED_ELEMENTS per
         program) to normalize, modulate, activate and write y: one DRAM read of x and one
         write of y.
  split  for large spatial sizes (StyleGAN's 1024 px AdaIN, or too few group blocks to fill
         the GPU): S is cut into chunks of CHUNK positions, one program per chunk of each group
         block, chunks fastest.
         `_chunk_stats_kernel` writes each chunk's (mean, M2) to a float32 workspace; the
         apply kernel first merges its group's chunk statistics in chunk order, then writes
         its chunk of y. The reduction is spread over chunks * blocks programs, and the merge
         order is fixed, so results do not change from run to run. x is read twice.
Both grids are 1-D: B * group blocks alone passes the 65,535 programs that grid axes 1 and 2
allow (StyleGAN's AdaIN on the 32 x 32 layer at batch 128 has 65,536), axis 0 takes 2^31 - 1.
Backward, the same two paths. Fused: one launch per group block computes the statistics
(recomputed: the forward saves none), then walks the tiles twice: per channel A = sum dz and
Bc = sum dz * xhat (written to a workspace, their u-weighted group sums kept in registers),
then dx. Split: three launches over the chunks of every group block: `_chunk_stats_kernel`;
`_channel_grad_sums_kernel`, which writes each chunk's A, Bc and its share of the group sums;
`_input_grad_kernel`, which adds those shares in chunk order and writes its chunk of dx. A last
small kernel, shared with adaLN, adds the chunk sums into dscale, dshift, dweight and dbias in
a fixed order (no atomics). Reads: x three times and dy twice per call, the repeats from L2
when a group block's tiles fit there (fused) or from DRAM (split).

Statistics: each tile is reduced exactly (mean of the tile, then the sum of squared
deviations from it) and merged into the running (count, mean, M2) with Chan's update; all
values are first shifted by a pivot, the first element of the group, so a mean of 1e3 with a
spread of 1e-2 keeps its digits (float32 cannot hold 1e3 + 1e-7 * 1e3 apart otherwise).

ada_layer_norm: rows are tokens; a program owns a range of rows of one sample and holds
BLOCK_N whole rows (BLOCK_C >= C channels) at a time, so each row's statistics are two exact
passes over registers. Its backward writes per-chunk column sums of dy and dy * xhat, added
by the same final kernel as the group norm's. gated_residual_ada_layer_norm is the same pair
of kernels with GATED_RESIDUAL: the forward forms each tile's rows h = x + gate * branch,
writes h and normalizes it as rounded to x's dtype; the backward recomputes that h, adds the
gradient of h to the norm's dx, writes dbranch = gate * dx and a third per-chunk column sum,
of branch * dx, which the final kernel adds into dgate.

Arithmetic is float32 only (loads are converted first): the contract, and the Triton CPU
interpreter computes bfloat16 arithmetic wrongly. Offsets are int64, and so are the channel,
position and workspace-slot indices they are built from: an axis can hold 2^31 elements.
"""
import torch
import triton
import triton.language as tl

from fastgen.kernels import LAUNCH_OPTIONS, sm_count

_TILE_ELEMENTS = 4096  # per (BLOCK_C, BLOCK_S) tile: 16 float32 registers a thread at 8 warps
_NUM_WARPS = 8
# One program should not walk more than this many elements alone: past it the split path
# spreads the group over several programs even when there are enough group blocks.
_MAX_FUSED_ELEMENTS = 1 << 16
_MAX_CHUNKS = 256  # bounds the per-program merge of chunk statistics
_MAX_LAYER_NORM_CHANNELS = 16384  # whole rows are held in registers
_FINISH_BLOCK = 128  # channels per program of the final modulation-gradient kernel


@triton.jit
def _group_rows(g0, c0, G, CPG, GPP: tl.constexpr, CPG_TILE: tl.constexpr):
    """Channel index (int64) and validity of each row of a tile starting at channel c0 of each group."""
    r = tl.arange(0, GPP * CPG_TILE)
    group = g0 + r // CPG_TILE
    within = c0 + r % CPG_TILE
    return group.to(tl.int64) * CPG + within, (group < G) & (within < CPG)


@triton.jit
def _rows(per_group, GPP: tl.constexpr, CPG_TILE: tl.constexpr):
    """A per-group vector repeated over each group's rows."""
    return tl.reshape(tl.broadcast_to(per_group[:, None], (GPP, CPG_TILE)), (GPP * CPG_TILE,))


@triton.jit
def _groups(per_row, GPP: tl.constexpr, CPG_TILE: tl.constexpr):
    """Per-row values summed over each group's rows."""
    return tl.sum(tl.reshape(per_row, (GPP, CPG_TILE)), axis=1)


@triton.jit
def _tile_offsets(b, channel, s, sb, sc, ss):
    return b.to(tl.int64) * sb + channel.to(tl.int64)[:, None] * sc + s.to(tl.int64)[None, :] * ss


@triton.jit
def _load_tile(ptr, b, channel, s, mask, sb, sc, ss):
    return tl.load(ptr + _tile_offsets(b, channel, s, sb, sc, ss), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, values, b, channel, s, mask, sb, sc, ss):
    tl.store(ptr + _tile_offsets(b, channel, s, sb, sc, ss), values.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chan_merge(count, mean, m2, part_count, part_mean, part_m2):
    """(count, mean, M2) of the union of two sets from those of each (Chan et al.)."""
    total = count + part_count
    delta = part_mean - mean
    fraction = part_count / tl.maximum(total, 1.0)
    return total, mean + delta * fraction, m2 + part_m2 + delta * delta * count * fraction


@triton.jit
def _program_chunk(NUM_CHUNKS):
    """(chunk, group block) of a split-path program: the grid runs over group blocks x chunks,
    chunks fastest (module docstring)."""
    return tl.program_id(0) % NUM_CHUNKS, tl.program_id(0) // NUM_CHUNKS


@triton.jit
def _program_groups(group_block, G, GPP: tl.constexpr):
    """(sample, first group) of a group block, one of B * cdiv(G, GPP)."""
    blocks = tl.cdiv(G, GPP)
    return group_block // blocks, (group_block % blocks) * GPP


@triton.jit
def _chunk_range(chunk, S, CHUNK):
    """[begin, end) of a chunk of CHUNK positions (rows for layer norm), int64. tl.cast, not
    .to: the chunk is a plain int in an interpreted loop."""
    start = tl.cast(chunk, tl.int64) * CHUNK
    return start, tl.minimum(start + CHUNK, S)


@triton.jit
def _pivots(x_ptr, b, g0, G, CPG, x_sb, x_sc, GPP: tl.constexpr):
    """The first element of each group: every program of a group shifts by the same value."""
    g = g0 + tl.arange(0, GPP)
    offsets = b.to(tl.int64) * x_sb + g.to(tl.int64) * CPG * x_sc
    return tl.load(x_ptr + offsets, mask=g < G, other=0.0).to(tl.float32)


@triton.jit
def _range_stats(x_ptr, b, g0, pivot, s_begin, s_end, G, CPG, x_sb, x_sc, x_ss,
                 GPP: tl.constexpr, CPG_TILE: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean, M2) of x - pivot per group over positions [s_begin, s_end)."""
    count = tl.zeros((GPP,), dtype=tl.float32)
    mean = tl.zeros((GPP,), dtype=tl.float32)
    m2 = tl.zeros((GPP,), dtype=tl.float32)
    pivot_rows = _rows(pivot, GPP, CPG_TILE)
    for c0 in range(0, CPG, CPG_TILE):
        channel, row_valid = _group_rows(g0, c0, G, CPG, GPP, CPG_TILE)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s, mask = _position_tile(s0, s_end, row_valid, BLOCK_S)
            shifted = tl.where(mask, _load_tile(x_ptr, b, channel, s, mask, x_sb, x_sc, x_ss) - pivot_rows[:, None], 0.0)
            tile_count = _groups(tl.sum(mask.to(tl.float32), axis=1), GPP, CPG_TILE)
            tile_mean = _groups(tl.sum(shifted, axis=1), GPP, CPG_TILE) / tl.maximum(tile_count, 1.0)
            deviation = tl.where(mask, shifted - _rows(tile_mean, GPP, CPG_TILE)[:, None], 0.0)
            tile_m2 = _groups(tl.sum(deviation * deviation, axis=1), GPP, CPG_TILE)
            count, mean, m2 = _chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)
    return count, mean, m2


@triton.jit
def _group_slots(b, g0, G, num_chunks, GPP: tl.constexpr):
    """Where chunk 0 of each of this program's groups sits in a (B * G, chunks) workspace, and
    which groups exist."""
    g = g0 + tl.arange(0, GPP)
    return (b.to(tl.int64) * G + g) * num_chunks, g < G


@triton.jit
def _merged_chunk_stats(mean_ptr, m2_ptr, b, g0, G, CPG, S, CHUNK, num_chunks, GPP: tl.constexpr):
    """(count, mean, M2) per group from the chunk statistics, merged in chunk order."""
    slot, valid = _group_slots(b, g0, G, num_chunks, GPP)
    count = tl.zeros((GPP,), dtype=tl.float32)
    mean = tl.zeros((GPP,), dtype=tl.float32)
    m2 = tl.zeros((GPP,), dtype=tl.float32)
    for k in range(num_chunks):
        begin, end = _chunk_range(k, S, CHUNK)
        part_count = tl.zeros((GPP,), dtype=tl.float32) + ((end - begin) * CPG).to(tl.float32)
        part_mean = tl.load(mean_ptr + slot + k, mask=valid, other=0.0)
        part_m2 = tl.load(m2_ptr + slot + k, mask=valid, other=0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, part_count, part_mean, part_m2)
    return count, mean, m2


@triton.jit
def _rstd(count, m2, eps):
    return tl.rsqrt(m2 / tl.maximum(count, 1.0) + eps)


@triton.jit
def _fused_program_stats(x_ptr, G, CPG, S, eps, x_sb, x_sc, x_ss,
                         GPP: tl.constexpr, CPG_TILE: tl.constexpr, BLOCK_S: tl.constexpr):
    """(sample, first group, pivot, mean, rstd, count) of this program's groups, from all of x;
    the fused grid has one program per group block."""
    b, g0 = _program_groups(tl.program_id(0), G, GPP)
    pivot = _pivots(x_ptr, b, g0, G, CPG, x_sb, x_sc, GPP)
    count, mean, m2 = _range_stats(x_ptr, b, g0, pivot, 0, S, G, CPG, x_sb, x_sc, x_ss, GPP, CPG_TILE, BLOCK_S)
    return b, g0, pivot, mean, _rstd(count, m2, eps), count


@triton.jit
def _split_program_stats(x_ptr, mean_ptr, m2_ptr, chunk, group_block, G, CPG, S, CHUNK, NUM_CHUNKS, eps, x_sb, x_sc,
                         GPP: tl.constexpr):
    """(sample, first group, pivot, mean, rstd, count) of the program's groups, from the chunk
    statistics, and [begin, end) of its chunk."""
    b, g0 = _program_groups(group_block, G, GPP)
    pivot = _pivots(x_ptr, b, g0, G, CPG, x_sb, x_sc, GPP)
    count, mean, m2 = _merged_chunk_stats(mean_ptr, m2_ptr, b, g0, G, CPG, S, CHUNK, NUM_CHUNKS, GPP)
    s_begin, s_end = _chunk_range(chunk, S, CHUNK)
    return b, g0, pivot, mean, _rstd(count, m2, eps), count, s_begin, s_end


@triton.jit
def _modulation(b, channel, row_valid, scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc,
                weight_ptr, w_s, bias_ptr, bi_s, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per row, weight, bias (1 and 0 when absent), 1 + scale[b] and shift[b]."""
    channel = channel.to(tl.int64)
    one_plus_scale = 1.0 + tl.load(scale_ptr + b.to(tl.int64) * s_sb + channel * s_sc, mask=row_valid, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + b.to(tl.int64) * t_sb + channel * t_sc, mask=row_valid, other=0.0).to(tl.float32)
    weight, bias = _affine_params(channel, row_valid, weight_ptr, w_s, bias_ptr, bi_s, HAS_WEIGHT, HAS_BIAS)
    return weight, bias, one_plus_scale, shift


@triton.jit
def _pre_activation(xhat, weight, bias, one_plus_scale, shift):
    """(xhat * weight + bias) * (1 + scale) + shift per row, in the reference's order: an
    infinite scale then meets the normalized value's sign, where folding it into
    weight * (1 + scale) and bias * (1 + scale) + shift would add infinities of opposite
    signs (NaN), or make 0 * inf of an absent bias."""
    return (xhat * weight[:, None] + bias[:, None]) * one_plus_scale[:, None] + shift[:, None]


@triton.jit
def _affine_params(channel, valid, weight_ptr, w_s, bias_ptr, bi_s, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Per-channel weight and bias (1 and 0 when absent)."""
    weight = tl.full(channel.shape, 1.0, tl.float32)
    bias = tl.zeros(channel.shape, dtype=tl.float32)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + channel * w_s, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + channel * bi_s, mask=valid, other=0.0).to(tl.float32)
    return weight, bias


@triton.jit
def _channel_tile(b, g0, c0, G, CPG, scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
                  HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, GPP: tl.constexpr, CPG_TILE: tl.constexpr):
    """Rows (channels, validity) of the channel tile at c0 of each group and their modulation
    (weight, bias, 1 + scale, shift)."""
    channel, row_valid = _group_rows(g0, c0, G, CPG, GPP, CPG_TILE)
    weight, bias, one_plus_scale, shift = _modulation(b, channel, row_valid, scale_ptr, s_sb, s_sc, shift_ptr, t_sb,
                                                      t_sc, weight_ptr, w_s, bias_ptr, bi_s, HAS_WEIGHT, HAS_BIAS)
    return channel, row_valid, weight, bias, one_plus_scale, shift


@triton.jit
def _position_tile(s0, s_end, row_valid, BLOCK_S: tl.constexpr):
    """Positions (int64: a tile can end past 2^31) and mask of the tile at s0."""
    s = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
    return s, row_valid[:, None] & (s < s_end)[None, :]


@triton.jit
def _stats_rows(pivot, mean, rstd, GPP: tl.constexpr, CPG_TILE: tl.constexpr):
    return _rows(pivot, GPP, CPG_TILE), _rows(mean, GPP, CPG_TILE), _rows(rstd, GPP, CPG_TILE)


@triton.jit
def _xhat_tile(x_ptr, b, channel, s, mask, x_sb, x_sc, x_ss, pivot_rows, mean_rows, rstd_rows):
    """The normalized tile, 0 where masked (no overflow in the activation there). Pivot first:
    x - pivot is exact for x near the group's values, and the mean it leaves is small, so a
    large common offset costs no digits."""
    x = _load_tile(x_ptr, b, channel, s, mask, x_sb, x_sc, x_ss)
    return tl.where(mask, ((x - pivot_rows[:, None]) - mean_rows[:, None]) * rstd_rows[:, None], 0.0)


@triton.jit
def _pre_activation_grad(dy_ptr, b, channel, s, mask, g_sb, g_sc, g_ss, xhat, weight, bias, one_plus_scale, shift,
                         ACT_SILU: tl.constexpr):
    """dz = dy * act'(z) with z the pre-activation output; 0 where masked (dy loads as 0 there)."""
    dz = _load_tile(dy_ptr, b, channel, s, mask, g_sb, g_sc, g_ss)
    if ACT_SILU:
        z = _pre_activation(xhat, weight, bias, one_plus_scale, shift)
        sigmoid = tl.sigmoid(z)
        dz = dz * sigmoid * (1.0 + z * (1.0 - sigmoid))
    return dz


@triton.jit
def _apply_range(x_ptr, y_ptr, b, g0, pivot, mean, rstd, s_begin, s_end, G, CPG,
                 x_sb, x_sc, x_ss, y_sb, y_sc, y_ss,
                 scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_SILU: tl.constexpr,
                 GPP: tl.constexpr, CPG_TILE: tl.constexpr, BLOCK_S: tl.constexpr):
    """y over positions [s_begin, s_end) of this program's groups."""
    pivot_rows, mean_rows, rstd_rows = _stats_rows(pivot, mean, rstd, GPP, CPG_TILE)
    for c0 in range(0, CPG, CPG_TILE):
        channel, row_valid, weight, bias, one_plus_scale, shift = _channel_tile(
            b, g0, c0, G, CPG, scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
            HAS_WEIGHT, HAS_BIAS, GPP, CPG_TILE)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s, mask = _position_tile(s0, s_end, row_valid, BLOCK_S)
            xhat = _xhat_tile(x_ptr, b, channel, s, mask, x_sb, x_sc, x_ss, pivot_rows, mean_rows, rstd_rows)
            z = _pre_activation(xhat, weight, bias, one_plus_scale, shift)
            if ACT_SILU:
                z = z * tl.sigmoid(z)
            _store_tile(y_ptr, z, b, channel, s, mask, y_sb, y_sc, y_ss)


@triton.jit
def _group_norm_fused_kernel(
    x_ptr, y_ptr, G, CPG, S, eps,
    x_sb, x_sc, x_ss, y_sb, y_sc, y_ss,
    scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_SILU: tl.constexpr,
    GPP: tl.constexpr, CPG_TILE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b, g0, pivot, mean, rstd, _ = _fused_program_stats(x_ptr, G, CPG, S, eps, x_sb, x_sc, x_ss, GPP, CPG_TILE, BLOCK_S)
    _apply_range(x_ptr, y_ptr, b, g0, pivot, mean, rstd, 0, S, G, CPG,
                 x_sb, x_sc, x_ss, y_sb, y_sc, y_ss,
                 scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
                 HAS_WEIGHT, HAS_BIAS, ACT_SILU, GPP, CPG_TILE, BLOCK_S)


@triton.jit
def _chunk_stats_kernel(
    x_ptr, mean_ptr, m2_ptr, G, CPG, S, CHUNK, NUM_CHUNKS, x_sb, x_sc, x_ss,
    GPP: tl.constexpr, CPG_TILE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    chunk, group_block = _program_chunk(NUM_CHUNKS)
    b, g0 = _program_groups(group_block, G, GPP)
    pivot = _pivots(x_ptr, b, g0, G, CPG, x_sb, x_sc, GPP)
    s_begin, s_end = _chunk_range(chunk, S, CHUNK)
    _, mean, m2 = _range_stats(x_ptr, b, g0, pivot, s_begin, s_end, G, CPG, x_sb, x_sc, x_ss, GPP, CPG_TILE, BLOCK_S)
    slot, valid = _group_slots(b, g0, G, NUM_CHUNKS, GPP)
    tl.store(mean_ptr + slot + chunk, mean, mask=valid)
    tl.store(m2_ptr + slot + chunk, m2, mask=valid)


@triton.jit
def _group_norm_apply_kernel(
    x_ptr, y_ptr, mean_ptr, m2_ptr, G, CPG, S, CHUNK, NUM_CHUNKS, eps,
    x_sb, x_sc, x_ss, y_sb, y_sc, y_ss,
    scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_SILU: tl.constexpr,
    GPP: tl.constexpr, CPG_TILE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    chunk, group_block = _program_chunk(NUM_CHUNKS)
    b, g0, pivot, mean, rstd, _, s_begin, s_end = _split_program_stats(
        x_ptr, mean_ptr, m2_ptr, chunk, group_block, G, CPG, S, CHUNK, NUM_CHUNKS, eps, x_sb, x_sc, GPP)
    _apply_range(x_ptr, y_ptr, b, g0, pivot, mean, rstd, s_begin, s_end, G, CPG,
                 x_sb, x_sc, x_ss, y_sb, y_sc, y_ss,
                 scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
                 HAS_WEIGHT, HAS_BIAS, ACT_SILU, GPP, CPG_TILE, BLOCK_S)


@triton.jit
def _sums_offsets(j, k, b, channel, num_chunks, B, C):
    """Offsets in the (2, chunks, B, C) float32 workspace of per-chunk channel sums."""
    slot = channel.to(tl.int64) * 0 + (j * num_chunks + k)  # int64 before the products
    return (slot * B + b) * C + channel


@triton.jit
def _channel_grad_sums(
    x_ptr, dy_ptr, sums_ptr, k, num_chunks, B, C, b, g0, pivot, mean, rstd, s_begin, s_end, G, CPG,
    x_sb, x_sc, x_ss, g_sb, g_sc, g_ss,
    scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_SILU: tl.constexpr,
    GPP: tl.constexpr, CPG_TILE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Writes A = sum dz and Bc = sum dz * xhat per channel over [s_begin, s_end) into chunk
    k of the workspace; returns the group sums of u * A and u * Bc, u = weight * (1 + scale)."""
    pivot_rows, mean_rows, rstd_rows = _stats_rows(pivot, mean, rstd, GPP, CPG_TILE)
    group_a = tl.zeros((GPP,), dtype=tl.float32)
    group_b = tl.zeros((GPP,), dtype=tl.float32)
    for c0 in range(0, CPG, CPG_TILE):
        channel, row_valid, weight, bias, one_plus_scale, shift = _channel_tile(
            b, g0, c0, G, CPG, scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
            HAS_WEIGHT, HAS_BIAS, GPP, CPG_TILE)
        u = weight * one_plus_scale
        sum_dz = tl.zeros(channel.shape, dtype=tl.float32)
        sum_dz_xhat = tl.zeros(channel.shape, dtype=tl.float32)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s, mask = _position_tile(s0, s_end, row_valid, BLOCK_S)
            xhat = _xhat_tile(x_ptr, b, channel, s, mask, x_sb, x_sc, x_ss, pivot_rows, mean_rows, rstd_rows)
            dz = _pre_activation_grad(dy_ptr, b, channel, s, mask, g_sb, g_sc, g_ss, xhat, weight, bias,
                                     one_plus_scale, shift, ACT_SILU)
            sum_dz += tl.sum(dz, axis=1)
            sum_dz_xhat += tl.sum(dz * xhat, axis=1)
        tl.store(sums_ptr + _sums_offsets(0, k, b, channel, num_chunks, B, C), sum_dz, mask=row_valid)
        tl.store(sums_ptr + _sums_offsets(1, k, b, channel, num_chunks, B, C), sum_dz_xhat, mask=row_valid)
        group_a += _groups(u * sum_dz, GPP, CPG_TILE)
        group_b += _groups(u * sum_dz_xhat, GPP, CPG_TILE)
    return group_a, group_b


@triton.jit
def _input_grad_range(
    x_ptr, dy_ptr, dx_ptr, b, g0, pivot, mean, rstd, mean_u_a, mean_u_b, s_begin, s_end, G, CPG,
    x_sb, x_sc, x_ss, g_sb, g_sc, g_ss, dx_sb, dx_sc, dx_ss,
    scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_SILU: tl.constexpr,
    GPP: tl.constexpr, CPG_TILE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dx = rstd * (u dz - mean(u A) - xhat mean(u Bc)) over [s_begin, s_end)."""
    pivot_rows, mean_rows, rstd_rows = _stats_rows(pivot, mean, rstd, GPP, CPG_TILE)
    a_rows = _rows(mean_u_a, GPP, CPG_TILE)
    b_rows = _rows(mean_u_b, GPP, CPG_TILE)
    for c0 in range(0, CPG, CPG_TILE):
        channel, row_valid, weight, bias, one_plus_scale, shift = _channel_tile(
            b, g0, c0, G, CPG, scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
            HAS_WEIGHT, HAS_BIAS, GPP, CPG_TILE)
        u = weight * one_plus_scale
        for s0 in range(s_begin, s_end, BLOCK_S):
            s, mask = _position_tile(s0, s_end, row_valid, BLOCK_S)
            xhat = _xhat_tile(x_ptr, b, channel, s, mask, x_sb, x_sc, x_ss, pivot_rows, mean_rows, rstd_rows)
            dz = _pre_activation_grad(dy_ptr, b, channel, s, mask, g_sb, g_sc, g_ss, xhat, weight, bias,
                                     one_plus_scale, shift, ACT_SILU)
            dx = rstd_rows[:, None] * (u[:, None] * dz - a_rows[:, None] - xhat * b_rows[:, None])
            _store_tile(dx_ptr, dx, b, channel, s, mask, dx_sb, dx_sc, dx_ss)


@triton.jit
def _group_norm_backward_fused_kernel(
    dy_ptr, x_ptr, dx_ptr, sums_ptr, B, C, G, CPG, S, eps,
    x_sb, x_sc, x_ss, g_sb, g_sc, g_ss, dx_sb, dx_sc, dx_ss,
    scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_SILU: tl.constexpr,
    GPP: tl.constexpr, CPG_TILE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b, g0, pivot, mean, rstd, count = _fused_program_stats(x_ptr, G, CPG, S, eps, x_sb, x_sc, x_ss,
                                                           GPP, CPG_TILE, BLOCK_S)
    group_a, group_b = _channel_grad_sums(
        x_ptr, dy_ptr, sums_ptr, 0, 1, B, C, b, g0, pivot, mean, rstd, 0, S, G, CPG,
        x_sb, x_sc, x_ss, g_sb, g_sc, g_ss,
        scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
        HAS_WEIGHT, HAS_BIAS, ACT_SILU, GPP, CPG_TILE, BLOCK_S)
    count = tl.maximum(count, 1.0)
    _input_grad_range(
        x_ptr, dy_ptr, dx_ptr, b, g0, pivot, mean, rstd, group_a / count, group_b / count, 0, S, G, CPG,
        x_sb, x_sc, x_ss, g_sb, g_sc, g_ss, dx_sb, dx_sc, dx_ss,
        scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
        HAS_WEIGHT, HAS_BIAS, ACT_SILU, GPP, CPG_TILE, BLOCK_S)


@triton.jit
def _channel_grad_sums_kernel(
    dy_ptr, x_ptr, sums_ptr, group_a_ptr, group_b_ptr, mean_ptr, m2_ptr, B, C, G, CPG, S, CHUNK, NUM_CHUNKS, eps,
    x_sb, x_sc, x_ss, g_sb, g_sc, g_ss,
    scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_SILU: tl.constexpr,
    GPP: tl.constexpr, CPG_TILE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    chunk, group_block = _program_chunk(NUM_CHUNKS)
    b, g0, pivot, mean, rstd, _, s_begin, s_end = _split_program_stats(
        x_ptr, mean_ptr, m2_ptr, chunk, group_block, G, CPG, S, CHUNK, NUM_CHUNKS, eps, x_sb, x_sc, GPP)
    group_a, group_b = _channel_grad_sums(
        x_ptr, dy_ptr, sums_ptr, chunk, NUM_CHUNKS, B, C, b, g0, pivot, mean, rstd,
        s_begin, s_end, G, CPG,
        x_sb, x_sc, x_ss, g_sb, g_sc, g_ss,
        scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
        HAS_WEIGHT, HAS_BIAS, ACT_SILU, GPP, CPG_TILE, BLOCK_S)
    # Two (B * G, chunks) workspaces: this chunk's share of the group sums dx needs.
    slot, valid = _group_slots(b, g0, G, NUM_CHUNKS, GPP)
    tl.store(group_a_ptr + slot + chunk, group_a, mask=valid)
    tl.store(group_b_ptr + slot + chunk, group_b, mask=valid)


@triton.jit
def _summed_group_terms(group_a_ptr, group_b_ptr, b, g0, G, num_chunks, GPP: tl.constexpr):
    """The group sums of u * A and u * Bc: the chunks' shares added in chunk order."""
    slot, valid = _group_slots(b, g0, G, num_chunks, GPP)
    group_a = tl.zeros((GPP,), dtype=tl.float32)
    group_b = tl.zeros((GPP,), dtype=tl.float32)
    for k in range(num_chunks):
        group_a += tl.load(group_a_ptr + slot + k, mask=valid, other=0.0)
        group_b += tl.load(group_b_ptr + slot + k, mask=valid, other=0.0)
    return group_a, group_b


@triton.jit
def _input_grad_kernel(
    dy_ptr, x_ptr, dx_ptr, group_a_ptr, group_b_ptr, mean_ptr, m2_ptr, G, CPG, S, CHUNK, NUM_CHUNKS, eps,
    x_sb, x_sc, x_ss, g_sb, g_sc, g_ss, dx_sb, dx_sc, dx_ss,
    scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_SILU: tl.constexpr,
    GPP: tl.constexpr, CPG_TILE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    chunk, group_block = _program_chunk(NUM_CHUNKS)
    b, g0, pivot, mean, rstd, count, s_begin, s_end = _split_program_stats(
        x_ptr, mean_ptr, m2_ptr, chunk, group_block, G, CPG, S, CHUNK, NUM_CHUNKS, eps, x_sb, x_sc, GPP)
    group_a, group_b = _summed_group_terms(group_a_ptr, group_b_ptr, b, g0, G, NUM_CHUNKS, GPP)
    count = tl.maximum(count, 1.0)
    _input_grad_range(
        x_ptr, dy_ptr, dx_ptr, b, g0, pivot, mean, rstd, group_a / count, group_b / count,
        s_begin, s_end, G, CPG,
        x_sb, x_sc, x_ss, g_sb, g_sc, g_ss, dx_sb, dx_sc, dx_ss,
        scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, weight_ptr, w_s, bias_ptr, bi_s,
        HAS_WEIGHT, HAS_BIAS, ACT_SILU, GPP, CPG_TILE, BLOCK_S)


@triton.jit
def _modulation_grad_kernel(
    sums_ptr, scale_ptr, s_sb, s_sc, weight_ptr, w_s, bias_ptr, bi_s,
    dscale_ptr, ds_sb, ds_sc, dshift_ptr, dt_sb, dt_sc, dweight_ptr, dw_s, dbias_ptr, db_s, dgate_ptr, dg_sb, dg_sc,
    B, C, num_chunks,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, AFFINE_GRADS: tl.constexpr, GATE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """From the per-chunk channel sums A and Bc: dshift = A, dscale = weight Bc + bias A and,
    with AFFINE_GRADS, dweight = sum_b (1 + scale) Bc, dbias = sum_b (1 + scale) A; with
    GATE_GRAD, dgate = the sum of the third per-chunk sum (branch * dx)."""
    channel = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = channel < C
    weight, bias = _affine_params(channel, valid, weight_ptr, w_s, bias_ptr, bi_s, HAS_WEIGHT, HAS_BIAS)
    dweight = tl.zeros((BLOCK,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK,), dtype=tl.float32)
    for b in range(B):
        sum_dz = tl.zeros((BLOCK,), dtype=tl.float32)
        sum_dz_xhat = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(num_chunks):
            sum_dz += tl.load(sums_ptr + _sums_offsets(0, k, b, channel, num_chunks, B, C), mask=valid, other=0.0)
            sum_dz_xhat += tl.load(sums_ptr + _sums_offsets(1, k, b, channel, num_chunks, B, C), mask=valid, other=0.0)
        b64 = channel * 0 + b  # int64 whether b is a Python int (interpreter) or a tensor
        tl.store(dshift_ptr + b64 * dt_sb + channel * dt_sc, sum_dz.to(dshift_ptr.dtype.element_ty), mask=valid)
        dscale = weight * sum_dz_xhat + bias * sum_dz
        tl.store(dscale_ptr + b64 * ds_sb + channel * ds_sc, dscale.to(dscale_ptr.dtype.element_ty), mask=valid)
        if GATE_GRAD:
            dgate = tl.zeros((BLOCK,), dtype=tl.float32)
            for k in range(num_chunks):
                dgate += tl.load(sums_ptr + _sums_offsets(2, k, b, channel, num_chunks, B, C), mask=valid, other=0.0)
            tl.store(dgate_ptr + b64 * dg_sb + channel * dg_sc, dgate.to(dgate_ptr.dtype.element_ty), mask=valid)
        if AFFINE_GRADS:
            one_plus_scale = 1.0 + tl.load(scale_ptr + b64 * s_sb + channel * s_sc, mask=valid, other=0.0).to(tl.float32)
            dweight += one_plus_scale * sum_dz_xhat
            dbias += one_plus_scale * sum_dz
    if AFFINE_GRADS:
        tl.store(dweight_ptr + channel * dw_s, dweight.to(dweight_ptr.dtype.element_ty), mask=valid)
        tl.store(dbias_ptr + channel * db_s, dbias.to(dbias_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _centered_rows(x, mask, cols, C, eps):
    """x - mean per row (0 where masked) and 1 / sqrt(var + eps); the row's first element is
    the pivot, so a large common offset cancels exactly before the sums."""
    pivot = tl.sum(tl.where(cols[None, :] == 0, x, 0.0), axis=1)
    shifted = tl.where(mask, x - pivot[:, None], 0.0)
    mean = tl.sum(shifted, axis=1) / C
    centered = tl.where(mask, shifted - mean[:, None], 0.0)
    return centered, tl.rsqrt(tl.sum(centered * centered, axis=1) / C + eps)


@triton.jit
def _row_tile(r0, end, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = r0 + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    return rows, cols, (rows < end)[:, None] & (cols < C)[None, :]


@triton.jit
def _row_offsets(b, rows, cols, sb, sn, sc):
    return b.to(tl.int64) * sb + rows.to(tl.int64)[:, None] * sn + cols.to(tl.int64)[None, :] * sc


@triton.jit
def _sample_modulation(b, C, scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, BLOCK_C: tl.constexpr):
    """1 + scale[b] and shift[b] over the channels."""
    cols = tl.arange(0, BLOCK_C)
    _, _, one_plus_scale, shift = _modulation(b, cols, cols < C, scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc,
                                              scale_ptr, 0, scale_ptr, 0, False, False)
    return one_plus_scale, shift


@triton.jit
def _sample_gate(b, C, gate_ptr, g_sb, g_sc, BLOCK_C: tl.constexpr):
    """gate[b] over the channels."""
    cols = tl.arange(0, BLOCK_C)
    return tl.load(gate_ptr + b.to(tl.int64) * g_sb + cols.to(tl.int64) * g_sc, mask=cols < C, other=0.0).to(tl.float32)


@triton.jit
def _gated_residual_rows(x, x_ptr, branch_ptr, gate, b, rows, cols, mask, r_sb, r_sn, r_sc):
    """(branch, h) of a tile: h = x + gate * branch rounded to x's dtype, as the op stores it."""
    branch = tl.load(branch_ptr + _row_offsets(b, rows, cols, r_sb, r_sn, r_sc), mask=mask, other=0.0).to(tl.float32)
    h = x + gate[None, :] * branch
    return branch, h.to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _layer_norm_kernel(
    x_ptr, y_ptr, scale_ptr, shift_ptr, branch_ptr, gate_ptr, h_ptr, N, C, ROWS, eps,
    x_sb, x_sn, x_sc, y_sb, y_sn, y_sc, s_sb, s_sc, t_sb, t_sc, r_sb, r_sn, r_sc, g_sb, g_sc, h_sb, h_sn, h_sc,
    GATED_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = adaLN of the rows of x or, with GATED_RESIDUAL, of h = x + gate * branch (written too)."""
    b = tl.program_id(1)
    one_plus_scale, shift = _sample_modulation(b, C, scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, BLOCK_C)
    if GATED_RESIDUAL:
        gate = _sample_gate(b, C, gate_ptr, g_sb, g_sc, BLOCK_C)
    start, end = _chunk_range(tl.program_id(0), N, ROWS)
    for r0 in range(start, end, BLOCK_N):
        rows, cols, mask = _row_tile(r0, end, C, BLOCK_N, BLOCK_C)
        x = tl.load(x_ptr + _row_offsets(b, rows, cols, x_sb, x_sn, x_sc), mask=mask, other=0.0).to(tl.float32)
        if GATED_RESIDUAL:
            _, x = _gated_residual_rows(x, x_ptr, branch_ptr, gate, b, rows, cols, mask, r_sb, r_sn, r_sc)
            tl.store(h_ptr + _row_offsets(b, rows, cols, h_sb, h_sn, h_sc), x.to(h_ptr.dtype.element_ty), mask=mask)
        centered, rstd = _centered_rows(x, mask, cols, C, eps)
        y = centered * rstd[:, None] * one_plus_scale[None, :] + shift[None, :]
        tl.store(y_ptr + _row_offsets(b, rows, cols, y_sb, y_sn, y_sc), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_backward_kernel(
    dy_ptr, x_ptr, dx_ptr, sums_ptr, scale_ptr, shift_ptr, branch_ptr, gate_ptr, dh_ptr, dbranch_ptr,
    B, N, C, ROWS, eps,
    g_sb, g_sn, g_sc, x_sb, x_sn, x_sc, dx_sb, dx_sn, dx_sc, s_sb, s_sc, t_sb, t_sc, r_sb, r_sn, r_sc,
    gt_sb, gt_sc, dh_sb, dh_sn, dh_sc, dr_sb, dr_sn, dr_sc,
    GATED_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx of adaLN and the per-chunk column sums of dy and dy * xhat; with GATED_RESIDUAL the
    rows are h = x + gate * branch, dx adds the gradient dh of h, dbranch = gate * dx, and a
    third column sum holds branch * dx."""
    b = tl.program_id(1)
    one_plus_scale, _ = _sample_modulation(b, C, scale_ptr, s_sb, s_sc, shift_ptr, t_sb, t_sc, BLOCK_C)
    if GATED_RESIDUAL:
        gate = _sample_gate(b, C, gate_ptr, gt_sb, gt_sc, BLOCK_C)
        sum_branch_dx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start, end = _chunk_range(tl.program_id(0), N, ROWS)
    sum_dy = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_dy_xhat = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_N):
        rows, cols, mask = _row_tile(r0, end, C, BLOCK_N, BLOCK_C)
        x = tl.load(x_ptr + _row_offsets(b, rows, cols, x_sb, x_sn, x_sc), mask=mask, other=0.0).to(tl.float32)
        if GATED_RESIDUAL:
            branch, x = _gated_residual_rows(x, x_ptr, branch_ptr, gate, b, rows, cols, mask, r_sb, r_sn, r_sc)
        dy = tl.load(dy_ptr + _row_offsets(b, rows, cols, g_sb, g_sn, g_sc), mask=mask, other=0.0).to(tl.float32)
        centered, rstd = _centered_rows(x, mask, cols, C, eps)
        xhat = centered * rstd[:, None]
        dxhat = dy * one_plus_scale[None, :]
        mean_dxhat = tl.sum(dxhat, axis=1) / C
        mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / C
        dx = rstd[:, None] * (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None])
        if GATED_RESIDUAL:
            dh = tl.load(dh_ptr + _row_offsets(b, rows, cols, dh_sb, dh_sn, dh_sc), mask=mask, other=0.0)
            dx += dh.to(tl.float32)
            tl.store(dbranch_ptr + _row_offsets(b, rows, cols, dr_sb, dr_sn, dr_sc),
                     (gate[None, :] * dx).to(dbranch_ptr.dtype.element_ty), mask=mask)
            sum_branch_dx += tl.sum(branch * dx, axis=0)
        tl.store(dx_ptr + _row_offsets(b, rows, cols, dx_sb, dx_sn, dx_sc), dx.to(dx_ptr.dtype.element_ty), mask=mask)
        sum_dy += tl.sum(dy, axis=0)
        sum_dy_xhat += tl.sum(dy * xhat, axis=0)
    cols = tl.arange(0, BLOCK_C)
    num_chunks = tl.num_programs(0)
    k = tl.program_id(0)
    tl.store(sums_ptr + _sums_offsets(0, k, b, cols, num_chunks, B, C), sum_dy, mask=cols < C)
    tl.store(sums_ptr + _sums_offsets(1, k, b, cols, num_chunks, B, C), sum_dy_xhat, mask=cols < C)
    if GATED_RESIDUAL:
        tl.store(sums_ptr + _sums_offsets(2, k, b, cols, num_chunks, B, C), sum_branch_dx, mask=cols < C)


def _target_programs(device: torch.device, per_sm: int) -> int:
    """Programs that fill the GPU; on the interpreter (sequential) one is enough. Group norm
    asks for one program per SM before it splits (a split costs a second read of x), layer
    norm rows are independent and ask for several."""
    sms = sm_count(device)
    return 1 if sms is None else per_sm * sms


class _GroupPlan:
    """Tile shape, groups per program and the spatial chunking of one ada_group_norm call.

    chunk_size (positions per chunk, rounded up to a power of two; tests use it to force the
    split path on small inputs) splits S into chunks of that size whenever S is larger; None
    picks the fused path when one program per group block is both enough programs and not too
    much serial work, else chunks that fill the GPU."""

    def __init__(self, x3: torch.Tensor, num_groups: int, chunk_size=None):
        batch, channels, positions = x3.shape
        self.groups = num_groups
        self.channels_per_group = channels // num_groups
        channels_fast = x3.stride(1) == 1 and positions > 1
        # channels_last rows are short runs of contiguous channels: widen the tile across
        # groups to 64 channels; NCHW rows are contiguous positions: keep channel tiles narrow.
        self.cpg_tile = min(triton.next_power_of_2(self.channels_per_group), 64 if channels_fast else 32)
        groups_pow2 = triton.next_power_of_2(num_groups)
        positions_pow2 = triton.next_power_of_2(max(positions, 1))
        if channels_fast:
            self.gpp = min(groups_pow2, max(1, 64 // self.cpg_tile))
        else:  # several small groups (AdaIN at 4 x 4) per program, else one
            self.gpp = min(groups_pow2, max(1, 1024 // (self.cpg_tile * positions_pow2)))
        self.block_s = min(positions_pow2, max(1, _TILE_ELEMENTS // (self.gpp * self.cpg_tile)))
        self.group_blocks = batch * triton.cdiv(num_groups, self.gpp)
        if chunk_size is None:
            tiles = triton.cdiv(max(positions, 1), self.block_s)
            block_elements = self.gpp * self.channels_per_group * positions
            wanted = max(triton.cdiv(_target_programs(x3.device, per_sm=1), self.group_blocks),
                         triton.cdiv(block_elements, _MAX_FUSED_ELEMENTS))
            self.chunk = self.block_s * triton.cdiv(tiles, min(tiles, wanted, _MAX_CHUNKS))
        else:
            self.chunk = triton.next_power_of_2(chunk_size)
            self.block_s = min(self.block_s, self.chunk)
        self.num_chunks = triton.cdiv(max(positions, 1), self.chunk)

    @property
    def fused(self) -> bool:
        return self.num_chunks == 1

    def grid(self) -> tuple:
        return (self.num_chunks * self.group_blocks,)

    def meta(self) -> dict:
        return dict(GPP=self.gpp, CPG_TILE=self.cpg_tile, BLOCK_S=self.block_s, num_warps=_NUM_WARPS)

    def chunking(self) -> dict:
        """The split path's kernels' chunk arguments."""
        return dict(CHUNK=self.chunk, NUM_CHUNKS=self.num_chunks)

    def chunk_stats(self, x3: torch.Tensor) -> tuple:
        """The split path's first launch: float32 (mean, M2) of every chunk of every group."""
        batch, _, positions = x3.shape
        mean, m2 = (torch.empty(batch * self.groups * self.num_chunks, device=x3.device, dtype=torch.float32)
                    for _ in "mv")
        _chunk_stats_kernel[self.grid()](x3, mean, m2, self.groups, self.channels_per_group, positions,
                                         **self.chunking(), **_strides("x", x3), **self.meta(), **LAUNCH_OPTIONS)
        return mean, m2


def _flat_spatial(t: torch.Tensor) -> torch.Tensor:
    """(B, C, S): a view where the strides allow (contiguous, channels_last, sliced), else a copy."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def _modulation_args(scale, shift, weight, bias) -> dict:
    # Absent weight / bias are never read (HAS_WEIGHT / HAS_BIAS); scale stands in for them.
    return dict(
        scale_ptr=scale, s_sb=scale.stride(0), s_sc=scale.stride(1),
        shift_ptr=shift, t_sb=shift.stride(0), t_sc=shift.stride(1),
        weight_ptr=scale if weight is None else weight, w_s=0 if weight is None else weight.stride(0),
        bias_ptr=scale if bias is None else bias, bi_s=0 if bias is None else bias.stride(0),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
    )


def _strides(prefix: str, t: torch.Tensor) -> dict:
    return dict(zip((f"{prefix}_sb", f"{prefix}_sc", f"{prefix}_ss"), t.stride()))


def ada_group_norm_forward(x, scale, shift, num_groups: int, weight, bias, eps: float, act, *, out,
                           chunk_size=None) -> None:
    """out = ada_group_norm(x, ...) (fastgen/ops/ada_norm.py), written in place."""
    if out.numel() == 0:
        return
    x3, y3 = _flat_spatial(x), out.view(out.shape[0], out.shape[1], -1)
    plan = _GroupPlan(x3, num_groups, chunk_size)
    args = dict(G=num_groups, CPG=plan.channels_per_group, S=x3.shape[2], eps=eps,
                **_strides("x", x3), **_strides("y", y3), **_modulation_args(scale, shift, weight, bias),
                ACT_SILU=act == "silu", **plan.meta())
    if plan.fused:
        _group_norm_fused_kernel[plan.grid()](x3, y3, **args, **LAUNCH_OPTIONS)
        return
    mean, m2 = plan.chunk_stats(x3)
    _group_norm_apply_kernel[plan.grid()](x3, y3, mean, m2, **plan.chunking(), **args, **LAUNCH_OPTIONS)


def _finish_modulation_grads(sums, num_chunks, scale, weight, bias, dscale, dshift, dweight=None, dbias=None,
                             dgate=None):
    """dscale, dshift (and dweight, dbias, dgate when given) from the per-chunk channel sums."""
    batch, channels = scale.shape
    affine = dweight is not None
    _modulation_grad_kernel[(triton.cdiv(channels, _FINISH_BLOCK),)](
        sums, scale, *scale.stride(),
        scale if weight is None else weight, 0 if weight is None else weight.stride(0),
        scale if bias is None else bias, 0 if bias is None else bias.stride(0),
        dscale, *dscale.stride(), dshift, *dshift.stride(),
        dweight if affine else dscale, dweight.stride(0) if affine else 0,
        dbias if affine else dscale, dbias.stride(0) if affine else 0,
        dscale if dgate is None else dgate, *(dscale if dgate is None else dgate).stride(),
        batch, channels, num_chunks,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, AFFINE_GRADS=affine, GATE_GRAD=dgate is not None,
        BLOCK=_FINISH_BLOCK,
        **LAUNCH_OPTIONS,
    )


def ada_group_norm_backward(grad, x, scale, shift, num_groups: int, weight, bias, eps: float, act, *, out,
                            chunk_size=None) -> None:
    """out = (dx, dscale, dshift, dweight, dbias), the gradients of ada_group_norm for the output
    gradient grad, written in place; dweight and dbias are the affine parameters' gradients
    (weight 1, bias 0 when absent)."""
    dx, dscale, dshift, dweight, dbias = out
    if x.numel() == 0:
        for t in (dx, dscale, dshift, dweight, dbias):
            t.zero_()
        return
    x3, g3 = _flat_spatial(x), _flat_spatial(grad)
    dx3 = dx.view(dx.shape[0], dx.shape[1], -1)
    plan = _GroupPlan(x3, num_groups, chunk_size)
    batch, channels, positions = x3.shape
    sums = torch.empty(2, plan.num_chunks, batch, channels, device=x.device, dtype=torch.float32)
    common = dict(G=num_groups, CPG=plan.channels_per_group, S=positions, eps=eps,
                  **_strides("x", x3), **_strides("g", g3), **_modulation_args(scale, shift, weight, bias),
                  ACT_SILU=act == "silu", **plan.meta())
    if plan.fused:
        _group_norm_backward_fused_kernel[plan.grid()](g3, x3, dx3, sums, B=batch, C=channels, **_strides("dx", dx3),
                                                       **common, **LAUNCH_OPTIONS)
    else:
        mean, m2 = plan.chunk_stats(x3)
        group_a_sums, group_b_sums = torch.empty(2, batch * num_groups, plan.num_chunks, device=x.device,
                                                 dtype=torch.float32)
        _channel_grad_sums_kernel[plan.grid()](g3, x3, sums, group_a_sums, group_b_sums, mean, m2, B=batch,
                                               C=channels, **plan.chunking(), **common, **LAUNCH_OPTIONS)
        _input_grad_kernel[plan.grid()](g3, x3, dx3, group_a_sums, group_b_sums, mean, m2, **plan.chunking(),
                                        **_strides("dx", dx3), **common, **LAUNCH_OPTIONS)
    _finish_modulation_grads(sums, plan.num_chunks, scale, weight, bias, dscale, dshift, dweight, dbias)


class _RowPlan:
    """Whole rows of C channels, BLOCK_N rows per tile, ROWS rows per program."""

    def __init__(self, x: torch.Tensor, op_name: str):
        batch, tokens, channels = x.shape
        if channels > _MAX_LAYER_NORM_CHANNELS:
            raise ValueError(f"{op_name}: the Triton kernels hold whole rows and support C <= "
                             f"{_MAX_LAYER_NORM_CHANNELS}, got C={channels}")
        self.block_c = triton.next_power_of_2(max(channels, 1))
        self.block_n = max(1, min(triton.next_power_of_2(max(tokens, 1)), _TILE_ELEMENTS // self.block_c))
        tiles = triton.cdiv(max(tokens, 1), self.block_n)
        chunks = min(tiles, _MAX_CHUNKS, max(1, triton.cdiv(_target_programs(x.device, per_sm=4), batch)))
        self.rows = self.block_n * triton.cdiv(tiles, chunks)
        self.num_chunks = triton.cdiv(max(tokens, 1), self.rows)
        self.num_warps = min(16, max(4, self.block_n * self.block_c // 512))

    def grid(self, batch: int) -> tuple:
        return (self.num_chunks, batch)

    def meta(self) -> dict:
        return dict(BLOCK_N=self.block_n, BLOCK_C=self.block_c, num_warps=self.num_warps)


def _row_strides(t) -> tuple:
    """(b, n, c) strides of a (B, N, C) tensor; zeros for an absent one (never read: GATED_RESIDUAL off)."""
    return (0, 0, 0) if t is None else t.stride()


def _layer_norm_forward(x, scale, shift, eps, y, op_name, branch=None, gate=None, h=None) -> None:
    """y = adaLN(x) or, given branch, gate and h, h = x + gate * branch and y = adaLN(h)."""
    if y.numel() == 0:
        return
    plan = _RowPlan(x, op_name)
    batch, tokens, channels = x.shape
    gated = branch is not None
    _layer_norm_kernel[plan.grid(batch)](
        x, y, scale, shift, branch if gated else x, gate if gated else scale, h if gated else y,
        tokens, channels, plan.rows, eps,
        *x.stride(), *y.stride(), *scale.stride(), *shift.stride(), *_row_strides(branch),
        *(gate.stride() if gated else (0, 0)), *_row_strides(h),
        GATED_RESIDUAL=gated, **plan.meta(), **LAUNCH_OPTIONS,
    )


def _layer_norm_backward(grad, x, scale, shift, eps, dx, dscale, dshift, op_name, branch=None, gate=None,
                         grad_h=None, dbranch=None, dgate=None) -> None:
    """The gradients of adaLN, or with branch, gate, grad_h those of the gated residual too."""
    gated = branch is not None
    if x.numel() == 0:
        for t in (dx, dscale, dshift, dbranch, dgate):
            if t is not None:
                t.zero_()
        return
    plan = _RowPlan(x, op_name)
    batch, tokens, channels = x.shape
    sums = torch.empty(3 if gated else 2, plan.num_chunks, batch, channels, device=x.device, dtype=torch.float32)
    _layer_norm_backward_kernel[plan.grid(batch)](
        grad, x, dx, sums, scale, shift, branch if gated else x, gate if gated else scale,
        grad_h if gated else grad, dbranch if gated else dx, batch, tokens, channels, plan.rows, eps,
        *grad.stride(), *x.stride(), *dx.stride(), *scale.stride(), *shift.stride(), *_row_strides(branch),
        *(gate.stride() if gated else (0, 0)), *_row_strides(grad_h), *_row_strides(dbranch),
        GATED_RESIDUAL=gated, **plan.meta(), **LAUNCH_OPTIONS,
    )
    _finish_modulation_grads(sums, plan.num_chunks, scale, None, None, dscale, dshift, dgate=dgate)


def ada_layer_norm_forward(x, scale, shift, eps: float, *, out) -> None:
    """out = ada_layer_norm(x, scale, shift, eps), written in place."""
    _layer_norm_forward(x, scale, shift, eps, out, "ada_layer_norm")


def ada_layer_norm_backward(grad, x, scale, shift, eps: float, *, out) -> None:
    """out = (dx, dscale, dshift) of ada_layer_norm for the output gradient grad, written in place."""
    _layer_norm_backward(grad, x, scale, shift, eps, *out, "ada_layer_norm")


def gated_residual_ada_layer_norm_forward(x, branch, gate, scale, shift, eps: float, *, out) -> None:
    """out = (h, y) of gated_residual_ada_layer_norm, written in place."""
    h, y = out
    _layer_norm_forward(x, scale, shift, eps, y, "gated_residual_ada_layer_norm", branch, gate, h)


def gated_residual_ada_layer_norm_backward(grad_h, grad_y, x, branch, gate, scale, shift, eps: float, *,
                                           out) -> None:
    """out = (dx, dbranch, dgate, dscale, dshift) of gated_residual_ada_layer_norm, written in place."""
    dx, dbranch, dgate, dscale, dshift = out
    _layer_norm_backward(grad_y, x, scale, shift, eps, dx, dscale, dshift, "gated_residual_ada_layer_norm",
                         branch, gate, grad_h, dbranch, dgate)
