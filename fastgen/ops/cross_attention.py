"""Scaled dot-product attention from Lq queries to Lkv keys, with key padding: the
cross-attention of Stable Diffusion's UNet (image tokens to text tokens), SANA and DiT, and
with Lq = Lkv the same op serves self-attention.

`cross_attention(q, k, v, key_padding_mask=None, scale=None, causal_block_ends=None)`: q of
shape (B, Lq, H, D), k and v of shape (B, Lkv, H, D), D <= 256, any strides; key_padding_mask a
(B, Lkv) bool tensor, True where the key may be attended (the text tokens), False for padding;
scale defaults to 1/sqrt(D); causal_block_ends None or a 1-D int32 / int64 tensor on q's device
(any stride) of strictly increasing block ends e_0 < e_1 < ... < e_{n-1} = Lq = Lkv, e_0 >= 1,
for block-causal self-attention (below). For each batch b, head h and query row i,

    s_ij    = scale * q_i . k_j                     for the keys j of row i: mask[b, j] True
                                                    and, with block ends, j < end(i)
    lse_i   = log sum_j exp(s_ij)                   (the row's log-sum-exp)
    out_i   = sum_j exp(s_ij - lse_i) v_j           (softmax(s_i) v)

Block-causal attention (VAR's next-scale prediction, which follows "Visual Autoregressive
Modeling", Tian et al. 2024: the token maps of all scales form one sequence, and the tokens of
scale s see those of every scale <= s). Row i lies in block b, e_{b-1} <= i < e_b (e_{-1} = 0),
and sees the keys j < end(i) = e_b: its own block and every earlier one. For VAR at 256 px the
blocks are the scales' token maps, causal_block_ends = cumsum(p^2 for p in (1, 2, 3, 4, 5, 6,
8, 10, 13, 16)) = (1, 5, 14, ..., 680) (`block_ends(sizes, device)` builds it). The pattern
is the ends alone: no (Lq, Lkv) mask exists in memory (the reference builds one). With every
block of one row, block-causal attention is causal attention.

Decode mode. Sampling generates one scale at a time: the n_s queries of scale s attend to the
keys and values of every earlier scale, cached, and their own. That is plain attention (no
block ends) with q of length n_s and k, v the cache prefix `k_cache[:, :e_s]`, `v_cache[:,
:e_s]` (views of any strides, read in place): the rows e_{s-1} .. e_s - 1 of the block-causal
attention over the whole sequence (up to float32 rounding: the tiles differ).

VAR's attention (its attn_l2_norm) normalizes q and k to unit length per head and multiplies
q by a learned per-head scale, with attention scale 1:

    q'_i = exp(min(s_h, log 100)) q_i / max(||q_i||, 1e-12),   k'_j = k_j / max(||k_j||, 1e-12)

`l2_normalized_qk(q, k, log_scale)` computes (q', k') in PyTorch (F.normalize; autograd gives
the normalization's and the scale's gradients), and `cross_attention(q', k', v, None, 1.0,
ends)` attends. It is not fused into the flash kernels: the normalization is two passes over q
and k that torch.compile fuses into one, while fusing it would put its backward in both backward
kernels and sum the scale's gradient across programs. Nor is it qk_norm_rope's RMSNorm:
x w / sqrt(mean x^2 + eps) with w = 1/sqrt(D) is x / sqrt(||x||^2 + D eps), which departs from
x / max(||x||, 1e-12) by a relative D eps / (2 ||x||^2) for every eps > 0 the op accepts, and
its weight is one per feature, shared by the heads, where VAR's scale is one per head.

A row with no attendable key has an empty sum: its output is 0 (not the NaN of 0/0) and its
lse is +inf, so that every recomputed exp(s_ij - lse_i) of that row is 0 as well.

NaN and Inf propagate as in the eager reference (softmax of the masked scores, then dense
products): a row with a key whose scores hold NaN or +inf, or are all -inf (an infinite q or
k), has out NaN, lse NaN or -inf, and P NaN at every key, masked ones included, so its dq, the
dk of its keys and the dv of all of them are NaN; dS is 0 at masked keys and on rows without a
key, where the products still add 0 * inf = NaN from a non-finite q, k or v there.

Keys past a row's block end are not part of its attention, but like padded keys they are
masked, not removed, where the kernels compute a tile holding both kinds: a non-finite k or v
of such a key reaches the rows of that tile through a 0 * inf product (as it reaches every row
in the reference's dense products). The Triton kernels skip every key tile past the last
row's end of a query tile (and, in the dk / dv pass, every query tile before the first row
seeing a key tile), so a non-finite value in a later block reaches no row of a query tile
ending before that block: those rows' outputs and gradients stay finite where the reference's
are NaN, and equal its values on the same inputs without the non-finite value.

Scores, softmax statistics and accumulation are float32 (float64 for float64 inputs); out
has q's dtype and shape, contiguous; lse is float64 (B, H, Lq). The backward recomputes P_ij =
exp(s_ij - lse_i), whose relative error is lse's absolute one: rounded to float32, lse would be
off by up to half an ulp of lse, 1.5e-5 of P at |lse| = 300 (past float32's tolerance) and a
factor e^0.5 at 8.5e6, so lse holds the float32 statistics' m + log(l) in float64.

Precision of out. For float16 and bfloat16 the weights P_ij enter the product with v rounded
to that dtype (as in FlashAttention), so out_i is within the dtype's tolerance of the size of
its terms, sum_j P_ij |v_j|, not of its value, which cancels where the v_j differ in sign
(measured: head dim 1, 57 keys with v up to 1.5e10 in bfloat16, out -2.957e8 where float64
gives -2.8625e8, the terms' size 5.6e9).

Attention over a key set split in parts (ring or Ulysses sequence parallelism, or keys too many
for one call) is assembled from each part's (out_p, lse_p) as `merge_attention` does:

    lse   = log sum_p exp(lse_p)                    (a part without a key counts as lse_p = -inf)
    out_i = sum_p exp(lse_p,i - lse_i) out_p,i

which is the whole set's softmax: each part's weights exp(s_ij - lse_p,i) rescaled to the union.

Backward (FlashAttention-2), for an output gradient g and P_ij = exp(s_ij - lse_i):

    delta_i = g_i . out_i                 (= sum_j P_ij (g_i . v_j))
    dv_j    = sum_i P_ij g_i
    dS_ij   = P_ij (g_i . v_j - delta_i)
    dq_i    = scale sum_j dS_ij k_j       dk_j = scale sum_i dS_ij q_i

Precision of dq and dk. delta_i = g_i . out_i equals sum_j P_ij (g_i . v_j) only up to rounding
(out is rounded to q's dtype, and for float16 / bfloat16 P and dS enter the products rounded
to it, as in FlashAttention-2), and dS_ij = P_ij (dP_ij - delta_i) subtracts the two, each a
sum over the head dim that can cancel itself. So dq and dk are within the dtype's tolerance of
the sizes of their terms written out to products of the inputs,

    scale sum_j P_ij (|g_i| . |v_j| + |g_i| . |out|_i) |k_j|   and
    scale sum_i P_ij (|g_i| . |v_j| + |g_i| . |out|_i) |q_i|,   |out|_i = sum_l P_il |v_l|,

not of their values, which cancel where P is nearly one-hot (measured: with 2 keys in bfloat16,
dq 0.038 where the float64 value is 0.0006, 12 of 16 seeded draws past bfloat16's tolerance of
|dq|; at D 80 with 9 queries and 19 keys, dq -0.121 where float64 gives -0.089, 6 of 10 draws
past it; at scores near 1e20, where rows are one-hot, dq 38 and dk -7 where float64 gives 0 and
0.09, a rounding of 1e-7 of dP times a huge k or q), nor of |dP_ij| and |delta_i| alone, which
cancel where g_i is nearly orthogonal to v_j (measured: k up to 1.5e10, a one-hot row whose
dP = -0.0061 has terms of size 27: dS 2^-21 where float64 gives 0, dq 55 for 0, 0.24% of the
terms' tolerance and 3.9x that of |dP| + |delta|; in bfloat16 with v up to 1.4e10, out's
rounding moves delta by 2^-8 of |g_i| . |out|_i: dk -1.25e6 where float64 gives 1.83e7, 8% of
the terms' tolerance). dv has no such subtraction.

Ops: `cross_attention_forward -> (out, lse)` keeps lse for the backward;
`cross_attention_backward(grad, q, k, v, output, lse, mask, scale, causal_block_ends) -> (dq,
dk, dv)` is an op of its own so the fast backward is one graph node under torch.compile
(first-order gradients only); and the public `cross_attention -> out` is a CompositeImplicitAutograd op that returns
the forward's first output, so autograd and torch.compile see the forward op (whose autograd
saves lse) and the user sees one tensor. The registered `Op` named cross_attention (driven by
`fastgen check` and the contract tests) has the single-output signature; its Triton
implementation is the forward kernel with lse written to a scratch buffer.

Determinism. The kernels use no atomics: for the same inputs and the same tile configuration
every output and gradient bit is the same in every run. On a GPU the Triton autotuner picks
the configuration for each (Lq, Lkv, padded D, mask, block ends or not, dtypes) by timing the candidates in the
process, so two processes (or two GPUs of one kind) can pick different tiles, and their
results then differ by float32 rounding. Under `torch.use_deterministic_algorithms(True)` the
kernels skip the autotuner and run one fixed configuration (the lean one that fits at every
D; slower than the tuned choice), so results are bitwise the same across processes on the
same GPU model, Triton version and inputs.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from fastgen.ops.registry import (CheckCase, Op, check_attention_inputs, check_companion, check_number,
                                  define_custom_op, random_tensor, register, register_autograd, with_the_math)

MAX_HEAD_DIM = 256


def _check_same_place(op_name: str, name: str, tensor: torch.Tensor, q: torch.Tensor, dtype=None) -> None:
    dtype = q.dtype if dtype is None else dtype
    if tensor.dtype != dtype:
        raise TypeError(f"{op_name}: {name} dtype {tensor.dtype} must be {dtype}")
    if tensor.device != q.device:
        raise ValueError(f"{op_name}: {name} is on {tensor.device} but q is on {q.device}")


# Block ends whose values were checked, by id: (weak reference, version counter, Lq). A tensor
# passed again unchanged (the same object, no in-place write since) is not read again, so a
# model passing its ends tensor every layer pays the device-to-host copy once. An inference
# tensor has no version counter: it is read at every call.
_CHECKED_BLOCK_ENDS: dict = {}


def _values_are_readable(tensor: torch.Tensor) -> bool:
    """False for the meta and fake tensors of tracing and during CUDA graph capture."""
    from torch._subclasses.fake_tensor import is_fake

    if tensor.device.type == "meta" or is_fake(tensor):
        return False
    return not (tensor.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _check_block_ends(op_name: str, ends, q: torch.Tensor, k: torch.Tensor) -> None:
    if ends is None:
        return
    if not isinstance(ends, torch.Tensor):
        raise TypeError(f"{op_name}: causal_block_ends must be a 1-D int32 or int64 tensor or None, "
                        f"got {type(ends).__name__}")
    if ends.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op_name}: causal_block_ends must be int32 or int64, got {ends.dtype}")
    if ends.device != q.device:
        raise ValueError(f"{op_name}: causal_block_ends is on {ends.device} but q is on {q.device}")
    if ends.dim() != 1:
        raise ValueError(f"{op_name}: causal_block_ends must be 1-D (one end per block), got shape {tuple(ends.shape)}")
    q_len = q.shape[1]
    if k.shape[1] != q_len:
        raise ValueError(f"{op_name}: causal_block_ends is for self-attention, Lq == Lkv, got Lq={q_len}, "
                         f"Lkv={k.shape[1]}")
    if not _values_are_readable(ends):
        return
    version = None if ends.is_inference() else ends._version
    checked = _CHECKED_BLOCK_ENDS.get(id(ends))
    if version is not None and checked is not None and checked[0]() is ends and checked[1:] == (version, q_len):
        return
    values = ends.tolist()
    if any(b <= a for a, b in zip(values, values[1:])) or (values and values[0] < 1):
        raise ValueError(f"{op_name}: causal_block_ends must increase strictly from at least 1, got {values}")
    if (values[-1] if values else 0) != q_len:
        raise ValueError(f"{op_name}: the last of causal_block_ends must be Lq = {q_len}, got "
                         f"{values[-1] if values else 'no ends'}")
    if version is not None:
        key = id(ends)
        _CHECKED_BLOCK_ENDS[key] = (weakref.ref(ends, lambda _, key=key: _CHECKED_BLOCK_ENDS.pop(key, None)),
                                    version, q_len)


def _check_inputs(op_name: str, q, k, v, key_padding_mask, scale, causal_block_ends=None) -> None:
    check_attention_inputs(op_name, q, k, v, MAX_HEAD_DIM, "(B, L, H, D)")
    batch = q.shape[0]
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"{op_name}: key_padding_mask must be a bool tensor or None, "
                            f"got {type(key_padding_mask).__name__}")
        _check_same_place(op_name, "key_padding_mask", key_padding_mask, q, torch.bool)
        if key_padding_mask.shape != (batch, k.shape[1]):
            raise ValueError(f"{op_name}: key_padding_mask must have shape (B, Lkv) = {(batch, k.shape[1])}, "
                             f"got {tuple(key_padding_mask.shape)}")
    check_number(op_name, "scale", scale, allow_none=True)
    _check_block_ends(op_name, causal_block_ends, q, k)


def block_ends(sizes, device) -> torch.Tensor:
    """causal_block_ends (int64 on `device`) of consecutive blocks of `sizes` rows: VAR's scales
    are `block_ends([p * p for p in patch_nums], device)`."""
    return torch.as_tensor(sizes, dtype=torch.int64).cumsum(0).to(device)


def l2_normalized_qk(q: torch.Tensor, k: torch.Tensor, log_scale: torch.Tensor,
                     max_log_scale: float = math.log(100.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """(q', k') of VAR's attn_l2_norm (module docstring): q and k (B, L, H, D) normalized to unit
    length over D, q times exp(min(log_scale, max_log_scale)) for its head; log_scale holds one
    learned value per head, of any shape with H elements (VAR keeps a (1, H, 1, 1) parameter).
    Attend with scale 1."""
    heads = q.shape[2]
    if log_scale.numel() != heads:
        raise ValueError(f"l2_normalized_qk: log_scale must hold one value per head, H = {heads}, "
                         f"got shape {tuple(log_scale.shape)}")
    head_scale = log_scale.clamp(max=max_log_scale).exp().reshape(1, 1, heads, 1)
    return F.normalize(q, dim=-1) * head_scale.to(q.dtype), F.normalize(k, dim=-1)


def effective_scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def lse_shape(q: torch.Tensor) -> tuple:
    batch, q_len, heads, _ = q.shape
    return (batch, heads, q_len)


def _allocate_output(q, k, v, key_padding_mask=None, scale=None, causal_block_ends=None):
    _check_inputs("cross_attention", q, k, v, key_padding_mask, scale, causal_block_ends)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _allocate_output_and_lse(q, k, v, key_padding_mask=None, scale=None, causal_block_ends=None):
    _check_inputs("cross_attention", q, k, v, key_padding_mask, scale, causal_block_ends)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(lse_shape(q), dtype=torch.float64, device=q.device))


def _check_backward_inputs(grad, q, k, v, output, lse, key_padding_mask, scale, causal_block_ends) -> None:
    op_name = "cross_attention_backward"
    _check_inputs(op_name, q, k, v, key_padding_mask, scale, causal_block_ends)
    for name, tensor in (("grad", grad), ("output", output)):
        check_companion(op_name, name, tensor, q, tuple(q.shape), "of q", "q")
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"{op_name}: lse must be a torch.Tensor, got {type(lse).__name__}")
    _check_same_place(op_name, "lse", lse, q, torch.float64)
    if lse.shape != lse_shape(q):
        raise ValueError(f"{op_name}: lse must have shape (B, H, Lq) = {lse_shape(q)}, got {tuple(lse.shape)}")


def _allocate_gradients(grad, q, k, v, output, lse, key_padding_mask=None, scale=None, causal_block_ends=None):
    _check_backward_inputs(grad, q, k, v, output, lse, key_padding_mask, scale, causal_block_ends)
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def block_causal_mask(causal_block_ends: torch.Tensor, length: int) -> torch.Tensor:
    """(L, L) bool, True where row i sees key j < end(i) (module docstring): the dense form of
    block-causal attention over `length` = L tokens, for the reference and dense-mask peers
    (the kernels never build it)."""
    ends = causal_block_ends.long().contiguous()
    positions = torch.arange(length, device=ends.device)
    row_ends = ends[torch.searchsorted(ends, positions, right=True)]
    return positions[None, :] < row_ends[:, None]


def _keys_of_rows(q, key_padding_mask, causal_block_ends):
    """The (B or 1, 1, Lq or 1, Lkv) bool of the keys each row attends to (module docstring), or
    None where every row attends to every key."""
    keep = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    if causal_block_ends is not None:
        before_end = block_causal_mask(causal_block_ends, q.shape[1])
        keep = before_end[None, None] if keep is None else keep & before_end
    return keep


def _probabilities(q, k, key_padding_mask, scale, causal_block_ends=None):
    """(P, scores, has_key) in the compute dtype: the (B, H, Lq, Lkv) softmax probabilities,
    the scaled scores with -inf where the key is masked, and the (B, 1, Lq, 1) bool of rows
    that have at least one key."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute), k.to(compute)) * effective_scale(q, scale)
    keep = _keys_of_rows(q, key_padding_mask, causal_block_ends)
    if keep is None:
        has_key = torch.full((1, 1, 1, 1), k.shape[1] > 0, device=q.device)
    else:
        scores, has_key = scores.masked_fill(~keep, float("-inf")), keep.any(-1, keepdim=True)
    # Rows without a key would be softmax(-inf, ..., -inf) = NaN: give them finite scores
    # and zero the probabilities, so the output and the gradients stay 0 there.
    probabilities = torch.softmax(torch.where(has_key, scores, 0.0), dim=-1) * has_key
    return probabilities, scores, has_key


