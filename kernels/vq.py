"""Triton kernels for codebook nearest-neighbour search and VQ quantization (math and the
guarantees of each mode in fastgen/ops/vq.py).

Search (`_nearest_kernel`): program (i, s) owns BLOCK_N rows of z and the s-th contiguous
range of codebook tiles. It loads its z tile once and streams BLOCK_K x D codebook tiles;
for each tile the cross term z . e_k is one tensor-core `tl.dot` (fp16/bf16 operands as
given, fp32 operands with the requested input precision), the score is
    l2:      ||e_k||^2 - 2 z . e_k       (||z||^2 is the same for every k: left out)
    cosine:  -(z . e_k) / max(||e_k||, eps)
and a running (best score, index) per row is updated with a strict `<`, so that among equal
scores the lowest index (the earliest tile, and tl.min's left tie-break inside a tile) wins.
Codebook norms are precomputed once per call into a (K,) vector (`_code_norms_kernel`).
No N x K tensor exists anywhere: extra memory is O(K) for the norms and O(N * splits) for
the split results.

Splitting the codebook over a second grid axis keeps the GPU busy when N is small (VAR's
first scales have 1..100 tokens). Each split writes its best as one int64, the score's bits
mapped to an order-preserving integer in the high half and the index in the low half, so the
min of the packed values is the min score with the lowest index among ties; `_finish_kernel`
takes that min per row. With one split the search kernel finishes the rows itself.

The epilogue writes either (idx, distance) or, for vq_quantize, idx, z_q (the value of the
straight-through output: e_idx, and NaN where z is NaN or infinite, as there), the row's sum
of squared errors sum_d (z - e_idx)^2 in fp32 (direct form: no cancellation) and +1 on the
code's usage count (an int64 atomic add: exact, order-independent). `_sum_kernel` adds the
row sums in one program in a fixed order, so the loss is bitwise reproducible.

Exact mode (`_refine_kernel`, one more pass over the codebook): from the fast best score s*
of a row and a bound eps on the error of any fast score of that row (`_score_error_bound`),
every code with fast score <= s* + 2 eps is a candidate, and the code the float64 scores pick
(the true nearest up to their rounding, which eps covers too) is always among them.
Candidates other than the fast winner are rare (near-ties); only for them, one column at a
time, the score is recomputed in float64 from the input values in the direct form
sum_d (z_d - e_d)^2 (l2) or -(z . e) / max(||e||, eps) (cosine), and the float64 scores
decide, ties to the lowest index.

Non-finite scores. torch.argmin / argmax take a NaN before any number, so the kernels rank a
NaN score as -inf: the strict `<`, tl.min's left tie-break and the packed integer order then
all keep the first NaN, as the reference does. Otherwise a fast score is -inf only where z.e
= +inf, which with ||e||^2 finite needs an inf in z (the reference normalizes it to NaN for
cosine) or an infinite float32 ||z||^2 (l2: the reference's ||z||^2 + ||e||^2 - 2 z.e is inf -
inf), so a row whose best is -inf reports a NaN distance and, in exact mode, keeps that code
without rescoring. Padding columns past K score +inf and are never candidates, even where an infinite
squared norm (a code near 1e19) makes the candidate threshold infinite.

Arithmetic is float32 (float64 in the exact recheck) on values converted after loading,
bfloat16 by `to_float32`'s bit shift (the conversion a GPU does; the Triton CPU interpreter's
own drops a subnormal's leading bit, which reordered the cosine scores of subnormal rows or
codes). The interpreter also computes bfloat16 arithmetic wrongly and runs `tl.dot` on bfloat16
operands as integers, so under the interpreter the dot operands are converted to float32
(`DOT_IN_FP32`; products of 16-bit floats are exact in float32, so this is the same math as
the tensor cores' fp32 accumulation). Offsets are int64 (a codebook's row index times its row
stride can pass 2^31); code indices are int32 (the op checks K < 2^31).

Block shapes (`_blocks`): BLOCK_D = next power of two >= max(D, 16) (D < 16 is padded with
masked zeros, tl.dot needs 16), BLOCK_N = 64 rows (32 at D = 512), BLOCK_K = 128 codes for
D <= 64 else 64, 8 warps from BLOCK_D 64 on (4 warps spill there). Float32 "ieee" dots run
on FMA units, and Triton's FMA dot holds whole operand rows along D in each thread: the dot
is split over D in slices of 32 (`D_CHUNK`), re-reading the z slices from L1/L2, which keeps
every search kernel free of spills (ptxas for sm_90 measured the whole-D dots at 2.1 KB per
thread at D = 40, 3.3 KB at 128, 10.7 KB at 256). These shapes compile for sm_90 (checked on
a machine without a GPU) but were chosen by reasoning and ptxas, not timed: tune them on a
GPU.
"""

