"""bias_act: the Triton kernels against the float64 reference, first and second gradients,
the y-based backward, errors."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastgen
from conftest import (CPU, DEVICES_AND_BACKENDS, DTYPES, LAYOUTS, assert_compiles_as_one_graph,
                      clear_error_test, fake_tensor_arg)
from fastgen.check import mismatch
from fastgen.ops.bias_act import (
    ACTIVATIONS,
    BIAS_ACT,
    BIAS_ACT_BACKWARD,
    bias_act,
    bias_act_backward,
    bias_act_reference,
    parse_params,
    reduce_to_bias,
)
from fastgen.ops.registry import TOLERANCES, random_tensor

# (shape, dim): conv activations (NCHW, bias on C), FC layers, a bias on the last axis.
SHAPES = [((2, 6, 5, 7), 1), ((3, 17), 1), ((2, 3, 9), -1), ((4, 5, 3, 2), 2), ((5,), 0)]


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


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape_dim=st.sampled_from(SHAPES), act_settings=settings_of_act(), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), with_bias=st.booleans())
def test_forward_and_backward_match_reference(device, backend, shape_dim, act_settings, dtype, layout, with_bias,
                                              generator):
    """The forward kernel into a poisoned output, and dx, db through the custom op's autograd,
    against the float64 reference and its autograd."""
    shape, dim = shape_dim
    act, alpha, gain, clamp = act_settings
    x, b = _inputs(shape, dim, layout, device, dtype, generator, with_bias)
    args = (x, b, act, alpha, gain, clamp, dim)
    out = BIAS_ACT.allocate_output(*args)
    out.fill_(float("nan"))
    BIAS_ACT.implementations[backend].run(*args, out=out)
    x64, b64 = (None if t is None else t.double().requires_grad_() for t in (x, b))
    expected = bias_act_reference(x64, b64, act, alpha, gain, clamp, dim)
    _, detail = mismatch(out, expected)
    assert not detail, f"forward: {detail}"

    leaves = [t.requires_grad_() for t in (x, b) if t is not None]
    with fastgen.use_backend(backend):
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


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("act, clamp", [("lrelu", 1.0), ("swish", None), ("tanh", 0.9), ("softplus", None)])
def test_second_order_through_kernels_matches_reference(device, backend, act, clamp, generator):
    x = torch.randn(2, 4, 3, 5, generator=generator)
    b = torch.randn(4, generator=generator)
    actual = _r1_like(backend, x.to(device), b.to(device), act, clamp)
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


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
def test_act_none_is_no_activation_as_in_ada_group_norm(device, backend, generator):
    x, b = _inputs((2, 6, 5, 7), 1, "contiguous", device, torch.float32, generator)
    x.requires_grad_(True)
    with fastgen.use_backend(backend):
        y = bias_act(x, b, act=None, gain=1.5, clamp=0.7)
        (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, ((x + b[:, None, None]) * 1.5).clamp(-0.7, 0.7))
    torch.testing.assert_close(dx, (((x + b[:, None, None]) * 1.5).abs() <= 0.7).float() * 1.5)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_op_into_poisoned_outputs(device, backend, layout, generator):
    """dx and db of the backward op (both reduction directions of db) against its reference."""
    x, b = _inputs((3, 6, 5, 7), 1, layout, device, torch.float32, generator)
    dy = random_tensor((3, 6, 5, 7), "sliced", device, torch.float32, generator)
    for act, source in (("lrelu", "y"), ("swish", "x")):
        y = bias_act_reference(x, b, act, None, None, 2.0, 1)
        args = (dy, x if source == "x" else None, b, y if source == "y" else None, act, None, None, 2.0, 1)
        out = BIAS_ACT_BACKWARD.allocate_output(*args)
        for t in out:
            t.fill_(float("nan"))
        BIAS_ACT_BACKWARD.implementations[backend].run(*args, out=out)
        for actual, expected in zip(out, BIAS_ACT_BACKWARD.reference(*args)):
            _, detail = mismatch(actual, expected)
            assert not detail, f"{act}: {detail}"


# Where _non_finite_problem puts NaN, inf and -inf (in this order) into x or dy, and the
# channels of b it sets to them; the bias runs along dim 1 of (2, 6, 5, 7).
_LARGE_Z_AT = ((0, 1, 2, 3), (1, 2, 0, 4), (0, 4, 4, 6))
_SMALL_Z_AT = ((1, 1, 3, 3), (0, 2, 1, 4), (1, 4, 0, 6))
_NON_FINITE_CHANNELS = (1, 2, 4)
NON_FINITE_VALUES = (float("nan"), float("inf"), float("-inf"))


def _non_finite_problem(name, dtype, device, generator):
    """x, b and dy of shape (2, 6, 5, 7) with NaN, inf and -inf in the input `name`: in x or dy
    at an element whose z = x + b is 5 (clamped to 0.8 under every activation) and at one
    whose z is 0.1 (not clamped), or in three channels of b."""
    x, b = _inputs((2, 6, 5, 7), 1, "contiguous", CPU, torch.float32, generator)
    dy = torch.randn(x.shape, generator=generator)
    for large, small in zip(_LARGE_Z_AT, _SMALL_Z_AT):
        x[large] = 5.0 - b[large[1]]
        x[small] = 0.1 - b[small[1]]
    for large, small, channel, value in zip(_LARGE_Z_AT, _SMALL_Z_AT, _NON_FINITE_CHANNELS, NON_FINITE_VALUES):
        if name == "b":
            b[channel] = value
        else:
            target = x if name == "x" else dy
            target[large] = target[small] = value
    return x.to(device, dtype), b.to(device, dtype), dy.to(device, dtype)


def _assert_same_non_finite_and_close(actual, expected, what):
    """NaN and the same inf wherever the reference has them, the rest within the dtype's tolerance."""
    rtol, atol = TOLERANCES[actual.dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda detail: f"{what}: {detail}")


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("clamp", [None, 0.8])
@pytest.mark.parametrize("name", ["x", "b"])
def test_forward_propagates_nan_and_inf_as_the_reference(device, backend, dtype, act, clamp, name, generator):
    """relu and the clamp keep a NaN, as F.relu and torch.clamp do; inf follows each activation."""
    x, b, _ = _non_finite_problem(name, dtype, device, generator)
    args = (x, b, act, None, None, clamp, 1)
    out = BIAS_ACT.allocate_output(*args).fill_(0.5)
    BIAS_ACT.implementations[backend].run(*args, out=out)
    _assert_same_non_finite_and_close(out, bias_act_reference(x.double(), b.double(), act, None, None, clamp, 1), "y")


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("clamp", [None, 0.8])
@pytest.mark.parametrize("name", ["x", "b", "dy"])
def test_backward_propagates_nan_and_inf_as_the_reference(device, backend, dtype, act, clamp, name, generator):
    """dx = dy * (gain * act'(z) * m), db its sums: a NaN or inf in dy, or a NaN act'(z), stays
    NaN where the clamp mask m is 0 (NaN * 0, inf * 0), as in the reference; y (the backward
    of piecewise linear activations reads it) comes from the reference forward."""
    x, b, dy = _non_finite_problem(name, dtype, device, generator)
    y = bias_act_reference(x, b, act, None, None, clamp, 1)
    source = parse_params(x, b, act, None, None, clamp, 1).derivative_source(dtype)
    args = (dy, x if source == "x" else None, b, y if source == "y" else None, act, None, None, clamp, 1)
    out = BIAS_ACT_BACKWARD.allocate_output(*args)
    for t in out:
        t.fill_(0.5)
    BIAS_ACT_BACKWARD.implementations[backend].run(*args, out=out)
    for what, actual, expected in zip(("dx", "db"), out, BIAS_ACT_BACKWARD.reference(*args)):
        _assert_same_non_finite_and_close(actual, expected, what)