def _attend(q, k, v, key_padding_mask, scale, causal_block_ends):
    """(out in the compute dtype, scores, has_key) of eager math attention."""
    probabilities, scores, has_key = _probabilities(q, k, key_padding_mask, scale, causal_block_ends)
    out = torch.einsum("bhqk,bkhd->bqhd", probabilities, v.to(probabilities.dtype))
    return out, scores, has_key


def cross_attention_reference(q, k, v, key_padding_mask=None, scale=None, causal_block_ends=None):
    """Eager math attention: the (B, H, Lq, Lkv) score matrix, masked softmax (the block-causal
    pattern as a dense mask), then v, in float32 (float64 for float64 inputs)."""
    _check_inputs("cross_attention", q, k, v, key_padding_mask, scale, causal_block_ends)
    return _attend(q, k, v, key_padding_mask, scale, causal_block_ends)[0].to(q.dtype)


def cross_attention_forward_reference(q, k, v, key_padding_mask=None, scale=None, causal_block_ends=None):
    """(out, lse) in eager PyTorch; lse is +inf on rows without a key."""
    _check_inputs("cross_attention", q, k, v, key_padding_mask, scale, causal_block_ends)
    out, scores, has_key = _attend(q, k, v, key_padding_mask, scale, causal_block_ends)
    # The log-sum-exp of the compute dtype's scores, summed in float64: the op's lse digits.
    lse = torch.where(has_key[..., 0], torch.logsumexp(scores.double(), dim=-1), float("inf"))
    return out.to(q.dtype), lse


