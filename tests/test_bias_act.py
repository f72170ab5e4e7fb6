"""bias_act: the Triton kernels against the float64 reference, first and second gradients,
the y-based backward, errors."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastgen
from fastgen.check import mismatch
from fastgen.ops.bias_act import (
    ACTIVATIONS,
    BIAS_ACT,
    BIAS_ACT_BACKWARD,
    bias_act,
    bias_act_backward,
    bias_act_reference,
    parse_params,
)
from fastgen.ops.registry import random_tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "sliced")
CPU = torch.device("cpu")
# (shape, dim): conv activations (NCHW, bias on C), FC layers, a bias on the last axis.
SHAPES = [((2, 6, 5, 7), 1), ((3, 17), 1), ((2, 3, 9), -1), ((4, 5, 3, 2), 2), ((5,), 0)]


def _devices():
    return [pytest.param(CPU, id="cpu-triton-interpreter"),
            pytest.param(torch.device("cuda"), id="cuda-triton", marks=pytest.mark.gpu)]


def _inputs(shape, dim, layout, device, dtype, generator, with_bias=True):
    layout = layout if len(shape) == 4 or layout == "sliced" else "contiguous"
    x = random_tensor(shape, layout, device, dtype, generator)
    b = random_tensor((shape[dim],), "contiguous", device, dtype, generator) if with_bias else None
    return x, b


@st.composite
def settings_of_act(draw):
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    alpha = draw(st.sampled_from([None, 0.1, -0.3])) if act == "lrelu" else None
    return act, alpha, draw(st.sampled_from([None, 1.0, -2.0])), draw(st.sampled_from([None, 0.8, 3.0]))


@pytest.mark.parametrize("device", _devices())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape_dim=st.sampled_from(SHAPES), act_settings=settings_of_act(), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), with_bias=st.booleans())
def test_forward_and_backward_match_reference(device, shape_dim, act_settings, dtype, layout, with_bias, generator):
    """The forward kernel into a poisoned output, and dx, db through the custom op's autograd,
    against the float64 reference and its autograd."""
    shape, dim = shape_dim
    act, alpha, gain, clamp = act_settings
    x, b = _inputs(shape, dim, layout, device, dtype, generator, with_bias)
    args = (x, b, act, alpha, gain, clamp, dim)
    out = BIAS_ACT.allocate_output(*args)
    out.fill_(float("nan"))
    BIAS_ACT.implementations["triton"].run(*args, out=out)
    x64, b64 = (None if t is None else t.double().requires_grad_() for t in (x, b))
    expected = bias_act_reference(x64, b64, act, alpha, gain, clamp, dim)
    _, detail = mismatch(out, expected)
    assert not detail, f"forward: {detail}"

    leaves = [t.requires_grad_() for t in (x, b) if t is not None]
    with fastgen.use_backend("triton"):
        y = bias_act(x, b, act, alpha, gain, clamp, dim)
    grad_out = torch.randn(shape, generator=generator).to(device, dtype)
    y.backward(grad_out)
    expected.backward(grad_out.double())
    for name, leaf, leaf64 in zip(("dx", "db"), leaves, [t for t in (x64, b64) if t is not None]):
        _, detail = mismatch(leaf.grad, leaf64.grad)
        assert not detail, f"{name}: {detail}"


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_custom_op_gradients_gradcheck(act, generator):
    """First and second order in float64 through the registered autograd of both ops."""
    x = torch.randn(2, 3, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True)
    clamp = 1.5 if act in ("lrelu", "tanh", "linear") else None
    fn = lambda a, c: bias_act(a, c, act, None, 1.3, clamp, 1)  # noqa: E731
    with fastgen.use_backend("reference"):
        assert torch.autograd.gradcheck(fn, (x, b))
        assert torch.autograd.gradgradcheck(fn, (x, b))


def _r1_like(backend, x, b, act, clamp):
    """The gradient of a nonlinear loss of the output, squared and differentiated again."""
    x = x.detach().requires_grad_()
    b = b.detach().requires_grad_()
    with fastgen.use_backend(backend):
        y = bias_act(x, b, act, None, None, clamp, 1)
        (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        grad_x.square().sum().backward()
    return x.grad, b.grad


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("act, clamp", [("lrelu", 1.0), ("swish", None), ("tanh", 0.9), ("softplus", None)])
def test_second_order_through_triton_matches_reference(device, act, clamp, generator):
    x = torch.randn(2, 4, 3, 5, generator=generator)
    b = torch.randn(4, generator=generator)
    actual = _r1_like("triton", x.to(device), b.to(device), act, clamp)
    expected = _r1_like("reference", x.double(), b.double(), act, clamp)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double().cpu(), e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act, clamp, dtype, source", [
    ("lrelu", None, torch.float16, "y"), ("relu", 2.0, torch.float32, "y"), ("linear", 1.0, torch.float32, "y"),
    ("lrelu", 256.0, torch.float16, "x"), ("tanh", None, torch.float32, "x"), ("linear", None, torch.float16, None),
])
def test_backward_reads_y_where_the_activation_allows(act, clamp, dtype, source):
    """What the forward keeps for the backward: y (x may be freed) for the piecewise linear
    activations, x when a 16-bit y could have been rounded onto the clamp, nothing for linear."""
    assert parse_params(torch.ones(1, dtype=dtype), None, act, None, None, clamp, 0).derivative_source(dtype) == source


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_op_into_poisoned_outputs(device, layout, generator):
    """dx and db of the backward op (both reduction directions of db) against its reference."""
    x, b = _inputs((3, 6, 5, 7), 1, layout, device, torch.float32, generator)
    dy = random_tensor((3, 6, 5, 7), "sliced", device, torch.float32, generator)
    for act, source in (("lrelu", "y"), ("swish", "x")):
        y = bias_act_reference(x, b, act, None, None, 2.0, 1)
        args = (dy, x if source == "x" else None, b, y if source == "y" else None, act, None, None, 2.0, 1)
        out = BIAS_ACT_BACKWARD.allocate_output(*args)
        for t in out:
            t.fill_(float("nan"))
        BIAS_ACT_BACKWARD.implementations["triton"].run(*args, out=out)
        for actual, expected in zip(out, BIAS_ACT_BACKWARD.reference(*args)):
            _, detail = mismatch(actual, expected)
            assert not detail, f"{act}: {detail}"


def test_many_rows_use_the_row_loop_for_db(generator, monkeypatch):
    """db with several row steps per program (the channels_last / FC reduction path)."""
    from fastgen.kernels import bias_act as kernels

    monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", 1)  # 128-row tiles: 3 steps in one program
    x = torch.randn(300, 5, generator=generator, requires_grad=True)
    b = torch.randn(5, generator=generator, requires_grad=True)
    with fastgen.use_backend("triton"):
        bias_act(x, b, "lrelu").backward(torch.ones(300, 5))
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    bias_act_reference(x64, b64, "lrelu").backward(torch.ones(300, 5, dtype=torch.float64))
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-4)


def test_defaults_are_stylegans():
    x = torch.tensor([[-1.0, 2.0]])
    torch.testing.assert_close(bias_act(x, act="lrelu"), torch.tensor([[-0.2, 2.0]]) * math.sqrt(2))
    torch.testing.assert_close(bias_act(x, act="swish"), x * torch.sigmoid(x) * math.sqrt(2))
    torch.testing.assert_close(bias_act(x, act="tanh", clamp=0.5), torch.tanh(x).clamp(-0.5, 0.5))
    torch.testing.assert_close(bias_act(x, torch.tensor([1.0, -1.0]), "relu", gain=1), torch.tensor([[0.0, 1.0]]))


def test_torch_compile_fullgraph(generator):
    x = torch.randn(2, 4, 3, 3, generator=generator, requires_grad=True)
    b = torch.randn(4, generator=generator)

    def layer(x):
        return bias_act(x * 2, b, "lrelu", clamp=1.0).sum(1)

    with fastgen.use_backend("triton"):
        expected = layer(x)
        actual = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(actual, expected)


def test_opcheck(generator):
    for case in BIAS_ACT.check_cases():
        x, *rest = case.make_args(CPU, torch.float32, generator)
        torch.library.opcheck(torch.ops.fastgen.bias_act, (x.requires_grad_(), *rest))


_X = torch.ones(2, 3, 4)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: bias_act(_X, act="gelu"), ValueError, "act must be one of linear, relu, lrelu, .*; got 'gelu'"),
        (lambda: bias_act(_X, torch.ones(4)), ValueError, r"b must be a 1-D tensor of x.shape\[dim\] = 3 entries, got shape \(4,\)"),
        (lambda: bias_act(_X, torch.ones(3, 1)), ValueError, r"b must be a 1-D tensor .* got shape \(3, 1\)"),
        (lambda: bias_act(_X, torch.ones(3, dtype=torch.float16)), TypeError, "b dtype torch.float16 must match x dtype"),
        (lambda: bias_act(_X, torch.ones(3, device="meta")), ValueError, "b is on meta but x is on cpu"),
        (lambda: bias_act(_X, dim=3), ValueError, r"dim must be an int in \[-3, 3\)"),
        (lambda: bias_act(_X, clamp=-1.0), ValueError, "clamp must be >= 0"),
        (lambda: bias_act(_X, gain=float("nan")), TypeError, "gain must be a finite number or None"),
        (lambda: bias_act(torch.ones(3, dtype=torch.int64)), TypeError, "x must be float32"),
        (lambda: bias_act_backward(_X, None, None, None, "relu", None, None, None, 1), ValueError,
         "the backward of act='relu' .* needs y, got None"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stylegan_layer_shapes_on_cuda(layout, dtype, generator):
    x, b = _inputs((4, 256, 64, 64), 1, layout, "cuda", dtype, generator)
    x.requires_grad_()
    b.requires_grad_()
    with fastgen.use_backend("triton"):
        y = bias_act(x, b, "lrelu", clamp=256.0)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    expected = bias_act_reference(x64, b64, "lrelu", clamp=256.0)
    expected.backward(grad_out.double())
    for actual, reference in ((y, expected), (x.grad, x64.grad), (b.grad, b64.grad)):
        _, detail = mismatch(actual, reference)
        assert not detail, detail


@pytest.mark.parametrize("act", ["linear", "lrelu", "tanh"])
def test_backward_accepts_broadcast_gradients(act, generator):
    """y.sum().backward() hands the backward an expanded gradient with all strides 0."""
    x = torch.randn(2, 3, 4, generator=generator, requires_grad=True)
    b = torch.randn(3, generator=generator, requires_grad=True)
    with fastgen.use_backend("triton"):
        bias_act(x, b, act, gain=1.0).sum().backward()
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    bias_act_reference(x64, b64, act, gain=1.0).sum().backward()
    for actual, expected in ((x.grad, x64.grad), (b.grad, b64.grad)):
        _, detail = mismatch(actual, expected)
        assert not detail, detail


@pytest.mark.gpu
def test_cuda_graph_capture_replays(generator):
    """Forward and backward (with its db partials) capture and replay."""
    x = torch.randn(4, 64, 32, 32, generator=generator).cuda().requires_grad_()
    b = torch.randn(64, generator=generator).cuda().requires_grad_()
    grad_out = torch.randn(x.shape, generator=generator).cuda()

    def step():
        return torch.autograd.grad(bias_act(x, b, "lrelu", clamp=1.0), (x, b), grad_out)

    with fastgen.use_backend("triton"):
        step()  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dx, db = step()
    with torch.no_grad():
        x.copy_(torch.randn(x.shape, generator=generator))
    graph.replay()
    torch.cuda.synchronize()
    expected = torch.autograd.grad(bias_act_reference(x, b, "lrelu", clamp=1.0), (x, b), grad_out)
    torch.testing.assert_close(dx, expected[0])
    torch.testing.assert_close(db, expected[1], rtol=1e-4, atol=1e-3)
