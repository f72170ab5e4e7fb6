"""Flash cross-attention: every implementation against the float64 reference (outputs, lse,
gradients), key padding masks with empty rows, strides, determinism, torch.compile, errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastgen
from fastgen.check import mismatch
from fastgen.ops.cross_attention import (
    CROSS_ATTENTION,
    CROSS_ATTENTION_BACKWARD,
    CROSS_ATTENTION_FORWARD,
    cross_attention,
    cross_attention_backward,
    cross_attention_backward_reference,
    cross_attention_forward,
    cross_attention_forward_reference,
    cross_attention_reference,
    block_ends,
    l2_normalized_qk,
    merge_attention,
    padding_mask,
)
from fastgen.ops.registry import TOLERANCES, random_tensor, use_backend
from test_fuzz import cross_attention_gradient_terms

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (16, 40, 64, 72, 80, 160)
CPU = torch.device("cpu")


def _devices():
    return [pytest.param(CPU, id="cpu-triton-interpreter"),
            pytest.param(torch.device("cuda"), id="cuda-triton", marks=pytest.mark.gpu)]


def _qkv(batch, q_len, kv_len, heads, head_dim, layout, device, dtype, generator):
    """q, k, v as "fused qkv" (self-attention: views into one (B, L, 3, H, D) projection),
    "fused kv" (cross-attention: k and v views into one (B, Lkv, 2, H, D) projection, as
    diffusers' fused to_kv gives them), "contiguous" or "sliced" (no unit stride)."""
    if layout == "fused qkv":
        return random_tensor((batch, q_len, 3, heads, head_dim), "contiguous", device, dtype, generator).unbind(2)
    q = random_tensor((batch, q_len, heads, head_dim), "contiguous" if layout == "fused kv" else layout,
                      device, dtype, generator)
    if layout == "fused kv":
        return (q, *random_tensor((batch, kv_len, 2, heads, head_dim), "contiguous", device, dtype, generator).unbind(2))
    k, v = (random_tensor((batch, kv_len, heads, head_dim), layout, device, dtype, generator) for _ in "kv")
    return q, k, v


@st.composite
def attention_inputs(draw, device, generator):
    """(q, k, v, key_padding_mask, scale): odd lengths, cross- or self-attention, every layout
    and dtype, the models' head dims, no mask or ragged caption lengths (0 included: a row
    with no key), default or explicit scale."""
    dtype = draw(st.sampled_from(DTYPES))
    batch, heads, head_dim = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from(HEAD_DIMS))
    layout = draw(st.sampled_from(["fused qkv", "fused kv", "contiguous", "sliced"]))
    q_len = draw(st.integers(1, 40))
    kv_len = q_len if layout == "fused qkv" else draw(st.integers(1, 40))
    q, k, v = _qkv(batch, q_len, kv_len, heads, head_dim, layout, device, dtype, generator)
    mask = None
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, kv_len), min_size=batch, max_size=batch))
        mask = padding_mask(lengths, kv_len, device)
    scale = draw(st.sampled_from([None, 0.05, 0.3]))
    return q, k, v, mask, scale


def _upcast(args):
    return tuple(a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _assert_close_to(actual, expected, what):
    _, detail = mismatch(actual, expected)
    assert not detail, f"{what}: {detail}"


def _dense_keep(key_padding_mask, causal_block_ends, q_len, kv_len):
    """(B or 1, 1, Lq or 1, Lkv) bool of the keys each row sees, on the CPU, or None for all: the
    module docstring's block-causal pattern written out block by block as a dense mask."""
    keep = None if key_padding_mask is None else key_padding_mask.cpu()[:, None, None, :]
    if causal_block_ends is not None:
        dense = torch.zeros(q_len, kv_len, dtype=torch.bool)
        block_start = 0
        for end in causal_block_ends.tolist():
            dense[block_start:end, :end] = True
            block_start = end
        keep = dense[None, None] if keep is None else keep & dense
    return keep


def _assert_lse_is_logsumexp(lse, q, k, key_padding_mask, scale, causal_block_ends=None):
    """lse against torch.logsumexp of the float64 scores; +inf exactly on rows with no key."""
    q64, k64 = _upcast((q, k))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64).cpu() * scale
    keep = _dense_keep(key_padding_mask, causal_block_ends, q.shape[1], k.shape[1])
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    expected = torch.logsumexp(scores, dim=-1)
    empty = expected == float("-inf")
    lse = lse.cpu()
    assert lse.dtype == torch.float64
    assert torch.equal(lse == float("inf"), empty), "lse must be +inf exactly on the rows without a key"
    # The log-sum-exp of float32 scores (float64 only keeps its digits): float32's tolerance.
    _assert_close_to(lse[~empty].float(), expected[~empty].float(), "lse")


def _poisoned(tensors):
    return tuple(t.fill_(float("nan")) for t in tensors)


def _reference_gradients(grad, q, k, v, key_padding_mask, scale, causal_block_ends=None):
    grad64, q64, k64, v64 = _upcast((grad, q, k, v))
    out, lse = cross_attention_forward_reference(q64, k64, v64, key_padding_mask, scale, causal_block_ends)
    return cross_attention_backward_reference(grad64, q64, k64, v64, out, lse, key_padding_mask, scale,
                                              causal_block_ends)