import torch
import triton
import triton.language as tl

from fastgen.kernels import LAUNCH_OPTIONS, sm_count
from fastgen.kernels._convert import to_float32
from fastgen.ops.registry import triton_interpreter_enabled

# F.normalize's eps: a code of norm below it is divided by eps instead.
COSINE_EPS = 1e-12
_INT64_MAX = tl.constexpr(2**63 - 1)


@triton.jit
def _load_rows(ptr, rows, n_rows, D, d, stride_row, stride_d):
    """(len(rows), BLOCK_D) tile of a (n_rows, D) matrix, zero outside it, in its own dtype."""
    mask = (rows < n_rows)[:, None] & (d < D)[None, :]
    offsets = rows.to(tl.int64)[:, None] * stride_row + d.to(tl.int64)[None, :] * stride_d
    return tl.load(ptr + offsets, mask=mask, other=0.0)


@triton.jit
def _code_norms_kernel(e_ptr, out_ptr, K, D, e_sk, e_sd, COSINE: tl.constexpr, EPS: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """l2: ||e_k||^2; cosine: 1 / max(||e_k||, eps) (correctly rounded sqrt and division)."""
    k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    e = to_float32(_load_rows(e_ptr, k, K, D, tl.arange(0, BLOCK_D), e_sk, e_sd))
    norms = tl.sum(e * e, axis=1)
    if COSINE:
        norms = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(norms), EPS))
    tl.store(out_ptr + k, norms, mask=k < K)


