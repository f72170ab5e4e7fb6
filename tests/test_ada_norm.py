"""Adaptive group / layer norm and the gated residual fused with adaLN: every implementation
against the float64 reference (fused and split statistics paths), large-mean inputs, gradients,
determinism, errors; the CUDA extension's argument checks (without a GPU too)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastgen
from conftest import CPU, DEVICES_AND_BACKENDS, EMULATED_CUDA
from fastgen.check import mismatch
from fastgen.ops.ada_norm import (
    ADA_GROUP_NORM,
    ADA_GROUP_NORM_BACKWARD,
    ADA_LAYER_NORM,
    ADA_LAYER_NORM_BACKWARD,
    GATED_RESIDUAL_ADA_LAYER_NORM,
    GATED_RESIDUAL_ADA_LAYER_NORM_BACKWARD,
    ada_group_norm,
    ada_group_norm_backward,
    ada_group_norm_reference,
    ada_layer_norm,
    ada_layer_norm_reference,
    ada_group_norm_backward_cuda,
    ada_group_norm_cuda,
    gated_residual_ada_layer_norm,
    gated_residual_ada_layer_norm_backward,
    gated_residual_ada_layer_norm_reference,
)
from fastgen.ops.registry import random_tensor
from test_fuzz import (ada_group_norm_gradient_terms, ada_layer_norm_gradient_terms, gated_residual_gradient_terms,
                       gated_residual_reference_at)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HYPOTHESIS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _devices():
    return [pytest.param(CPU, id="cpu-triton-interpreter"),
            pytest.param(torch.device("cuda"), id="cuda-triton", marks=pytest.mark.gpu)]


def _kernels():
    from fastgen.kernels import ada_norm

    return ada_norm


def _upcast(values):
    return tuple(v.detach().double() if isinstance(v, torch.Tensor) else v for v in values)


def _assert_close_to(actual, expected, what, magnitude=None):
    _, detail = mismatch(actual, expected, magnitude=magnitude)
    assert not detail, f"{what}: {detail}"


def _poisoned(outputs):
    for tensor in outputs if isinstance(outputs, tuple) else (outputs,):
        tensor.fill_(float("nan"))
    return outputs


@st.composite
def group_norm_inputs(draw, device, generator):
    """Positional ada_group_norm args: odd channel and spatial sizes, 0 to 3 spatial dims,
    AdaGN (affine, SiLU) or AdaIN (G = C, plain), every layout and dtype."""
    dtype = draw(st.sampled_from(DTYPES))
    groups, per_group = draw(st.integers(1, 5)), draw(st.sampled_from([1, 2, 3, 5, 8, 33]))
    spatial = tuple(draw(st.lists(st.integers(1, 9), min_size=0, max_size=3)))
    if per_group * math.prod(spatial) == 1:
        spatial = (2,)  # a group of one value has no variance: rejected (see the error tests)
    shape = (draw(st.integers(1, 3)), groups * per_group, *spatial)
    layouts = ["contiguous", "sliced"] + (["channels_last"] if len(shape) == 4 else [])
    layout = draw(st.sampled_from(layouts)) if spatial else "contiguous"
    x = random_tensor(shape, layout, device, dtype, generator)
    scale, shift = (random_tensor(shape[:2], draw(st.sampled_from(["contiguous", "sliced"])), device, dtype, generator)
                    for _ in "ab")
    weight = random_tensor(shape[1:2], "sliced", device, dtype, generator) if draw(st.booleans()) else None
    bias = random_tensor(shape[1:2], "contiguous", device, dtype, generator) if draw(st.booleans()) else None
    eps, act = draw(st.sampled_from([1e-5, 1e-8, 0.5])), draw(st.sampled_from([None, "silu"]))
    return x, scale, shift, groups, weight, bias, eps, act


@st.composite
def layer_norm_inputs(draw, device, generator):
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.sampled_from([1, 7, 32, 72, 200])))
    x = random_tensor(shape, draw(st.sampled_from(["contiguous", "sliced"])), device, dtype, generator)
    scale, shift = (random_tensor((shape[0], shape[2]), "sliced", device, dtype, generator) for _ in "ab")
    return x, scale, shift, draw(st.sampled_from([1e-6, 1e-3]))


# None lets the launcher choose (fused on these sizes); k forces the split-statistics path:
# for Triton chunks of about S / k positions (sizes round up to powers of two: 1 to k
# chunks), for CUDA k chunks of the group's flattened elements (fewer when it has fewer units).
_SPLITS = st.sampled_from([None, None, 2, 3, 7])


def _chunk_size(x, splits):
    return None if splits is None else -(-math.prod(x.shape[2:]) // splits)


def test_chunk_size_forces_the_split_path():
    plan = _kernels()._GroupPlan(torch.empty(2, 12, 90), num_groups=3, chunk_size=7)
    assert not plan.fused and (plan.chunk, plan.num_chunks) == (8, 12)
    assert _kernels()._GroupPlan(torch.empty(2, 12, 90), num_groups=3).fused


def _run_group_norm(args, splits=None, backend="triton"):
    out = _poisoned(ADA_GROUP_NORM.allocate_output(*args))
    if backend == "cuda":
        ada_group_norm_cuda(*args, out, num_chunks=splits or 0)
    elif splits is None:
        ADA_GROUP_NORM.implementations["triton"].run(*args, out=out)
    else:
        _kernels().ada_group_norm_forward(*args, out=out, chunk_size=_chunk_size(args[0], splits))
    return out


def _run_group_norm_backward(grad, args, splits=None, backend="triton"):
    grads = _poisoned(ADA_GROUP_NORM_BACKWARD.allocate_output(grad, *args))
    if backend == "cuda":
        ada_group_norm_backward_cuda(grad, *args, *grads, num_chunks=splits or 0)
    elif splits is None:
        ADA_GROUP_NORM_BACKWARD.implementations["triton"].run(grad, *args, out=grads)
    else:
        _kernels().ada_group_norm_backward(grad, *args, out=grads, chunk_size=_chunk_size(args[0], splits))
    return grads


def _reference_gradients(reference, grad, args, tensor_positions):
    """Gradients of the float64 reference by autograd, for the args at tensor_positions."""
    upcast = list(_upcast(args))
    absent = {4: torch.ones, 5: torch.zeros}  # weight, bias: the gradient they would get
    leaves = []
    for i in tensor_positions:
        if upcast[i] is None:
            upcast[i] = absent[i](args[0].shape[1], dtype=torch.float64, device=args[0].device)
        upcast[i].requires_grad_()
        leaves.append(upcast[i])
    return torch.autograd.grad(reference(*upcast), leaves, grad.double())


_GROUP_GRAD_NAMES = ("dx", "dscale", "dshift", "dweight", "dbias")
_GROUP_ARGUMENTS = ("x", "scale", "shift", "weight", "bias")


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@_HYPOTHESIS
@given(data=st.data())
def test_group_norm_forward_matches_reference(device, backend, data, generator):
    args = data.draw(group_norm_inputs(device, generator))
    out = _run_group_norm(args, data.draw(_SPLITS), backend)
    _assert_close_to(out, ada_group_norm_reference(*_upcast(args)), "y")


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@_HYPOTHESIS
@given(data=st.data())
def test_group_norm_backward_kernel_matches_reference(device, backend, data, generator):
    args = data.draw(group_norm_inputs(device, generator))
    grad = random_tensor(tuple(args[0].shape), data.draw(st.sampled_from(["contiguous", "sliced"])), device,
                         args[0].dtype, generator)
    grads = _run_group_norm_backward(grad, args, data.draw(_SPLITS), backend)
    expected = _reference_gradients(ada_group_norm_reference, grad, args, (0, 1, 2, 4, 5))
    terms = ada_group_norm_gradient_terms(args, lambda: [grad], None)
    for name, actual, reference, argument in zip(_GROUP_GRAD_NAMES, grads, expected, _GROUP_ARGUMENTS):
        _assert_close_to(actual, reference, name, terms[argument])


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@_HYPOTHESIS
@given(data=st.data())
def test_layer_norm_forward_and_backward_kernels_match_reference(device, backend, data, generator):
    args = data.draw(layer_norm_inputs(device, generator))
    out = _poisoned(ADA_LAYER_NORM.allocate_output(*args))
    ADA_LAYER_NORM.implementations[backend].run(*args, out=out)
    _assert_close_to(out, ada_layer_norm_reference(*_upcast(args)), "y")
    grad = random_tensor(tuple(args[0].shape), "sliced", device, args[0].dtype, generator)
    grads = _poisoned(ADA_LAYER_NORM_BACKWARD.allocate_output(grad, *args))
    ADA_LAYER_NORM_BACKWARD.implementations[backend].run(grad, *args, out=grads)
    expected = _reference_gradients(ada_layer_norm_reference, grad, args, (0, 1, 2))
    terms = ada_layer_norm_gradient_terms(args, lambda: [grad], None)
    for name, actual, reference, argument in zip(("dx", "dscale", "dshift"), grads, expected, ("x", "scale", "shift")):
        _assert_close_to(actual, reference, name, terms[argument])


@pytest.mark.parametrize("splits", [None, 3, 9])
def test_group_norm_statistics_survive_a_large_mean(splits, generator):
    """mean 1e3, std 1e-2 in float32: the group's values agree in their first 5 digits, so
    E[x^2] - E[x]^2 (or even a float32 mean) would lose most of the normalized value."""
    x = 1e3 + 1e-2 * torch.randn(2, 8, 12, 11, generator=generator)
    scale, shift, weight, bias = (torch.randn(*s, generator=generator) for s in ((2, 8), (2, 8), (8,), (8,)))
    args = (x, scale, shift, 2, weight, bias, 1e-5, "silu")
    _assert_close_to(_run_group_norm(args, splits), ada_group_norm_reference(*_upcast(args)), "y")
    grad = torch.randn(x.shape, generator=generator)
    grads = _run_group_norm_backward(grad, args, splits)
    expected = _reference_gradients(ada_group_norm_reference, grad, args, (0, 1, 2, 4, 5))
    # Relative to the sizes of the terms each gradient sums (dx's carry rstd = 100): dscale sums
    # 132 products of size 1 to about 0.05, so float32 rounding alone is 1e-5 of it.
    terms = ada_group_norm_gradient_terms(args, lambda: [grad], None)
    for name, actual, reference, argument in zip(_GROUP_GRAD_NAMES, grads, expected, _GROUP_ARGUMENTS):
        _assert_close_to(actual, reference, name, terms[argument])


def test_layer_norm_statistics_survive_a_large_mean(generator):
    x = 1e3 + 1e-2 * torch.randn(2, 9, 96, generator=generator)
    scale, shift = (torch.randn(2, 96, generator=generator) for _ in "ab")
    with fastgen.use_backend("triton"):
        out = ada_layer_norm(x, scale, shift)
    _assert_close_to(out, ada_layer_norm_reference(*_upcast((x, scale, shift))), "y")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_mean_in_16_bit_stays_finite(dtype, generator):
    """At 1e3 a 16-bit format cannot hold a 1e-2 spread: groups become (nearly) constant, and
    the output must be the modulated bias, not NaN."""
    x = (1e3 + 1e-2 * torch.randn(2, 4, 5, 5, generator=generator)).to(dtype)
    scale, shift, bias = (torch.randn(*s, generator=generator).to(dtype) for s in ((2, 4), (2, 4), (4,)))
    args = (x, scale, shift, 2, None, bias, 1e-5, None)
    _assert_close_to(_run_group_norm(args), ada_group_norm_reference(*_upcast(args)), "y")


def test_large_groups_take_the_split_path():
    """A 256 x 256 x 32-element group is reduced by many programs, not serially by one."""
    x3 = torch.empty(2, 64, 256 * 256, device="meta")
    plan = _kernels()._GroupPlan(x3, num_groups=2)
    assert not plan.fused and plan.num_chunks >= 16
    assert plan.num_chunks * plan.chunk >= 256 * 256 > (plan.num_chunks - 1) * plan.chunk
    small = _kernels()._GroupPlan(torch.empty(2, 64, 8 * 8, device="meta"), num_groups=32)
    assert small.fused


def _split_path_args(device, layout, generator):
    args = (random_tensor((2, 12, 10, 9), layout, device, torch.float32, generator),
            *(random_tensor(s, "contiguous", device, torch.float32, generator) for s in ((2, 12), (2, 12), (12,), (12,))))
    return (*args[:3], 3, *args[3:], 1e-5, "silu")


@pytest.mark.parametrize("device", _devices())
def test_split_path_is_deterministic_and_agrees_with_fused(device, generator):
    args = _split_path_args(device, "channels_last", generator)
    grad = random_tensor((2, 12, 10, 9), "contiguous", device, torch.float32, generator)
    # 13 splits of the 90 positions: chunks of 7.
    runs = [(_run_group_norm(args, splits), *_run_group_norm_backward(grad, args, splits))
            for splits in (13, 13, None)]
    for first, second, fused in zip(*runs):
        assert torch.equal(first, second)
        torch.testing.assert_close(first, fused, rtol=1e-5, atol=1e-5)



def _with_infinities(t, count, generator):
    """A copy of t with `count` random elements set to +-inf."""
    flat = t.clone().flatten()
    where = torch.randperm(flat.numel(), generator=generator)[:count]
    flat[where] = float("inf") * torch.randn(count, generator=generator).sign().to(t.dtype)
    return flat.view(t.shape)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("affine, act", [(True, "silu"), (False, None)], ids=["affine-silu", "plain"])
@pytest.mark.parametrize("splits", [None, 3], ids=["fused", "split"])
def test_infinite_scale_meets_the_normalized_value_as_in_the_reference(device, backend, affine, act, splits,
                                                                       generator):
    """(xhat * weight + bias) * (1 + scale) + shift in the reference's order: an infinite scale
    gives the infinity of the normalized value's sign. Folded into xhat * u + offset, it added
    opposite infinities (NaN) wherever xhat * weight and bias differ in sign, and the absent
    bias's 0 * inf made every element of the channel NaN (adaLN's too)."""
    x = random_tensor((2, 8, 5, 4), "contiguous", device, torch.float32, generator)
    scale, shift = (torch.randn(2, 8, generator=generator).to(device) for _ in "ab")
    weight, bias = ((torch.randn(8, generator=generator).to(device) for _ in "ab") if affine else (None, None))
    args = (x, _with_infinities(scale, 3, generator), shift, 4, weight, bias, 1e-5, act)
    expected = ada_group_norm_reference(*_upcast(args)).float()
    torch.testing.assert_close(_run_group_norm(args, splits, backend), expected, equal_nan=True)

    x = random_tensor((2, 7, 24), "contiguous", device, torch.float32, generator)
    scale, shift = (torch.randn(2, 24, generator=generator).to(device) for _ in "ab")
    args = (x, _with_infinities(scale, 3, generator), shift, 1e-6)
    out = _poisoned(ADA_LAYER_NORM.allocate_output(*args))
    ADA_LAYER_NORM.implementations[backend].run(*args, out=out)
    torch.testing.assert_close(out, ada_layer_norm_reference(*_upcast(args)).float(), equal_nan=True)

def test_group_norm_matches_the_adm_formulation(generator):
    """ADM's ResBlock with use_scale_shift_norm: out_norm(h) * (1 + scale) + shift, SiLU."""
    norm = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight, generator=generator)
    torch.nn.init.normal_(norm.bias, generator=generator)
    h = torch.randn(2, 16, 6, 6, generator=generator)
    scale, shift = torch.randn(2, 32, 1, 1, generator=generator).chunk(2, dim=1)
    expected = torch.nn.functional.silu(norm(h) * (1 + scale) + shift)
    with torch.no_grad(), fastgen.use_backend("triton"):
        out = ada_group_norm(h, scale[:, :, 0, 0], shift[:, :, 0, 0], 4, norm.weight, norm.bias, norm.eps, "silu")
    torch.testing.assert_close(out, expected)