def _attention_in_dtype(q, k, v, key_padding_mask, scale, causal_block_ends=None):
    """Unfused eager attention computed in the inputs' own dtype, as model code without a
    fused kernel runs it: the yardstick for how exact 16-bit gradients can be."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    keep = _dense_keep(key_padding_mask, causal_block_ends, q.shape[1], k.shape[1])
    if keep is None:
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), v)
    keep = keep.to(q.device)
    has_key = keep.any(-1, keepdim=True)
    probabilities = torch.softmax(torch.where(has_key, scores.masked_fill(~keep, float("-inf")), 0.0), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probabilities * has_key, v)


def _assert_gradients_close(actual_grads, grad, q, k, v, key_padding_mask, scale, causal_block_ends=None):
    """(dq, dk, dv) against the float64 reference backward. The kernels form delta from the
    stored 16-bit output and round P and dS to the input dtype before their products, as
    FlashAttention does; with peaked softmaxes (large scores, D = 160) the rounded output
    alone puts bfloat16 gradients past the output tolerance, and in float32 the sums over
    many rows miss 1e-5 as eager PyTorch does. So atol is widened by 4x the worst error of the
    same gradients computed by unfused eager attention in the input dtype (the most seen over
    many draws was about 2x): the kernels must be about as exact as the code they replace.
    A real bug is off by far more (ignoring the mask or delta: 100x). dq and dk are held to
    rtol of their terms' sizes, not of their values, as the op states ("Precision of dq and
    dk"): delta = g . out from the rounded out does not cancel sum_j P dP exactly, which the
    eager yardstick's softmax backward does (a suite run's bfloat16 dq, 102 of 320 elements up
    to 0.0675 off; measured at D 160 with 1 to 6 queries: 3 of 600 bfloat16 gradients past 4x
    the yardstick's error, none past 0.18 of the terms' tolerance)."""
    expected = _reference_gradients(grad, q, k, v, key_padding_mask, scale, causal_block_ends)
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
    in_dtype = torch.autograd.grad(_attention_in_dtype(*leaves, key_padding_mask, scale, causal_block_ends), leaves,
                                   grad)
    terms = cross_attention_gradient_terms((q, k, v, key_padding_mask, scale, causal_block_ends), lambda: [grad], {})
    for name, actual, reference, yardstick in zip(("dq", "dk", "dv"), actual_grads, expected, in_dtype):
        rtol, atol = TOLERANCES[actual.dtype]
        atol += 4 * (yardstick.double() - reference).abs().max().item()
        error = (actual.detach().double() - reference).abs()
        size = torch.maximum(reference.abs(), terms[name[1]].to(reference.device)) if name[1] in terms else reference.abs()
        bad = ~(error <= atol + rtol * size)  # NaN (an unwritten element) is bad
        assert not bad.any(), (f"{name}: {int(bad.sum())} of {error.numel()} elements off, worst error "
                               f"{error.max().item():.3g} (rtol {rtol}, atol {atol:.3g})")


_HYPOTHESIS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("device", _devices())
@_HYPOTHESIS
@given(data=st.data())
def test_forward_matches_reference(device, data, generator):
    q, k, v, mask, scale = data.draw(attention_inputs(device, generator))
    out, lse = _poisoned(CROSS_ATTENTION_FORWARD.allocate_output(q, k, v, mask, scale))
    CROSS_ATTENTION_FORWARD.implementations["triton"].run(q, k, v, mask, scale, out=(out, lse))
    _assert_close_to(out, cross_attention_reference(*_upcast((q, k, v)), mask, scale), "out")
    _assert_lse_is_logsumexp(lse, q, k, mask, scale)


@pytest.mark.parametrize("device", _devices())
@_HYPOTHESIS
@given(data=st.data())
def test_backward_kernel_matches_reference(device, data, generator):
    """From the Triton forward's out and lse, as the autograd hands them over."""
    q, k, v, mask, scale = data.draw(attention_inputs(device, generator))
    grad = random_tensor(tuple(q.shape), "sliced", device, q.dtype, generator)
    with fastgen.use_backend("triton"):
        out, lse = cross_attention_forward(q, k, v, mask, scale)
    grads = _poisoned(CROSS_ATTENTION_BACKWARD.allocate_output(grad, q, k, v, out, lse, mask, scale))
    CROSS_ATTENTION_BACKWARD.implementations["triton"].run(grad, q, k, v, out, lse, mask, scale, out=grads)
    _assert_gradients_close(grads, grad, q, k, v, mask, scale)


def _equal_keys_at_scores(largest_score, device, dtype, generator):
    """q (9 rows), k (21 equal keys: one key row at stride 0), v and the scale that makes the
    largest |score| `largest_score`."""
    q = random_tensor((2, 9, 2, 40), "contiguous", device, dtype, generator)
    k = random_tensor((2, 1, 2, 40), "contiguous", device, dtype, generator).expand(2, 21, 2, 40)
    v = random_tensor((2, 21, 2, 40), "contiguous", device, dtype, generator)
    return q, k, v, largest_score / torch.einsum("bqhd,bkhd->bhqk", *_upcast((q, k))).abs().max().item()


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("largest_score", [4e4, 8.5e6])
def test_backward_probabilities_keep_the_digits_of_large_scores(device, dtype, largest_score, generator):
    """21 equal keys (one key row, stride 0), so every P is 1/21 in float64, at scores up to
    `largest_score` of either sign. lse = m + log 21 is stored as float64 and subtracted in two
    float32 parts. Rounded to float32, lse is off by up to |lse| 2^-24, and P by as much
    relatively: with a float32 lse every dtype's dv failed here at 8.5e6 (an ulp of lse is 1
    there: P e^-3 for 1/21), float32's also at 4e4. The output gradient is 30x larger than
    unit-normal so that dv's terms, not atol, set its tolerance."""
    q, k, v, scale = _equal_keys_at_scores(largest_score, device, dtype, generator)
    grad = 30 * random_tensor((2, 9, 2, 40), "contiguous", device, dtype, generator)
    with fastgen.use_backend("triton"):
        out, lse = cross_attention_forward(q, k, v, None, scale)
        dq, dk, dv = cross_attention_backward(grad, q, k, v, out, lse, None, scale)
    expected_dv = _reference_gradients(grad, q, k, v, None, scale)[2]
    # dv_j = sum_i P_ij g_i: held to the dtype's tolerance of sum_i P_ij |g_i|.
    terms = grad.double().abs().sum(1, keepdim=True).expand(expected_dv.shape) / 21
    _, detail = mismatch(dv, expected_dv, magnitude=terms)
    assert not detail, f"dv: {detail}"


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_hot_rows_with_the_output_gradient_orthogonal_to_their_value(device, dtype, generator):
    """Keys of size 1e9 (float16: 1e3) make every row one-hot, and each row's output gradient is
    orthogonal to its key's v: dP = g . v cancels to about 0 while its terms |g| . |v| do not,
    so the float32 rounding of dP and delta is dS, times a k of 1e9 in dq. The op states dq and
    dk within the tolerance of their terms written out to products of the inputs ("Precision of
    dq and dk"); sized by |dP| + |delta| instead, float32 fails here, as the fuzz's draw of this
    kind did (dq 55 for 0)."""
    q = random_tensor((2, 9, 2, 31), "contiguous", device, dtype, generator)
    # float16 ends at 65504: its keys of 1e3 keep the eager yardstick's float16 scores finite.
    size = 1e3 if dtype == torch.float16 else 1e9
    k = (size * random_tensor((2, 13, 2, 31), "contiguous", device, torch.float32, generator)).to(dtype)
    v = random_tensor((2, 13, 2, 31), "contiguous", device, dtype, generator)
    q64, k64, v64 = _upcast((q, k, v))
    chosen = torch.einsum("bqhd,bkhd->bhqk", q64, k64).argmax(-1)  # (B, H, Lq): each row's key
    v_of_row = torch.gather(v64.transpose(1, 2), 2, chosen[..., None].expand(-1, -1, -1, 31)).transpose(1, 2)
    grad = torch.randn(q.shape, generator=generator, dtype=torch.float64).to(device)
    grad = grad - (grad * v_of_row).sum(-1, keepdim=True) / v_of_row.square().sum(-1, keepdim=True) * v_of_row
    grad = grad.to(dtype)
    with fastgen.use_backend("triton"):
        out, lse = cross_attention_forward(q, k, v)
        grads = cross_attention_backward(grad, q, k, v, out, lse, None, None)
    _assert_gradients_close(grads, grad, q, k, v, None, None)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, lengths", [("fused qkv", None), ("fused kv", (11, 6))], ids=["self", "cross-masked"])
