"""Triton flash-attention kernels for cross- and self-attention (math in
fastgen/ops/cross_attention.py).

Every tensor is addressed through its four (B, L, H, D) strides, so q, k and v can be views
of one fused projection; nothing is copied or padded in memory. The head dim D is padded to
D_PAD = max(16, next power of two) inside the kernels by masked loads (tl.dot needs every
dimension >= 16 and power-of-two block shapes); the padded columns load as zeros, add nothing
to q.k and are never stored. Offsets are int64.

Grids are 1-D over B*H heads x blocks of rows, the blocks fastest, so that the programs of
one head run together and share its keys and values in L2; B*H alone passes the 65,535
programs of grid axes 1 and 2 (DiT-XL/2's 16 heads at batch 4096), axis 0 takes 2^31 - 1.

Forward, one launch over query blocks: each program keeps BLOCK_M query rows and
streams the keys and values in tiles of BLOCK_N with the online softmax: a running row max m
and row sum l in float32, the accumulator rescaled by exp(m_old - m_new) when the max grows.
Scores are scale * q.k in float32, and every exponent is exp2((s - pivot) * log2(e)) (exp2
is the hardware instruction): the difference is taken before the multiply, so the row max's
own key gets exactly exp2(0) = 1 even at scores near 1e20, where folding log2(e) into the
score would round the max and its key apart by 2^40. Key columns past Lkv or masked out get a
score of -inf; while a row's scores are all -inf, m is -inf and the exponent is taken against
0 instead, so no inf - inf NaN appears. It writes out = acc / l and the row's log-sum-exp
m + log(l) in float64 (exactly m where l = 1, so the backward's exp(s - lse) is exactly 1
there; a float32 lse would give P a relative error up to |lse| 2^-24). A row
with a key follows the reference's softmax into NaN (a NaN or +inf score, or scores all -inf:
0 / 0, lse -inf); a row with no key, counted by its mask, gets out 0 and lse +inf, so that the
backward's exp(s - lse) is 0 there.

Block-causal attention (causal_block_ends, constexpr BLOCK_CAUSAL; without it the kernels
compile as before): each row's key end, the first block end past it, comes from a loop over the
ends (a few dozen at most) at the start of a program. A query-block program streams the key
tiles only up to the largest key end of its rows (the last row's: the ends increase), so the
tiles past it are neither loaded nor computed; inside the tiles it streams, keys at or past a
row's end are masked as padding is, and a row's key count, which decides the keyless-row
convention, is counted per row. The dk / dv program of a key tile starts its query loop at the
tile holding the first row that sees the tile's first key (that key's block start): rows
before it see none of the tile's keys.

Backward (FlashAttention-2), two launches, no atomics (deterministic):
  1. `_query_grad_kernel`, over query blocks: computes delta = rowsum(dout * out) for its
     rows and stores it for the next launch, then streams the key/value tiles recomputing
     P = exp(s - lse), dP = dout v^T, dS = P (dP - delta), and accumulates dq = scale dS k.
     lse is split per row into float32 parts hi + lo and the exponent taken as (s - hi) - lo:
     s - hi is exact where s is within a factor 2 of hi (Sterbenz), and elsewhere off by at
     most 2^-24 |s - hi|, as any float32 exponent is, so the float32 tiles keep the float64
     lse's digits at one subtraction more per element.
     dS is exactly 0 at masked keys, at rows without keys and (second launch) at the rows
     past Lq, where P is 0 but dP or delta may be NaN: the reference passes no gradient there.
     The second launch masks the rows past Lq as padded keys are masked, so their P is 0 even
     where their zero-loaded q meets an infinite key element (a 0 * inf = NaN score).
  2. `_key_value_grad_kernel`, over key blocks: keeps BLOCK_N keys and streams the
     query tiles, recomputing P^T and dP^T, and accumulates dv = P^T dout, dk = scale dS^T q.
     Its scores are the transpose of the forward's product q k^T, not k q^T, whose float32
     rounding differs (at scores near 1e20 by 1e13: P^T 0 where the forward's max key had 1).
Both clamp the recomputed exponent s - lse at 0 (P <= 1, as the forward's are): a score a
rounding above the forward's row max makes an infinite P otherwise. The passes assume their
float32 scores equal the forward's: a score recomputed one rounding apart moves its P by a
factor e^ulp, past float32's tolerance from scores of about 100, by e from 8.4e6 (an ulp of 1),
and at 1e20 to 0 for the forward's max key. Equality holds under the interpreter (every
kernel's tiles 16 x 16) and is owed a check on a GPU, where the three launches' tiles are tuned
apart: test_backward_probabilities_keep_the_digits_of_large_scores (scores up to 4e4 and 8.5e6)
fails there if they differ.
P and dS are recomputed twice (once per launch) instead of sharing dq between key blocks
with atomic adds: that costs two of the backward's seven tile products again but makes every
gradient a fixed-order sum.

Precision: tl.dot takes the input dtype (tensor cores for float16/bfloat16, P and dS rounded
to it as FlashAttention does) and accumulates in float32. Float32 inputs use
input_precision="tf32x3": each operand is split into two TF32 parts and three tensor-core
products are summed, which leaves a relative error of about 2^-21 per product, as accurate as
eager float32 attention in an emulation of it (2e-6..4e-6 against float64 at D = 40..256, where
plain TF32 is 2e-3 off and misses the float32 tolerance). "ieee" (exact float32 FMA) would be as
accurate but cannot run on tensor cores: with it ptxas for sm_90 spills 2.7..77 KB per thread
(most above 17 KB) in every float32 configuration at D_PAD 128. Softmax statistics and all
elementwise arithmetic are float32, but for lse's sum m + log(l) and its split (float64). The
Triton CPU interpreter computes bfloat16 dots wrongly (conversions are exact), so under the
interpreter bfloat16 operands are converted to float32 before each dot (UPCAST_DOTS): the
values multiplied are the same bfloat16 values.

Tiles: a few autotuned configs, valid on Ampere and Hopper, pruned by D_PAD so the tiles a
program keeps and streams fit in registers (budgets from ptxas, below), plus a lean last
config always kept so that one fits in shared memory at every D (see _prune); BLOCK_N = 32
wastes least on the 77 text tokens of Stable Diffusion (96 columns computed instead of 128).
Under the interpreter one fixed small config runs (autotuning there would only multiply the
test time); under torch.use_deterministic_algorithms(True) the lean config runs without
autotuning, so the choice cannot differ between processes.
"""
import torch
import triton
import triton.language as tl