def test_custom_op_gradcheck(generator):
    """The registered autograd against finite differences in float64: AdaGN with affine and
    SiLU, AdaIN without, and adaLN."""
    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    with fastgen.use_backend("reference"):
        assert torch.autograd.gradcheck(
            lambda *t: ada_group_norm(t[0], t[1], t[2], 2, t[3], t[4], 1e-5, "silu"),
            (leaf(2, 6, 3, 2), leaf(2, 6), leaf(2, 6), leaf(6), leaf(6)))
        assert torch.autograd.gradcheck(lambda *t: ada_group_norm(*t, 3, eps=1e-8),
                                        (leaf(1, 3, 5), leaf(1, 3), leaf(1, 3)))
        assert torch.autograd.gradcheck(ada_layer_norm, (leaf(2, 3, 5), leaf(2, 5), leaf(2, 5)))


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_runs_the_fast_backward(device, backend, dtype, generator):
    """Gradients through the custom ops with a fast backend (backward called after the
    use_backend block) against the float64 reference; absent weight gets no gradient."""
    shapes = ((2, 8, 5, 3), (2, 8), (2, 8), (8,), (2, 11, 24), (2, 24), (2, 24))
    leaves = [random_tensor(shape, "channels_last" if len(shape) == 4 else "contiguous", device, dtype, generator)
              .requires_grad_() for shape in shapes]

    def both_ops(x, scale, shift, bias, tokens, token_scale, token_shift, group_norm, layer_norm):
        return (group_norm(x, scale, shift, 4, None, bias, 1e-5, "silu"),
                layer_norm(tokens, token_scale, token_shift))

    with fastgen.use_backend(backend):
        outputs = both_ops(*leaves, ada_group_norm, ada_layer_norm)
    grads = [random_tensor(tuple(out.shape), "contiguous", device, dtype, generator) for out in outputs]
    torch.autograd.backward(outputs, grads)
    leaves64 = [leaf.detach().double().requires_grad_() for leaf in leaves]
    outputs64 = both_ops(*leaves64, ada_group_norm_reference, ada_layer_norm_reference)
    expected = torch.autograd.grad(outputs64, leaves64, [g.double() for g in grads])
    names = ("x", "scale", "shift", "bias", "tokens", "token scale", "token shift")
    for name, leaf, reference in zip(names, leaves, expected):
        _assert_close_to(leaf.grad, reference, f"grad of {name}")