def cross_attention_backward_reference(grad, q, k, v, output, lse, key_padding_mask=None, scale=None,
                                       causal_block_ends=None):
    """The backward formulas of the module docstring in eager PyTorch. P is recomputed from q
    and k (not from the given lse) and delta from P, so the reference depends on nothing the
    fast forward produced: output and lse are the kernels' inputs."""
    _check_backward_inputs(grad, q, k, v, output, lse, key_padding_mask, scale, causal_block_ends)
    probabilities = _probabilities(q, k, key_padding_mask, scale, causal_block_ends)[0]
    q_, k_, v_, grad_ = (t.to(probabilities.dtype) for t in (q, k, v, grad))
    dv = torch.einsum("bhqk,bqhd->bkhd", probabilities, grad_)
    dprobabilities = torch.einsum("bqhd,bkhd->bhqk", grad_, v_)
    delta = (dprobabilities * probabilities).sum(-1, keepdim=True)
    dscores = probabilities * (dprobabilities - delta) * effective_scale(q, scale)
    keep = _keys_of_rows(q, key_padding_mask, causal_block_ends)
    if keep is not None:
        # No gradient reaches a masked key (nor a row without keys, all masked), as through
        # the reference's masked_fill and where, even where dP is NaN there.
        dscores = dscores.masked_fill(~keep, 0.0)
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k_)
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q_)
    return tuple(t.to(q.dtype) for t in (dq, dk, dv))