def test_autograd_runs_the_triton_backward(device, dtype, layout, lengths, generator):
    """The public op's autograd runs the Triton backward with the forward's backend: self-
    attention on a fused qkv projection, cross-attention on a fused kv projection with padding."""
    q, k, v = (t.detach().requires_grad_() for t in _qkv(2, 19, 11, 2, 40, layout, device, dtype, generator))
    mask = None if lengths is None else padding_mask(lengths, k.shape[1], device)
    with fastgen.use_backend("triton"):
        out = cross_attention(q, k, v, mask)
    grad = random_tensor(tuple(q.shape), "contiguous", device, dtype, generator)
    out.backward(grad)  # outside the block: the backward must still run the Triton kernels
    _assert_close_to(out, cross_attention_reference(*_upcast((q, k, v)), mask), "out")
    _assert_gradients_close((q.grad, k.grad, v.grad), grad, q, k, v, mask, None)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_without_a_key_give_zeros_and_zero_gradients(backend, dtype, generator):
    """Batch row 0 has no caption token at all: its outputs are exactly 0 and every gradient
    through it is exactly 0, never NaN; masked keys get zero dk and dv."""
    q, k, v = (t.detach().requires_grad_() for t in _qkv(2, 21, 9, 2, 16, "sliced", CPU, dtype, generator))
    mask = padding_mask((0, 4), 9, CPU)
    with fastgen.use_backend(backend):
        out = cross_attention(q, k, v, mask)
        out.backward(random_tensor(tuple(out.shape), "contiguous", CPU, dtype, generator))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    for grad in (q.grad, k.grad, v.grad):
        assert torch.isfinite(grad).all()
    assert not q.grad[0].any() and not k.grad[0].any() and not v.grad[0].any()
    assert not k.grad[1, 4:].any() and not v.grad[1, 4:].any()
    assert out[1].abs().sum() > 0 and q.grad[1].abs().sum() > 0