@pytest.mark.parametrize("device, backend", [
    (CPU, "reference"), (CPU, "triton"),
    pytest.param(torch.device("cuda"), "cuda", id="cuda-cuda", marks=pytest.mark.gpu), EMULATED_CUDA,
])
def test_output_keeps_channels_last_and_broadcast_gradients_work(device, backend, generator):
    """y.sum().backward() hands the backward an expanded gradient with all strides 0."""
    x = (torch.randn(1, 8, 4, 6, generator=generator).to(device).contiguous(memory_format=torch.channels_last)
         .requires_grad_())
    scale, shift = (torch.randn(1, 8, generator=generator).to(device) for _ in "ab")
    with fastgen.use_backend(backend):
        y = ada_group_norm(x, scale, shift, 2, act="silu")
        y.sum().backward()
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    x64 = x.detach().double().requires_grad_()
    ada_group_norm_reference(x64, scale.double(), shift.double(), 2, act="silu").sum().backward()
    _assert_close_to(x.grad, x64.grad, "grad of x")


@pytest.mark.parametrize("layout", ["transposed", "channels_last_3d"])
def test_other_dense_layouts(layout, generator):
    """A permuted view whose spatial dims do not flatten (read through a copy, y contiguous) and
    a 5-D channels_last_3d map (read in place, y keeps the layout)."""
    if layout == "transposed":
        x = torch.randn(2, 6, 5, 4, generator=generator).transpose(2, 3)
    else:
        x = torch.randn(2, 6, 3, 4, 5, generator=generator).contiguous(memory_format=torch.channels_last_3d)
    args = (x, *(torch.randn(2, 6, generator=generator) for _ in "ab"), 3, None, None, 1e-5, "silu")
    out = _run_group_norm(args)
    _assert_close_to(out, ada_group_norm_reference(*_upcast(args)), "y")
    assert out.is_contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.contiguous_format)