def padding_mask(lengths, max_length: int, device) -> torch.Tensor:
    """(len(lengths), max_length) bool: True on the first lengths[b] keys of row b, as a text
    encoder's attention mask marks the real tokens of captions padded to max_length."""
    return torch.arange(max_length, device=device)[None, :] < torch.as_tensor(lengths, device=device)[:, None]


def _check_case(label, batch, q_len, kv_len, heads, head_dim, layout, scale=None, key_lengths=None,
                block_sizes=None):
    def make_args(device, dtype, generator):
        if layout == "fused qkv":
            q, k, v = random_tensor((batch, q_len, 3, heads, head_dim), "contiguous", device, dtype, generator).unbind(2)
        else:
            q = random_tensor((batch, q_len, heads, head_dim), layout, device, dtype, generator)
            k, v = (random_tensor((batch, kv_len, heads, head_dim), layout, device, dtype, generator) for _ in "kv")
        mask = None if key_lengths is None else padding_mask(key_lengths, kv_len, device)
        ends = None if block_sizes is None else block_ends(block_sizes, device)
        return (q, k, v, mask, scale, ends)

    return CheckCase(label, make_args)


def _check_cases():
    return [
        _check_case("SD-like D40 Lq37 Lkv21", 2, 37, 21, 2, 40, "contiguous"),
        _check_case("self-attention fused qkv D16 L33", 1, 33, 33, 2, 16, "fused qkv"),
        _check_case("D80 sliced Lq9 Lkv19 scale 0.3", 2, 9, 19, 1, 80, "sliced", scale=0.3),
        _check_case("SANA-like D72 Lq20 Lkv30", 1, 20, 30, 2, 72, "contiguous"),
        _check_case("SD 1.5 deepest D160 Lq12 Lkv77, captions of 9 and 0 tokens", 2, 12, 77, 1, 160,
                    "contiguous", key_lengths=[9, 0]),
        _check_case("VAR-like block-causal D64 scales 1, 4, 9, 16", 2, 30, 30, 2, 64, "fused qkv",
                    block_sizes=[1, 4, 9, 16]),
    ]