def _autograd_of_the_reference(grad, q, k, v, key_padding_mask):
    """(out, dq, dk, dv): float64 autograd through the forward's eager reference."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = cross_attention_reference(*leaves, key_padding_mask)
    out.backward(grad.double())
    return (out.detach(), *(t.grad for t in leaves))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_nan_and_inf_propagate_as_in_the_reference(dtype, name, value, generator):
    """One non-finite entry in every batch row of q, k or v, with a caption of 5 keys, one of
    none and one of a single key: out and every gradient are NaN or infinite exactly where
    float64 autograd of the eager reference is. The reference's softmax row is NaN for a NaN
    or +inf score and for scores all -inf (the single key's), P is NaN at the masked keys of
    such a row (so is their dv), its masked_fill and where pass no gradient to a masked key
    or a row without keys even where dP is NaN, and its products add 0 * inf = NaN."""
    q, k, v = (t.detach().clone() for t in _qkv(3, 7, 6, 2, 16, "contiguous", CPU, dtype, generator))
    tensors = dict(zip("qkv", (q, k, v)))
    tensors[name][:, 2 if name == "q" else 0, 0, 3] = value
    mask = padding_mask((5, 0, 1), 6, CPU)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with fastgen.use_backend("triton"):
        out = cross_attention(*leaves, mask)
    grad = random_tensor(tuple(out.shape), "contiguous", CPU, dtype, generator)
    out.backward(grad)
    _assert_non_finite_where_the_reference_is((out, q.grad, k.grad, v.grad),
                                              _autograd_of_the_reference(grad, q, k, v, mask))


def _assert_non_finite_where_the_reference_is(actual_outputs, reference_outputs):
    """(out, dq, dk, dv) NaN where the float64 reference's are, and infinite where its values
    rounded to the outputs' dtype are, with the same signs."""
    for what, actual, reference in zip(("out", "dq", "dk", "dv"), actual_outputs, reference_outputs):
        rounded = reference.to(actual.dtype).double()
        actual = actual.detach().double()
        differs = (actual.isnan() != rounded.isnan()) | ((actual.isinf() | rounded.isinf()) & (actual != rounded))
        assert not differs.any(), (f"{what}: non-finite where the reference is not, or the other way round, at "
                                   f"{differs.nonzero().tolist()[:4]}: got {actual[differs][:4].tolist()}, "
                                   f"expected {reference[differs][:4].tolist()}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_key_every_row_scores_minus_inf_passes_no_nan_to_other_gradients(dtype, generator):
    """At head dim 1 an infinite key element alone makes the key's score -inf on every row
    (q > 0): its P is 0, so its dv and dk are 0 and only dq's 0 * inf is NaN, as in the
    reference. The dk / dv pass computes the rows past Lq of its query tile too (q loaded as
    zeros): their 0 * inf score must not reach the key's dv."""
    q, k, v = (t.detach().clone() for t in _qkv(2, 5, 21, 2, 1, "contiguous", CPU, dtype, generator))
    q.abs_()
    k[:, 3, :, 0] = float("-inf")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with fastgen.use_backend("triton"):
        out = cross_attention(*leaves)
    grad = random_tensor(tuple(out.shape), "contiguous", CPU, dtype, generator)
    out.backward(grad)
    expected = _autograd_of_the_reference(grad, q, k, v, None)
    assert torch.equal(expected[3][:, 3], torch.zeros_like(expected[3][:, 3])), "the premise: the key's dv is 0"
    _assert_non_finite_where_the_reference_is((out, q.grad, k.grad, v.grad), expected)
    _assert_close_to(v.grad, expected[3], "dv")


@pytest.mark.parametrize("huge", ["q", "k"])
def test_scores_near_1e20_give_the_forwards_probabilities_to_dv(huge, generator):
    """q (or k) times 2^32 puts scores near 1e20, where a float32 rounding is 1e13: P^T =
    exp(s - lse) in the dk / dv pass is the forward's only where its scores are the forward's
    float32 numbers (k q^T rounds q k^T differently: P^T inf, or 0 where the row max's is 1)."""
    q, k, v = (t.detach().clone() for t in _qkv(2, 37, 23, 2, 16, "contiguous", CPU, torch.float32, generator))
    {"q": q, "k": k}[huge].mul_(2.0**32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with fastgen.use_backend("triton"):
        out = cross_attention(*leaves)
    grad = random_tensor(tuple(out.shape), "contiguous", CPU, torch.float32, generator)
    out.backward(grad)
    expected = _autograd_of_the_reference(grad, q, k, v, None)
    _assert_non_finite_where_the_reference_is((out, q.grad, k.grad, v.grad), expected)
    _assert_close_to(out, expected[0], "out")
    _assert_close_to(v.grad, expected[3], "dv")


def test_reference_is_pytorch_attention(generator):
    """The eager reference against torch's own math attention (boolean attn_mask) in float64,
    and the explicit backward formulas against autograd through it."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 13, 7, 3, 24, "contiguous", CPU, torch.float64, generator))
    mask = padding_mask((7, 3), 7, CPU)
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask[:, None, None, :], scale=0.2).transpose(1, 2)
    actual = cross_attention_reference(q, k, v, mask, 0.2)
    torch.testing.assert_close(actual, expected)
    grad = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    autograd_grads = torch.autograd.grad(expected, (q, k, v), grad)
    out, lse = cross_attention_forward_reference(q, k, v, mask, 0.2)
    for a, e in zip(cross_attention_backward_reference(grad, q, k, v, out, lse, mask, 0.2), autograd_grads):
        torch.testing.assert_close(a, e)


def test_custom_op_gradcheck(generator):
    """The registered autograd (the backward op's reference) against finite differences in
    float64: Lq != Lkv, D not a power of two, a ragged mask with an empty row, a given scale."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 5, 6, 1, 3, "contiguous", CPU, torch.float64, generator))
    mask = padding_mask((0, 4), 6, CPU)
    with fastgen.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda *qkv: cross_attention(*qkv, mask, 0.7), (q, k, v))
        assert torch.autograd.gradcheck(lambda *qkv: cross_attention(*qkv), (q, k, v))


def test_lse_is_not_differentiable_and_second_order_is_unsupported(generator):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 5, 4, 2, 4, "contiguous", CPU, torch.float64, generator))
    out, lse = cross_attention_forward(q, k, v)
    assert out.requires_grad and not lse.requires_grad
    (dq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="cross_attention_backward.* no autograd formula"):
        torch.autograd.grad(dq.sum(), (q,))


@pytest.mark.parametrize("device", _devices())
def test_runs_are_bitwise_identical(device, generator):
    """No atomics: the dq pass and the dk/dv pass each sum in a fixed order."""
    q, k, v = (t.detach().requires_grad_() for t in _qkv(2, 40, 40, 2, 40, "fused qkv", device, torch.bfloat16, generator))
    grad = random_tensor(tuple(q.shape), "contiguous", device, q.dtype, generator)
    results = []
    with fastgen.use_backend("triton"):
        for _ in range(2):
            out = cross_attention(q, k, v)
            results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_backward_accepts_broadcast_gradients(generator):
    """out.sum().backward() hands the backward an expanded gradient with all strides 0."""
    q, k, v = (t.detach().requires_grad_() for t in _qkv(1, 9, 7, 2, 16, "contiguous", CPU, torch.float32, generator))
    with fastgen.use_backend("triton"):
        cross_attention(q, k, v).sum().backward()
    _assert_gradients_close((q.grad, k.grad, v.grad), torch.ones(q.shape), q, k, v, None, None)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph_forward_and_backward(backend, generator):
    """The public op traces (through its composite into the forward op) without a graph break
    and the compiled forward and backward agree with eager."""
    q, k, v = (t.detach().requires_grad_() for t in _qkv(2, 12, 5, 2, 16, "contiguous", CPU, torch.float32, generator))
    mask = padding_mask((5, 2), 5, CPU)

    def attention_block(q, k, v):
        return cross_attention(q * 2.0, k, v, mask).square().sum()

    with fastgen.use_backend(backend):
        expected = torch.autograd.grad(attention_block(q, k, v), (q, k, v))
        compiled = torch.compile(attention_block, backend="aot_eager", fullgraph=True)
        actual = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def _tensors(q_shape=(1, 4, 2, 8), kv_shape=(1, 6, 2, 8), dtype=torch.float32):
    return torch.ones(q_shape, dtype=dtype), torch.ones(kv_shape, dtype=dtype), torch.ones(kv_shape, dtype=dtype)


@pytest.mark.parametrize(
    "make_args, error, message",
    [
        (lambda: _tensors(dtype=torch.int32), TypeError, "q must be float32, float16, bfloat16 or float64, got torch.int32"),
        (lambda: (torch.ones(4, 2, 8), *_tensors()[1:]), ValueError, r"q must be 4-D \(B, L, H, D\), got shape \(4, 2, 8\)"),
        (lambda: (*_tensors()[:2], torch.ones(1, 6, 2, 8, dtype=torch.float16)), TypeError,
         "v dtype torch.float16 must match q dtype torch.float32"),
        (lambda: (_tensors()[0], torch.ones(1, 6, 2, 8, device="meta"), _tensors()[2]), ValueError,
         "k is on meta but q is on cpu"),
        (lambda: _tensors(kv_shape=(1, 6, 3, 8)), ValueError,
         r"k must have q's batch, heads and head dim \(B, H, D\) = \(1, 2, 8\), got k of shape \(1, 6, 3, 8\)"),
        (lambda: (*_tensors()[:2], torch.ones(1, 5, 2, 8)), ValueError,
         r"v must have k's shape \(1, 6, 2, 8\), got \(1, 5, 2, 8\)"),
        (lambda: _tensors((1, 4, 1, 257), (1, 6, 1, 257)), ValueError, "head dim D must be between 1 and 256, got 257"),
        (lambda: (*_tensors(), torch.ones(1, 6)), TypeError, "key_padding_mask dtype torch.float32 must be torch.bool"),
        (lambda: (*_tensors(), torch.ones(1, 5, dtype=torch.bool)), ValueError,
         r"key_padding_mask must have shape \(B, Lkv\) = \(1, 6\), got \(1, 5\)"),
        (lambda: (*_tensors(), torch.ones(1, 6, dtype=torch.bool, device="meta")), ValueError,
         "key_padding_mask is on meta but q is on cpu"),
        (lambda: (*_tensors(), None, float("nan")), ValueError, "scale must be a finite number or None, got nan"),
        (lambda: (*_tensors(), None, None, torch.tensor([2.0, 6.0])), TypeError,
         "causal_block_ends must be int32 or int64, got torch.float32"),
        (lambda: (*_tensors(), None, None, torch.tensor([2, 6], device="meta")), ValueError,
         "causal_block_ends is on meta but q is on cpu"),
        (lambda: (*_tensors(), None, None, torch.tensor([[2, 6]])), ValueError,
         r"causal_block_ends must be 1-D \(one end per block\), got shape \(1, 2\)"),
        (lambda: (*_tensors(), None, None, torch.tensor([6])), ValueError,
         "causal_block_ends is for self-attention, Lq == Lkv, got Lq=4, Lkv=6"),
        (lambda: (*_tensors(kv_shape=(1, 4, 2, 8)), None, None, torch.tensor([3, 2, 4])), ValueError,
         r"causal_block_ends must increase strictly from at least 1, got \[3, 2, 4\]"),
        (lambda: (*_tensors(kv_shape=(1, 4, 2, 8)), None, None, torch.tensor([1, 1, 4], dtype=torch.int32)), ValueError,
         r"causal_block_ends must increase strictly from at least 1, got \[1, 1, 4\]"),
        (lambda: (*_tensors(kv_shape=(1, 4, 2, 8)), None, None, torch.tensor([0, 4])), ValueError,
         r"causal_block_ends must increase strictly from at least 1, got \[0, 4\]"),
        (lambda: (*_tensors(kv_shape=(1, 4, 2, 8)), None, None, torch.tensor([1, 3])), ValueError,
         "the last of causal_block_ends must be Lq = 4, got 3"),
        (lambda: (*_tensors(kv_shape=(1, 4, 2, 8)), None, None, torch.tensor([], dtype=torch.int64)), ValueError,
         "the last of causal_block_ends must be Lq = 4, got no ends"),
    ],
)
def test_bad_input_gets_a_clear_error(make_args, error, message):
    for function in (cross_attention, cross_attention_forward, cross_attention_reference):
        with pytest.raises(error, match=message) as raised:
            function(*make_args())
        assert str(raised.value).startswith("cross_attention: "), "named after the op the user called"


def test_reference_rejects_non_tensors():
    # The custom op's schema rejects these before fastgen's checks run; the reference is plain Python.
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        cross_attention_reference([[1.0]], *_tensors()[1:])
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor or None, got list"):
        cross_attention_reference(*_tensors(), [True] * 6)
    with pytest.raises(TypeError, match="causal_block_ends must be a 1-D int32 or int64 tensor or None, got list"):
        cross_attention_reference(*_tensors(), None, None, [2, 6])


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(grad=torch.ones(1, 4, 2, 4)), ValueError, r"grad must have shape of q = \(1, 4, 2, 8\), got \(1, 4, 2, 4\)"),
        (dict(grad=torch.ones(1, 4, 2, 8, dtype=torch.float64)), TypeError,
         "grad dtype torch.float64 must match q dtype torch.float32"),
        (dict(output=torch.ones(1, 3, 2, 8)), ValueError, r"output must have shape of q = \(1, 4, 2, 8\), got \(1, 3, 2, 8\)"),
        (dict(lse=torch.ones(1, 2, 4)), TypeError, "lse dtype torch.float32 must be torch.float64"),
        (dict(lse=torch.ones(1, 4, 2, dtype=torch.float64)), ValueError, r"lse must have shape \(B, H, Lq\) = \(1, 2, 4\), got \(1, 4, 2\)"),
    ],
)
def test_backward_op_checks_its_inputs(change, error, message):
    q, k, v = _tensors()
    args = dict(grad=torch.ones(q.shape), q=q, k=k, v=v, output=torch.ones(q.shape),
                lse=torch.ones(1, 2, 4, dtype=torch.float64))
    args.update(change)
    with pytest.raises(error, match=message):
        cross_attention_backward(**args)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck_with_a_mask(backend, generator):
    """torch.library.opcheck (schema, fake, autograd registration, AOT dispatch) of the three
    ops with a key padding mask, which the contract's check cases leave out."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 7, 5, 2, 16, "sliced", CPU, torch.float32, generator))
    mask = padding_mask((0, 3), 5, CPU)
    with fastgen.use_backend(backend):
        out, lse = cross_attention_forward(q, k, v, mask, None)
        grad = random_tensor(tuple(q.shape), "contiguous", CPU, q.dtype, generator)
        for op, args in ((torch.ops.fastgen.cross_attention, (q, k, v, mask, 0.5)),
                         (torch.ops.fastgen.cross_attention_forward, (q, k, v, mask, None)),
                         (torch.ops.fastgen.cross_attention_backward,
                          (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse, mask, None))):
            torch.library.opcheck(op, args)


def test_public_op_is_the_registered_contract():
    """What `fastgen check` and the contract tests drive: one output, the Triton forward."""
    assert CROSS_ATTENTION.name == "cross_attention" and hasattr(torch.ops.fastgen, "cross_attention")
    q, k, v = _tensors()
    assert cross_attention(q, k, v).shape == q.shape


def _kept_configs(kernel, d_pad, precision):
    tuned = kernel.tuned
    return tuned.early_config_prune(tuned.configs, {}, D_PAD=d_pad, PRECISION=precision)


@pytest.mark.parametrize("precision", ["tf32", "tf32x3"])
@pytest.mark.parametrize("head_dim", [16, 40, 64, 80, 128, 160, 256])
def test_autotuning_keeps_configs_for_every_head_dim(head_dim, precision):
    """The GPU autotuner prunes its configs by tile elements per thread (they cannot run here):
    some must stay for every head dim, all of them for small ones."""
    from fastgen.kernels import cross_attention as kernels

    d_pad = max(16, 1 << (head_dim - 1).bit_length())
    for kernel in (kernels._forward, kernels._query_grad, kernels._key_value_grad):
        kept = _kept_configs(kernel, d_pad, precision)
        assert kept, f"no config left for D = {head_dim}"
        if d_pad <= 16 or (d_pad <= 64 and precision == "tf32"):
            assert kept == kernel.tuned.configs


# From ptxas -v for sm_90 (Triton 3.9) on the first 8 configs of each kernel (bytes spilled per
# thread): the least-spilling config and the worst one, as (BLOCK_M, BLOCK_N, warps).
_MEASURED_SPILLS = [
    ("_forward", "tf32", 128, (64, 32, 4), 0, (128, 64, 4), 1140),
    ("_key_value_grad", "tf32", 256, (32, 32, 4), 32, (64, 128, 8), 2216),
    ("_forward", "tf32x3", 128, (64, 32, 8), 196, (128, 64, 4), 2968),
    ("_forward", "tf32x3", 256, (64, 32, 8), 1388, (128, 64, 4), 15796),
    ("_query_grad", "tf32x3", 128, (32, 32, 4), 480, (64, 64, 4), 4036),
    ("_query_grad", "tf32x3", 256, (32, 32, 4), 2388, (32, 64, 4), 32468),
    ("_key_value_grad", "tf32x3", 128, (32, 32, 4), 892, (64, 32, 4), 19072),
    ("_key_value_grad", "tf32x3", 256, (64, 64, 8), 4928, (64, 32, 4), 41532),
]


@pytest.mark.parametrize("kernel_name, precision, d_pad, least, least_bytes, worst, worst_bytes", _MEASURED_SPILLS)
def test_autotuning_keeps_the_least_spilling_config(kernel_name, precision, d_pad, least, least_bytes, worst,
                                                     worst_bytes):
    """Counting only the accumulators once left the float32 key/value gradient at D_PAD 128
    with one candidate, spilling 16.6 KB per thread; the measured best must stay a candidate
    and the measured worst must not."""
    from fastgen.kernels import cross_attention as kernels

    kept = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
            for c in _kept_configs(getattr(kernels, kernel_name), d_pad, precision)}
    assert least in kept, f"the config spilling {least_bytes} B is pruned; kept {sorted(kept)}"
    assert worst not in kept, f"the config spilling {worst_bytes} B is kept"


_SD15_CROSS = [(4096, 40), (1024, 80), (256, 160), (64, 160)]  # (image tokens, head dim) per UNet level


@pytest.mark.gpu
@pytest.mark.parametrize("q_len, head_dim", _SD15_CROSS)
def test_stable_diffusion_shapes_on_gpu(q_len, head_dim, generator):
    """SD 1.5 at 512 px with CFG (batch 2 x 2): 77 text tokens, 8 heads, padded captions;
    outputs and gradients against the reference and against torch's SDPA."""
    device = torch.device("cuda")
    q, k, v = (t.detach().requires_grad_()
               for t in _qkv(4, q_len, 77, 8, head_dim, "fused kv", device, torch.bfloat16, generator))
    mask = padding_mask((77, 12, 77, 1), 77, device)
    with fastgen.use_backend("triton"):
        out = cross_attention(q, k, v, mask)
    grad = random_tensor(tuple(q.shape), "contiguous", device, q.dtype, generator)
    out.backward(grad)
    _assert_close_to(out, cross_attention_reference(*_upcast((q, k, v)), mask), "out")
    _assert_gradients_close((q.grad, k.grad, v.grad), grad, q, k, v, mask, None)
    sdpa = F.scaled_dot_product_attention(*(t.detach().transpose(1, 2) for t in (q, k, v)),
                                          attn_mask=mask[:, None, None, :]).transpose(1, 2)
    torch.testing.assert_close(out, sdpa, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_self_attention_4096_on_gpu(dtype, generator):
    """Lq = Lkv = 4096 (the UNet's first level), every dtype, through the public op."""
    q, k, v = _qkv(2, 4096, 4096, 8, 40, "fused qkv", torch.device("cuda"), dtype, generator)
    with fastgen.use_backend("triton"):
        out, lse = cross_attention_forward(q, k, v)
    _assert_close_to(out, cross_attention_reference(*_upcast((q, k, v))), "out")
    _assert_lse_is_logsumexp(lse, q, k, None, None)


@pytest.mark.gpu
def test_cuda_graph_replays_with_new_inputs(generator):
    """Samplers capture the denoiser in a CUDA graph: the launches must be capturable (autotuned
    before the capture) and read the inputs' current contents on replay."""
    q, k, v = (t.contiguous() for t in _qkv(4, 1024, 77, 8, 80, "contiguous", torch.device("cuda"), torch.float16,
                                           generator))
    with fastgen.use_backend("triton"):
        cross_attention(q, k, v)  # autotunes and compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = cross_attention(q, k, v)
    for tensor in (q, k, v):
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    graph.replay()
    torch.cuda.synchronize()
    _assert_close_to(out, cross_attention_reference(*_upcast((q, k, v))), "out")


_CONFIGS_LAUNCHED = """
import json, sys, torch
from fastgen import precompile
import fastgen
torch.use_deterministic_algorithms(sys.argv[1] == "deterministic")
session = precompile.CompileSession(keep_ptx=True)
with session:
    for lq in json.loads(sys.argv[2]):
        q = torch.randn(1, lq, 2, 40, requires_grad=True)
        k, v = (torch.randn(1, 300, 2, 40, requires_grad=True) for _ in range(2))
        with fastgen.use_backend("triton"):
            fastgen.cross_attention(q, k, v).sum().backward()
print(json.dumps(sorted(f"{name} {options}" for name, options in session.variants)))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="compiles for a GPU without one")
def test_deterministic_mode_launches_one_fixed_config_in_every_process():
    """On a GPU the autotuner picks tiles by timing, per process. Under
    torch.use_deterministic_algorithms(True) each kernel launches only its lean config, at every
    length, and two processes launch the same ones; otherwise every pruned config is a
    candidate (the compile-only session compiles each, as the autotuner would time each)."""
    import json
    import os
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def launched(mode, query_lengths):
        result = subprocess.run([sys.executable, "-c", _CONFIGS_LAUNCHED, mode, json.dumps(query_lengths)],
                                capture_output=True, text=True, env=environment, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.splitlines()[-1])

    first, second = launched("deterministic", [77, 1000]), launched("deterministic", [77, 1000])
    assert first == second
    kernels = {entry.split()[0] for entry in first}
    assert kernels == {"_forward_kernel", "_query_grad_kernel", "_key_value_grad_kernel"}
    assert len(first) == len(kernels), first  # one config each
    # One length shows the autotuner's candidates; compiling each is what makes this test slow.
    assert len(launched("autotuned", [77])) > len(first)


@pytest.mark.parametrize("long_side", ["q", "kv"])
def test_triton_refuses_sequences_its_int32_indices_cannot_reach(long_side):
    """Row and key indices are int32 in the kernels: a sequence within a block of 2^31 would
    wrap them past the bounds mask, so the launchers refuse it (meta tensors: nothing runs)."""
    from fastgen.kernels import cross_attention as kernels

    lengths = {"q": (2**31 - 100, 8), "kv": (8, 2**31 - 100)}[long_side]
    q, k = (torch.empty(1, length, 1, 16, device="meta") for length in lengths)
    with pytest.raises(ValueError, match=r"at most 2147483392 queries and keys, got Lq="):
        kernels.cross_attention_forward(q, k, k, None, None, out=(torch.empty_like(q), None))
    with pytest.raises(ValueError, match="at most 2147483392"):
        kernels.cross_attention_backward(q, q, k, k, q, None, None, None, out=(q, k, k))


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("masked", [False, True], ids=["all keys", "padded"])
def test_key_parts_merge_through_the_lse_into_full_attention(generator, device, masked):
    """Attention over keys split in two (and three) parts, each part's (out, lse) from the
    Triton forward, merged: the whole set's output and lse. Padded: sample 0 has no key in the
    second part, sample 1 none in the first, sample 2 none at all (out 0, lse +inf)."""
    q, k, v = _qkv(3, 7, 12, 2, 40, "sliced", device, torch.float32, generator)
    mask = torch.ones(3, 12, dtype=torch.bool, device=device)
    if masked:
        mask[0, 5:] = False
        mask[1, :5] = False
        mask[2] = False
    with use_backend("triton"):
        whole, whole_lse = cross_attention_forward(q, k, v, mask)
        for bounds in ((0, 5, 12), (0, 3, 8, 12)):
            parts = [cross_attention_forward(q, k[:, a:b], v[:, a:b], mask[:, a:b])
                     for a, b in zip(bounds, bounds[1:])]
            out, lse = merge_attention(parts)
            torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lse, whole_lse, rtol=1e-6, atol=1e-6)
    if masked:
        assert torch.equal(out[2], torch.zeros_like(out[2])) and bool((lse[2] == float("inf")).all())
    expected = cross_attention_reference(*(t.double() for t in (q, k, v)), mask)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", _devices())
def test_parts_merge_at_large_scores(generator, device):
    """21 equal keys (stride 0) split 10 + 11 at scores up to 8.5e6: the parts' weights in the
    union are exp(lse_p - lse) = 10/21 and 11/21, and every P 1/21, only while lse keeps the
    digits of log 10 and log 11 (an ulp of a float32 lse is 1 there)."""
    q, k, v, scale = _equal_keys_at_scores(8.5e6, device, torch.float32, generator)
    with use_backend("triton"):
        out, lse = merge_attention([cross_attention_forward(q, k[:, a:b], v[:, a:b], None, scale)
                                    for a, b in ((0, 10), (10, 21))])
        whole_lse = cross_attention_forward(q, k, v, None, scale)[1]
    _assert_close_to(out, v.double().mean(1, keepdim=True).expand(out.shape), "merged out")
    # The same float32 scores m (rounded by up to 0.5 at 8.5e6, in the parts and the whole alike)
    # plus log 21: equal to float32 logarithms' rounding.
    torch.testing.assert_close(lse - whole_lse, torch.zeros_like(lse), rtol=0, atol=1e-6)


def test_merge_keeps_nan_of_a_part():
    q, k, v = (torch.randn(1, 3, 1, 8) for _ in "qkv")
    k[0, 1, 0, 0] = float("nan")
    parts = [cross_attention_forward_reference(q, k[:, a:b], v[:, a:b]) for a, b in ((0, 2), (2, 3))]
    out, lse = merge_attention(parts)
    assert bool(out.isnan().all()) and bool(lse.isnan().all())



# Block-causal attention (VAR's scales): odd block lists, one block (full attention), every row
# its own block (causal attention), and VAR's scales (the first seven of 256 px: 155 tokens;
# all ten, 680 tokens, take minutes under the interpreter).
_VAR_SCALES = [p * p for p in (1, 2, 3, 4, 5, 6, 8)]
_BLOCK_LISTS = [pytest.param([1, 3, 2, 7], id="1,3,2,7"), pytest.param([13], id="one block"),
                pytest.param([1] * 11, id="causal"), pytest.param([5, 17, 2, 9], id="5,17,2,9")]


def _block_causal_case(sizes, batch, heads, head_dim, dtype, device, generator, masked):
    """q, k, v (a fused qkv projection), a padding mask leaving batch row 0 its first key only
    (every row of it sees that one key; under blocks its later keys are partly visible, partly
    padding), and the block ends as every other element of a longer tensor (stride 2)."""
    length = sum(sizes)
    q, k, v = _qkv(batch, length, length, heads, head_dim, "fused qkv", device, dtype, generator)
    mask = padding_mask([1] + [length - 2] * (batch - 1), length, device) if masked else None
    ends = block_ends(sizes, device)
    return q, k, v, mask, torch.stack([ends, torch.full_like(ends, -1)], 1)[:, 0]


def test_block_causal_reference_is_pytorch_attention_with_a_dense_mask(generator):
    """The op's reference (its mask from searchsorted over the ends) against torch's math SDPA
    with the dense mask written out block by block, values and autograd, with padding."""
    sizes = [1, 3, 2, 7]
    q, k, v, mask, ends = _block_causal_case(sizes, 2, 2, 8, torch.float64, CPU, generator, masked=True)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    keep = _dense_keep(mask, ends, q.shape[1], k.shape[1])
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=keep, scale=0.4).transpose(1, 2)
    actual = cross_attention_reference(q, k, v, mask, 0.4, ends)
    torch.testing.assert_close(actual, expected)
    grad = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    out, lse = cross_attention_forward_reference(q, k, v, mask, 0.4, ends)
    for a, e in zip(cross_attention_backward_reference(grad, q, k, v, out, lse, mask, 0.4, ends),
                    torch.autograd.grad(expected, (q, k, v), grad)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sizes", _BLOCK_LISTS)
@pytest.mark.parametrize("masked", [False, True], ids=["all keys", "padded"])
def test_block_causal_matches_the_dense_mask_reference(device, dtype, sizes, masked, generator):
    """The Triton forward (out, lse) and backward (dq, dk, dv) against the float64 reference
    with the block-causal mask; padded: batch row 0 has one key, which every row sees."""
    q, k, v, mask, ends = _block_causal_case(sizes, 2, 2, 24, dtype, device, generator, masked)
    with fastgen.use_backend("triton"):
        out, lse = cross_attention_forward(q, k, v, mask, None, ends)
    _assert_close_to(out, cross_attention_reference(*_upcast((q, k, v)), mask, None, ends), "out")
    _assert_lse_is_logsumexp(lse, q, k, mask, None, ends)
    grad = random_tensor(tuple(q.shape), "sliced", device, dtype, generator)
    grads = _poisoned(CROSS_ATTENTION_BACKWARD.allocate_output(grad, q, k, v, out, lse, mask, None, ends))
    CROSS_ATTENTION_BACKWARD.implementations["triton"].run(grad, q, k, v, out, lse, mask, None, ends, out=grads)
    _assert_gradients_close(grads, grad, q, k, v, mask, None, ends)


@pytest.mark.parametrize("device", _devices())
def test_block_causal_at_var_scales_through_autograd(device, generator):
    """VAR's scales at a small head dim, attention scale 1 as VAR's l2-normed attention uses it,
    int32 ends: the public op's output and its autograd's gradients."""
    ends = block_ends(_VAR_SCALES, device).int()
    length = sum(_VAR_SCALES)
    q, k, v = (t.detach().requires_grad_()
               for t in _qkv(1, length, length, 1, 16, "fused qkv", device, torch.float32, generator))
    with fastgen.use_backend("triton"):
        out = cross_attention(q, k, v, None, 1.0, ends)
    grad = random_tensor(tuple(q.shape), "contiguous", device, q.dtype, generator)
    out.backward(grad)
    _assert_close_to(out, cross_attention_reference(*_upcast((q, k, v)), None, 1.0, ends), "out")
    _assert_gradients_close((q.grad, k.grad, v.grad), grad, q, k, v, None, 1.0, ends)


@pytest.mark.parametrize("device", _devices())
def test_decode_per_scale_is_the_block_causal_rows(device, generator):
    """Decode mode (module docstring): the queries of each scale attend, without block ends, to
    the cache prefix of all earlier scales and their own (views into a longer cache): outputs
    and lse are the rows of that scale in the block-causal forward over the whole sequence."""
    sizes = [1, 4, 9, 16, 3]
    length = sum(sizes)
    q, k, v = _qkv(2, length, length, 2, 40, "fused qkv", device, torch.float32, generator)
    k_cache, v_cache = (torch.full((2, length + 7, 2, 40), float("nan"), device=device) for _ in "kv")
    k_cache[:, :length], v_cache[:, :length] = k, v
    ends = block_ends(sizes, device)
    with fastgen.use_backend("triton"):
        whole, whole_lse = cross_attention_forward(q, k, v, None, None, ends)
        start = 0
        for end in ends.tolist():
            out, lse = cross_attention_forward(q[:, start:end], k_cache[:, :end], v_cache[:, :end])
            torch.testing.assert_close(out, whole[:, start:end], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lse, whole_lse[:, :, start:end], rtol=1e-6, atol=1e-6)
            start = end


@pytest.mark.parametrize("device", _devices())
def test_block_causal_skips_the_tiles_a_block_cannot_see(device, generator):
    """A block of 128 (every tile size of the kernels divides 128), then one of 16. Head 1: a NaN in a key and
    a value of block 2; head 0: a NaN in a query and an output gradient row of block 1. Masked
    but computed tiles would carry them through 0 * NaN products (the reference's dense products
    do, into every row): skipped, head 1's out, lse and dq of block 1 and head 0's dk and dv of
    block 2 equal the reference on the clean inputs. A wrong mask would show in the same values."""
    q, k, v, _, ends = _block_causal_case([128, 16], 1, 2, 16, torch.float32, device, generator, masked=False)
    grad = random_tensor(tuple(q.shape), "contiguous", device, q.dtype, generator)
    poisoned = [t.clone() for t in (q, k, v, grad)]
    for tensor, row, head in zip(poisoned, (10, 130, 131, 20), (0, 1, 1, 0)):
        tensor[:, row, head, 3] = float("nan")
    with fastgen.use_backend("triton"):
        out, lse = cross_attention_forward(*poisoned[:3], None, None, ends)
        dq, dk, dv = cross_attention_backward(poisoned[3], *poisoned[:3], out, lse, None, None, ends)
    expected_out, expected_lse = cross_attention_forward_reference(*_upcast((q, k, v)), None, None, ends)
    expected_dq, expected_dk, expected_dv = _reference_gradients(grad, q, k, v, None, None, ends)
    first, second = slice(0, 128), slice(128, 144)
    _assert_close_to(out[:, first, 1], expected_out[:, first, 1], "out of block 1")
    _assert_close_to(lse[:, 1, first].float(), expected_lse[:, 1, first].float(), "lse of block 1")
    _assert_close_to(dq[:, first, 1], expected_dq[:, first, 1].float(), "dq of block 1")
    _assert_close_to(dk[:, second, 0], expected_dk[:, second, 0].float(), "dk of block 2")
    _assert_close_to(dv[:, second, 0], expected_dv[:, second, 0].float(), "dv of block 2")


def test_block_causal_compiles_and_passes_opcheck(generator):
    """torch.compile(fullgraph=True) of the public op with block ends (forward and backward), and
    torch.library.opcheck of the three ops with them: the ends travel through the schemas, the
    fakes and the autograd."""
    q, k, v = (t.detach().requires_grad_()
               for t in _qkv(1, 9, 9, 2, 16, "contiguous", CPU, torch.float32, generator))
    ends, mask = block_ends([2, 3, 4], CPU), padding_mask([7], 9, CPU)

    def attention_block(q, k, v):
        return cross_attention(q * 2.0, k, v, mask, None, ends).square().sum()

    with fastgen.use_backend("triton"):
        expected = torch.autograd.grad(attention_block(q, k, v), (q, k, v))
        compiled = torch.compile(attention_block, backend="aot_eager", fullgraph=True)
        for a, e in zip(torch.autograd.grad(compiled(q, k, v), (q, k, v)), expected):
            torch.testing.assert_close(a, e)
        out, lse = cross_attention_forward(q, k, v, mask, None, ends)
        grad = random_tensor(tuple(q.shape), "contiguous", CPU, q.dtype, generator)
        for op, args in ((torch.ops.fastgen.cross_attention, (q, k, v, mask, 0.5, ends)),
                         (torch.ops.fastgen.cross_attention_forward, (q, k, v, None, None, ends)),
                         (torch.ops.fastgen.cross_attention_backward,
                          (grad, q.detach(), k.detach(), v.detach(), out.detach(), lse, mask, None, ends))):
            torch.library.opcheck(op, args)


def test_block_causal_gradcheck(generator):
    """The reference backward with block ends and padding against finite differences."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 6, 6, 1, 3, "contiguous", CPU, torch.float64, generator))
    ends, mask = block_ends([1, 3, 2], CPU), padding_mask([0, 4], 6, CPU)
    with fastgen.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda *qkv: cross_attention(*qkv, mask, 0.7, ends), (q, k, v))


