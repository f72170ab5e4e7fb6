"""trms2d (channel RMSNorm): every implementation against the float64 reference, gradients, errors."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastgen
from conftest import CPU, DEVICES_AND_BACKENDS, DTYPES, LAYOUTS, clear_error_test, fake_tensor_arg
from fastgen.check import mismatch
from fastgen.ops.registry import random_tensor
from test_fuzz import trms2d_gradient_terms
from fastgen.ops.rms_norm_2d import (
    TRMS2D,
    TRMS2D_BACKWARD,
    trms2d,
    trms2d_backward_reference,
    trms2d_reference,
)


def _problem(device, dtype, shape, layout, affine, generator):
    x = random_tensor(shape, layout, device, dtype, generator)
    weight, bias = (random_tensor(shape[1:2], "contiguous", device, dtype, generator) if present else None
                    for present in affine)
    return x, weight, bias


def _assert_matches_reference(op, reference, args, backend):
    """The backend's implementation, writing into NaN-poisoned outputs, against float64."""
    out = op.allocate_output(*args)
    for tensor in out if isinstance(out, tuple) else (out,):
        tensor.fill_(float("nan"))
    op.implementations[backend].run(*args, out=out)
    upcast = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
    expected = reference(*upcast)
    if op is TRMS2D_BACKWARD:
        # dx cancels where one channel dominates the mean square (always at C = 1, where
        # dx = g r eps / (x^2 + eps)): the op states its precision by the terms' sizes.
        grad, x, weight, bias, eps = upcast
        terms = trms2d_gradient_terms((x, weight, bias, eps), lambda: [grad], {})
        triples = zip(out, expected, (terms["x"], terms["weight"], terms["bias"]))
    else:
        triples = [(out, expected, None)]
    for actual, wanted, magnitude in triples:
        _, detail = mismatch(actual, wanted, magnitude=magnitude)
        assert not detail, detail