def test_torch_compile_fullgraph_forward_and_backward(generator):
    """Forward and backward ops trace into one graph each (no graph break) and agree with eager."""
    x = torch.randn(2, 8, 4, 4, generator=generator, requires_grad=True)
    tokens = torch.randn(2, 5, 8, generator=generator, requires_grad=True)
    scale, shift = (torch.randn(2, 8, generator=generator, requires_grad=True) for _ in "ab")

    def block(x, tokens, scale, shift):
        h = ada_group_norm(x * 2.0, scale, shift, 4, act="silu")
        return h.square().sum() + ada_layer_norm(tokens, scale, shift).square().sum()

    inputs = (x, tokens, scale, shift)
    with fastgen.use_backend("triton"):
        expected = torch.autograd.grad(block(*inputs), inputs)
        actual = torch.autograd.grad(torch.compile(block, backend="aot_eager", fullgraph=True)(*inputs), inputs)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def _gn_args(x_shape=(2, 8, 4, 4), groups=4, **changes):
    args = dict(x=torch.ones(x_shape), scale=torch.ones(x_shape[:2]), shift=torch.ones(x_shape[:2]),
                num_groups=groups, weight=None, bias=None, eps=1e-5, act=None)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args, error, message",
    [
        (_gn_args(x=torch.ones(2, 8, 4, 4, dtype=torch.int32)), TypeError, "x must be float32, float16, bfloat16 or float64"),
        (_gn_args(x=torch.ones(8)), ValueError, r"x must be \(B, C, \*spatial\), got shape \(8,\)"),
        (_gn_args(groups=0), ValueError, "num_groups must be an int >= 1, got 0"),
        (_gn_args(groups=3), ValueError, "channels C=8 must be divisible by num_groups=3"),
        (_gn_args(scale=torch.ones(2, 4)), ValueError, r"scale must have shape \(B, C\) = \(2, 8\), got \(2, 4\)"),
        (_gn_args(x_shape=(2, 8), groups=8), ValueError, r"each group must hold more than one value"),
        (_gn_args(shift=torch.ones(2, 8, dtype=torch.float16)), TypeError, "shift dtype torch.float16 must match x dtype"),
        (_gn_args(weight=torch.ones(4)), ValueError, r"weight must have shape \(C,\) = \(8,\), got \(4,\)"),
        (_gn_args(bias=torch.ones(8, device="meta")), ValueError, "bias is on meta but x is on cpu"),
        (_gn_args(scale=[1.0]), TypeError, "scale must be a torch.Tensor, got list"),
        (_gn_args(eps=0.0), ValueError, "eps must be a finite number > 0, got 0.0"),
        (_gn_args(act="relu"), ValueError, "act must be None or 'silu', got 'relu'"),
    ],
)
def test_group_norm_bad_input_gets_a_clear_error(args, error, message):
    with pytest.raises(error, match=message):
        ada_group_norm_reference(**args)
    if isinstance(args["scale"], torch.Tensor):  # the op's schema rejects a list before fastgen does
        with pytest.raises(error, match=message):
            ada_group_norm(**args)


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((torch.ones(2, 3, 4, 1), torch.ones(2, 4), torch.ones(2, 4)), ValueError,
         r"x must be 3-D \(B, N, C\), got shape \(2, 3, 4, 1\)"),
        ((torch.ones(2, 3, 4), torch.ones(2, 4), torch.ones(1, 4)), ValueError,
         r"shift must have shape \(B, C\) = \(2, 4\), got \(1, 4\)"),
        ((torch.ones(2, 3, 4), torch.ones(2, 4), torch.ones(2, 4), float("nan")), ValueError, "eps must be a finite number"),
    ],
)
def test_layer_norm_bad_input_gets_a_clear_error(args, error, message):
    for function in (ada_layer_norm, ada_layer_norm_reference):
        with pytest.raises(error, match=message):
            function(*args)


def test_backward_op_checks_the_gradient():
    args = _gn_args()
    with pytest.raises(ValueError, match=r"grad must have shape of x = \(2, 8, 4, 4\), got \(2, 8, 4\)"):
        ada_group_norm_backward(torch.ones(2, 8, 4), *args.values())


def test_layer_norm_kernel_says_which_widths_it_supports():
    x = torch.ones(1, 1, 16385)
    with fastgen.use_backend("triton"), pytest.raises(ValueError, match="support C <= 16384, got C=16385"):
        ada_layer_norm(x, torch.ones(1, 16385), torch.ones(1, 16385))
    message = "gated_residual_ada_layer_norm: the Triton kernels hold whole rows and support C <= 16384"
    with fastgen.use_backend("triton"), pytest.raises(ValueError, match=message):
        gated_residual_ada_layer_norm(x, x, *(torch.ones(1, 16385) for _ in "gab"))


# The gated residual fused with the next adaLN (gated_residual_ada_layer_norm).

_GATED_TARGETS = [pytest.param(CPU, id="cpu-triton-interpreter"),
                  pytest.param(torch.device("cuda"), id="cuda-triton", marks=pytest.mark.gpu)]


@st.composite
def gated_residual_inputs(draw, device, generator):
    """Positional gated_residual_ada_layer_norm args: odd token counts and widths, x and branch
    contiguous or sliced independently, the per-sample vectors sliced or not, every dtype."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 40)), draw(st.sampled_from([1, 7, 33, 72, 200])))
    x, branch = (random_tensor(shape, draw(st.sampled_from(["contiguous", "sliced"])), device, dtype, generator)
                 for _ in "xb")
    gate, scale, shift = (random_tensor((shape[0], shape[2]), draw(st.sampled_from(["contiguous", "sliced"])), device,
                                        dtype, generator) for _ in "gab")
    return x, branch, gate, scale, shift, draw(st.sampled_from([1e-6, 1e-3]))


def _gated_reference_gradients(args, h, grad_h, grad_y):
    leaves = [a.detach().double().requires_grad_() for a in args[:5]]
    outputs = gated_residual_reference_at(h)(*leaves, args[5])
    return torch.autograd.grad(outputs, leaves, (grad_h.double(), grad_y.double()))


_GATED_GRAD_NAMES = ("dx", "dbranch", "dgate", "dscale", "dshift")
_GATED_ARGUMENTS = ("x", "branch", "gate", "scale", "shift")


def _run_gated_forward(args):
    out = _poisoned(GATED_RESIDUAL_ADA_LAYER_NORM.allocate_output(*args))
    GATED_RESIDUAL_ADA_LAYER_NORM.implementations["triton"].run(*args, out=out)
    return out


def _run_gated_backward(grad_h, grad_y, args):
    grads = _poisoned(GATED_RESIDUAL_ADA_LAYER_NORM_BACKWARD.allocate_output(grad_h, grad_y, *args))
    GATED_RESIDUAL_ADA_LAYER_NORM_BACKWARD.implementations["triton"].run(grad_h, grad_y, *args, out=grads)
    return grads


@pytest.mark.parametrize("device", _GATED_TARGETS)
@_HYPOTHESIS
@given(data=st.data())
def test_gated_residual_forward_and_backward_kernels_match_reference(device, data, generator):
    """h against the float64 residual; y against float64 adaLN of the h the kernel returned (the
    op normalizes its rounded h); the gradients, written over NaN, against float64 autograd."""
    args = data.draw(gated_residual_inputs(device, generator))
    h, y = _run_gated_forward(args)
    _assert_close_to(h, gated_residual_ada_layer_norm_reference(*_upcast(args))[0], "h")
    _assert_close_to(y, ada_layer_norm_reference(*_upcast((h, args[3], args[4])), args[5]), "y")
    grad_h, grad_y = (random_tensor(tuple(args[0].shape), "sliced", device, args[0].dtype, generator) for _ in "hy")
    grads = _run_gated_backward(grad_h, grad_y, args)
    expected = _gated_reference_gradients(args, h, grad_h, grad_y)
    terms = gated_residual_gradient_terms(args, lambda: [grad_h, grad_y], None)
    for name, actual, reference, argument in zip(_GATED_GRAD_NAMES, grads, expected, _GATED_ARGUMENTS):
        _assert_close_to(actual, reference, name, terms[argument])


def test_gated_residual_statistics_survive_a_large_mean(generator):
    """h with mean 1e3 and spread 1e-2 (float32): the pivot keeps y's digits, as in adaLN."""
    x = 1e3 + 1e-2 * torch.randn(2, 9, 96, generator=generator)
    branch = 1e-2 * torch.randn(2, 9, 96, generator=generator)
    gate, scale, shift = (torch.randn(2, 96, generator=generator) for _ in "gab")
    h, y = _run_gated_forward((x, branch, gate, scale, shift, 1e-6))
    _assert_close_to(h, gated_residual_ada_layer_norm_reference(*_upcast((x, branch, gate, scale, shift)))[0], "h")
    _assert_close_to(y, ada_layer_norm_reference(h.double(), scale.double(), shift.double()), "y")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gated_residual_y_normalizes_the_rounded_h_it_returns(backend, generator):
    """bfloat16 h near 100 holds steps of 0.5: a 0.1-wide branch rounds to a few levels, so y of
    the unrounded sum would differ from y of the returned h by about 1 (not a rounding)."""
    x = torch.full((2, 6, 40), 100.0, dtype=torch.bfloat16)
    branch = (0.1 * torch.randn(2, 6, 40, generator=generator)).bfloat16()
    gate, scale, shift = (torch.randn(2, 40, generator=generator).bfloat16() for _ in "gab")
    with fastgen.use_backend(backend):
        h, y = gated_residual_ada_layer_norm(x, branch, gate, scale, shift)
    _assert_close_to(y, ada_layer_norm_reference(*_upcast((h, scale, shift))), "y")