def test_block_ends_are_read_once_per_unchanged_tensor(monkeypatch):
    """The ends' values are checked with a device-to-host copy once per tensor: again only after
    an in-place write (which could break them), and a new tensor is checked anew; an inference
    tensor (no version counter) at every call."""
    q = torch.ones(1, 4, 1, 8)
    ends = torch.tensor([1, 4])
    cross_attention_reference(q, q, q, None, None, ends)
    reads = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or t.numpy().tolist())
    cross_attention_reference(q, q, q, None, None, ends)
    assert not reads
    ends[0] = 5
    with pytest.raises(ValueError, match="increase strictly"):
        cross_attention_reference(q, q, q, None, None, ends)
    assert len(reads) == 1
    with torch.inference_mode():  # no version counter: read at every call
        inference_ends = torch.tensor([1, 4])
        for _ in range(2):
            cross_attention_reference(q, q, q, None, None, inference_ends)
        inference_ends[0] = 4
        with pytest.raises(ValueError, match="increase strictly"):
            cross_attention_reference(q, q, q, None, None, inference_ends)
    assert len(reads) == 4


def _l2_normalized_qk_float64(q, k, log_scale):
    """VAR's attn_l2_norm written out in float64: x / max(sqrt(sum_d x^2), 1e-12), q times
    exp(min(s_h, log 100))."""
    def unit(x):
        return x / torch.clamp(x.square().sum(-1, keepdim=True).sqrt(), min=1e-12)

    q, k, log_scale = (t.double() for t in (q, k, log_scale))
    return unit(q) * torch.exp(torch.clamp(log_scale, max=math.log(100.0))).view(1, 1, -1, 1), unit(k)


