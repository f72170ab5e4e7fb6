"""ReLU linear attention: every implementation against the float64 reference, gradients,
determinism, all-zero feature rows, errors, the CUDA entry point's argument checks."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastgen
from conftest import EMULATED_CUDA, fake_tensor_arg
from fastgen.ops.linear_attention import (
    LINEAR_ATTENTION,
    LINEAR_ATTENTION_BACKWARD,
    fused_qkv,
    linear_attention,
    linear_attention_backward,
    linear_attention_backward_reference,
    linear_attention_reference,
)
from fastgen.ops.registry import TOLERANCES, random_tensor
from test_fuzz import linear_attention_gradient_terms

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (8, 16, 32, 40, 64, 72, 128)
CPU = torch.device("cpu")


def _devices():
    return [pytest.param(CPU, id="cpu-triton-interpreter"),
            pytest.param(torch.device("cuda"), id="cuda-triton", marks=pytest.mark.gpu)]


@st.composite
def attention_inputs(draw, device, generator, min_kv_tokens=1):
    """(q, k, v, eps): odd token counts, Nq != Nkv or self-attention, fused-qkv views or
    separate tensors (contiguous or with no unit stride), every dtype and the head dims the
    models use plus odd ones."""
    dtype = draw(st.sampled_from(DTYPES))
    batch, heads, head_dim = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.sampled_from(HEAD_DIMS))
    layout = draw(st.sampled_from(["fused qkv", "contiguous", "sliced"]))
    eps = draw(st.sampled_from([1e-15, 1e-3]))
    kv_tokens = draw(st.integers(min_kv_tokens, 150))
    if layout == "fused qkv":
        return (*fused_qkv(batch, kv_tokens, heads, head_dim, device, dtype, generator), eps)
    q_tokens = draw(st.integers(1, 150))
    q = random_tensor((batch, q_tokens, heads, head_dim), layout, device, dtype, generator)
    k, v = (random_tensor((batch, kv_tokens, heads, head_dim), layout, device, dtype, generator) for _ in "kv")
    return q, k, v, eps


def _upcast(tensors):
    return tuple(t.detach().double() for t in tensors)


def _assert_close_to(actual, expected, what):
    """Within the dtype's tolerance, with NaN and the same inf wherever the reference has them
    (an unwritten NaN element where it has a number fails)."""
    rtol, atol = TOLERANCES[actual.dtype]
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=rtol,
                               atol=atol, equal_nan=True, msg=lambda detail: f"{what}: {detail}")


def _assert_gradients_close(actual_grads, grad, q, k, v, eps=1e-15):
    """(dq, dk, dv) against the float64 reference backward. Each gradient sums over many rows,
    and the two terms of dq and of dk nearly cancel when out barely depends on q or k (few
    keys, or a row whose g . S and z (g . out) meet), so even float32 eager PyTorch misses the
    float32 tolerance on some inputs. The tolerance is therefore widened by 4x the worst error of
    the same formulas evaluated in float32, and dq and dk are held to their terms' sizes (the
    op's "Precision of dq and dk": float32 dq 1.5e-5 where float64 gives 1.6e-12 among 150
    keys): the kernels must be as accurate as float32 allows, not more. NaN and inf must stand
    where the reference's are."""
    inputs = (grad, q, k, v)
    expected = linear_attention_backward_reference(*_upcast(inputs), eps)
    in_float32 = linear_attention_backward_reference(*(t.detach().float() for t in inputs), eps)
    terms = linear_attention_gradient_terms((q, k, v, eps), lambda: [grad], {})
    for name, actual, reference, float32_result in zip(("dq", "dk", "dv"), actual_grads, expected, in_float32):
        rtol, atol = TOLERANCES[actual.dtype]
        both_finite = reference.isfinite() & float32_result.isfinite()
        float32_error = (float32_result.double() - reference)[both_finite].abs()
        atol += 4 * float32_error.max().item() if float32_error.numel() else 0.0
        actual, reference = actual.detach().double().cpu(), reference.cpu()
        scale = reference.abs()
        if name[1] in terms:
            scale = torch.maximum(scale, torch.nan_to_num(terms[name[1]].cpu(), nan=0.0, posinf=0.0))
        finite = actual.isfinite() & reference.isfinite()
        wrong = ~(finite | (actual.isnan() & reference.isnan()) | (actual == reference))
        wrong |= finite & ~((actual - reference).abs() <= atol + rtol * scale)
        if wrong.any():
            index = tuple(wrong.nonzero()[0].tolist())
            raise AssertionError(f"{name}: {int(wrong.sum())} of {wrong.numel()} elements off, first at {index}: "
                                 f"got {actual[index].item():.6g}, expected {reference[index].item():.6g} "
                                 f"(atol {atol:.3g}, rtol {rtol:g} of {scale[index].item():.3g})")