def _grads_against_eager_autograd(backend, x, b, args, generator):
    """(dx, db) through the custom op's autograd on `backend`, and the float64 eager reference's
    autograd (the fuzz test's ground truth) for the same random dy, on the CPU: the eager CPU
    semantics at a NaN z are the ones the op states, on every device (torch's CUDA elu and selu
    backward pass the gradient there)."""
    x, b = x.detach().requires_grad_(), b.detach().requires_grad_()
    x64, b64 = (t.detach().cpu().double().requires_grad_() for t in (x, b))
    with fastgen.use_backend(backend):
        y = bias_act(x, b, *args)
    dy = torch.randn(y.shape, generator=generator).to(y.device, y.dtype)
    y.backward(dy)
    bias_act_reference(x64, b64, *args).backward(dy.cpu().double())
    return (x.grad, b.grad), (x64.grad, b64.grad)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("clamp", [None, 0.8])
@pytest.mark.parametrize("gain", [None, -2.0])
def test_backward_at_non_finite_z_follows_the_eager_autograd(device, backend, dtype, act, clamp, gain, generator):
    """At a NaN z relu passes the gradient (torch's backward tests its output <= 0), lrelu
    scales it by alpha, the clamp stops it; +-inf follow each activation's limits. 512
    elements: torch's CPU elu backward gives NaN at a NaN z in its vectorized loop but not in
    its scalar tail, and a multiple of every vector width leaves no tail."""
    x, b = _inputs((2, 8, 4, 8), 1, "contiguous", CPU, torch.float32, generator)
    flat = x.view(-1)
    where = torch.randperm(flat.numel(), generator=generator)[:12]
    flat[where] = torch.tensor(NON_FINITE_VALUES).repeat(4)
    b[torch.randperm(8, generator=generator)[:3]] = torch.tensor(NON_FINITE_VALUES)
    actual, expected = _grads_against_eager_autograd(
        backend, x.to(device, dtype), b.to(device, dtype), (act, None, gain, clamp, 1), generator)
    for what, a, e in zip(("dx", "db"), actual, expected):
        _assert_same_non_finite_and_close(a, e, what)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("shape, dim, layout", [((2, 6, 5, 7), 1, "contiguous"), ((2, 6, 5, 7), 1, "channels_last"),
                                                ((3, 17), 1, "contiguous"), ((2, 3, 9), 2, "contiguous")])
