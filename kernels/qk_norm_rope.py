"""Triton kernels of `qk_norm_rope` (math in fastgen/ops/qk_norm_rope.py).

One launch serves q and k: grid axis 1 picks the tensor (0: q, 1: k, each with its own
strides, weight and output), axis 0 a block of BLOCK_R rows, a row being the D features of one
(b, l, h). A row is held as two (BLOCK_R, BLOCK_P) tiles, the first and the second feature of
each RoPE pair (interleaved: 2i and 2i + 1; rotate_half, and the norm alone: i and i + P with
P = ceil(D / 2) pairs), so the rotation is elementwise between the tiles, the row's mean square
is their two sums, and q and k are read once and the outputs written once. The two interleaved
tiles read alternate elements of the same cache lines, which the second load finds in L1.

The backward walks the same tiles: a fixed number of programs per tensor takes row blocks
pid, pid + G, ..., writes dx and keeps the per-feature sums of g * xhat in registers, stored as
one row of a (G, D) float32 partial buffer; torch sums the rows, so dweight does not depend
on scheduling (no atomics).

Every tensor, the weights and tables included, is addressed through its strides. Row indices
and offsets are int64 (B * L * H rows of a long sequence and a large batch can pass 2^31
elements); the grid's axis 0 holds the row blocks (up to 2^31 - 1) and axis 1 only the two
tensors. Arithmetic is float32, every load converted exactly first.
"""
import torch
import triton
import triton.language as tl

from fastgen.kernels import LAUNCH_OPTIONS, sm_count
from fastgen.kernels._convert import to_float32

# Elements of one (BLOCK_R, BLOCK_P) tile: a row pair of tiles is 2x this.
_TILE_ELEMENTS = 2048


@triton.jit
def _pairs(D, PAIRS, INTERLEAVED: tl.constexpr, BLOCK_P: tl.constexpr):
    """Pair indices j, the features of each pair's first and second element, and their masks."""
    j = tl.arange(0, BLOCK_P).to(tl.int64)
    if INTERLEAVED:
        first = 2 * j
        second = first + 1
    else:
        first = j
        second = j + PAIRS
    return j, first, second, j < PAIRS, second < D


@triton.jit
def _rows(row_block, ROWS, L, H, BLOCK_R: tl.constexpr):
    """The rows of one block: in-bounds mask, and each row's batch, token and head."""
    # Widened before the multiply: row_block is an int32 program id or loop index.
    rows = (tl.zeros((BLOCK_R,), tl.int64) + row_block) * BLOCK_R + tl.arange(0, BLOCK_R)
    return rows < ROWS, rows // H // L, (rows // H) % L, rows % H


@triton.jit
def _load_pair(ptr, b, l, h, s0, s1, s2, s3, first, second, mask_first, mask_second):
    row = ptr + (b * s0 + l * s1 + h * s2)[:, None]
    x1 = to_float32(tl.load(row + first[None, :] * s3, mask=mask_first, other=0.0))
    x2 = to_float32(tl.load(row + second[None, :] * s3, mask=mask_second, other=0.0))
    return x1, x2


@triton.jit
def _store_pair(ptr, y1, y2, b, l, h, s0, s1, s2, s3, first, second, mask_first, mask_second):
    row = ptr + (b * s0 + l * s1 + h * s2)[:, None]
    tl.store(row + first[None, :] * s3, y1.to(ptr.dtype.element_ty), mask=mask_first)
    tl.store(row + second[None, :] * s3, y2.to(ptr.dtype.element_ty), mask=mask_second)


@triton.jit
def _load_angles(cos_ptr, sin_ptr, l, j, cos_s0, cos_s1, sin_s0, sin_s1, mask):
    cos = tl.load(cos_ptr + l[:, None] * cos_s0 + j[None, :] * cos_s1, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + l[:, None] * sin_s0 + j[None, :] * sin_s1, mask=mask, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _load_weight(w_ptr, w_s, first, second, mask_first, mask_second):
    w1 = to_float32(tl.load(w_ptr + first * w_s, mask=mask_first, other=0.0))
    w2 = to_float32(tl.load(w_ptr + second * w_s, mask=mask_second, other=0.0))
    return w1[None, :], w2[None, :]


@triton.jit
def _inverse_rms(x1, x2, D, eps):
    return tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)[:, None]