from fastgen.kernels import LAUNCH_OPTIONS
from fastgen.ops.cross_attention import effective_scale, lse_shape
from fastgen.ops.registry import triton_interpreter_enabled

# Module constants a kernel may read must be tl.constexpr.
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tile_offsets(b, h, rows, d, s_b, s_l, s_h, s_d):
    """(len(rows), D_PAD) offsets of rows `rows` of head (b, h), columns d."""
    return b.to(tl.int64) * s_b + rows.to(tl.int64)[:, None] * s_l + h.to(tl.int64) * s_h + d.to(tl.int64)[None, :] * s_d


@triton.jit
def _load_tile(ptr, b, h, rows, L, d, D: tl.constexpr, s_b, s_l, s_h, s_d):
    """Rows `rows` of head (b, h) in the input dtype; zeros outside L x D."""
    mask = (rows < L)[:, None] & (d < D)[None, :]
    return tl.load(ptr + _tile_offsets(b, h, rows, d, s_b, s_l, s_h, s_d), mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, values, b, h, rows, L, d, D: tl.constexpr, s_b, s_l, s_h, s_d):
    mask = (rows < L)[:, None] & (d < D)[None, :]
    tl.store(ptr + _tile_offsets(b, h, rows, d, s_b, s_l, s_h, s_d), values.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _program_block(L, BLOCK: tl.constexpr):
    """(block of BLOCK rows along a sequence of L, b * H + h) of this program (module docstring)."""
    blocks = tl.cdiv(L, BLOCK)
    return tl.program_id(0) % blocks, tl.program_id(0) // blocks


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    if UPCAST_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _key_is_valid(mask_ptr, b, cols, LKV, m_sb, m_sl, HAS_MASK: tl.constexpr):
    """True for the columns that are keys of this batch row: inside Lkv and not padding."""
    valid = cols < LKV
    if HAS_MASK:
        keep = tl.load(mask_ptr + b.to(tl.int64) * m_sb + cols.to(tl.int64) * m_sl, mask=valid, other=0)
        valid = valid & (keep != 0)
    return valid


@triton.jit
def _row_key_ends(ends_ptr, NUM_ENDS, e_s, rows):
    """Each row's key end under block-causal attention: the first block end past the row (the
    ends increase, the first is >= 1), 0 for rows past the last end. A loop over the ends: they
    are a few dozen at most."""
    key_ends = rows * 0
    for j in range(0, NUM_ENDS):
        end = tl.load(ends_ptr + j * e_s).to(tl.int32)
        key_ends = tl.where((key_ends == 0) & (end > rows), end, key_ends)
    return key_ends


@triton.jit
def _block_starts(ends_ptr, NUM_ENDS, e_s, cols):
    """Each key's block start, the last block end at or before it (0 in the first block): the
    first query row that sees the key under block-causal attention."""
    starts = cols * 0
    for j in range(0, NUM_ENDS):
        end = tl.load(ends_ptr + j * e_s).to(tl.int32)
        starts = tl.where(end <= cols, end, starts)
    return starts


@triton.jit
def _scores(a, b_t, valid, scale, PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr):
    """scale * a b_t^T in float32, -inf where `valid` (broadcast to the tile) is False. The
    where sits between the product and every later subtraction, so the product is rounded
    on its own (never contracted into an FMA with the subtraction): the forward's row max and
    the backward's score of that key are then the same float32 number."""
    return tl.where(valid, _dot(a, tl.trans(b_t), PRECISION, UPCAST_DOTS) * scale, float("-inf"))


@triton.jit
def _exp(x):
    return tl.exp2(x * _LOG2E)


@triton.jit
def _recomputed_probabilities(s, lse_hi, lse_lo):
    """exp((s - lse_hi) - lse_lo) of recomputed scores, at most 1: the exponent is clamped at 0
    (NaN kept). A score recomputed one float32 rounding above the forward's row max (an ulp is
    1e13 at scores near 1e20) would make P infinite."""
    x = (s - lse_hi) - lse_lo
    return _exp(tl.where(x > 0.0, 0.0, x))


@triton.jit
def _row_stats_ptrs(stats_ptr, bh, rows, LQ):
    """Pointers and bounds into a (B, H, Lq) row statistic (contiguous)."""
    return stats_ptr + bh.to(tl.int64) * LQ + rows, rows < LQ


@triton.jit
def _lse_parts(lse_ptr, bh, rows, LQ):
    """The float64 lse of `rows` as float32 hi + lo (hi the nearest float32, lo the rest; lo 0
    where hi is infinite, keeping a keyless row's +inf), and the rows' bounds. Rows past Lq
    read +inf."""
    ptrs, in_range = _row_stats_ptrs(lse_ptr, bh, rows, LQ)
    lse = tl.load(ptrs, mask=in_range, other=float("inf"))
    hi = lse.to(tl.float32)
    infinite = (hi == float("inf")) | (hi == float("-inf"))
    lo = tl.where(infinite, 0.0, (lse - hi.to(tl.float64)).to(tl.float32))
    return hi, lo, in_range


@triton.jit
def _score_grad(p, dp, delta, counted):
    """dS = P (dP - delta) where `counted`, exactly 0 elsewhere: the reference's masked_fill
    and where pass no gradient to a masked key or a row without keys, even where dP or delta
    is NaN (a NaN or infinite v there makes them so) and P is 0."""
    return tl.where(counted, p * (dp - delta), 0.0)


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, ends_ptr, out_ptr, lse_ptr,
    LQ, LKV, H, scale, NUM_ENDS,
    q_sb, q_sl, q_sh, q_sd,
    k_sb, k_sl, k_sh, k_sd,
    v_sb, v_sl, v_sh, v_sd,
    m_sb, m_sl, e_s,
    o_sb, o_sl, o_sh, o_sd,
    D: tl.constexpr, D_PAD: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block, bh = _program_block(LQ, BLOCK_M)
    b, h = bh // H, bh % H
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    q = _load_tile(q_ptr, b, h, rows, LQ, d, D, q_sb, q_sl, q_sh, q_sd)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    if BLOCK_CAUSAL:
        # Key tiles past the block end of the tile's last row are skipped, not masked.
        key_ends = _row_key_ends(ends_ptr, NUM_ENDS, e_s, tl.where(rows < LQ, rows, LQ - 1))
        key_stop = tl.max(key_ends, axis=0)
        keys = tl.zeros((BLOCK_M,), dtype=tl.int32)
    else:
        key_stop = LKV
        keys = 0
    for start in range(0, key_stop, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, b, h, cols, LKV, d, D, k_sb, k_sl, k_sh, k_sd)
        valid = _key_is_valid(mask_ptr, b, cols, LKV, m_sb, m_sl, HAS_MASK)
        if BLOCK_CAUSAL:
            counted = valid[None, :] & (cols[None, :] < key_ends[:, None])
            keys += tl.sum(counted.to(tl.int32), axis=1)
        else:
            counted = valid[None, :]
            keys += tl.sum(valid.to(tl.int32), axis=0)
        scores = _scores(q, k, counted, scale, PRECISION, UPCAST_DOTS)
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        # While a row's scores are all -inf its max is -inf: exponents against 0 give p = 0,
        # rescale 0. Differences to the max, not products folded with it, give the max's own
        # key p = 1 exactly, however large its score.
        pivot = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = _exp(scores - pivot[:, None])
        rescale = _exp(row_max - pivot)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        v = _load_tile(v_ptr, b, h, cols, LKV, d, D, v_sb, v_sl, v_sh, v_sd)
        acc = acc * rescale[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST_DOTS)
        row_max = new_max
    # With a key, the reference's softmax: NaN for a row whose scores hold NaN or +inf (the
    # sum is NaN) or are all -inf (0 / 0). Without one, out 0 and lse +inf (module docstring).
    has_key = keys > 0
    out = acc / tl.where(has_key, row_sum, 1.0)[:, None]
    _store_tile(out_ptr, out, b, h, rows, LQ, d, D, o_sb, o_sl, o_sh, o_sd)
    lse_ptrs, in_range = _row_stats_ptrs(lse_ptr, bh, rows, LQ)
    log_sum = (tl.log2(row_sum) * _LN2).to(tl.float64)
    lse = tl.where(has_key, row_max.to(tl.float64) + log_sum, float("inf"))
    tl.store(lse_ptrs, lse, mask=in_range)


@triton.jit
def _query_grad_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, ends_ptr, out_ptr, grad_ptr, lse_ptr, delta_ptr, dq_ptr,
    LQ, LKV, H, scale, NUM_ENDS,
    q_sb, q_sl, q_sh, q_sd,
    k_sb, k_sl, k_sh, k_sd,
    v_sb, v_sl, v_sh, v_sd,
    m_sb, m_sl, e_s,
    o_sb, o_sl, o_sh, o_sd,
    g_sb, g_sl, g_sh, g_sd,
    dq_sb, dq_sl, dq_sh, dq_sd,
    D: tl.constexpr, D_PAD: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block, bh = _program_block(LQ, BLOCK_M)
    b, h = bh // H, bh % H
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D_PAD)
    q = _load_tile(q_ptr, b, h, rows, LQ, d, D, q_sb, q_sl, q_sh, q_sd)
    grad = _load_tile(grad_ptr, b, h, rows, LQ, d, D, g_sb, g_sl, g_sh, g_sd)
    out = _load_tile(out_ptr, b, h, rows, LQ, d, D, o_sb, o_sl, o_sh, o_sd)
    delta = tl.sum(grad.to(tl.float32) * out.to(tl.float32), axis=1)
    stats_ptrs, in_range = _row_stats_ptrs(delta_ptr, bh, rows, LQ)
    tl.store(stats_ptrs, delta, mask=in_range)
    lse_hi, lse_lo, _ = _lse_parts(lse_ptr, bh, rows, LQ)
    dq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)
    if BLOCK_CAUSAL:
        key_ends = _row_key_ends(ends_ptr, NUM_ENDS, e_s, tl.where(rows < LQ, rows, LQ - 1))
        key_stop = tl.max(key_ends, axis=0)
    else:
        key_stop = LKV
    for start in range(0, key_stop, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_ptr, b, h, cols, LKV, d, D, k_sb, k_sl, k_sh, k_sd)
        v = _load_tile(v_ptr, b, h, cols, LKV, d, D, v_sb, v_sl, v_sh, v_sd)
        valid = _key_is_valid(mask_ptr, b, cols, LKV, m_sb, m_sl, HAS_MASK)
        if BLOCK_CAUSAL:
            counted = valid[None, :] & (cols[None, :] < key_ends[:, None])
        else:
            counted = valid[None, :]
        p = _recomputed_probabilities(_scores(q, k, counted, scale, PRECISION, UPCAST_DOTS), lse_hi[:, None],
                                      lse_lo[:, None])
        dp = _dot(grad, tl.trans(v), PRECISION, UPCAST_DOTS)
        ds = _score_grad(p, dp, delta[:, None], counted)
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST_DOTS)
    _store_tile(dq_ptr, dq * scale, b, h, rows, LQ, d, D, dq_sb, dq_sl, dq_sh, dq_sd)