def test_backward_with_an_expanded_bias_matches_the_reference(device, backend, shape, dim, layout, generator):
    """A stride-0 b (one value expanded along dim): its axis still gets a db entry per channel,
    though its strides alone would merge it with its neighbours in the Triton canonical view."""
    x = random_tensor(shape, layout, device, torch.float32, generator)
    b = torch.randn(1, generator=generator).to(device).expand(shape[dim])
    actual, expected = _grads_against_eager_autograd(backend, x, b, ("lrelu", None, None, 1.5, dim), generator)
    for what, a, e in zip(("dx", "db"), actual, expected):
        _, detail = mismatch(a, e)
        assert not detail, f"{what}: {detail}"


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("empty", ["channels_last", "expanded"])
def test_empty_input_with_zero_strides_gets_dense_outputs(device, backend, empty, generator):
    """An empty x whose strides include 0 (empty_like would copy them) gives dense y and dx
    that the CUDA launchers accept, and a zero db."""
    if empty == "channels_last":
        x = torch.randn(2, 6, 5, 0, device=device).contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(2, 6, 5, 1, device=device).expand(2, 6, 5, 0)
    b = torch.randn(6, generator=generator).to(device)
    (dx, db), _ = _grads_against_eager_autograd(backend, x, b, ("lrelu", None, None, 1.5, 1), generator)
    assert dx.shape == x.shape
    assert torch.equal(db, torch.zeros_like(b))
    out = BIAS_ACT.allocate_output(x, b, "lrelu", None, None, 1.5, 1)
    assert out.shape == x.shape and 0 not in out.stride()


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

    assert_compiles_as_one_graph(layer, x)