def test_gated_residual_propagates_non_finite_values_as_the_reference(generator):
    """An infinity or NaN in x, branch or gate makes h non-finite exactly where the reference's
    is (same values), the rows it reaches non-finite in y, and the gradients it reaches
    non-finite, as float64 autograd of the reference."""
    shape = (2, 7, 24)
    x, branch = (torch.randn(shape, generator=generator) for _ in "xb")
    gate, scale, shift = (torch.randn(2, 24, generator=generator) for _ in "gab")
    x[0, 3, 5], branch[1, 2, 7], gate[1, 20] = float("inf"), float("nan"), float("-inf")
    args = (x, branch, gate, scale, shift, 1e-6)
    h, y = _run_gated_forward(args)
    expected_h, expected_y = gated_residual_ada_layer_norm_reference(*_upcast(args))
    torch.testing.assert_close(h, expected_h.float(), equal_nan=True)
    assert torch.equal(y.isfinite(), expected_y.isfinite()) and not y.isfinite().all()
    grad_h, grad_y = (torch.randn(shape, generator=generator) for _ in "hy")
    grads = _run_gated_backward(grad_h, grad_y, args)
    leaves = [a.double().requires_grad_() for a in args[:5]]
    expected = torch.autograd.grad(gated_residual_ada_layer_norm_reference(*leaves, 1e-6), leaves,
                                   (grad_h.double(), grad_y.double()))
    for name, actual, reference in zip(_GATED_GRAD_NAMES, grads, expected):
        assert torch.equal(actual.isfinite(), reference.isfinite()), name
        finite = reference.isfinite()
        _assert_close_to(actual[finite], reference[finite], name)


def test_gated_residual_float16_overflow_makes_that_tokens_y_nan(generator):
    """x + gate * branch past float16's 65,504 in one element: h is +-inf there as the reference's,
    y is NaN in that token only (it normalizes the rounded h), and the gradients are non-finite
    exactly where float64 autograd of the contract at that h has them: that token's dx and
    dbranch, its sample's dgate and dscale (sums over the tokens), never dshift."""
    shape = (2, 5, 24)
    x, branch = (torch.randn(shape, generator=generator).half() for _ in "xb")
    gate, scale, shift = (torch.randn(2, 24, generator=generator).half() for _ in "gab")
    gate[1, 7], branch[1, 3, 7] = 4.0, 2e4  # h 8e4 in float32: +inf once rounded to float16
    args = (x, branch, gate, scale, shift, 1e-6)
    h, y = _run_gated_forward(args)
    expected_h = gated_residual_ada_layer_norm_reference(*args)[0]
    assert torch.equal(h.isinf(), expected_h.isinf()) and h[1, 3, 7] == float("inf")
    nan_tokens = y.isnan().any(-1)
    assert nan_tokens.tolist() == [[False] * 5, [False, False, False, True, False]] and y[1, 3].isnan().all()
    grad_h, grad_y = (torch.randn(shape, generator=generator).half() for _ in "hy")
    grads = _run_gated_backward(grad_h, grad_y, args)
    expected = _gated_reference_gradients(args, h, grad_h, grad_y)
    for name, actual, reference in zip(_GATED_GRAD_NAMES, grads, expected):
        assert torch.equal(actual.isfinite(), reference.isfinite()), name
        finite = reference.isfinite()
        _assert_close_to(actual[finite], reference[finite], name)
    dx, dbranch, dgate, dscale, dshift = grads
    assert dx[1, 3].isnan().all() and dx.isfinite().sum() == dx.numel() - 24
    assert dgate[1].isnan().all() and dscale[1].isnan().all() and dgate[0].isfinite().all()
    assert dshift.isfinite().all()


