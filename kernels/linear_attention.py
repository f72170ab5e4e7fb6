"""Triton kernels for ReLU linear attention (math in fastgen/ops/linear_attention.py).

Per (batch, head) the op is a D x D state S = phi(K)^T V and a D-vector z = sum_n phi(k_n),
followed by a row-wise pass over the queries. Every tensor is addressed through its four
strides (q, k, v are usually views of one fused qkv projection); nothing is copied, and there
is no padded ones-row tensor: z is a row sum kept beside S.

Forward, two launches:
  1. `_state_partials_kernel`, grid (kv chunks, B*H): each program accumulates S and z over
     one contiguous chunk of key/value rows and writes them to its own workspace slot.
  2. `_output_kernel`, grid (q chunks, B*H): each program first adds the chunk partials of its
     (batch, head) in chunk order, then streams its chunk of query rows: ReLU, numerator
     phi(q) S, denominator phi(q).z + eps and the division are fused; out is written once.
Backward, three launches (S and z are recomputed from k and v rather than saved, so the op's
only output stays `out`): the state kernel again; `_query_grad_kernel` (reads q and dout,
writes dq and the chunk partials of dS and dz; it multiplies by S^T only, as out itself is
not needed); `_key_value_grad_kernel` (adds those partials, reads k and v, writes dk and dv).
Resident D_PAD x D_PAD dot operands live in shared memory (64 KiB at D_PAD 128, two copies
under TF32x3), so at D_PAD 128 a kernel holds one of S, S^T, dS, dS^T at a time: the
key/value-gradient kernel then computes dv and dk in two passes over its rows. Every kernel
fits sm_90's 227 KiB and sm_80's 163 KiB a block (the compile check measures them, with
--arch 80 for the latter).

Determinism: no atomics. Every partial is produced by one program in a fixed row order and
every consumer adds the partials in chunk order, so two runs give bitwise equal results.
Folding the reduction into the consumer costs each consumer program a read of all partials
of its head (from L2); the number of chunks is therefore only as large as needed to fill the
GPU when B*H alone does not.

Precision: every value is converted to float32 after loading and every tl.dot runs on
float32 operands. For float32 inputs the dots use input_precision="tf32x3" (three
tensor-core products of the operands' TF32 parts, about 2^-21 relative per product: float32
accuracy, where plain TF32 would round the operands to 10 mantissa bits and miss the float32
tolerance; exact FMA "ieee" dots spill about 20 KB per thread at D = 72..128 on sm_90).
For float16/bfloat16 inputs they use "tf32": the 16-bit input values are exactly
representable in TF32, so the products that build S from k and v are the same as a native
16-bit tensor-core dot; only the float32 intermediates (S, dS, dout/den) are rounded to TF32,
about 5e-4 relative, well inside the 16-bit output tolerances. Native 16-bit operands would
double the tensor-core rate on the GPU, but at D = 32 these kernels are bound by memory, not by
the dots, and the Triton CPU interpreter computes bfloat16 dots (and bfloat16 arithmetic)
wrongly, so the float32 path is the one that can be verified on every machine.

Block shapes: D is padded to D_PAD = max(16, next power of two) inside the kernels with
masked loads (tl.dot needs every dimension >= 16); BLOCK_N rows per tile. Every offset is
int64: B*N*3*H*D of a fused qkv tensor can pass 2^31 elements, and so can one stride times
its index in a view.
"""
import torch
import triton
import triton.language as tl

from fastgen.kernels import LAUNCH_OPTIONS, sm_count
from fastgen.kernels._convert import to_float32


@triton.jit
def _load_rows(ptr, b, h, rows, N, s_b, s_n, s_h, s_d, d, D: tl.constexpr):
    """A (BLOCK_N, D_PAD) float32 tile of rows `rows` of head (b, h); zeros outside N x D."""
    offsets = (b.to(tl.int64) * s_b + rows.to(tl.int64)[:, None] * s_n + h.to(tl.int64) * s_h
               + d.to(tl.int64)[None, :] * s_d)
    mask = (rows < N)[:, None] & (d < D)[None, :]
    return to_float32(tl.load(ptr + offsets, mask=mask, other=0.0))