_X = torch.ones(2, 3, 4)


test_bad_input_gets_a_clear_error = clear_error_test(
    [
        (lambda: bias_act(_X, act="gelu"), ValueError, "act must be one of linear, relu, lrelu, .*; got 'gelu'"),
        (lambda: bias_act(_X, act=3), RuntimeError, "Expected a value of type 'Optional\\[str\\]' for argument 'act'"),
        (lambda: bias_act(_X, torch.ones(4)), ValueError, r"b must be a 1-D tensor of x.shape\[dim\] = 3 entries, got shape \(4,\)"),
        (lambda: bias_act(_X, torch.ones(3, 1)), ValueError, r"b must be a 1-D tensor .* got shape \(3, 1\)"),
        (lambda: bias_act(_X, torch.ones(3, dtype=torch.float16)), TypeError, "b dtype torch.float16 must match x dtype"),
        (lambda: bias_act(_X, torch.ones(3, device="meta")), ValueError, "b is on meta but x is on cpu"),
        (lambda: bias_act(_X, dim=3), ValueError, r"dim must be an int in \[-3, 3\)"),
        (lambda: bias_act(_X, clamp=-1.0), ValueError, "clamp must be >= 0"),
        (lambda: bias_act(_X, gain=float("nan")), ValueError, "gain must be a finite number or None, got nan"),
        (lambda: bias_act(torch.ones(3, dtype=torch.int64)), TypeError, "x must be float32"),
        (lambda: bias_act_backward(_X, None, None, None, "relu", None, None, None, 1), ValueError,
         "the backward of act='relu' .* needs y, got None"),
    ],
)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stylegan_layer_shapes_on_cuda(backend, layout, dtype, generator):
    x, b = _inputs((4, 256, 64, 64), 1, layout, "cuda", dtype, generator)
    x.requires_grad_()
    b.requires_grad_()
    with fastgen.use_backend(backend):
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
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_replays(backend, generator):
    """Forward and backward (with its db partials) capture and replay."""
    x = torch.randn(4, 64, 32, 32, generator=generator).cuda().requires_grad_()
    b = torch.randn(64, generator=generator).cuda().requires_grad_()
    grad_out = torch.randn(x.shape, generator=generator).cuda()

    def step():
        return torch.autograd.grad(bias_act(x, b, "lrelu", clamp=1.0), (x, b), grad_out)

    with fastgen.use_backend(backend):
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


# ---------------------------------------------------------------------------------------
# The CUDA extension's entry points (csrc/bias_act.cu)

_SHAPE = (2, 3, 4, 5)
_B = (1, 3, 1, 1)


def _forward_args(**changes):
    args = dict(x=fake_tensor_arg(_SHAPE), b=fake_tensor_arg(_B), y=fake_tensor_arg(_SHAPE), dim=1, act="lrelu",
                alpha=0.2, gain=1.4, clamp=None, stream=0)
    args.update(changes)
    return args


def _backward_args(**changes):
    args = dict(dy=fake_tensor_arg(_SHAPE), x=None, y=fake_tensor_arg(_SHAPE), b=fake_tensor_arg(_B),
                dx=fake_tensor_arg(_SHAPE), db=fake_tensor_arg(_B), partial=None, dim=1, act="lrelu", alpha=0.2,
                gain=1.4, clamp=1.0, stream=0)
    args.update(changes)
    if "partial" not in changes:
        splits = fastgen._cuda.load().bias_act_db_splits(args["dx"], 1) if args["dx"][2] == _SHAPE else 1
        args["partial"] = fake_tensor_arg((1, 1, splits, 3))
    return args