def test_l2_normalized_qk_is_vars_attention_normalization(generator):
    """Values against the float64 transcription: a zero row (stays 0), a row of norm below
    1e-12 (divided by 1e-12), a head scale past log 100 (clamped); gradients of q, k and the
    log scale (0 for the clamped head) against finite differences."""
    q, k = (torch.randn(2, 5, 3, 8, generator=generator, dtype=torch.float64) for _ in "qk")
    q[0, 1, 2] = 0.0
    k[1, 3, 0] = 1e-14 * torch.randn(8, generator=generator, dtype=torch.float64)
    log_scale = torch.tensor([math.log(4.0), 5.0, -1.0], dtype=torch.float64).view(1, 3, 1, 1)
    for actual, expected in zip(l2_normalized_qk(q, k, log_scale), _l2_normalized_qk_float64(q, k, log_scale)):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0)
    assert not l2_normalized_qk(q, k, log_scale)[0][0, 1, 2].any()
    q[0, 1, 2], k[1, 3, 0] = 1.0, 1.0  # away from the kinks at norms 0 and 1e-12 for finite differences
    leaves = [t.detach().requires_grad_() for t in (q, k, log_scale)]
    assert torch.autograd.gradcheck(lambda *args: l2_normalized_qk(*args), leaves)
    grads = torch.autograd.grad(l2_normalized_qk(*leaves)[0].sum(), leaves[2])
    assert grads[0].flatten()[1] == 0, "the clamped head's scale gets no gradient"
    with pytest.raises(ValueError, match=r"log_scale must hold one value per head, H = 3, got shape \(2,\)"):
        l2_normalized_qk(q, k, torch.zeros(2))