@st.composite
def problems(draw):
    shape = (draw(st.integers(1, 2)), draw(st.sampled_from([1, 3, 16, 37, 130])),
             draw(st.integers(1, 5)), draw(st.integers(1, 9)))
    affine = (draw(st.booleans()), draw(st.booleans()))
    return shape, draw(st.sampled_from(LAYOUTS)), affine, draw(st.sampled_from(DTYPES))


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("op, reference", [(TRMS2D, trms2d_reference), (TRMS2D_BACKWARD, trms2d_backward_reference)],
                         ids=["forward", "backward"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems(), eps=st.sampled_from([1e-5, 1e-2]))
def test_kernels_match_reference(device, backend, op, reference, problem, eps, generator):
    shape, layout, affine, dtype = problem
    x, weight, bias = _problem(device, dtype, shape, layout, affine, generator)
    args = (x, weight, bias, eps)
    if op is TRMS2D_BACKWARD:
        args = (random_tensor(shape, layout, device, dtype, generator), *args)
    _assert_matches_reference(op, reference, args, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("op, reference", [(TRMS2D, trms2d_reference), (TRMS2D_BACKWARD, trms2d_backward_reference)],
                         ids=["forward", "backward"])
@pytest.mark.parametrize("shape, layout", [((3, 512, 37, 29), "contiguous"), ((2, 1024, 9, 16), "channels_last"),
                                           ((1, 5, 130, 3), "sliced"), ((2, 128, 1, 1), "contiguous")])
def test_kernels_match_reference_at_dcae_sizes(backend, op, reference, shape, layout, generator):
    """Channel counts and maps beyond what the interpreter can run: many tiles per block, many
    channels per warp, pixel counts that leave every tile ragged."""
    device = torch.device("cuda")
    for dtype in DTYPES:
        args = (*_problem(device, dtype, shape, layout, (True, True), generator), 1e-5)
        if op is TRMS2D_BACKWARD:
            args = (random_tensor(shape, layout, device, dtype, generator), *args)
        _assert_matches_reference(op, reference, args, backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_matches_the_diffusers_formulation(backend, generator):
    """DC-AE's norm: diffusers' RMSNorm (fp32 mean square, eps inside the root, weight then
    bias) over channels moved last, in float32 where rounding order does not matter."""
    x = torch.randn(2, 24, 5, 6, generator=generator)
    weight, bias = torch.randn(24, generator=generator), torch.randn(24, generator=generator)
    h = x.movedim(1, -1)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = (h * weight + bias).movedim(-1, 1)
    with fastgen.use_backend(backend):
        torch.testing.assert_close(trms2d(x, weight, bias), expected)


def test_output_keeps_channels_last(generator):
    x = random_tensor((2, 8, 3, 5), "channels_last", CPU, torch.float32, generator)
    with fastgen.use_backend("triton"):
        y = trms2d(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


def test_custom_op_gradients_gradcheck(generator):
    """The registered autograd (the analytic backward op) against finite differences in float64."""
    x, weight, bias = (t.requires_grad_() for t in _problem(CPU, torch.float64, (2, 5, 3, 2), "sliced",
                                                                (True, True), generator))
    with fastgen.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda *a: trms2d(*a, eps=1e-3), (x, weight, bias))


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, affine", [("contiguous", (True, True)), ("channels_last", (True, False)),
                                            ("sliced", (False, True))])
def test_autograd_matches_reference_autograd(device, backend, dtype, layout, affine, generator):
    """The custom op's gradients against autograd through the eager reference in float64."""
    shape = (2, 33, 3, 7)
    inputs = [t for t in _problem(device, dtype, shape, layout, affine, generator) if t is not None]
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    for t in inputs:
        t.requires_grad_()
    weight, bias = (inputs[1] if affine[0] else None), (inputs[-1] if affine[1] else None)
    weight64, bias64 = (inputs64[1] if affine[0] else None), (inputs64[-1] if affine[1] else None)
    grad = torch.randn(shape, generator=generator).to(device, dtype)
    with fastgen.use_backend(backend):
        trms2d(inputs[0], weight, bias).backward(grad)
    trms2d_reference(inputs64[0], weight64, bias64).backward(grad.double())
    for actual, expected in zip(inputs, inputs64):
        _, detail = mismatch(actual.grad, expected.grad)
        assert not detail, detail


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
def test_backward_accepts_broadcast_gradients(device, backend, generator):
    """y.sum().backward() hands the backward an expanded gradient with all strides 0."""
    x = torch.randn(1, 6, 3, 4, generator=generator).to(device).requires_grad_()
    bias = torch.randn(6, generator=generator).to(device).requires_grad_()
    with fastgen.use_backend(backend):
        trms2d(x, None, bias).sum().backward()
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 12.0))