FORWARD_BAD = [
    ("x", dict(x=fake_tensor_arg(_SHAPE, "float64"))),
    ("x", dict(x=fake_tensor_arg((2, -3, 4, 5)))),
    ("x", dict(x=fake_tensor_arg(_SHAPE, ptr=0))),
    ("y", dict(y=fake_tensor_arg(_SHAPE, "float16"))),
    ("y", dict(y=fake_tensor_arg((2, 3, 4, 6)))),
    ("y", dict(y=fake_tensor_arg(_SHAPE, strides=(60, 0, 5, 1)))),
    ("b", dict(b=fake_tensor_arg((1, 4, 1, 1)))),
    ("b", dict(b=fake_tensor_arg((3, 1, 1, 1)))),
    ("b", dict(b=fake_tensor_arg(_B, "bfloat16"))),
    ("dim", dict(dim=4)),
    ("dim", dict(dim=-1)),
    ("act", dict(act="gelu")),
    ("alpha", dict(alpha=float("inf"))),
    ("gain", dict(gain=float("nan"))),
    ("clamp", dict(clamp=-1.0)),
    ("clamp", dict(clamp="1")),
]

BACKWARD_BAD = [
    ("dy", dict(dy=fake_tensor_arg(_SHAPE, "float64"))),
    ("dx", dict(dx=fake_tensor_arg((2, 3, 4, 4)))),
    ("dx", dict(dx=fake_tensor_arg(_SHAPE, "float16"))),
    ("dx", dict(dx=fake_tensor_arg(_SHAPE, strides=(0, 20, 5, 1)))),
    ("x", dict(x=fake_tensor_arg(_SHAPE))),  # x and y both given
    ("y", dict(y=fake_tensor_arg((2, 3, 1, 5)))),
    ("x", dict(y=None, x=fake_tensor_arg(_SHAPE, "bfloat16"))),
    ("b", dict(b=fake_tensor_arg((1, 1, 4, 1)))),
    ("db", dict(db=None)),
    ("db", dict(b=None)),
    ("db", dict(db=fake_tensor_arg((1, 1, 3, 1)))),
    ("partial", dict(partial=None)),
    ("partial", dict(partial=fake_tensor_arg((1, 1, 1, 3), "float16"))),
    ("partial", dict(partial=fake_tensor_arg((1, 1, 1000, 3)))),
    ("partial", dict(partial=fake_tensor_arg((1, 1, 1, 3), strides=(6, 6, 6, 2)))),
    ("dim", dict(dim=7)),
    ("act", dict(act="")),
    ("clamp", dict(clamp=float("nan"))),
]


@pytest.mark.parametrize("name, changes", FORWARD_BAD)
def test_cuda_forward_bad_arguments_name_them(cuda_extension, name, changes):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        cuda_extension.bias_act_forward(**_forward_args(**changes))


@pytest.mark.parametrize("name, changes", BACKWARD_BAD)
def test_cuda_backward_bad_arguments_name_them(cuda_extension, name, changes):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        cuda_extension.bias_act_backward(**_backward_args(**changes))


def test_cuda_db_splits_depend_on_the_layout_only(cuda_extension):
    C = cuda_extension
    nchw = fake_tensor_arg((4, 256, 64, 64))
    nhwc = fake_tensor_arg((4, 256, 64, 64), strides=(256 * 64 * 64, 1, 64 * 256, 256))
    # NCHW: a block per channel, 4 row splits fill 1024 blocks; channels_last: 4 blocks of 64
    # channel lanes, 256 splits.
    assert (C.bias_act_db_splits(nchw, 1), C.bias_act_db_splits(nhwc, 1)) == (4, 256)
    assert C.bias_act_db_splits(fake_tensor_arg((0, 3, 4, 5)), 1) == 1
    with pytest.raises(ValueError, match="^dim"):
        C.bias_act_db_splits(nchw, 4)


@pytest.mark.parametrize("entry, args", [("bias_act_forward", _forward_args), ("bias_act_backward", _backward_args)])
def test_cuda_call_without_device_raises(cuda_extension, entry, args):
    C = cuda_extension
    if C.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        getattr(C, entry)(**args())