_HYPOTHESIS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _forward_targets():
    """(device, backend) of every forward kernel: Triton under the interpreter here, Triton and
    CUDA on a GPU (the backward has Triton kernels only)."""
    return [pytest.param(CPU, "triton", id="cpu-triton-interpreter"),
            pytest.param(torch.device("cuda"), "triton", id="cuda-triton", marks=pytest.mark.gpu),
            pytest.param(torch.device("cuda"), "cuda", id="cuda-cuda", marks=pytest.mark.gpu),
            EMULATED_CUDA]


@pytest.mark.parametrize("device, backend", _forward_targets())
@_HYPOTHESIS
@given(data=st.data())
def test_forward_matches_reference(device, backend, data, generator):
    q, k, v, eps = data.draw(attention_inputs(device, generator))
    out = LINEAR_ATTENTION.allocate_output(q, k, v, eps).fill_(float("nan"))
    LINEAR_ATTENTION.implementations[backend].run(q, k, v, eps, out=out)
    _assert_close_to(out, linear_attention_reference(*_upcast((q, k, v)), eps), "out")


@pytest.mark.parametrize("device", _devices())
@_HYPOTHESIS
@given(data=st.data())
def test_backward_kernel_matches_reference(device, data, generator):
    # At least 8 keys: with one or two, out hardly depends on q and k, so their gradients are
    # float32 rounding noise, and two correct float32 evaluations differ by no fixed factor.
    q, k, v, eps = data.draw(attention_inputs(device, generator, min_kv_tokens=8))
    grad = random_tensor(tuple(q.shape), "sliced", device, q.dtype, generator)
    grads = LINEAR_ATTENTION_BACKWARD.allocate_output(grad, q, k, v, eps)
    for tensor in grads:
        tensor.fill_(float("nan"))
    LINEAR_ATTENTION_BACKWARD.implementations["triton"].run(grad, q, k, v, eps, out=grads)
    _assert_gradients_close(grads, grad, q, k, v, eps)


NON_FINITE = pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)


def _with_non_finite_entry(qkv, name, value):
    """(q, k, v) with `value` in one entry of `name`, in the first batch and head only: the
    other head shows that nothing leaks across heads."""
    tensors = dict(zip("qkv", (t.detach().clone() for t in qkv)))
    tensors[name][0, 5, 0, 3] = value
    return tuple(tensors[n] for n in "qkv")


@pytest.mark.parametrize("device, backend", _forward_targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["q", "k", "v"])
@NON_FINITE
def test_forward_propagates_nan_and_inf_as_the_reference(device, backend, dtype, name, value, generator):
    """ReLU keeps a NaN (F.relu does): a NaN in q makes its row NaN, in k its whole head."""
    q, k, v = _with_non_finite_entry(fused_qkv(2, 40, 2, 16, device, dtype, generator), name, value)
    out = LINEAR_ATTENTION.allocate_output(q, k, v, 1e-15).fill_(0.5)
    LINEAR_ATTENTION.implementations[backend].run(q, k, v, 1e-15, out=out)
    _assert_close_to(out, linear_attention_reference(*_upcast((q, k, v))), "out")


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["q", "k", "v"])
@NON_FINITE
def test_backward_propagates_nan_and_inf_as_the_reference(device, dtype, name, value, generator):
    q, k, v = _with_non_finite_entry(fused_qkv(2, 40, 2, 16, device, dtype, generator), name, value)
    grad = random_tensor(tuple(q.shape), "contiguous", device, dtype, generator)
    grads = LINEAR_ATTENTION_BACKWARD.allocate_output(grad, q, k, v, 1e-15)
    for tensor in grads:
        tensor.fill_(0.5)
    LINEAR_ATTENTION_BACKWARD.implementations["triton"].run(grad, q, k, v, 1e-15, out=grads)
    _assert_gradients_close(grads, grad, q, k, v)