test_bad_input_gets_a_clear_error = clear_error_test(
    [
        (lambda: trms2d_reference([1.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: trms2d(torch.ones(1, 4, 2, 2, dtype=torch.int32)), TypeError, "x must be float32"),
        (lambda: trms2d(torch.ones(4, 2, 2)), ValueError, "x must be 4-D"),
        (lambda: trms2d(torch.ones(1, 0, 2, 2)), ValueError, "x must have at least one channel"),
        (lambda: trms2d(torch.ones(1, 4, 2, 2), torch.ones(3)), ValueError, r"weight must have shape \(C,\)"),
        (lambda: trms2d(torch.ones(1, 4, 2, 2), None, torch.ones(4, dtype=torch.float16)), TypeError, "bias dtype"),
        (lambda: trms2d(torch.ones(1, 4, 2, 2), torch.ones(4, device="meta")), ValueError, "weight is on meta"),
        (lambda: trms2d(torch.ones(1, 4, 2, 2), eps=0.0), ValueError, "eps must be a finite number > 0"),
        (lambda: torch.ops.fastgen.trms2d_backward(torch.ones(1, 4, 2, 3), torch.ones(1, 4, 2, 2)), ValueError,
         "grad must have shape of x"),
    ],
)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_weight_gradient_is_deterministic(backend, generator):
    x = torch.randn(4, 256, 64, 64, generator=generator).cuda()
    grad = torch.randn(x.shape, generator=generator).cuda()
    weight = torch.randn(256, generator=generator).cuda()
    with fastgen.use_backend(backend):
        runs = [torch.ops.fastgen.trms2d_backward(grad, x, weight) for _ in range(3)]
    for dx, dweight, dbias in runs[1:]:
        assert torch.equal(dweight, runs[0][1]) and torch.equal(dbias, runs[0][2]) and torch.equal(dx, runs[0][0])


def _forward_args(x=(2, 8, 4, 4), weight=(1, 8, 1, 1), bias=(1, 8, 1, 1), y=(2, 8, 4, 4), eps=1e-5):
    return (fake_tensor_arg(x), None if weight is None else fake_tensor_arg(weight),
            None if bias is None else fake_tensor_arg(bias), fake_tensor_arg(y), eps, 0)


@pytest.mark.parametrize("sms, x, blocks", [
    (2, (2, 8, 4, 4), 2),  # a tile per image
    (2, (2, 8, 64, 64), 4),  # 64 tiles: two blocks per SM
    (132, (2, 8, 64, 64), 64),  # fewer tiles than 2 * 132 blocks
    (2, (0, 8, 4, 4), 1),  # the one row of partial sums an empty batch still writes
])
def test_cuda_backward_blocks_follow_the_launch_plan(emulated_extension, monkeypatch, sms, x, blocks):
    monkeypatch.setenv("FASTGEN_EMULATED_SMS", str(sms))
    assert emulated_extension.trms2d_backward_blocks(fake_tensor_arg(x)) == blocks


def _backward_args(grad=(2, 8, 4, 4), x=(2, 8, 4, 4), dx=(2, 8, 4, 4), partial=(3, 2, 8, 1), eps=1e-5,
                   partial_strides=None):
    return (fake_tensor_arg(grad), fake_tensor_arg(x), fake_tensor_arg((1, 8, 1, 1)), fake_tensor_arg(dx),
            fake_tensor_arg(partial, strides=partial_strides), eps, 0)


@pytest.mark.parametrize("entry_point, args, name", [
    ("trms2d_forward", _forward_args(x=(2, 0, 4, 4), y=(2, 0, 4, 4)), "x"),
    ("trms2d_forward", _forward_args(weight=(1, 7, 1, 1)), "weight"),
    ("trms2d_forward", _forward_args(bias=(8, 1, 1, 1)), "bias"),
    ("trms2d_forward", _forward_args(y=(2, 8, 4, 5)), "y"),
    ("trms2d_forward", _forward_args(eps=0.0), "eps"),
    ("trms2d_forward", _forward_args(eps=math.inf), "eps"),
    ("trms2d_forward", (*_forward_args()[:3], fake_tensor_arg((2, 8, 4, 4), "float16"), 1e-5, 0), "y"),
    ("trms2d_forward", (*_forward_args()[:3], fake_tensor_arg((2, 8, 4, 4), strides=(128, 0, 4, 1)), 1e-5, 0), "y"),
    ("trms2d_backward", _backward_args(grad=(2, 8, 4, 3)), "grad"),
    ("trms2d_backward", _backward_args(dx=(1, 8, 4, 4)), "dx"),
    ("trms2d_backward", _backward_args(partial=(3, 2, 9, 1)), "partial"),
    ("trms2d_backward", _backward_args(partial=(0, 2, 8, 1)), "partial"),
    ("trms2d_backward", _backward_args(partial=(3, 2, 8, 1), partial_strides=(16, 1, 2, 1)), "partial"),
    ("trms2d_backward", _backward_args()[:4] + (fake_tensor_arg((3, 2, 8, 1), "bfloat16"), 1e-5, 0), "partial"),
])
def test_cuda_entry_points_reject_bad_arguments_naming_them(cuda_extension, entry_point, args, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        getattr(cuda_extension, entry_point)(*args)


@pytest.mark.parametrize("entry_point, args", [("trms2d_forward", _forward_args()),
                                               ("trms2d_backward", _backward_args())])
def test_cuda_entry_points_need_a_device(cuda_extension, entry_point, args):
    if cuda_extension.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        getattr(cuda_extension, entry_point)(*args)