CROSS_ATTENTION = register(Op(name="cross_attention", reference=cross_attention_reference,
                              allocate_output=_allocate_output, check_cases=_check_cases))
# Not in OPS: `fastgen check` and the contract tests drive ops with one output. Both run
# through cross_attention: its "bwd" direction runs these with the backend forced.
CROSS_ATTENTION_FORWARD = Op(name="cross_attention_forward", called_as="cross_attention",
                             reference=cross_attention_forward_reference,
                             allocate_output=_allocate_output_and_lse)
CROSS_ATTENTION_BACKWARD = Op(name="cross_attention_backward", called_as="cross_attention's backward",
                              reference=cross_attention_backward_reference,
                              allocate_output=_allocate_gradients)


CROSS_ATTENTION.implement_at("triton", "fastgen.kernels.cross_attention:cross_attention")
CROSS_ATTENTION_FORWARD.implement_at("triton", "fastgen.kernels.cross_attention:cross_attention_forward")
CROSS_ATTENTION_BACKWARD.implement_at("triton", "fastgen.kernels.cross_attention:cross_attention_backward")


@define_custom_op(CROSS_ATTENTION_FORWARD)
def cross_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
    causal_block_ends: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): the attention output and the per-row log-sum-exp the backward needs."""


@define_custom_op(CROSS_ATTENTION_BACKWARD)
def cross_attention_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output: torch.Tensor, lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
    causal_block_ends: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for the output gradient `grad`, recomputing the probabilities from lse."""


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale, causal_block_ends = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, causal_block_ends)
    ctx.mark_non_differentiable(lse)
    ctx.scale = scale


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse, key_padding_mask, causal_block_ends = ctx.saved_tensors
    dq, dk, dv = cross_attention_backward(grad, q, k, v, out, lse, key_padding_mask, ctx.scale, causal_block_ends)
    return dq, dk, dv, None, None, None