def _autograd_of_the_reference(grad, q, k, v, eps=1e-15):
    """(dq, dk, dv): float64 autograd through the forward reference, F.relu's backward included,
    on the CPU, whose eager semantics the op follows on every device."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    linear_attention_reference(*leaves, eps).backward(grad.cpu().double())
    return tuple(t.grad for t in leaves)


@pytest.mark.parametrize("device, backend", _forward_targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["q", "k"])
def test_backward_passes_the_gradient_at_a_nan_as_relu_does(device, backend, dtype, name, generator):
    """F.relu's backward zeroes the gradient where its input is <= 0 and passes it at a NaN: a
    NaN in q_n makes dq_n NaN wherever q_n is not <= 0, the NaN entry itself included; in k,
    dk NaN at the NaN entry. The backward of every backend (on CPU tensors the "cuda" backend
    runs the backward's reference) against float64 autograd of the forward's reference."""
    q, k, v = (t.detach().requires_grad_()
               for t in _with_non_finite_entry(fused_qkv(2, 40, 2, 16, device, dtype, generator), name, float("nan")))
    with fastgen.use_backend(backend):
        out = linear_attention(q, k, v)
    grad = torch.randn(out.shape, generator=generator).to(device, dtype)
    out.backward(grad)
    expected = _autograd_of_the_reference(grad, q, k, v)
    for gradient_name, actual, reference in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), expected):
        nan_differs = actual.isnan().cpu() != reference.isnan()
        assert not nan_differs.any(), (f"{gradient_name}: NaN differs from the reference's at "
                                       f"{nan_differs.nonzero().tolist()}")
    _assert_gradients_close((q.grad, k.grad, v.grad), grad, q, k, v)


def _one_infinite_value(device, dtype, generator, q_tokens, kv_tokens, head_dim, value):
    """(q, k, v) of 2 heads with `value` in one entry of v (the first batch and head) and
    fresh random data elsewhere. The key of that row is positive, so S_i0 = +-inf for every i
    (a k_ni <= 0 would make it 0 * inf = NaN). The first three query rows are positive, so
    their out_n0 are +-inf; in the others, about half the entries are <= 0, and the fourth row's
    are made so: zero features of phi(q_n) that meet those infinities (at head dim 1 all six
    random rows came out positive one draw in 64)."""
    q = random_tensor((1, q_tokens, 2, head_dim), "contiguous", device, dtype, generator)
    k, v = (random_tensor((1, kv_tokens, 2, head_dim), "contiguous", device, dtype, generator) for _ in "kv")
    row = kv_tokens // 2
    k[0, row, 0] = k[0, row, 0].abs() + 0.5
    v[0, row, 0, 0] = value
    q[0, :3, 0] = q[0, :3, 0].abs() + 0.5
    q[0, 3, 0] = -q[0, 3, 0].abs()
    return q, k, v


def _assert_non_finite_where_the_reference_is(actual, reference, what):
    """NaN exactly where the float64 reference has NaN and its signed infinities, rounded to
    the result's dtype, where it has them."""
    actual = actual.detach().double().cpu()
    rounded = reference.to(actual.dtype if actual.dtype != torch.float64 else reference.dtype).double()
    wrong = (actual.isnan() != rounded.isnan()) | ((actual.isinf() | rounded.isinf()) & (actual != rounded))
    assert not wrong.any(), (f"{what}: {int(wrong.sum())} of {wrong.numel()} elements non-finite differently from the "
                             f"reference, first at {wrong.nonzero()[0].tolist()}")


def _gradients_and_the_references(backend, q, k, v, gradient_of, eps):
    """((dq, dk, dv) through the op on `backend`, the same from float64 autograd of the
    reference), for the output gradient gradient_of(out)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with fastgen.use_backend(backend):
        out = linear_attention(q, k, v, eps)
    grad = gradient_of(out)
    out.backward(grad)
    return (q.grad, k.grad, v.grad), _autograd_of_the_reference(grad, q, k, v, eps)


def _assert_gradients_non_finite_where_the_reference_is(gradients, expected):
    for gradient_name, actual, reference in zip(("dq", "dk", "dv"), gradients, expected):
        _assert_non_finite_where_the_reference_is(actual, reference, gradient_name)


@pytest.mark.parametrize("device, backend", _forward_targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [1, 12])
@pytest.mark.parametrize("value", [float("inf"), float("-inf")], ids=str)
def test_infinite_value_with_a_padded_head_dim(device, backend, dtype, head_dim, value, generator):
    """D below the kernels' padded width: phi(k)'s padding columns are zeros, and zero times the
    infinite v_n is NaN in the padding rows of S; the padding of phi(q) multiplied it into every
    column of out. out is +-inf, NaN or finite exactly where the reference's is."""
    q, k, v = _one_infinite_value(device, dtype, generator, 37, 37, head_dim, value)
    out = LINEAR_ATTENTION.allocate_output(q, k, v, 1e-15).fill_(0.5)
    LINEAR_ATTENTION.implementations[backend].run(q, k, v, 1e-15, out=out)
    expected = linear_attention_reference(*_upcast((q, k, v)))
    assert expected.isinf().any(), "the case must have infinite outputs"
    _assert_non_finite_where_the_reference_is(out, expected.to(dtype), "out")
    _assert_close_to(out, expected, "out")


@pytest.mark.parametrize("device, backend", _forward_targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [1, 16])
def test_infinite_value_makes_dz_nan_through_zero_features_of_q(device, backend, dtype, head_dim, generator):
    """With an inf in S, out_n = phi(q_n) S is NaN wherever a feature q_ni <= 0 meets an
    infinite S_ij (0 * inf), so the reference's grad . out_n, dz and every dk at k > 0 are NaN.
    The Triton backward dropped the terms of such features from dden_n (so that an overflow of
    grad / eps times a finite S gives no NaN) and got -inf or 0 in dk instead."""
    q, k, v = _one_infinite_value(device, dtype, generator, 9, 48, head_dim, float("inf"))
    # Positive: every row's dden_n has the same sign, so no inf - inf makes dz NaN anyway.
    gradients, expected = _gradients_and_the_references(
        backend, q, k, v, lambda out: torch.randn(out.shape, generator=generator).abs().to(device, dtype), 1e-6)
    assert expected[1].isnan().any(), "the case must have NaN in dk"
    _assert_gradients_non_finite_where_the_reference_is(gradients, expected)


@pytest.mark.parametrize("device, backend", _forward_targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [1, 16])
def test_infinite_value_with_every_query_feature_positive(device, backend, dtype, head_dim, generator):
    """The case above without a zero feature of q in the head: out_n0 = +inf on every row,
    dden_n = -inf, so dz is -inf (not NaN) and dk is -inf at every k > 0 but the infinite
    value's own row. The rows of the backward's last tile past N (q loaded as zeros, so
    0 * inf = NaN in their out) must add nothing to dz: they once made every dk NaN."""
    q, k, v = _one_infinite_value(device, dtype, generator, 9, 48, head_dim, float("inf"))
    q[0, :, 0] = q[0, :, 0].abs() + 0.5
    gradients, expected = _gradients_and_the_references(
        backend, q, k, v, lambda out: torch.randn(out.shape, generator=generator).abs().to(device, dtype), 1e-6)
    assert (expected[1][0, :, 0] == float("-inf")).any(), "the premise: dk -inf in the head"
    _assert_gradients_non_finite_where_the_reference_is(gradients, expected)


@pytest.mark.parametrize("device, backend", _forward_targets())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [1, 16])
def test_infinite_key_with_every_query_feature_positive(device, backend, dtype, head_dim, generator):
    """+inf in k_n0 makes z_0 infinite; with every q_n0 > 0 each real row's denominator is +inf,
    so dnum_n = g_n / den_n = 0, dS finite and dv NaN only in the infinite key's row (inf * 0).
    The rows of the backward's last tile past N (q loaded as zeros, so 0 * inf = NaN in their
    denominator) must add nothing to dS, or every dv of the head is NaN."""
    q = random_tensor((1, 9, 2, head_dim), "contiguous", device, dtype, generator)
    k, v = (random_tensor((1, 5, 2, head_dim), "contiguous", device, dtype, generator) for _ in "kv")
    q[0, :, 0, 0] = q[0, :, 0, 0].abs() + 0.5
    k[0, 2, 0, 0] = float("inf")
    gradients, expected = _gradients_and_the_references(
        backend, q, k, v, lambda out: torch.randn(out.shape, generator=generator).to(device, dtype), 1e-15)
    dv_nan = expected[2][0, :, 0].isnan().any(-1)
    assert dv_nan.tolist() == [False, False, True, False, False], "the premise: dv NaN in the infinite key's row only"
    _assert_gradients_non_finite_where_the_reference_is(gradients, expected)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("name", ["q", "k"])