@triton.jit
def _tile_scores(z, z_ptr, rows, N, z_sn, z_sd, e_ptr, norms_ptr, k, K, D, d, e_sk, e_sd,
                 COSINE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                 D_CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fast scores (BLOCK_N, BLOCK_K) of the z rows against codes k, NaN ranked as -inf (module
    docstring); +inf past the codebook.
    With D_CHUNK < BLOCK_D the dot runs over D in slices of D_CHUNK read from memory (z is
    then not used): a float32 FMA dot ("ieee") keeps whole operand rows in each thread's
    registers, which at BLOCK_D >= 64 spills (module docstring)."""
    if D_CHUNK == BLOCK_D:
        e = _load_rows(e_ptr, k, K, D, d, e_sk, e_sd)
        if DOT_IN_FP32:
            e = to_float32(e)
        dots = tl.dot(z, tl.trans(e), input_precision=INPUT_PRECISION)
    else:
        dots = tl.zeros((rows.shape[0], k.shape[0]), tl.float32)
        for d0 in range(0, BLOCK_D, D_CHUNK):
            part = d0 + tl.arange(0, D_CHUNK)
            z_part = _load_rows(z_ptr, rows, N, D, part, z_sn, z_sd)
            e_part = _load_rows(e_ptr, k, K, D, part, e_sk, e_sd)
            dots += tl.dot(z_part, tl.trans(e_part), input_precision=INPUT_PRECISION)
    in_codebook = k < K
    norms = tl.load(norms_ptr + k, mask=in_codebook, other=0.0)
    if COSINE:
        scores = -dots * norms[None, :]
    else:
        scores = norms[None, :] - 2.0 * dots
    ranked = tl.where(scores != scores, float("-inf"), scores)
    return tl.where(in_codebook[None, :], ranked, float("inf"))


@triton.jit
def _pack(score, idx):
    # +0.0 turns -0.0 into +0.0: the two compare equal as floats and must as integers too.
    bits = (score + 0.0).to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their order
    return (key.to(tl.int64) << 32) | idx.to(tl.int64)


@triton.jit
def _unpack(packed):
    key = (packed >> 32).to(tl.int32)
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), (packed & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _fast_distance(z, best, COSINE: tl.constexpr, EPS: tl.constexpr):
    """What the caller gets as the distance from the fast best score: l2 ||z||^2 + score,
    cosine the similarity -score / max(||z||, eps); NaN for a best of -inf (a NaN score)."""
    z = to_float32(z)
    squared_norm = tl.sum(z * z, axis=1)
    if COSINE:
        distance = -best / tl.maximum(tl.sqrt_rn(squared_norm), EPS)
    else:
        distance = squared_norm + best
    return tl.where(best == float("-inf"), float("nan"), distance)


@triton.jit
def _epilogue(rows, N, K, D, d, best_idx, distance, z_ptr, e_ptr, z_sn, z_sd, e_sk, e_sd,
              idx_ptr, value_ptr, zq_ptr, counts_ptr, QUANTIZE: tl.constexpr):
    """Write a finished row block: idx and, for search, the distance into value; for
    quantize, z_q = e_idx where z - z is 0 (a finite z), else z - z (NaN, for a NaN or
    infinite z, where the reference's straight-through z + (e - z) is NaN too), the row's
    squared error into value, and the usage count; z is loaded for the error anyway."""
    in_rows = rows < N
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=in_rows)
    if QUANTIZE:
        z = _load_rows(z_ptr, rows, N, D, d, z_sn, z_sd)
        # Only rows < N are loaded: a padded row's index is meaningless.
        e = _load_rows(e_ptr, tl.where(in_rows, best_idx.to(tl.int64), K), K, D, d, e_sk, e_sd)
        mask = in_rows[:, None] & (d < D)[None, :]
        z32 = to_float32(z)
        # A select keeps the code's bits (the interpreter converts subnormal bfloat16 wrongly).
        z_minus_z = z32 - z32
        z_q = tl.where(z_minus_z == 0, e, z_minus_z.to(e.dtype))
        tl.store(zq_ptr + rows[:, None] * D + d[None, :], z_q, mask=mask)
        error = z32 - to_float32(e)
        tl.store(value_ptr + rows, tl.sum(error * error, axis=1), mask=in_rows)
        tl.atomic_add(counts_ptr + best_idx, tl.full(best_idx.shape, 1, tl.int64), mask=in_rows)
    else:
        tl.store(value_ptr + rows, distance, mask=in_rows)


@triton.jit
def _nearest_kernel(
    z_ptr, e_ptr, norms_ptr, partial_ptr, idx_ptr, value_ptr, zq_ptr, counts_ptr,
    N, K, D, z_sn, z_sd, e_sk, e_sd, tiles_per_split,
    SPLITS: tl.constexpr, FINISH: tl.constexpr, QUANTIZE: tl.constexpr, COSINE: tl.constexpr,
    EPS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, D_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    z = 0.0  # the chunked dot reads z from memory, slice by slice
    if D_CHUNK == BLOCK_D:
        z = _load_rows(z_ptr, rows, N, D, d, z_sn, z_sd)
        if DOT_IN_FP32:
            z = to_float32(z)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    k_begin = split * tiles_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + tiles_per_split * BLOCK_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        scores = _tile_scores(z, z_ptr, rows, N, z_sn, z_sd, e_ptr, norms_ptr, k, K, D, d, e_sk, e_sd,
                              COSINE, INPUT_PRECISION, DOT_IN_FP32, D_CHUNK, BLOCK_D)
        tile_best, tile_arg = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, k0 + tile_arg, best_idx)
    if FINISH:
        if D_CHUNK != BLOCK_D:  # only the whole-D path kept the z tile in registers
            z = _load_rows(z_ptr, rows, N, D, d, z_sn, z_sd)
        distance = _fast_distance(z, best, COSINE, EPS)
        _epilogue(rows, N, K, D, d, best_idx, distance, z_ptr, e_ptr, z_sn, z_sd, e_sk, e_sd,
                  idx_ptr, value_ptr, zq_ptr, counts_ptr, QUANTIZE)
    else:
        tl.store(partial_ptr + rows * SPLITS + split, _pack(best, best_idx), mask=rows < N)


@triton.jit
def _best_of_splits(partial_ptr, rows, N, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    s = tl.arange(0, BLOCK_S)
    mask = (rows < N)[:, None] & (s < SPLITS)[None, :]
    packed = tl.load(partial_ptr + rows[:, None] * SPLITS + s[None, :], mask=mask, other=_INT64_MAX)
    return _unpack(tl.min(packed, axis=1))


@triton.jit
def _finish_kernel(
    partial_ptr, z_ptr, e_ptr, idx_ptr, value_ptr, zq_ptr, counts_ptr,
    N, K, D, z_sn, z_sd, e_sk, e_sd,
    SPLITS: tl.constexpr, QUANTIZE: tl.constexpr, COSINE: tl.constexpr, EPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    best, best_idx = _best_of_splits(partial_ptr, rows, N, SPLITS, BLOCK_S)
    distance = best
    if not QUANTIZE:
        distance = _fast_distance(_load_rows(z_ptr, rows, N, D, d, z_sn, z_sd), best, COSINE, EPS)
    _epilogue(rows, N, K, D, d, best_idx, distance, z_ptr, e_ptr, z_sn, z_sd, e_sk, e_sd,
              idx_ptr, value_ptr, zq_ptr, counts_ptr, QUANTIZE)


@triton.jit
def _score_error_bound(z, max_sq_norm_ptr, D, DOT_ERROR: tl.constexpr, COSINE: tl.constexpr,
                       EPS: tl.constexpr):
    """A bound on |fast score - float64 score| for every code, per row, with a factor 2 of
    safety: dot products err by at most DOT_ERROR * ||z|| ||e|| (Cauchy-Schwarz on sum
    |z_d e_d|), the fp32 norms by (D + 1) u relative, each final multiply or add by u; and each
    float32 operation by at most float32's smallest normal to underflow (gradual or flushed
    to zero), 2D of them in a squared norm or a dot, so an underflowing norm still bounds the
    true one. For l2 it adds the float64 direct form's rounding, (D + 2) 2^-53 relative to a
    distance <= (||z|| + max ||e||)^2: a code whose float64 score ties or beats the fast
    winner's is then always a candidate, even for codes far shorter than z (subnormal codes),
    whose fast scores differ where the float64 ones tie. (Cosine's relative term is 2^29 times
    its float64 rounding already.)"""
    u = 5.9604644775390625e-08  # 2^-24, float32's unit roundoff
    underflow = 2.0 * D * 1.1754943508222875e-38  # 2D operations, 2^-126 each
    z_norm = tl.sqrt_rn(tl.sum(z * z, axis=1) + underflow) * (1.0 + D * u)
    if COSINE:
        # |score error| <= |z.e| r (rel. error of r + u) + r |dot error|, ||e|| r <= 1, r <= 1/eps.
        return 2.0 * (z_norm * (DOT_ERROR + (0.5 * D + 3.0) * u) + underflow / EPS)
    max_sq_norm = tl.load(max_sq_norm_ptr) * (1.0 + (D + 1) * u) + underflow
    max_norm = tl.sqrt_rn(max_sq_norm)
    float64_rounding = (D + 2) * 1.1102230246251565e-16 * (z_norm + max_norm) * (z_norm + max_norm)
    return 2.0 * ((D + 2) * u * max_sq_norm + 2.0 * (DOT_ERROR + u) * z_norm * max_norm + 3.0 * underflow
                  + float64_rounding)


@triton.jit
def _accurate_scores(z64, e64, COSINE: tl.constexpr, EPS: tl.constexpr):
    """float64 scores in the direct form; e64 is (1, BLOCK_D) (one code for every row) or
    (BLOCK_N, BLOCK_D) (a code per row)."""
    if COSINE:
        e_norm = tl.sqrt(tl.sum(e64 * e64, axis=1))
        return -tl.sum(z64 * e64, axis=1) / tl.maximum(e_norm, EPS)
    difference = z64 - e64
    return tl.sum(difference * difference, axis=1)


@triton.jit
def _refine_kernel(
    partial_ptr, z_ptr, e_ptr, norms_ptr, max_sq_norm_ptr, idx_ptr, value_ptr, zq_ptr, counts_ptr,
    N, K, D, z_sn, z_sd, e_sk, e_sd,
    SPLITS: tl.constexpr, QUANTIZE: tl.constexpr, COSINE: tl.constexpr, EPS: tl.constexpr,
    DOT_ERROR: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, D_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < N
    d = tl.arange(0, BLOCK_D)
    fast_best, fast_idx = _best_of_splits(partial_ptr, rows, N, SPLITS, BLOCK_S)
    z = _load_rows(z_ptr, rows, N, D, d, z_sn, z_sd)
    z32 = to_float32(z)
    z64 = z32.to(tl.float64)
    if DOT_IN_FP32:
        z = z32
    threshold = fast_best + 2.0 * _score_error_bound(z32, max_sq_norm_ptr, D, DOT_ERROR, COSINE, EPS)
    # A NaN score (ranked -inf) decides its row, as in torch.argmin: nothing to rescore.
    decided_by_nan = fast_best == float("-inf")
    refined = in_rows & ~decided_by_nan
    other_best = tl.full((BLOCK_N,), float("inf"), tl.float64)
    other_idx = fast_idx
    columns = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + columns
        scores = _tile_scores(z, z_ptr, rows, N, z_sn, z_sd, e_ptr, norms_ptr, k, K, D, d, e_sk, e_sd,
                              COSINE, INPUT_PRECISION, DOT_IN_FP32, D_CHUNK, BLOCK_D)
        # k < K: with an infinite threshold the padding columns' +inf would qualify.
        candidate = ((scores <= threshold[:, None]) & (k[None, :] < K) & (k[None, :] != fast_idx[:, None])
                     & refined[:, None])
        if tl.max(candidate.to(tl.int32)) > 0:  # a near-tie in this tile: rare
            for j in range(0, BLOCK_K):
                row_wants = tl.sum(tl.where(columns[None, :] == j, candidate.to(tl.int32), 0), axis=1) > 0
                if tl.max(row_wants.to(tl.int32)) > 0:
                    code = tl.zeros((1,), tl.int64) + (k0 + j)
                    e64 = to_float32(_load_rows(e_ptr, code, K, D, d, e_sk, e_sd)).to(tl.float64)
                    exact = _accurate_scores(z64, e64, COSINE, EPS)
                    # Columns come in increasing k: strict < keeps the lowest index of a tie.
                    better = row_wants & (exact < other_best)
                    other_best = tl.where(better, exact, other_best)
                    other_idx = tl.where(better, k0 + j, other_idx)
    fast_e64 = to_float32(_load_rows(e_ptr, tl.where(in_rows, fast_idx.to(tl.int64), K), K, D, d, e_sk, e_sd)
                          ).to(tl.float64)
    fast_exact = _accurate_scores(z64, fast_e64, COSINE, EPS)
    take_other = (other_best < fast_exact) | ((other_best == fast_exact) & (other_idx < fast_idx))
    best_idx = tl.where(take_other, other_idx, fast_idx)
    best = tl.where(take_other, other_best, fast_exact)
    if COSINE:
        best = -best / tl.maximum(tl.sqrt(tl.sum(z64 * z64, axis=1)), EPS)
    best = tl.where(decided_by_nan, float("nan"), best)
    _epilogue(rows, N, K, D, d, best_idx, best.to(tl.float32), z_ptr, e_ptr, z_sn, z_sd, e_sk, e_sd,
              idx_ptr, value_ptr, zq_ptr, counts_ptr, QUANTIZE)


@triton.jit
def _sum_kernel(values_ptr, out_ptr, N, scale, BLOCK: tl.constexpr):
    """out = scale * sum(values), in one program and a fixed order: reproducible bit for bit."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, N, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        acc += tl.load(values_ptr + offsets, mask=offsets < N, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


# Relative error of one product of the dot, on top of float32 accumulation: tf32 rounds both
# operands to 10 explicit mantissa bits; tf32x3 drops only the low x low product.
_OPERAND_ERROR = {"ieee": 0.0, "tf32": 2.0**-10, "tf32x3": 2.0**-20}
# D per dot for float32 "ieee" (FMA) dots: ptxas for sm_90 spills 2.1 KB per thread at
# BLOCK_D 64 (4 warps), 3.3 KB at 128 and 10.7 KB at 256 (VQGAN's codebook) with whole-D dots.
_FMA_D_CHUNK = 32
# Search programs to aim for per streaming multiprocessor before splitting the codebook.
_PROGRAMS_PER_SM = 2
_INTERPRETER_PROGRAMS = 8


def _num_splits(row_blocks: int, num_tiles: int, device: torch.device) -> int:
    """Codebook splits so that about two programs per SM run when there are few row blocks."""
    sms = sm_count(device)
    target = _INTERPRETER_PROGRAMS if sms is None else _PROGRAMS_PER_SM * sms
    return max(1, min(num_tiles, target // row_blocks))


def _blocks(D: int) -> dict:
    """Block shapes and launch options by feature dim (tl.dot needs every side >= 16)."""
    block_d = max(16, triton.next_power_of_2(D))
    block_n = 32 if block_d >= 512 else 64
    block_k = 128 if block_d <= 64 else 64
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_D": block_d,
            "num_warps": 8 if block_d >= 64 else 4, "num_stages": 2 if block_d >= 512 else 3}


def _dot_options(dtype: torch.dtype, input_precision: str) -> dict:
    interpreted = triton_interpreter_enabled()
    operand_error = _OPERAND_ERROR[input_precision] if dtype == torch.float32 else 0.0
    return {
        # fp16/bf16 operands go to the tensor cores as they are; the option is for fp32 only.
        "INPUT_PRECISION": input_precision if dtype == torch.float32 else None,
        "DOT_IN_FP32": interpreted and dtype != torch.float32,
        "operand_error": operand_error,
    }


def code_norms(codebook: torch.Tensor, cosine: bool) -> torch.Tensor:
    K, D = codebook.shape
    norms = torch.empty(K, dtype=torch.float32, device=codebook.device)
    block_d = max(16, triton.next_power_of_2(D))
    block_k = max(1, 4096 // block_d)
    _code_norms_kernel[(triton.cdiv(K, block_k),)](
        codebook, norms, K, D, *codebook.stride(), COSINE=cosine, EPS=COSINE_EPS, BLOCK_K=block_k, BLOCK_D=block_d,
        **LAUNCH_OPTIONS)
    return norms


def _search(z, codebook, cosine: bool, exact: bool, input_precision: str, idx, value, zq=None, counts=None) -> None:
    """Nearest code of every row of z; the epilogue writes idx and value (distance, or the row's
    squared error when quantizing) and, when quantizing, z_q and the counts."""
    N, D = z.shape
    K = codebook.shape[0]
    if N == 0:
        return
    meta = _blocks(D)
    dot = _dot_options(z.dtype, input_precision)
    fma_dot = z.dtype == torch.float32 and input_precision == "ieee"
    d_chunk = min(meta["BLOCK_D"], _FMA_D_CHUNK) if fma_dot else meta["BLOCK_D"]
    norms = code_norms(codebook, cosine)
    row_blocks = triton.cdiv(N, meta["BLOCK_N"])
    num_tiles = triton.cdiv(K, meta["BLOCK_K"])
    splits = _num_splits(row_blocks, num_tiles, z.device)
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)
    finish_in_search = splits == 1 and not exact
    quantize = zq is not None
    # Without quantize the kernels never touch zq / counts: value stands in for their pointers.
    zq_arg, counts_arg = (zq, counts) if quantize else (value, value)
    partial = value if finish_in_search else torch.empty(N, splits, dtype=torch.int64, device=z.device)
    common = dict(QUANTIZE=quantize, COSINE=cosine, EPS=COSINE_EPS)
    _nearest_kernel[(row_blocks, splits)](
        z, codebook, norms, partial, idx, value, zq_arg, counts_arg,
        N, K, D, *z.stride(), *codebook.stride(), tiles_per_split,
        SPLITS=splits, FINISH=finish_in_search, INPUT_PRECISION=dot["INPUT_PRECISION"],
        DOT_IN_FP32=dot["DOT_IN_FP32"], D_CHUNK=d_chunk, **common, **meta, **LAUNCH_OPTIONS,
    )
    if finish_in_search:
        return
    block_s = triton.next_power_of_2(splits)
    if exact:
        max_sq_norm = norms if cosine else norms.max().reshape(1)
        # It also holds the rows in float64: half as many from BLOCK_D 256 on (ptxas for sm_90:
        # 0.9 KB of spills per thread with 64 rows of 256).
        refine_meta = {**meta, "BLOCK_N": meta["BLOCK_N"] // 2} if meta["BLOCK_D"] >= 256 else meta
        _refine_kernel[(triton.cdiv(N, refine_meta["BLOCK_N"]),)](
            partial, z, codebook, norms, max_sq_norm, idx, value, zq_arg, counts_arg,
            N, K, D, *z.stride(), *codebook.stride(),
            SPLITS=splits, DOT_ERROR=dot["operand_error"] + D * 2.0**-24, INPUT_PRECISION=dot["INPUT_PRECISION"],
            DOT_IN_FP32=dot["DOT_IN_FP32"], D_CHUNK=d_chunk, BLOCK_S=block_s, **common, **refine_meta, **LAUNCH_OPTIONS,
        )
        return
    block_n = max(16, 4096 // max(block_s, meta["BLOCK_D"]))
    _finish_kernel[(triton.cdiv(N, block_n),)](
        partial, z, codebook, idx, value, zq_arg, counts_arg,
        N, K, D, *z.stride(), *codebook.stride(),
        SPLITS=splits, BLOCK_N=block_n, BLOCK_S=block_s, BLOCK_D=meta["BLOCK_D"], **common, **LAUNCH_OPTIONS,
    )


def vq_nearest(z, codebook, metric: str, exact: bool, input_precision: str, *, out) -> None:
    """out = (idx, distance): idx[n] = nearest code of z[n] and distance[n] its distance (l2)
    or similarity (cosine)."""
    idx, distance = out
    _search(z, codebook, metric == "cosine", exact, input_precision, idx, distance)


def vq_quantize(z, codebook, beta: float, exact: bool, input_precision: str, *, out) -> None:
    """out = (z_q, idx, loss, counts): nearest l2 code, z_q = e_idx, loss = (1 + beta) mean
    (z - e_idx)^2, usage counts."""
    zq, idx, loss, counts = out
    N, D = z.shape
    counts.zero_()
    row_errors = torch.empty(N, dtype=torch.float32, device=z.device)
    _search(z, codebook, False, exact, input_precision, idx, row_errors, zq, counts)
    # mean over N*D elements: an empty z gives 0/0 = NaN, as torch's mean does.
    scale = (1.0 + beta) / (N * D) if N else float("nan")
    _sum_kernel[(1,)](row_errors, loss, N, scale, BLOCK=1024, **LAUNCH_OPTIONS)