@triton.jit
def _forward_rows(
    x_ptr, w_ptr, y_ptr, cos_ptr, sin_ptr, row_block,
    ROWS, L, H, D, PAIRS, eps,
    x_s0, x_s1, x_s2, x_s3, y_s0, y_s1, y_s2, y_s3, w_s, cos_s0, cos_s1, sin_s0, sin_s1,
    NORM: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    row_ok, b, l, h = _rows(row_block, ROWS, L, H, BLOCK_R)
    j, first, second, first_ok, second_ok = _pairs(D, PAIRS, INTERLEAVED, BLOCK_P)
    mask_first = row_ok[:, None] & first_ok[None, :]
    mask_second = row_ok[:, None] & second_ok[None, :]
    x1, x2 = _load_pair(x_ptr, b, l, h, x_s0, x_s1, x_s2, x_s3, first, second, mask_first, mask_second)
    if NORM:
        rstd = _inverse_rms(x1, x2, D, eps)
        w1, w2 = _load_weight(w_ptr, w_s, first, second, first_ok, second_ok)
        x1 = x1 * rstd * w1
        x2 = x2 * rstd * w2
    if ROPE:
        cos, sin = _load_angles(cos_ptr, sin_ptr, l, j, cos_s0, cos_s1, sin_s0, sin_s1, mask_first)
        x1, x2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    _store_pair(y_ptr, x1, x2, b, l, h, y_s0, y_s1, y_s2, y_s3, first, second, mask_first, mask_second)


@triton.jit
def _qk_norm_rope_forward_kernel(
    q_ptr, k_ptr, wq_ptr, wk_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    ROWS, L, H, D, PAIRS, eps,
    q_s0, q_s1, q_s2, q_s3, k_s0, k_s1, k_s2, k_s3,
    qo_s0, qo_s1, qo_s2, qo_s3, ko_s0, ko_s1, ko_s2, ko_s3,
    wq_s, wk_s, cos_s0, cos_s1, sin_s0, sin_s1,
    NORM_Q: tl.constexpr, NORM_K: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    if tl.program_id(1) == 0:
        _forward_rows(q_ptr, wq_ptr, q_out_ptr, cos_ptr, sin_ptr, tl.program_id(0), ROWS, L, H, D, PAIRS, eps,
                      q_s0, q_s1, q_s2, q_s3, qo_s0, qo_s1, qo_s2, qo_s3, wq_s, cos_s0, cos_s1, sin_s0, sin_s1,
                      NORM_Q, ROPE, INTERLEAVED, BLOCK_R, BLOCK_P)
    else:
        _forward_rows(k_ptr, wk_ptr, k_out_ptr, cos_ptr, sin_ptr, tl.program_id(0), ROWS, L, H, D, PAIRS, eps,
                      k_s0, k_s1, k_s2, k_s3, ko_s0, ko_s1, ko_s2, ko_s3, wk_s, cos_s0, cos_s1, sin_s0, sin_s1,
                      NORM_K, ROPE, INTERLEAVED, BLOCK_R, BLOCK_P)


@triton.jit
def _backward_rows(
    dy_ptr, x_ptr, w_ptr, dx_ptr, partial_ptr, cos_ptr, sin_ptr,
    ROWS, L, H, D, PAIRS, NUM_BLOCKS, eps,
    dy_s0, dy_s1, dy_s2, dy_s3, x_s0, x_s1, x_s2, x_s3, dx_s0, dx_s1, dx_s2, dx_s3,
    w_s, cos_s0, cos_s1, sin_s0, sin_s1,
    NORM: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    j, first, second, first_ok, second_ok = _pairs(D, PAIRS, INTERLEAVED, BLOCK_P)
    if NORM:
        w1, w2 = _load_weight(w_ptr, w_s, first, second, first_ok, second_ok)
    sum_first = tl.zeros((BLOCK_P,), dtype=tl.float32)
    sum_second = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for row_block in range(pid, NUM_BLOCKS, tl.num_programs(0)):
        row_ok, b, l, h = _rows(row_block, ROWS, L, H, BLOCK_R)
        mask_first = row_ok[:, None] & first_ok[None, :]
        mask_second = row_ok[:, None] & second_ok[None, :]
        g1, g2 = _load_pair(dy_ptr, b, l, h, dy_s0, dy_s1, dy_s2, dy_s3, first, second, mask_first, mask_second)
        if ROPE:
            # The transpose of the rotation: the rotation by the opposite angle.
            cos, sin = _load_angles(cos_ptr, sin_ptr, l, j, cos_s0, cos_s1, sin_s0, sin_s1, mask_first)
            g1, g2 = g1 * cos + g2 * sin, g2 * cos - g1 * sin
        if NORM:
            x1, x2 = _load_pair(x_ptr, b, l, h, x_s0, x_s1, x_s2, x_s3, first, second, mask_first, mask_second)
            rstd = _inverse_rms(x1, x2, D, eps)
            xhat1 = x1 * rstd
            xhat2 = x2 * rstd
            scaled1 = g1 * w1
            scaled2 = g2 * w2
            mean = ((tl.sum(scaled1 * xhat1, axis=1) + tl.sum(scaled2 * xhat2, axis=1)) / D)[:, None]
            sum_first += tl.sum(g1 * xhat1, axis=0)
            sum_second += tl.sum(g2 * xhat2, axis=0)
            g1 = rstd * (scaled1 - xhat1 * mean)
            g2 = rstd * (scaled2 - xhat2 * mean)
        _store_pair(dx_ptr, g1, g2, b, l, h, dx_s0, dx_s1, dx_s2, dx_s3, first, second, mask_first, mask_second)
    if NORM:
        row = partial_ptr + pid.to(tl.int64) * D
        tl.store(row + first, sum_first, mask=first_ok)
        tl.store(row + second, sum_second, mask=second_ok)


@triton.jit
def _qk_norm_rope_backward_kernel(
    dq_out_ptr, dk_out_ptr, q_ptr, k_ptr, wq_ptr, wk_ptr, dq_ptr, dk_ptr, partial_q_ptr, partial_k_ptr,
    cos_ptr, sin_ptr,
    ROWS, L, H, D, PAIRS, NUM_BLOCKS, eps,
    gq_s0, gq_s1, gq_s2, gq_s3, gk_s0, gk_s1, gk_s2, gk_s3,
    q_s0, q_s1, q_s2, q_s3, k_s0, k_s1, k_s2, k_s3,
    dq_s0, dq_s1, dq_s2, dq_s3, dk_s0, dk_s1, dk_s2, dk_s3,
    wq_s, wk_s, cos_s0, cos_s1, sin_s0, sin_s1,
    NORM_Q: tl.constexpr, NORM_K: tl.constexpr, ROPE: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    if tl.program_id(1) == 0:
        _backward_rows(dq_out_ptr, q_ptr, wq_ptr, dq_ptr, partial_q_ptr, cos_ptr, sin_ptr,
                       ROWS, L, H, D, PAIRS, NUM_BLOCKS, eps,
                       gq_s0, gq_s1, gq_s2, gq_s3, q_s0, q_s1, q_s2, q_s3, dq_s0, dq_s1, dq_s2, dq_s3,
                       wq_s, cos_s0, cos_s1, sin_s0, sin_s1, NORM_Q, ROPE, INTERLEAVED, BLOCK_R, BLOCK_P)
    else:
        _backward_rows(dk_out_ptr, k_ptr, wk_ptr, dk_ptr, partial_k_ptr, cos_ptr, sin_ptr,
                       ROWS, L, H, D, PAIRS, NUM_BLOCKS, eps,
                       gk_s0, gk_s1, gk_s2, gk_s3, k_s0, k_s1, k_s2, k_s3, dk_s0, dk_s1, dk_s2, dk_s3,
                       wk_s, cos_s0, cos_s1, sin_s0, sin_s1, NORM_K, ROPE, INTERLEAVED, BLOCK_R, BLOCK_P)


class _Plan:
    """Rows, pairs, tile shape and row blocks of one call (see the module docstring)."""

    def __init__(self, q: torch.Tensor, cos, rope_layout: str):
        batch, length, heads, head_dim = q.shape
        self.rows = batch * length * heads
        self.pairs = (head_dim + 1) // 2
        self.rope = cos is not None
        self.interleaved = self.rope and rope_layout == "interleaved"
        self.block_p = triton.next_power_of_2(self.pairs)
        self.block_r = max(1, min(_TILE_ELEMENTS // self.block_p, triton.next_power_of_2(self.rows)))
        self.num_blocks = triton.cdiv(self.rows, self.block_r)
        self.num_warps = 8 if self.block_r * self.block_p >= 4096 else 4

    def geometry(self, q: torch.Tensor) -> tuple:
        _, length, heads, head_dim = q.shape
        return self.rows, length, heads, head_dim, self.pairs

    def meta(self, weight_q, weight_k) -> dict:
        return dict(NORM_Q=weight_q is not None, NORM_K=weight_k is not None, ROPE=self.rope,
                    INTERLEAVED=self.interleaved, BLOCK_R=self.block_r, BLOCK_P=self.block_p,
                    num_warps=self.num_warps)


def _vector(vector, stand_in) -> tuple:
    """(pointer, stride) of a (D,) weight, any view; an absent one is never read and stand_in
    takes its place as the pointer."""
    return (stand_in, 0) if vector is None else (vector, vector.stride(0))


def _tables(cos, sin, stand_in) -> tuple:
    """(cos, sin, their four strides); absent tables are never read."""
    if cos is None:
        return stand_in, stand_in, (0, 0, 0, 0)
    return cos, sin, (*cos.stride(), *sin.stride())


def qk_norm_rope_forward(q, k, weight_q, weight_k, cos, sin, eps: float, rope_layout: str, *, out) -> None:
    """out = (q_out, k_out) of qk_norm_rope; out may be views of any strides."""
    q_out, k_out = out
    plan = _Plan(q, cos, rope_layout)
    if plan.rows == 0:
        return
    (wq, wq_s), (wk, wk_s) = _vector(weight_q, q), _vector(weight_k, q)
    cos_arg, sin_arg, table_strides = _tables(cos, sin, q)
    _qk_norm_rope_forward_kernel[(plan.num_blocks, 2)](
        q, k, wq, wk, cos_arg, sin_arg, q_out, k_out,
        *plan.geometry(q), eps,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        wq_s, wk_s, *table_strides,
        **plan.meta(weight_q, weight_k), **LAUNCH_OPTIONS,
    )


def _backward_programs(device: torch.device, num_blocks: int) -> int:
    """Programs per tensor: 4 per SM fill the GPU, fewer when there are fewer row blocks; the
    interpreter, which runs programs one after another, gets a few (enough to exercise the
    sum over partial rows)."""
    sms = sm_count(device)
    return max(1, min(num_blocks, 4 if sms is None else 4 * sms))


def qk_norm_rope_backward(grad_q, grad_k, q, k, weight_q, weight_k, cos, sin, eps: float, rope_layout: str, *,
                          out) -> None:
    """out = (dq, dk, dweight_q, dweight_k) of qk_norm_rope for the output gradients."""
    dq, dk, dweight_q, dweight_k = out
    plan = _Plan(q, cos, rope_layout)
    if plan.rows == 0:
        dweight_q.zero_()
        dweight_k.zero_()
        return
    programs = _backward_programs(q.device, plan.num_blocks)
    head_dim = q.shape[3]
    partials = [torch.empty(programs, head_dim, dtype=torch.float32, device=q.device) if weight is not None else q
                for weight in (weight_q, weight_k)]
    (wq, wq_s), (wk, wk_s) = _vector(weight_q, q), _vector(weight_k, q)
    cos_arg, sin_arg, table_strides = _tables(cos, sin, q)
    _qk_norm_rope_backward_kernel[(programs, 2)](
        grad_q, grad_k, q, k, wq, wk, dq, dk, *partials, cos_arg, sin_arg,
        *plan.geometry(q), plan.num_blocks, eps,
        *grad_q.stride(), *grad_k.stride(), *q.stride(), *k.stride(), *dq.stride(), *dk.stride(),
        wq_s, wk_s, *table_strides,
        **plan.meta(weight_q, weight_k), **LAUNCH_OPTIONS,
    )
    for weight, partial, dweight in zip((weight_q, weight_k), partials, (dweight_q, dweight_k)):
        if weight is not None:
            dweight.copy_(partial.sum(0))