def test_bfloat16_subnormal_q_or_k_get_their_gradients(device, name, generator):
    """Every entry of q or k a bfloat16 subnormal: phi(q) . z is far below eps, so dq (or dk)
    is about grad S^T / eps, 1e16, at every positive entry, however small. The kernels must
    read each subnormal exactly (the interpreter's own bfloat16 conversion turns 2^-128 into
    0, so a mask q > 0 dropped those gradients)."""
    qkv = dict(zip("qkv", fused_qkv(1, 40, 2, 16, device, torch.bfloat16, generator)))
    tiny = torch.finfo(torch.bfloat16).tiny
    uniform = torch.rand(qkv[name].shape, generator=generator, dtype=torch.float64) * 2 - 1
    qkv[name] = (uniform * (0.99 * tiny)).to(device, torch.bfloat16)
    q, k, v = (qkv[n].detach().requires_grad_() for n in "qkv")
    assert 0 < qkv[name].abs().max() < tiny
    with fastgen.use_backend("triton"):
        out = linear_attention(q, k, v)
    grad = torch.randn(out.shape, generator=generator).to(device, torch.bfloat16)
    out.backward(grad)
    expected = _autograd_of_the_reference(grad, q, k, v)
    rtol, _ = TOLERANCES[torch.bfloat16]
    for gradient_name, actual, reference in zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), expected):
        torch.testing.assert_close(actual.double().cpu(), reference, rtol=rtol, atol=rtol * reference.abs().max().item(),
                                   msg=lambda detail, n=gradient_name: f"{n}: {detail}")


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_runs_the_triton_backward(device, dtype, generator):
    """The custom op's registered backward runs the Triton kernels with the forward's backend."""
    q, k, v = (t.detach().requires_grad_() for t in fused_qkv(2, 45, 3, 32, device, dtype, generator))
    with fastgen.use_backend("triton"):
        out = linear_attention(q, k, v)
    grad = torch.randn(out.shape, generator=generator).to(device, dtype)
    out.backward(grad)  # outside the block: the backward must still run the Triton kernels
    _assert_gradients_close((q.grad, k.grad, v.grad), grad, q, k, v)