@pytest.mark.parametrize("device", _GATED_TARGETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("outputs_used", ["both", "y only"])
def test_gated_residual_autograd_runs_the_fast_backward(device, dtype, outputs_used, generator):
    """Through the custom op with the Triton backend (backward after the use_backend block),
    against the float64 contract; with only y used, the gradient of h arrives as zeros."""
    args = (*(random_tensor(shape, "contiguous", device, dtype, generator).requires_grad_()
              for shape in ((2, 11, 40), (2, 11, 40), (2, 40), (2, 40), (2, 40))), 1e-6)
    with fastgen.use_backend("triton"):
        h, y = gated_residual_ada_layer_norm(*args)
    grad_y = random_tensor((2, 11, 40), "contiguous", device, dtype, generator)
    grad_h = (random_tensor((2, 11, 40), "contiguous", device, dtype, generator) if outputs_used == "both"
              else torch.zeros_like(grad_y))
    if outputs_used == "both":
        torch.autograd.backward((h, y), (grad_h, grad_y))
    else:
        y.backward(grad_y)
    expected = _gated_reference_gradients(args, h, grad_h, grad_y)
    terms = gated_residual_gradient_terms(args, lambda: [grad_h, grad_y], None)
    for name, leaf, reference, argument in zip(_GATED_GRAD_NAMES, args, expected, _GATED_ARGUMENTS):
        _assert_close_to(leaf.grad, reference, f"{name} through autograd", terms[argument])


def test_gated_residual_gradcheck_and_compile(generator):
    """The registered autograd against finite differences (float64, reference backend), and the
    forward and backward ops traced into one graph each, agreeing with eager under Triton."""
    leaves = [torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
              for shape in ((2, 3, 5), (2, 3, 5), (2, 5), (2, 5), (2, 5))]
    with fastgen.use_backend("reference"):
        assert torch.autograd.gradcheck(gated_residual_ada_layer_norm, tuple(leaves))

    def block(x, branch, gate, scale, shift):
        h, y = gated_residual_ada_layer_norm(x * 2.0, branch, gate, scale, shift)
        return h.square().sum() + y.sin().sum()

    inputs = tuple(leaf.detach().float().requires_grad_() for leaf in leaves)
    with fastgen.use_backend("triton"):
        expected = torch.autograd.grad(block(*inputs), inputs)
        actual = torch.autograd.grad(torch.compile(block, backend="aot_eager", fullgraph=True)(*inputs), inputs)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_gated_residual_has_no_cuda_kernel_and_runs_as_auto_under_cuda(generator):
    """Backend "cuda" names no implementation of this op: it runs as under "auto" (the reference
    for CPU tensors, Triton on a GPU), not an error."""
    assert "cuda" not in GATED_RESIDUAL_ADA_LAYER_NORM.implementations
    assert "cuda" not in GATED_RESIDUAL_ADA_LAYER_NORM_BACKWARD.implementations
    args = (*(torch.randn(2, 3, 8, generator=generator) for _ in "xb"), *(torch.randn(2, 8, generator=generator)
                                                                           for _ in "gab"))
    with fastgen.use_backend("cuda"):
        actual = gated_residual_ada_layer_norm(*args)
    for a, e in zip(actual, gated_residual_ada_layer_norm_reference(*args)):
        assert torch.equal(a, e)


def _gated_args(**changes):
    args = dict(x=torch.ones(2, 3, 4), branch=torch.ones(2, 3, 4), gate=torch.ones(2, 4), scale=torch.ones(2, 4),
                shift=torch.ones(2, 4), eps=1e-6)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args, error, message",
    [
        (_gated_args(x=torch.ones(2, 3)), ValueError, r"x must be 3-D \(B, N, C\), got shape \(2, 3\)"),
        (_gated_args(branch=torch.ones(2, 4, 4)), ValueError,
         r"branch must have shape of x = \(2, 3, 4\), got \(2, 4, 4\)"),
        (_gated_args(gate=torch.ones(1, 4)), ValueError, r"gate must have shape \(B, C\) = \(2, 4\), got \(1, 4\)"),
        (_gated_args(gate=torch.ones(2, 4, dtype=torch.float16)), TypeError,
         "gate dtype torch.float16 must match x dtype torch.float32"),
        (_gated_args(branch=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError,
         "branch must be float32, float16, bfloat16 or float64, got torch.int64"),
        (_gated_args(scale=torch.ones(2, 5)), ValueError, r"scale must have shape \(B, C\) = \(2, 4\), got \(2, 5\)"),
        (_gated_args(eps=-1.0), ValueError, "eps must be a finite number > 0, got -1.0"),
    ],
)
def test_gated_residual_bad_input_gets_a_clear_error(args, error, message):
    for function in (gated_residual_ada_layer_norm, gated_residual_ada_layer_norm_reference):
        with pytest.raises(error, match=f"gated_residual_ada_layer_norm: {message}"):
            function(**args)


def test_gated_residual_backward_op_checks_both_gradients():
    args = _gated_args()
    with pytest.raises(ValueError, match=r"backward: grad_h must have shape of x = \(2, 3, 4\), got \(2, 3\)"):
        gated_residual_ada_layer_norm_backward(torch.ones(2, 3), torch.ones(2, 3, 4), *args.values())
    with pytest.raises(TypeError, match="backward: grad_y dtype torch.float64 must match x dtype torch.float32"):
        gated_residual_ada_layer_norm_backward(torch.ones(2, 3, 4), torch.ones(2, 3, 4, dtype=torch.float64),
                                               *args.values())


@pytest.mark.gpu
@pytest.mark.parametrize("shape, groups, affine", [
    ((8, 256, 64, 64), 32, True),  # ADM imagenet256 ResBlock at 64 px: fused path
    ((1, 32, 512, 512), 32, False),  # StyleGAN AdaIN at 512 px: split path
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_model_shapes_on_gpu(shape, groups, affine, layout, backend, generator):
    device = torch.device("cuda")
    x = random_tensor(shape, layout, device, torch.bfloat16, generator).requires_grad_()
    scale, shift = (random_tensor(shape[:2], "contiguous", device, torch.bfloat16, generator).requires_grad_()
                    for _ in "ab")
    weight, bias = ((random_tensor(shape[1:2], "contiguous", device, torch.bfloat16, generator).requires_grad_()
                     for _ in "ab") if affine else (None, None))
    args = (x, scale, shift, groups, weight, bias, 1e-5, "silu" if affine else None)
    with fastgen.use_backend(backend):
        y = ada_group_norm(*args)
    _assert_close_to(y, ada_group_norm_reference(*_upcast(args)), "y")
    grad = torch.randn(shape, generator=generator).to(device, torch.bfloat16)
    y.backward(grad)
    positions = (0, 1, 2, 4, 5) if affine else (0, 1, 2)
    expected = _reference_gradients(ada_group_norm_reference, grad, args, positions)
    for i, reference in zip(positions, expected):
        _assert_close_to(args[i].grad, reference, f"grad of argument {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", [(4, 256, 32, 32), (1, 4, 256, 256)])  # fused; split (a workspace)
def test_cuda_graph_replays_with_new_inputs(backend, shape, generator):
    x = torch.randn(shape, generator=generator).cuda()
    scale, shift = (torch.randn(shape[:2], generator=generator).cuda() for _ in "ab")
    groups = min(32, shape[1] // 2)
    with fastgen.use_backend(backend):
        ada_group_norm(x, scale, shift, groups, act="silu")  # compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ada_group_norm(x, scale, shift, groups, act="silu")
    x.copy_(torch.randn(x.shape, generator=generator))
    graph.replay()
    torch.cuda.synchronize()
    _assert_close_to(y, ada_group_norm_reference(*_upcast((x, scale, shift)), groups, act="silu"), "y")


# ---------------------------------------------------------------------------------------
# The CUDA backend (csrc/ada_norm.cu)


def _planned_chunks(extension, batch, channels, positions, num_groups) -> int:
    """The chunks per group the extension's launch plan picks, read off the forward's
    workspace: 3 floats per chunk of every group when split, none when fused."""
    floats = extension.ada_group_norm_workspace(_arg((batch, channels, positions, 1)), num_groups, 0, False)
    return max(1, floats // (3 * batch * num_groups))


def test_cuda_chunking_splits_large_groups_and_few_groups(emulated_extension, monkeypatch):
    """On 132 SMs: a 256 x 256 x 32-element group is reduced by many blocks; ADM's 64 px
    ResBlock groups fit one block each; 8 groups are split to fill the GPU, small ones are not."""
    monkeypatch.setenv("FASTGEN_EMULATED_SMS", "132")
    assert _planned_chunks(emulated_extension, 2, 64, 256 * 256, 2) >= 32
    assert _planned_chunks(emulated_extension, 8, 256, 64 * 64, 32) == 1
    assert _planned_chunks(emulated_extension, 1, 512, 64 * 64, 8) == 17
    assert _planned_chunks(emulated_extension, 1, 64, 8 * 8, 8) == 1
    monkeypatch.setenv("FASTGEN_EMULATED_SMS", "2")
    assert _planned_chunks(emulated_extension, 1, 512, 64 * 64, 8) == 4  # sized by the groups' length


def _misaligned(t):
    """t's values and layout at an address one element past a 16-byte boundary: the CUDA
    kernels must fall back from vector to scalar accesses."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    storage = torch.full((span + 1,), float("nan"), dtype=t.dtype, device=t.device)
    view = storage[1:].as_strided(t.shape, t.stride())
    view.copy_(t)
    return view


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("splits", [None, 5])
def test_cuda_group_norm_vector_and_scalar_paths(dtype, layout, aligned, splits, generator):
    """64 channels in 8 groups at 8 x 8: vector units along positions (NCHW) or along a
    group's 8 channels (channels_last) when aligned; scalar otherwise."""
    device = torch.device("cuda")
    x = random_tensor((3, 64, 8, 8), layout, device, dtype, generator)
    x = x if aligned else _misaligned(x)
    scale, shift = (random_tensor((3, 64), "sliced", device, dtype, generator) for _ in "ab")
    weight, bias = (random_tensor((64,), "contiguous", device, dtype, generator) for _ in "ab")
    args = (x, scale, shift, 8, weight, bias, 1e-5, "silu")
    _assert_close_to(_run_group_norm(args, splits, "cuda"), ada_group_norm_reference(*_upcast(args)), "y")
    grad = random_tensor((3, 64, 8, 8), layout, device, dtype, generator)
    grads = _run_group_norm_backward(grad, args, splits, "cuda")
    expected = _reference_gradients(ada_group_norm_reference, grad, args, (0, 1, 2, 4, 5))
    for name, actual, reference in zip(_GROUP_GRAD_NAMES, grads, expected):
        _assert_close_to(actual, reference, name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [True, False])
def test_cuda_layer_norm_wide_rows(dtype, aligned, generator):
    """DiT-XL's 1152 channels and a row wider than one block's tile pass (8192)."""
    device = torch.device("cuda")
    for channels in (1152, 8192):
        x = random_tensor((2, 33, channels), "contiguous", device, dtype, generator)
        x = x if aligned else _misaligned(x)
        scale, shift = (random_tensor((2, channels), "contiguous", device, dtype, generator) for _ in "ab")
        args = (x, scale, shift, 1e-6)
        out = _poisoned(ADA_LAYER_NORM.allocate_output(*args))
        ADA_LAYER_NORM.implementations["cuda"].run(*args, out=out)
        _assert_close_to(out, ada_layer_norm_reference(*_upcast(args)), "y")
        grad = random_tensor(tuple(x.shape), "contiguous", device, dtype, generator)
        grads = _poisoned(ADA_LAYER_NORM_BACKWARD.allocate_output(grad, *args))
        ADA_LAYER_NORM_BACKWARD.implementations["cuda"].run(grad, *args, out=grads)
        expected = _reference_gradients(ada_layer_norm_reference, grad, args, (0, 1, 2))
        for name, actual, reference in zip(("dx", "dscale", "dshift"), grads, expected):
            _assert_close_to(actual, reference, name)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 3, 9])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_statistics_survive_a_large_mean(splits, layout, generator):
    device = torch.device("cuda")
    x = (1e3 + 1e-2 * torch.randn(2, 8, 12, 11, generator=generator)).to(device)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    scale, shift, weight, bias = (torch.randn(*s, generator=generator).to(device)
                                  for s in ((2, 8), (2, 8), (8,), (8,)))
    args = (x, scale, shift, 2, weight, bias, 1e-5, "silu")
    _assert_close_to(_run_group_norm(args, splits, "cuda"), ada_group_norm_reference(*_upcast(args)), "y")
    grad = torch.randn(x.shape, generator=generator).to(device)
    grads = _run_group_norm_backward(grad, args, splits, "cuda")
    expected = _reference_gradients(ada_group_norm_reference, grad, args, (0, 1, 2, 4, 5))
    _assert_close_to(grads[0] / 100, expected[0] / 100, "dx / 100")  # dx scales with rstd = 100
    for name, actual, reference in zip(_GROUP_GRAD_NAMES[1:], grads[1:], expected[1:]):
        _assert_close_to(actual, reference, name)
    tokens = (1e3 + 1e-2 * torch.randn(2, 9, 96, generator=generator)).to(device)
    token_scale, token_shift = (torch.randn(2, 96, generator=generator).to(device) for _ in "ab")
    with fastgen.use_backend("cuda"):
        out = ada_layer_norm(tokens, token_scale, token_shift)
    _assert_close_to(out, ada_layer_norm_reference(*_upcast((tokens, token_scale, token_shift))), "y")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_cuda_split_path_is_deterministic_and_agrees_with_fused(layout, generator):
    device = torch.device("cuda")
    args = _split_path_args(device, layout, generator)
    grad = random_tensor((2, 12, 10, 9), "contiguous", device, torch.float32, generator)
    runs = [(_run_group_norm(args, splits, "cuda"), *_run_group_norm_backward(grad, args, splits, "cuda"))
            for splits in (13, 13, 1)]
    for first, second, fused in zip(*runs):
        assert torch.equal(first, second)
        torch.testing.assert_close(first, fused, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_large_group_takes_the_split_path(dtype, layout, generator):
    """Two groups of 2 x 256 x 256 values: more than one block may walk alone."""
    device = torch.device("cuda")
    shape = (1, 4, 256, 256)
    from fastgen import _cuda

    assert _cuda.query("ada_group_norm_workspace", x=torch.empty(1, 4, 256 * 256, device=device), num_groups=2,
                       num_chunks=0, backward=False) > 0  # split
    x = random_tensor(shape, layout, device, dtype, generator)
    scale, shift = (random_tensor(shape[:2], "contiguous", device, dtype, generator) for _ in "ab")
    args = (x, scale, shift, 2, None, None, 1e-5, None)
    _assert_close_to(_run_group_norm(args, None, "cuda"), ada_group_norm_reference(*_upcast(args)), "y")
    grad = random_tensor(shape, layout, device, dtype, generator)
    grads = _run_group_norm_backward(grad, args, None, "cuda")
    expected = _reference_gradients(ada_group_norm_reference, grad, args, (0, 1, 2, 4, 5))
    for name, actual, reference in zip(_GROUP_GRAD_NAMES, grads, expected):
        _assert_close_to(actual, reference, name)


# Argument checks of the extension's entry points run before it looks for a device: fake
# pointers, never dereferenced.
FAKE_PTR = 1 << 20


@pytest.fixture
def extension(cuda_extension):
    return cuda_extension


def _arg(sizes, dtype="float32", strides=None, ptr=FAKE_PTR):
    strides = strides or torch.empty(sizes, device="meta").stride()
    return (ptr, dtype, tuple(sizes), tuple(strides))


def _gn_call(**changes):
    """ada_group_norm's extension arguments for x (2, 8, 12, 1) in 4 groups, with changes."""
    call = dict(x=_arg((2, 8, 12, 1)), y=_arg((2, 8, 12, 1)), scale=_arg((2, 8, 1, 1)), shift=_arg((2, 8, 1, 1)),
                weight=_arg((1, 8, 1, 1)), bias=None, workspace=None, num_groups=4, num_chunks=1, eps=1e-5,
                silu=True, stream=0)
    call.update(changes)
    return call


def _ln_call(**changes):
    call = dict(x=_arg((2, 5, 8, 1)), y=_arg((2, 5, 8, 1)), scale=_arg((2, 8, 1, 1)), shift=_arg((2, 8, 1, 1)),
                eps=1e-6, stream=0)
    call.update(changes)
    return call


@pytest.mark.parametrize("call, name", [
    (_gn_call(x=_arg((2, 8, 12, 1), "float64")), "x"),
    (_gn_call(x=_arg((2, 8, 6, 2)), y=_arg((2, 8, 6, 2))), "x"),  # spatial dims not flattened
    (_gn_call(x=(0, "float32", (2, 8, 12, 1), (96, 12, 1, 1))), "x"),  # null pointer
    (_gn_call(y=_arg((2, 8, 12, 1), "float16")), "y"),
    (_gn_call(y=_arg((2, 8, 11, 1))), "y"),
    (_gn_call(y=_arg((2, 8, 12, 1), strides=(96, 12, 0, 1))), "y"),  # overlapping output
    (_gn_call(scale=_arg((2, 4, 1, 1))), "scale"),
    (_gn_call(shift=_arg((2, 8, 1, 1), "bfloat16")), "shift"),
    (_gn_call(weight=_arg((2, 8, 1, 1))), "weight"),
    (_gn_call(bias=_arg((1, 8, 1, 1), "float16")), "bias"),
    (_gn_call(num_groups=3), "num_groups"),
    (_gn_call(num_groups=0), "num_groups"),
    (_gn_call(num_chunks=-1), "num_chunks"),
    (_gn_call(num_chunks=2), "workspace"),  # a split needs one
    (_gn_call(num_chunks=2, workspace=_arg((1, 1, 1, 47))), "workspace"),  # 3 * 8 groups * 2 chunks
    (_gn_call(num_chunks=2, workspace=_arg((1, 1, 1, 48), "float16")), "workspace"),
    (_gn_call(eps=0.0), "eps"),
    (_gn_call(eps=1e-60), "eps"),  # 0 as float32
    (_gn_call(eps=float("inf")), "eps"),
])
def test_cuda_group_norm_bad_arguments_name_them(extension, call, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        extension.ada_group_norm(**call)


@pytest.mark.parametrize("call, name", [
    (_ln_call(x=_arg((2, 5, 8, 2)), y=_arg((2, 5, 8, 2))), "x"),
    (_ln_call(y=_arg((2, 5, 7, 1))), "y"),
    (_ln_call(y=_arg((2, 5, 8, 1), "bfloat16")), "y"),
    (_ln_call(scale=_arg((2, 5, 1, 1))), "scale"),  # (B, C), not (B, N)
    (_ln_call(shift=_arg((1, 8, 1, 1))), "shift"),
    (_ln_call(eps=-1.0), "eps"),
])
def test_cuda_layer_norm_bad_arguments_name_them(extension, call, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        extension.ada_layer_norm(**call)


def _gn_backward_call(**changes):
    """ada_group_norm_backward's extension arguments for x (2, 8, 12, 1) in 4 groups: the
    workspace holds 3 * 8 group statistics and 2 * 2 * 8 channel sums (one position range)."""
    call = dict(dy=_arg((2, 8, 12, 1)), x=_arg((2, 8, 12, 1)), scale=_arg((2, 8, 1, 1)), shift=_arg((2, 8, 1, 1)),
                weight=None, bias=_arg((1, 8, 1, 1)), dx=_arg((2, 8, 12, 1)), dscale=_arg((2, 8, 1, 1)),
                dshift=_arg((2, 8, 1, 1)), dweight=_arg((1, 8, 1, 1)), dbias=_arg((1, 8, 1, 1)),
                workspace=_arg((1, 1, 1, 56)), num_groups=4, num_chunks=1, eps=1e-5,
                silu=False, stream=0)
    call.update(changes)
    return call


def _ln_backward_call(**changes):
    call = dict(dy=_arg((2, 5, 8, 1)), x=_arg((2, 5, 8, 1)), scale=_arg((2, 8, 1, 1)), shift=_arg((2, 8, 1, 1)),
                dx=_arg((2, 5, 8, 1)), dscale=_arg((2, 8, 1, 1)), dshift=_arg((2, 8, 1, 1)),
                workspace=_arg((1, 1, 1, 62)), eps=1e-6, stream=0)
    call.update(changes)
    return call


@pytest.mark.parametrize("call, name", [
    (_gn_backward_call(dy=_arg((2, 8, 11, 1))), "dy"),
    (_gn_backward_call(dy=_arg((2, 8, 12, 1), "float16")), "dy"),
    (_gn_backward_call(x=_arg((2, 8, 12, 2))), "x"),
    (_gn_backward_call(dx=_arg((2, 8, 12, 1), strides=(0, 12, 1, 1))), "dx"),
    (_gn_backward_call(dscale=_arg((2, 4, 1, 1))), "dscale"),
    (_gn_backward_call(dshift=_arg((2, 8, 1, 1), "bfloat16")), "dshift"),
    (_gn_backward_call(dweight=_arg((8, 1, 1, 1))), "dweight"),
    (_gn_backward_call(dbias=_arg((1, 8, 1, 1), strides=(8, 0, 1, 1))), "dbias"),
    (_gn_backward_call(weight=_arg((1, 7, 1, 1))), "weight"),
    (_gn_backward_call(num_groups=5), "num_groups"),
    (_gn_backward_call(workspace=None), "workspace"),
    (_gn_backward_call(workspace=_arg((1, 1, 1, 55))), "workspace"),
    (_gn_backward_call(num_chunks=2), "workspace"),  # + 5 * 8 groups * 2 chunks
    (_gn_backward_call(eps=-1e-5), "eps"),
])
def test_cuda_group_norm_backward_bad_arguments_name_them(extension, call, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        extension.ada_group_norm_backward(**call)


@pytest.mark.parametrize("call, name", [
    (_ln_backward_call(dy=_arg((2, 5, 9, 1))), "dy"),
    (_ln_backward_call(dx=_arg((2, 5, 8, 1), "float16")), "dx"),
    (_ln_backward_call(dscale=_arg((2, 5, 1, 1))), "dscale"),
    (_ln_backward_call(dshift=_arg((2, 8, 1, 1), strides=(0, 1, 1, 1))), "dshift"),
    (_ln_backward_call(workspace=_arg((1, 1, 1, 61))), "workspace"),  # 3 * 2 * 5 + 2 * 1 * 2 * 8
    (_ln_backward_call(workspace=_arg((1, 1, 1, 62), "bfloat16")), "workspace"),
])
def test_cuda_layer_norm_backward_bad_arguments_name_them(extension, call, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        extension.ada_layer_norm_backward(**call)


@pytest.mark.parametrize("entry_point, call", [
    ("ada_group_norm", _gn_call()),
    ("ada_group_norm", _gn_call(num_chunks=2, workspace=_arg((1, 1, 1, 48)))),
    ("ada_layer_norm", _ln_call()),
    ("ada_group_norm_backward", _gn_backward_call()),
    ("ada_group_norm_backward", _gn_backward_call(num_chunks=2, workspace=_arg((1, 1, 1, 136)))),
    ("ada_layer_norm_backward", _ln_backward_call()),
])
def test_cuda_entry_points_without_a_device_say_so(extension, entry_point, call):
    if extension.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        getattr(extension, entry_point)(**call)