@triton.jit
def _store_rows(ptr, values, b, h, rows, N, s_b, s_n, s_h, s_d, d, D: tl.constexpr):
    offsets = (b.to(tl.int64) * s_b + rows.to(tl.int64)[:, None] * s_n + h.to(tl.int64) * s_h
               + d.to(tl.int64)[None, :] * s_d)
    mask = (rows < N)[:, None] & (d < D)[None, :]
    tl.store(ptr + offsets, values.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _phi(x):
    """ReLU that keeps a NaN, as F.relu does (the default tl.maximum returns 0 for it)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _relu_backward(x, grad):
    """The gradient through phi at x: 0 where x <= 0, passed through elsewhere, at a NaN x
    too, as F.relu's backward does (a mask x > 0 would zero it there)."""
    return tl.where(x <= 0, 0.0, grad)


@triton.jit
def _head_and_chunk(N, rows_per_program):
    """(batch * H + head, chunk) of this program. The grid is 1-D over every head's chunks,
    chunks fastest: B * H on a second grid axis would be capped at 65,535 (SANA-1.6B's 70
    heads reach it at batch 937)."""
    chunks = tl.maximum(tl.cdiv(N, rows_per_program), 1)
    return tl.program_id(0) // chunks, tl.program_id(0) % chunks


@triton.jit
def _program_head(N, H, rows_per_program, D_PAD: tl.constexpr):
    """(batch, head) of this program and the padded column range."""
    head, _ = _head_and_chunk(N, rows_per_program)
    return head // H, head % H, tl.arange(0, D_PAD)


@triton.jit
def _chunk_rows(N, rows_per_program):
    """[start, end) of the rows this program owns."""
    _, chunk = _head_and_chunk(N, rows_per_program)
    start = chunk * rows_per_program
    return start, tl.minimum(start + rows_per_program, N)


@triton.jit
def _store_partial(matrix_ptr, vector_ptr, matrix, vector, D: tl.constexpr, D_PAD: tl.constexpr):
    """Write this program's (D_PAD, D_PAD) matrix and D_PAD vector into its workspace slot:
    programs run over each head's chunks in order, so program k fills slot k. Entries past D
    are stored as 0: a product of a padding zero and an infinite entry (phi(k)'s zero columns
    times an inf in v) is NaN there, and the dots that read the partials multiply the padding
    by zeros again, which would carry that NaN into real columns."""
    slot = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, D_PAD)
    real = d < D
    tl.store(matrix_ptr + slot * D_PAD * D_PAD + d[:, None] * D_PAD + d[None, :],
             tl.where(real[:, None] & real[None, :], matrix, 0.0))
    tl.store(vector_ptr + slot * D_PAD + d, tl.where(real, vector, 0.0))


@triton.jit
def _sum_partials(matrix_ptr, vector_ptr, num_partials, N, rows_per_program, D_PAD: tl.constexpr):
    """The partials of this program's (batch, head), added in chunk order (deterministic)."""
    d = tl.arange(0, D_PAD)
    matrix = tl.zeros((D_PAD, D_PAD), dtype=tl.float32)
    vector = tl.zeros((D_PAD,), dtype=tl.float32)
    head, _ = _head_and_chunk(N, rows_per_program)
    first = head.to(tl.int64) * num_partials
    for p in range(num_partials):
        slot = first + p
        matrix += tl.load(matrix_ptr + slot * D_PAD * D_PAD + d[:, None] * D_PAD + d[None, :])
        vector += tl.load(vector_ptr + slot * D_PAD + d)
    return matrix, vector