def test_reference_is_the_quadratic_formula(generator):
    """The padded-ones formulation against the definition written with the Nq x Nkv matrix of
    feature products: out = (A V) / (A 1 + eps), A = phi(q) phi(k)^T, per (batch, head)."""
    q = torch.randn(2, 7, 3, 5, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, 11, 3, 5, generator=generator, dtype=torch.float64) for _ in "kv")
    scores = torch.einsum("bnhd,bmhd->bhnm", q.relu(), k.relu())
    expected = torch.einsum("bhnm,bmhd->bnhd", scores, v) / (scores.sum(-1).transpose(1, 2)[..., None] + 1e-15)
    torch.testing.assert_close(linear_attention_reference(q, k, v), expected)


def test_custom_op_gradcheck(generator):
    """The registered autograd (the backward op's reference: the SPEC formulas) against finite
    differences in float64, with Nq != Nkv and a head dim that is not a power of two."""
    q = torch.randn(2, 5, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 7, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True) for _ in "kv")
    with fastgen.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda *qkv: linear_attention(*qkv, 1e-3), (q, k, v))


def test_second_order_gradients_say_they_are_unsupported(generator):
    q, k, v = (torch.randn(1, 5, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    (dq,) = torch.autograd.grad(linear_attention(q, k, v).sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="linear_attention_backward.* no autograd formula"):
        torch.autograd.grad(dq.sum(), (q,))


@pytest.mark.parametrize("device", _devices())
def test_runs_are_bitwise_identical(device, generator):
    """Several chunks per head, so the partial states are reduced: still no run-to-run noise."""
    q, k, v = (t.detach().requires_grad_() for t in fused_qkv(1, 300, 2, 32, device, torch.bfloat16, generator))
    grad = torch.randn(q.shape, generator=generator).to(device, q.dtype)
    results = []
    with fastgen.use_backend("triton"):
        for _ in range(2):
            out = linear_attention(q, k, v)
            results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rows_with_no_positive_feature(backend, generator):
    """A query row with every entry <= 0 gets 0 / eps = 0 and zero gradient, never NaN; keys
    that are all <= 0 make every output 0."""
    q, k, v = (t.clone() for t in fused_qkv(1, 20, 2, 16, CPU, torch.float32, generator))
    q[0, 3] = -q[0, 3].abs()
    q[0, 7] = 0.0
    q.requires_grad_()
    with fastgen.use_backend(backend):
        out = linear_attention(q, k, v)
        out.backward(torch.randn(out.shape, generator=generator))
        all_negative_keys = linear_attention(q, -k.abs(), v)
    assert torch.equal(out[0, 3], torch.zeros_like(out[0, 3])) and torch.equal(out[0, 7], out[0, 3])
    assert torch.isfinite(q.grad).all() and not q.grad[0, [3, 7]].any()
    assert torch.equal(all_negative_keys, torch.zeros_like(all_negative_keys))
    torch.testing.assert_close(out, linear_attention_reference(q, k, v))


@pytest.mark.parametrize("eps, large_grad", [(1e-15, 1e20), (1e-30, 1e8)])
def test_large_gradient_on_a_row_with_no_positive_feature(eps, large_grad, generator):
    """There dnumerator = grad / eps is huge and dnumerator S^T overflows to inf while phi(q)
    is 0: the row must add nothing to dz (0 * inf would be NaN in every dk of the head)."""
    q, k, v = (t.clone() for t in fused_qkv(1, 20, 1, 16, CPU, torch.float32, generator))
    q[0, 3] = -q[0, 3].abs()
    k, v = k.abs() * 30, v.abs() * 30
    grad = torch.randn(q.shape, generator=generator)
    grad[0, 3] = large_grad
    expected = linear_attention_backward_reference(grad, q, k, v, eps)
    assert all(torch.isfinite(t).all() for t in expected)
    grads = LINEAR_ATTENTION_BACKWARD.allocate_output(grad, q, k, v, eps)
    for t in grads:
        t.fill_(float("nan"))
    LINEAR_ATTENTION_BACKWARD.implementations["triton"].run(grad, q, k, v, eps, out=grads)
    for name, actual, reference in zip(("dq", "dk", "dv"), grads, expected):
        assert torch.isfinite(actual).all(), f"{name}: {int((~torch.isfinite(actual)).sum())} non-finite"
        torch.testing.assert_close(actual, reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())


def test_backward_accepts_broadcast_gradients(generator):
    """out.sum().backward() hands the backward an expanded gradient with all strides 0."""
    q, k, v = (t.detach().requires_grad_() for t in fused_qkv(1, 9, 2, 16, CPU, torch.float32, generator))
    with fastgen.use_backend("triton"):
        linear_attention(q, k, v).sum().backward()
    _assert_gradients_close((q.grad, k.grad, v.grad), torch.ones(q.shape), q, k, v)


def test_torch_compile_fullgraph_forward_and_backward(generator):
    """Forward and backward ops trace into one graph each (no graph break) and agree with eager."""
    q, k, v = (t.detach().requires_grad_() for t in fused_qkv(1, 12, 2, 16, CPU, torch.float32, generator))

    def attention_block(q, k, v):
        return linear_attention(q * 2.0, k, v).square().sum()

    with fastgen.use_backend("triton"):
        expected = torch.autograd.grad(attention_block(q, k, v), (q, k, v))
        compiled = torch.compile(attention_block, backend="aot_eager", fullgraph=True)
        actual = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def _qkv(q_shape=(1, 4, 2, 8), kv_shape=(1, 6, 2, 8), dtype=torch.float32):
    return torch.ones(q_shape, dtype=dtype), torch.ones(kv_shape, dtype=dtype), torch.ones(kv_shape, dtype=dtype)


@pytest.mark.parametrize(
    "make_args, error, message",
    [
        (lambda: _qkv(dtype=torch.int32), TypeError, "q must be float32, float16, bfloat16 or float64, got torch.int32"),
        (lambda: (torch.ones(4, 2, 8), *_qkv()[1:]), ValueError, r"q must be 4-D \(B, N, H, D\), got shape \(4, 2, 8\)"),
        (lambda: (*_qkv()[:2], torch.ones(1, 6, 2, 8, dtype=torch.float16)), TypeError,
         "v dtype torch.float16 must match q dtype torch.float32"),
        (lambda: (_qkv()[0], torch.ones(1, 6, 2, 8, device="meta"), _qkv()[2]), ValueError, "k is on meta but q is on cpu"),
        (lambda: _qkv(kv_shape=(1, 6, 3, 8)), ValueError,
         r"k must have q's batch, heads and head dim \(B, H, D\) = \(1, 2, 8\), got k of shape \(1, 6, 3, 8\)"),
        (lambda: (*_qkv()[:2], torch.ones(1, 5, 2, 8)), ValueError, r"v must have k's shape \(1, 6, 2, 8\), got \(1, 5, 2, 8\)"),
        (lambda: _qkv((1, 4, 1, 129), (1, 6, 1, 129)), ValueError, "head dim D must be between 1 and 128, got 129"),
        (lambda: (*_qkv(), 0.0), ValueError, "eps must be a finite number > 0, got 0.0"),
    ],
)
def test_bad_input_gets_a_clear_error(make_args, error, message):
    for function in (linear_attention, linear_attention_reference):
        with pytest.raises(error, match=message):
            function(*make_args())


def test_reference_rejects_a_non_tensor():
    # The custom op's schema rejects it before fastgen's checks run; the reference is plain Python.
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        linear_attention_reference([[1.0]], *_qkv()[1:])


def test_backward_op_checks_the_gradient():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"grad must have shape of q = \(1, 4, 2, 8\), got \(1, 4, 2, 4\)"):
        linear_attention_backward(torch.ones(1, 4, 2, 4), q, k, v)
    with pytest.raises(TypeError, match="grad dtype torch.float64 must match q dtype torch.float32"):
        linear_attention_backward(q.double(), q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("heads", [36, 70])
def test_sana_shape_on_gpu(backend, heads, generator):
    """The real SANA head layout at 64x64 latents (N = 4096): many chunks per head."""
    q, k, v = (t.detach().requires_grad_()
               for t in fused_qkv(2, 4096, heads, 32, torch.device("cuda"), torch.bfloat16, generator))
    with fastgen.use_backend(backend):
        out = linear_attention(q, k, v)
    grad = torch.randn(out.shape, generator=generator).to(out)
    out.backward(grad)
    _assert_close_to(out, linear_attention_reference(*_upcast((q, k, v))), "out")
    _assert_gradients_close((q.grad, k.grad, v.grad), grad, q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replays_with_new_inputs(backend, generator):
    """Samplers capture the denoiser in a CUDA graph: the launches (and their workspaces) must
    be capturable and read the inputs' current contents on replay."""
    qkv = torch.randn(2, 1024, 3, 36, 32, generator=generator).to("cuda", torch.bfloat16)
    q, k, v = qkv.unbind(2)
    with fastgen.use_backend(backend):
        linear_attention(q, k, v)  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = linear_attention(q, k, v)
    qkv.copy_(torch.randn(qkv.shape, generator=generator))
    graph.replay()
    torch.cuda.synchronize()
    _assert_close_to(out, linear_attention_reference(*_upcast((q, k, v))), "out")


def _entry_point_args(q=(2, 40, 3, 32), k=(2, 70, 3, 32), v=None, out=None, partials=None, eps=1e-15,
                      dtype="float32", partials_dtype="float32"):
    v = v or k
    out = out or q
    # The emulated device's 2 SMs want 4 blocks: B * H = 6 heads take one chunk each.
    partials = partials or (1, 1, 2 * 3, 32 * 32 + 32)
    return (fake_tensor_arg(q, dtype), fake_tensor_arg(k, dtype), fake_tensor_arg(v, dtype), fake_tensor_arg(out, dtype),
            fake_tensor_arg(partials, partials_dtype), eps, 0)


@pytest.mark.parametrize("changes, name", [
    (dict(dtype="uint8"), "q"),
    (dict(q=(2, 40, 3, 129), k=(2, 70, 3, 129), partials=(1, 1, 18, 129 * 130)), "q"),
    (dict(k=(2, 70, 4, 32)), "k"),
    (dict(v=(2, 71, 3, 32)), "v"),
    (dict(out=(2, 40, 3, 16)), "out"),
    (dict(eps=0.0), "eps"),
    (dict(partials_dtype="float16"), "partials"),
])
def test_cuda_entry_point_rejects_bad_arguments_naming_them(cuda_extension, changes, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        cuda_extension.linear_attention_forward(*_entry_point_args(**changes))


@pytest.mark.parametrize("sms, k, slots", [
    (2, (2, 70, 3, 32), 6),  # 6 heads already fill 2 SMs (4 blocks): one chunk each
    (2, (1, 70, 1, 32), 3),  # one head: a chunk per 32-row tile, up to the 4 blocks wanted
    (132, (1, 4096, 2, 64), 256),  # two heads on 132 SMs: 264 blocks wanted, 128 tiles each
    (2, (2, 0, 3, 32), 0),  # no keys: no state to sum
])
def test_cuda_partials_follow_the_launch_plan(emulated_extension, monkeypatch, sms, k, slots):
    """The launcher checks its workspace against the plan linear_attention_partials reports."""
    monkeypatch.setenv("FASTGEN_EMULATED_SMS", str(sms))
    assert emulated_extension.linear_attention_partials(fake_tensor_arg(k)) == slots
    q = (k[0], 5, k[2], k[3])
    args = _entry_point_args(q=q, k=k, partials=(1, 1, slots + 1, k[3] * k[3] + k[3]))
    with pytest.raises(ValueError, match=r"^partials\b"):
        emulated_extension.linear_attention_forward(*args)


def test_cuda_entry_point_needs_a_device(cuda_extension):
    if cuda_extension.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        cuda_extension.linear_attention_forward(*_entry_point_args())