@pytest.mark.parametrize("device", _devices())
def test_var_attention_with_l2_norm_and_block_ends(device, generator):
    """VAR's training attention as the model calls it: l2_normalized_qk, then the block-causal op
    with scale 1 on the Triton backend; out and the gradients of q, k, v and the per-head log
    scale against float64 autograd of the transcription and the dense-mask reference."""
    sizes = [1, 4, 9, 3]
    q, k, v, _, ends = _block_causal_case(sizes, 2, 2, 16, torch.float32, device, generator, masked=False)
    log_scale = torch.full((1, 2, 1, 1), math.log(4.0), device=device) + 0.3 * torch.randn(
        (1, 2, 1, 1), generator=generator).to(device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, log_scale)]
    grad = random_tensor(tuple(q.shape), "contiguous", device, q.dtype, generator)
    with fastgen.use_backend("triton"):
        out = cross_attention(*l2_normalized_qk(leaves[0], leaves[1], leaves[3]), leaves[2], None, 1.0, ends)
    actual = (out, *torch.autograd.grad(out, leaves, grad))
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    q64, k64 = _l2_normalized_qk_float64(leaves64[0], leaves64[1], leaves64[3])
    out64 = cross_attention_reference(q64, k64, leaves64[2], None, 1.0, ends)
    expected = (out64, *torch.autograd.grad(out64, leaves64, grad.double()))
    for name, a, e in zip(("out", "dq", "dk", "dv", "dlog_scale"), actual, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