@triton.jit
def _state_partials_kernel(
    k_ptr, v_ptr, state_ptr, normalizer_ptr,
    N, H, rows_per_program,
    k_sb, k_sn, k_sh, k_sd,
    v_sb, v_sn, v_sh, v_sd,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b, h, d = _program_head(N, H, rows_per_program, D_PAD)
    state = tl.zeros((D_PAD, D_PAD), dtype=tl.float32)
    normalizer = tl.zeros((D_PAD,), dtype=tl.float32)
    start, end = _chunk_rows(N, rows_per_program)
    for row0 in range(start, end, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        phi_k = _phi(_load_rows(k_ptr, b, h, rows, N, k_sb, k_sn, k_sh, k_sd, d, D))
        v = _load_rows(v_ptr, b, h, rows, N, v_sb, v_sn, v_sh, v_sd, d, D)
        state += tl.dot(tl.trans(phi_k), v, input_precision=DOT_PRECISION)
        normalizer += tl.sum(phi_k, axis=0)
    _store_partial(state_ptr, normalizer_ptr, state, normalizer, D, D_PAD)


@triton.jit
def _output_kernel(
    q_ptr, out_ptr, state_ptr, normalizer_ptr,
    N, H, rows_per_program, num_partials, eps,
    q_sb, q_sn, q_sh, q_sd,
    o_sb, o_sn, o_sh, o_sd,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b, h, d = _program_head(N, H, rows_per_program, D_PAD)
    state, normalizer = _sum_partials(state_ptr, normalizer_ptr, num_partials, N, rows_per_program, D_PAD)
    start, end = _chunk_rows(N, rows_per_program)
    for row0 in range(start, end, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        phi_q = _phi(_load_rows(q_ptr, b, h, rows, N, q_sb, q_sn, q_sh, q_sd, d, D))
        numerator = tl.dot(phi_q, state, input_precision=DOT_PRECISION)
        denominator = tl.sum(phi_q * normalizer[None, :], axis=1) + eps
        out = numerator / denominator[:, None]
        _store_rows(out_ptr, out, b, h, rows, N, o_sb, o_sn, o_sh, o_sd, d, D)


@triton.jit
def _query_grad_kernel(
    q_ptr, grad_ptr, dq_ptr, state_ptr, normalizer_ptr, dstate_ptr, dnormalizer_ptr,
    N, H, rows_per_program, num_partials, eps,
    q_sb, q_sn, q_sh, q_sd,
    g_sb, g_sn, g_sh, g_sd,
    dq_sb, dq_sn, dq_sh, dq_sd,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b, h, d = _program_head(N, H, rows_per_program, D_PAD)
    state, normalizer = _sum_partials(state_ptr, normalizer_ptr, num_partials, N, rows_per_program, D_PAD)
    state_t = tl.trans(state)
    # sum_j 0 * S_ij: 0, or NaN where row i of S has an inf or a NaN. It stands for the terms
    # of phi(q_n) S that a feature q_ni <= 0 adds: 0 * inf is NaN in the reference's out_n,
    # so in its grad . out_n, and the where below must keep that NaN.
    zero_feature_terms = tl.sum(state * 0.0, axis=1)
    dstate = tl.zeros((D_PAD, D_PAD), dtype=tl.float32)
    dnormalizer = tl.zeros((D_PAD,), dtype=tl.float32)
    start, end = _chunk_rows(N, rows_per_program)
    for row0 in range(start, end, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        q = _load_rows(q_ptr, b, h, rows, N, q_sb, q_sn, q_sh, q_sd, d, D)
        grad = _load_rows(grad_ptr, b, h, rows, N, g_sb, g_sn, g_sh, g_sd, d, D)
        phi_q = _phi(q)
        denominator = tl.sum(phi_q * normalizer[None, :], axis=1) + eps
        # Rows past N load q = 0: where z has an inf their denominator is 0 * inf = NaN, which
        # must not reach dS through their zero features (every dv of the head NaN where the
        # reference's rows give 0).
        dnumerator = tl.where((rows < N)[:, None], grad / denominator[:, None], 0.0)
        # out = phi_q S / den is not needed: grad . out = phi_q . (grad S^T) / den, and
        # dnumerator S^T is needed for dq anyway. One state product per tile instead of two,
        # and S stays resident in one orientation only: with both, float32 at D_PAD 128 (TF32x3
        # holds each operand as two parts) needed 320 KiB of shared memory, past sm_90's 227.
        dnumerator_state_t = tl.dot(dnumerator, state_t, input_precision=DOT_PRECISION)
        # where, not products with phi_q or the mask: on a row with no positive feature,
        # dnumerator = grad / eps and dnumerator S^T may overflow where S is finite, and 0 * inf
        # would be NaN in dq and in dz (so in every dk of the head). A NaN in q is kept: it
        # makes out_n, so grad . out_n, NaN in the reference.
        ddenominator = -tl.sum(tl.where(q <= 0, zero_feature_terms[None, :], phi_q * dnumerator_state_t),
                               axis=1) / denominator
        # Rows past N load q = 0, whose zero features met the NaN of an infinite S: they are no
        # rows of the reference and must add nothing to dz (a select per row, not per element).
        ddenominator = tl.where(rows < N, ddenominator, 0.0)
        dphi_q = dnumerator_state_t + ddenominator[:, None] * normalizer[None, :]
        _store_rows(dq_ptr, _relu_backward(q, dphi_q), b, h, rows, N, dq_sb, dq_sn, dq_sh, dq_sd, d, D)
        dstate += tl.dot(tl.trans(phi_q), dnumerator, input_precision=DOT_PRECISION)
        dnormalizer += tl.sum(ddenominator[:, None] * phi_q, axis=0)
    _store_partial(dstate_ptr, dnormalizer_ptr, dstate, dnormalizer, D, D_PAD)


@triton.jit
def _key_grad_rows(k_ptr, v_ptr, dk_ptr, dstate_t, dnormalizer, b, h, rows, N,
                   k_sb, k_sn, k_sh, k_sd, v_sb, v_sn, v_sh, v_sd, dk_sb, dk_sn, dk_sh, dk_sd,
                   d, D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    k = _load_rows(k_ptr, b, h, rows, N, k_sb, k_sn, k_sh, k_sd, d, D)
    v = _load_rows(v_ptr, b, h, rows, N, v_sb, v_sn, v_sh, v_sd, d, D)
    dphi_k = tl.dot(v, dstate_t, input_precision=DOT_PRECISION) + dnormalizer[None, :]
    _store_rows(dk_ptr, _relu_backward(k, dphi_k), b, h, rows, N, dk_sb, dk_sn, dk_sh, dk_sd, d, D)


@triton.jit
def _value_grad_rows(k_ptr, dv_ptr, dstate, b, h, rows, N, k_sb, k_sn, k_sh, k_sd, dv_sb, dv_sn, dv_sh, dv_sd,
                     d, D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    phi_k = _phi(_load_rows(k_ptr, b, h, rows, N, k_sb, k_sn, k_sh, k_sd, d, D))
    dv = tl.dot(phi_k, dstate, input_precision=DOT_PRECISION)
    _store_rows(dv_ptr, dv, b, h, rows, N, dv_sb, dv_sn, dv_sh, dv_sd, d, D)


@triton.jit
def _key_value_grad_kernel(
    k_ptr, v_ptr, dk_ptr, dv_ptr, dstate_ptr, dnormalizer_ptr,
    N, H, rows_per_program, num_partials,
    k_sb, k_sn, k_sh, k_sd,
    v_sb, v_sn, v_sh, v_sd,
    dk_sb, dk_sn, dk_sh, dk_sd,
    dv_sb, dv_sn, dv_sh, dv_sd,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TWO_PASSES: tl.constexpr,
):
    b, h, d = _program_head(N, H, rows_per_program, D_PAD)
    dstate, dnormalizer = _sum_partials(dstate_ptr, dnormalizer_ptr, num_partials, N, rows_per_program, D_PAD)
    start, end = _chunk_rows(N, rows_per_program)
    # dv needs dS and dk needs dS^T as resident dot operands. TWO_PASSES: dk in a second loop,
    # which reuses the first's shared memory instead of holding both at once, for one more
    # read of k.
    if not TWO_PASSES:
        dstate_t = tl.trans(dstate)
    for row0 in range(start, end, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        _value_grad_rows(k_ptr, dv_ptr, dstate, b, h, rows, N, k_sb, k_sn, k_sh, k_sd,
                         dv_sb, dv_sn, dv_sh, dv_sd, d, D, DOT_PRECISION)
        if not TWO_PASSES:
            _key_grad_rows(k_ptr, v_ptr, dk_ptr, dstate_t, dnormalizer, b, h, rows, N,
                           k_sb, k_sn, k_sh, k_sd, v_sb, v_sn, v_sh, v_sd, dk_sb, dk_sn, dk_sh, dk_sd,
                           d, D, DOT_PRECISION)
    if TWO_PASSES:
        dstate_t = tl.trans(dstate)
        for row0 in range(start, end, BLOCK_N):
            _key_grad_rows(k_ptr, v_ptr, dk_ptr, dstate_t, dnormalizer, b, h, row0 + tl.arange(0, BLOCK_N), N,
                           k_sb, k_sn, k_sh, k_sd, v_sb, v_sn, v_sh, v_sd, dk_sb, dk_sn, dk_sh, dk_sd,
                           d, D, DOT_PRECISION)


class _Plan:
    """Block shapes, dot precision and the split of each sequence into chunks, for one call."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor):
        batch, _, self.heads, self.head_dim = q.shape
        self.batch_heads = batch * self.heads
        self.d_pad = max(16, triton.next_power_of_2(self.head_dim))
        self.dot_precision = "tf32x3" if q.dtype == torch.float32 else "tf32"
        # Two (BLOCK_N, D_PAD) float32 row tiles beside a (D_PAD, D_PAD) state per program; at
        # D_PAD 128 the state alone is 64 registers per thread of 8 warps where it is an
        # accumulator, or 64 KiB of shared memory as a dot operand (twice that under TF32x3),
        # so the row tiles shrink: to 32 rows, and to 16 under TF32x3, where ptxas for sm_90
        # measured 32 rows spilling up to 1.6 KB per thread (16 rows: at most 0.5 KB) and
        # sm_80's 163 KiB of shared memory does not hold them (168..176 KiB; 16 rows: 152..160).
        self.block_n = 64 if self.d_pad <= 64 else 16 if self.dot_precision == "tf32x3" else 32
        self.num_warps = 4 if self.d_pad <= 64 else 8
        # dS and dS^T resident together take 164..168 KiB at D_PAD 128 in 16 bits (past sm_80's
        # 163) and 304 KiB under TF32x3 (past sm_90's 227); one at a time, 84..88 and 152 KiB.
        self.key_value_grad_in_two_passes = self.d_pad >= 128
        self.target_programs = _target_programs(q.device)

    def rows_per_program(self, tokens: int) -> int:
        """Rows per chunk (a multiple of BLOCK_N): enough chunks that B*H*chunks reaches the
        target number of programs (B*H = 0, an empty batch, takes one chunk)."""
        tiles = triton.cdiv(max(tokens, 1), self.block_n)
        chunks = min(tiles, max(1, triton.cdiv(self.target_programs, max(self.batch_heads, 1))))
        return self.block_n * triton.cdiv(tiles, chunks)

    def chunks(self, tokens: int) -> int:
        """Chunks of each head (one, of no rows, for an empty sequence)."""
        return triton.cdiv(max(tokens, 1), self.rows_per_program(tokens))

    def grid(self, tokens: int) -> tuple:
        return (self.chunks(tokens) * self.batch_heads,)

    def workspace(self, tokens: int, device: torch.device) -> tuple:
        """Uninitialised (matrix, vector) partials, one slot per program of grid(tokens)."""
        slots = self.grid(tokens)[0]
        return (torch.empty(slots, self.d_pad, self.d_pad, device=device, dtype=torch.float32),
                torch.empty(slots, self.d_pad, device=device, dtype=torch.float32))

    def meta(self) -> dict:
        return dict(D=self.head_dim, D_PAD=self.d_pad, BLOCK_N=self.block_n,
                    DOT_PRECISION=self.dot_precision, num_warps=self.num_warps)


def _target_programs(device: torch.device) -> int:
    sms = sm_count(device)
    # The interpreter runs programs one after another: a few chunks still exercise the
    # reduction over partials without making the tests slow.
    return 4 if sms is None else 2 * sms


def _state_partials(plan: _Plan, k: torch.Tensor, v: torch.Tensor) -> tuple:
    """The chunk partials of S and z, and how many chunks each head has."""
    tokens = k.shape[1]
    state, normalizer = plan.workspace(tokens, k.device)
    grid = plan.grid(tokens)
    _state_partials_kernel[grid](
        k, v, state, normalizer,
        tokens, plan.heads, plan.rows_per_program(tokens),
        *k.stride(), *v.stride(),
        **plan.meta(), **LAUNCH_OPTIONS,
    )
    return state, normalizer, plan.chunks(tokens)


def linear_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, *, out: torch.Tensor) -> None:
    """out = ReLU linear attention of (q, k, v), written into out (same shape as q)."""
    if out.numel() == 0:
        return
    plan = _Plan(q, k)
    state, normalizer, num_partials = _state_partials(plan, k, v)
    tokens = q.shape[1]
    _output_kernel[plan.grid(tokens)](
        q, out, state, normalizer,
        tokens, plan.heads, plan.rows_per_program(tokens), num_partials, eps,
        *q.stride(), *out.stride(),
        **plan.meta(), **LAUNCH_OPTIONS,
    )


def linear_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, *,
                              out: tuple) -> None:
    """out = (dq, dk, dv) of ReLU linear attention for the output gradient `grad`."""
    dq, dk, dv = out
    if dq.numel() == 0 and dk.numel() == 0:
        return
    plan = _Plan(q, k)
    state, normalizer, num_state_partials = _state_partials(plan, k, v)
    q_tokens, kv_tokens = q.shape[1], k.shape[1]
    dstate, dnormalizer = plan.workspace(q_tokens, q.device)
    _query_grad_kernel[plan.grid(q_tokens)](
        q, grad, dq, state, normalizer, dstate, dnormalizer,
        q_tokens, plan.heads, plan.rows_per_program(q_tokens), num_state_partials, eps,
        *q.stride(), *grad.stride(), *dq.stride(),
        **plan.meta(), **LAUNCH_OPTIONS,
    )
    _key_value_grad_kernel[plan.grid(kv_tokens)](
        k, v, dk, dv, dstate, dnormalizer,
        kv_tokens, plan.heads, plan.rows_per_program(kv_tokens), plan.chunks(q_tokens),
        *k.stride(), *v.stride(), *dk.stride(), *dv.stride(),
        TWO_PASSES=plan.key_value_grad_in_two_passes, **plan.meta(), **LAUNCH_OPTIONS,
    )