def _poisoned_view(shape, dtype, kind):
    """A NaN tensor of `shape` laid out as `kind`, and the buffer it lives in: "sliced" is a
    view with no unit stride inside a larger NaN buffer, to catch writes outside the view."""
    if kind == "sliced":
        big = torch.full((*shape[:-1], 2 * shape[-1] + 1), float("nan"), dtype=dtype, device="cuda")
        return big[..., 1::2], big
    t = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    if kind == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t, t


def _assert_only_view_written(view, buffer):
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside.as_strided(view.shape, view.stride(), view.storage_offset() - buffer.storage_offset()).fill_(False)
    assert buffer[outside].isnan().all(), "a write landed outside the output view"


# (shape, dim): odd sizes; the bias on a row axis and on the column axis of either layout,
# a channel count above gridDim.y's limit, more channels than one block's 64 lanes, >4 axes.
CUDA_SHAPES = [((3, 7, 5, 9), 1), ((2, 67, 3, 5), 1), ((1, 3, 33, 65), 3), ((5, 130), 1), ((4, 5, 3, 2), 2),
               ((70000, 3), 0), ((2, 3, 2, 4, 5), 2), ((7,), 0)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dim", CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_layout, out_layout", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                                  ("sliced", "contiguous"), ("contiguous", "sliced")])
@pytest.mark.parametrize("act, clamp", [("lrelu", 0.9), ("swish", None), ("linear", None), ("tanh", 1.1)])
def test_cuda_kernels_match_reference(shape, dim, dtype, x_layout, out_layout, act, clamp, generator):
    """Both kernels into NaN-poisoned outputs (a strided one inside a NaN buffer), db through
    either reduction, against the float64 reference."""
    if "channels_last" in (x_layout, out_layout) and len(shape) != 4:
        pytest.skip("channels_last needs 4 axes")
    x, b = _inputs(shape, dim, x_layout, "cuda", dtype, generator)
    args = (x, b, act, None, None, clamp, dim)
    y, y_buffer = _poisoned_view(shape, dtype, out_layout)
    BIAS_ACT.implementations["cuda"].run(*args, out=y)
    expected = bias_act_reference(x.double(), b.double(), act, None, None, clamp, dim)
    _, detail = mismatch(y, expected)
    assert not detail, f"forward: {detail}"
    _assert_only_view_written(y, y_buffer)

    dy = random_tensor(shape, "sliced", "cuda", dtype, generator)
    source = parse_params(x, b, act, None, None, clamp, dim).derivative_source(dtype)
    backward_args = (dy, x if source == "x" else None, b, y if source == "y" else None, act, None, None, clamp, dim)
    dx, dx_buffer = _poisoned_view(shape, dtype, out_layout)
    db = torch.full((shape[dim],), float("nan"), dtype=dtype, device="cuda")
    BIAS_ACT_BACKWARD.implementations["cuda"].run(*backward_args, out=(dx, db))
    # The reference in the same dtype: which of x and y it reads depends on the dtype.
    expected_dx, expected_db = BIAS_ACT_BACKWARD.reference(*backward_args)
    _, detail = mismatch(dx, expected_dx)
    assert not detail, f"dx: {detail}"
    _assert_only_view_written(dx, dx_buffer)
    # db sums up to 70000 float32 terms in another order: allow for that next to the rounding.
    error = (db.double() - expected_db.double()).abs()
    rtol, atol = TOLERANCES[dtype]
    allowed = rtol * expected_db.double().abs() + 1e-4 * reduce_to_bias(expected_dx.double().abs(), dim) + atol
    assert (error <= allowed).all(), f"db: max error {error.max().item():.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("with_bias", [True, False])
def test_cuda_empty_input_zeroes_db(with_bias, generator):
    x = torch.randn(0, 4, 3, device="cuda", requires_grad=True)
    b = torch.randn(4, device="cuda", requires_grad=True) if with_bias else None
    with fastgen.use_backend("cuda"):
        bias_act(x, b, "lrelu", dim=1).sum().backward()
    assert x.grad.shape == x.shape
    if with_bias:
        assert torch.equal(b.grad, torch.zeros_like(b))