register_autograd(cross_attention_forward, _backward, _setup_context)

_LIBRARY = torch.library.Library("fastgen", "FRAGMENT")
_LIBRARY.define(
    "cross_attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask=None, float? scale=None, "
    "Tensor? causal_block_ends=None) -> Tensor"
)


def _cross_attention_composite(q, k, v, key_padding_mask=None, scale=None, causal_block_ends=None):
    return torch.ops.fastgen.cross_attention_forward(q, k, v, key_padding_mask, scale, causal_block_ends)[0]


_LIBRARY.impl("cross_attention", _cross_attention_composite, "CompositeImplicitAutograd")


@with_the_math
def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_padding_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                    causal_block_ends: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T scale + mask bias) v (see the module docstring); `torch.ops.fastgen.cross_attention`."""
    return torch.ops.fastgen.cross_attention(q, k, v, key_padding_mask, scale, causal_block_ends)


def merge_attention(parts) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of attention over the union of disjoint key sets, from each set's (out, lse)
    of `cross_attention_forward` with the same queries (module docstring). A row without a key
    in any part keeps the op's convention: out 0, lse +inf. lse is float64; out is float32
    (float64 for float64 parts), laid out as (B, Lq, H, D)."""
    outs, lses = zip(*parts)
    # The op marks a keyless row with lse +inf (its recomputed probabilities are then 0); as a
    # weight in the union that row counts for nothing, which is lse -inf.
    weights = torch.stack([torch.where(lse == float("inf"), float("-inf"), lse.double()) for lse in lses])
    lse = torch.logsumexp(weights, dim=0)
    keyless = lse == float("-inf")
    scale = torch.where(keyless, 0.0, torch.exp(weights - torch.where(keyless, 0.0, lse)))
    compute = torch.promote_types(outs[0].dtype, torch.float32)
    # lse is (B, H, Lq) and out (B, Lq, H, D): the weights move to (B, Lq, H, 1).
    out = sum(o.to(compute) * w.transpose(1, 2)[..., None].to(compute) for o, w in zip(outs, scale))
    return out, torch.where(keyless, float("inf"), lse)