@triton.jit
def _key_value_grad_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, ends_ptr, grad_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    LQ, LKV, H, scale, NUM_ENDS,
    q_sb, q_sl, q_sh, q_sd,
    k_sb, k_sl, k_sh, k_sd,
    v_sb, v_sl, v_sh, v_sd,
    m_sb, m_sl, e_s,
    g_sb, g_sl, g_sh, g_sd,
    dk_sb, dk_sl, dk_sh, dk_sd,
    dv_sb, dv_sl, dv_sh, dv_sd,
    D: tl.constexpr, D_PAD: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST_DOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block, bh = _program_block(LKV, BLOCK_N)
    b, h = bh // H, bh % H
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D_PAD)
    k = _load_tile(k_ptr, b, h, cols, LKV, d, D, k_sb, k_sl, k_sh, k_sd)
    v = _load_tile(v_ptr, b, h, cols, LKV, d, D, v_sb, v_sl, v_sh, v_sd)
    valid = _key_is_valid(mask_ptr, b, cols, LKV, m_sb, m_sl, HAS_MASK)
    dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    if BLOCK_CAUSAL:
        # The query loop starts at the tile of the first row that sees the tile's first key.
        first_rows = _block_starts(ends_ptr, NUM_ENDS, e_s, cols)
        query_start = tl.min(first_rows, axis=0) // BLOCK_M * BLOCK_M
    else:
        query_start = 0
    for start in range(query_start, LQ, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_tile(q_ptr, b, h, rows, LQ, d, D, q_sb, q_sl, q_sh, q_sd)
        grad = _load_tile(grad_ptr, b, h, rows, LQ, d, D, g_sb, g_sl, g_sh, g_sd)
        lse_hi, lse_lo, in_range = _lse_parts(lse_ptr, bh, rows, LQ)
        delta_ptrs, _ = _row_stats_ptrs(delta_ptr, bh, rows, LQ)
        delta = tl.load(delta_ptrs, mask=in_range, other=0.0)
        # Rows past Lq are no rows of the reference: they are masked as padded keys are, so
        # their P^T column and dS^T are exactly 0. Their q loads as zeros, whose score with an
        # infinite key element is 0 * inf = NaN: the mask, not lse = +inf, makes P^T 0 there.
        if BLOCK_CAUSAL:
            counted_t = valid[:, None] & (rows[None, :] >= first_rows[:, None]) & in_range[None, :]
        else:
            counted_t = valid[:, None] & in_range[None, :]
        # The forward's product q k^T, operands in its order, transposed: k q^T rounds the same
        # scores differently (module docstring, backward).
        p_t = _recomputed_probabilities(tl.trans(_scores(q, k, tl.trans(counted_t), scale, PRECISION, UPCAST_DOTS)),
                                        lse_hi[None, :], lse_lo[None, :])
        dv += _dot(p_t.to(grad.dtype), grad, PRECISION, UPCAST_DOTS)
        dp_t = _dot(v, tl.trans(grad), PRECISION, UPCAST_DOTS)
        ds_t = _score_grad(p_t, dp_t, delta[None, :], counted_t)
        dk += _dot(ds_t.to(q.dtype), q, PRECISION, UPCAST_DOTS)
    _store_tile(dk_ptr, dk * scale, b, h, cols, LKV, d, D, dk_sb, dk_sl, dk_sh, dk_sd)
    _store_tile(dv_ptr, dv, b, h, cols, LKV, d, D, dv_sb, dv_sl, dv_sh, dv_sd)


def _configs(blocks: tuple) -> list:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
            for m, n, warps, stages in blocks]


# (BLOCK_M, BLOCK_N, warps, stages). The forward keeps a (BLOCK_M, D_PAD) accumulator and
# streams (BLOCK_N, D_PAD) key and value tiles; the query gradient kernel keeps dq plus the q
# and dout tiles and streams keys and values; the key/value gradient kernel keeps dk and dv
# (two (BLOCK_N, D_PAD) accumulators) and streams (BLOCK_M, D_PAD) q and dout tiles.
_FORWARD_BLOCKS = ((128, 32, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                   (64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2))
_BACKWARD_BLOCKS = ((64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2),
                    (128, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2), (64, 64, 8, 2), (32, 16, 4, 2))
# Tile elements (kept plus streamed rows, times D_PAD) per thread that a config may hold. From
# ptxas for sm_90 on the first 8 configs of every kernel at D_PAD 16, 64, 128 and 256 (Triton
# 3.9): within these budgets the candidates always include the least-spilling config of those,
# for 16-bit inputs one spilling at most 32 bytes per thread. Float32 (TF32x3: each operand
# held twice, as two TF32 parts) gets half the budget and still spills at D_PAD >= 128, least
# in the candidates kept (0.2..4.9 KB per thread, against up to 41 KB in others). Counting only
# the accumulators, as before, kept a key/value gradient config spilling 16.6 KB at D_PAD 128
# in float32 as the only candidate.
_TILE_ELEMENTS_PER_THREAD = {"tf32": 128, "tf32x3": 64}


def _prune(kept_and_streamed_rows):
    """Of all configs but the last, those whose tiles (kept plus streamed rows x D_PAD
    elements) fit the per-thread budget of the dot precision (when none does, those holding
    the fewest per thread); and always the last, the one with the fewest rows in shared memory
    (kept plus every stage's streamed rows). The GPU autotuner skips configs past the shared
    memory limit: in float32 at D_PAD 256 (SD 1.5's D = 160) no other forward config fits in
    sm_90's 227 KiB (the last takes 136 KiB), and in the backward the last (128..160 KiB) also
    spills least (1.4..2.1 KB per thread; the others kept there 2.4..34.6 KB, or 512 KiB of
    shared memory)."""
    def per_thread(config, d_pad):
        return sum(kept_and_streamed_rows(config.kwargs)) * d_pad / (32 * config.num_warps)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        *tiled, lean = configs
        footprint = [per_thread(c, args["D_PAD"]) for c in tiled]
        budget = _TILE_ELEMENTS_PER_THREAD[args["PRECISION"]]
        limit = budget if min(footprint) <= budget else min(footprint)
        return [c for c, f in zip(tiled, footprint) if f <= limit] + [lean]

    return prune


def _rows_in_shared_memory(kept_and_streamed_rows, config):
    kept, streamed = kept_and_streamed_rows(config.kwargs)
    return kept + config.num_stages * streamed


def _forward_rows(blocks):
    return blocks["BLOCK_M"], blocks["BLOCK_N"]


def _query_grad_rows(blocks):
    # dq, plus the q and dout tiles held across the loop (16-bit: together one float32 tile).
    return 2 * blocks["BLOCK_M"], blocks["BLOCK_N"]


def _key_value_grad_rows(blocks):
    return 2 * blocks["BLOCK_N"], blocks["BLOCK_M"]


# Under the interpreter: one small config whose tiles still split odd test lengths into
# several blocks (online softmax across tiles, partial last tiles).
_INTERPRETER_META = {"BLOCK_M": 16, "BLOCK_N": 16}
# The autotuner adds the dtypes of the tensor arguments to the key.
_TUNING_KEY = ["LQ", "LKV", "D_PAD", "HAS_MASK", "BLOCK_CAUSAL"]


class _Kernel:
    """A kernel with its autotuned twin: the fixed interpreter config, or autotuning."""

    def __init__(self, kernel, blocks, kept_and_streamed_rows, blocks_along):
        configs = _configs(blocks)
        rows = [_rows_in_shared_memory(kept_and_streamed_rows, config) for config in configs]
        assert rows[-1] == min(rows), "the prune keeps the last config for its shared memory: it must be the leanest"
        self.kernel = kernel
        self.lean = configs[-1]
        self.tuned = triton.autotune(configs, key=_TUNING_KEY,
                                     prune_configs_by={"early_config_prune": _prune(kept_and_streamed_rows)})(kernel)
        self.blocks_along = blocks_along  # "BLOCK_M" or "BLOCK_N": the size of the blocks the grid runs over

    def grid(self, length: int, batch_heads: int, blocks: dict) -> tuple:
        """Blocks of `length` rows of every head, with the block sizes `blocks` (module docstring)."""
        return (triton.cdiv(length, blocks[self.blocks_along]) * batch_heads,)

    def __call__(self, length: int, batch_heads: int, *args, **meta) -> None:
        if length == 0 or batch_heads == 0:
            return
        if triton_interpreter_enabled():
            grid = self.grid(length, batch_heads, _INTERPRETER_META)
            self.kernel[grid](*args, **meta, **_INTERPRETER_META, **LAUNCH_OPTIONS)
        elif torch.are_deterministic_algorithms_enabled():
            # The autotuner's pick rests on this process's timings; a fixed config does not.
            lean = self.lean
            self.kernel[self.grid(length, batch_heads, lean.kwargs)](
                *args, **meta, **lean.kwargs, num_warps=lean.num_warps, num_stages=lean.num_stages, **LAUNCH_OPTIONS)
        else:
            self.tuned[lambda config: self.grid(length, batch_heads, config)](*args, **meta, **LAUNCH_OPTIONS)


_forward = _Kernel(_forward_kernel, _FORWARD_BLOCKS, _forward_rows, "BLOCK_M")
_query_grad = _Kernel(_query_grad_kernel, _BACKWARD_BLOCKS, _query_grad_rows, "BLOCK_M")
_key_value_grad = _Kernel(_key_value_grad_kernel, _BACKWARD_BLOCKS, _key_value_grad_rows, "BLOCK_N")


def _mask_args(mask, q):
    """The mask as bytes (any strides) and its two strides; without one q stands in, unread."""
    if mask is None:
        return q, (0, 0)
    return mask.view(torch.uint8), mask.stride()


def _ends_args(ends, q):
    """The block ends (any stride), their count and stride; without them q stands in, unread."""
    if ends is None:
        return q, 0, 0
    return ends, ends.numel(), ends.stride(0)


def _meta(q, mask, ends) -> dict:
    head_dim = q.shape[-1]
    return dict(
        D=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)), HAS_MASK=mask is not None,
        BLOCK_CAUSAL=ends is not None,
        PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32",
        UPCAST_DOTS=q.dtype == torch.bfloat16 and triton_interpreter_enabled(),
    )


def cross_attention(q, k, v, mask, scale, causal_block_ends=None, *, out) -> None:
    """out = softmax(q k^T scale + mask bias) v, the row log-sum-exps discarded."""
    lse = torch.empty(lse_shape(q), dtype=torch.float64, device=q.device)
    cross_attention_forward(q, k, v, mask, scale, causal_block_ends, out=(out, lse))


# Query rows and keys are int32 indices in the kernels: a block's start plus its BLOCK_M or
# BLOCK_N (at most 128) stays below 2^31 for sequences shorter than this.
_MAX_SEQUENCE = 2**31 - 256


def _check_lengths(q, k) -> None:
    if max(q.shape[1], k.shape[1]) > _MAX_SEQUENCE:
        raise ValueError(f"cross_attention: the Triton kernels take sequences of at most {_MAX_SEQUENCE} "
                         f"queries and keys, got Lq={q.shape[1]}, Lkv={k.shape[1]}")


def cross_attention_forward(q, k, v, mask, scale, causal_block_ends=None, *, out) -> None:
    """out = (output (like q), lse ((B, H, Lq) float64)) of softmax(q k^T scale + mask bias) v."""
    _check_lengths(q, k)
    output, lse = out
    scale = effective_scale(q, scale)
    batch, q_len, heads, _ = q.shape
    mask_tensor, mask_strides = _mask_args(mask, q)
    ends, num_ends, ends_stride = _ends_args(causal_block_ends, q)
    _forward(
        q_len, batch * heads,
        q, k, v, mask_tensor, ends, output, lse,
        q_len, k.shape[1], heads, scale, num_ends,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, ends_stride, *output.stride(),
        **_meta(q, mask, causal_block_ends),
    )


def cross_attention_backward(grad, q, k, v, output, lse, mask, scale, causal_block_ends=None, *, out) -> None:
    """out = (dq, dk, dv) for the output gradient `grad`, from the forward's output and lse."""
    _check_lengths(q, k)
    dq, dk, dv = out
    scale = effective_scale(q, scale)
    batch, q_len, heads, _ = q.shape
    kv_len = k.shape[1]
    mask_tensor, mask_strides = _mask_args(mask, q)
    ends, num_ends, ends_stride = _ends_args(causal_block_ends, q)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    meta = _meta(q, mask, causal_block_ends)
    _query_grad(
        q_len, batch * heads,
        q, k, v, mask_tensor, ends, output, grad, lse, delta, dq,
        q_len, kv_len, heads, scale, num_ends,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, ends_stride, *output.stride(), *grad.stride(),
        *dq.stride(),
        **meta,
    )
    _key_value_grad(
        kv_len, batch * heads,
        q, k, v, mask_tensor, ends, grad, lse, delta, dk, dv,
        q_len, kv_len, heads, scale, num_ends,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, ends_stride, *grad.stride(), *dk.stride(),
        *dv.stride(),
        **meta,
    )
