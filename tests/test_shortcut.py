"""DC-AE shortcut ops: every implementation against the float64 reference, gradients, errors."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastgen
from conftest import CPU, DEVICES_AND_BACKENDS, DTYPES, LAYOUTS, clear_error_test
from fastgen.check import mismatch
from fastgen.ops.registry import random_tensor
from fastgen.ops.shortcut import (
    CHANNEL_DUP_PIXEL_SHUFFLE,
    PIXEL_UNSHUFFLE_CHANNEL_AVG,
    channel_dup_pixel_shuffle,
    channel_dup_pixel_shuffle_reference,
    pixel_unshuffle_channel_avg,
    pixel_unshuffle_channel_avg_reference,
)


@st.composite
def shortcut_problem(draw, direction):
    """A valid (x shape, factor, out_channels) for `direction` ("down" or "up"), with odd sizes."""
    factor = draw(st.sampled_from([1, 2, 3, 4]))
    batch = draw(st.integers(1, 3))
    low_h, low_w = draw(st.integers(1, 5)), draw(st.integers(1, 7))
    ratio = draw(st.sampled_from([1, 2, 3, 4, 8]))  # channels summed (down) or repeated (up)
    if direction == "down":
        out_channels = draw(st.integers(1, 6))
        channels_times_ff = out_channels * ratio
        # C*f*f = O*g needs f*f | O*g; scale O up until it holds.
        while channels_times_ff % (factor * factor):
            out_channels += 1
            channels_times_ff = out_channels * ratio
        shape = (batch, channels_times_ff // (factor * factor), low_h * factor, low_w * factor)
    else:
        channels = draw(st.integers(1, 6))
        total = channels * ratio
        while total % (factor * factor):
            channels += 1
            total = channels * ratio
        out_channels = total // (factor * factor)
        shape = (batch, channels, low_h, low_w)
    return shape, factor, out_channels


def _assert_matches_reference(op, reference, args, backend):
    out = op.allocate_output(*args)
    out.fill_(float("nan"))
    op.implementations[backend].run(*args, out=out)
    upcast = tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)
    error, detail = mismatch(out, reference(*upcast))
    assert not detail, detail


_OPS = {
    "down": (PIXEL_UNSHUFFLE_CHANNEL_AVG, pixel_unshuffle_channel_avg_reference),
    "up": (CHANNEL_DUP_PIXEL_SHUFFLE, channel_dup_pixel_shuffle_reference),
}


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("direction", ["down", "up"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_forward_matches_reference(device, backend, direction, data, generator):
    op, reference = _OPS[direction]
    x_shape, factor, out_channels = data.draw(shortcut_problem(direction))
    dtype = data.draw(st.sampled_from(DTYPES))
    layout = data.draw(st.sampled_from(LAYOUTS))
    x = random_tensor(x_shape, layout, device, dtype, generator)
    out_shape = op.allocate_output(x, factor, out_channels).shape
    residual = None
    if data.draw(st.booleans()):
        residual = random_tensor(tuple(out_shape), data.draw(st.sampled_from(LAYOUTS)), device, dtype, generator)
    scale = data.draw(st.sampled_from([None, 0.5, -3.0]))
    _assert_matches_reference(op, reference, (x, factor, out_channels, residual, scale), backend)


@pytest.mark.parametrize("direction", ["down", "up"])
def test_output_keeps_channels_last(direction, generator):
    op, _ = _OPS[direction]
    shape = (2, 8, 4, 6)
    x = random_tensor(shape, "channels_last", CPU, torch.float32, generator)
    with fastgen.use_backend("triton"):
        y = getattr(torch.ops.fastgen, op.name)(x, 2, 8)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_shortcut_ops_match_the_dcae_formulation(backend, generator):
    """The op as DC-AE's layers compute it: pixel_unshuffle + unflatten + mean, and
    repeat_interleave + pixel_shuffle, with the conv branch added."""
    x = torch.randn(2, 16, 8, 8, generator=generator)
    branch = torch.randn(2, 32, 4, 4, generator=generator)
    expected_down = F.pixel_unshuffle(x, 2).unflatten(1, (32, 2)).mean(2) + branch
    latent = torch.randn(2, 4, 4, 4, generator=generator)
    expected_up = F.pixel_shuffle(latent.repeat_interleave(8, dim=1), 2)
    with fastgen.use_backend(backend):
        torch.testing.assert_close(pixel_unshuffle_channel_avg(x, 2, 32, branch), expected_down)
        torch.testing.assert_close(channel_dup_pixel_shuffle(latent, 2, 8), expected_up)


def test_ops_are_adjoint(generator):
    """<A x, y> == <x, A^T y> with A = sum-unshuffle and A^T = dup-shuffle: the identity the
    backward passes rely on."""
    x = torch.randn(2, 6, 8, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(2, 8, 4, 2, generator=generator, dtype=torch.float64)
    ax = pixel_unshuffle_channel_avg(x, 2, 8, scale=1.0)
    aty = channel_dup_pixel_shuffle(y, 2, 6)
    torch.testing.assert_close((ax * y).sum(), (x * aty).sum())


@pytest.mark.parametrize("direction", ["down", "up"])
def test_custom_op_gradients_gradcheck(direction, generator):
    """The registered autograd (each op's backward is the other op) against finite differences,
    first and second order, in float64."""
    op, _ = _OPS[direction]
    custom_op = getattr(torch.ops.fastgen, op.name)
    x_shape, out_channels = ((1, 3, 4, 6), 6) if direction == "down" else ((1, 6, 2, 3), 3)
    x = torch.randn(*x_shape, generator=generator, dtype=torch.float64, requires_grad=True)
    out_shape = op.allocate_output(x, 2, out_channels).shape
    residual = torch.randn(*out_shape, generator=generator, dtype=torch.float64, requires_grad=True)
    with fastgen.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda a, r: custom_op(a, 2, out_channels, r), (x, residual))
        assert torch.autograd.gradgradcheck(lambda a, r: custom_op(a, 2, out_channels, r, 0.7), (x, residual))


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_reference(device, backend, direction, dtype, generator):
    op, reference = _OPS[direction]
    custom_op = getattr(torch.ops.fastgen, op.name)
    x_shape, factor, out_channels = ((2, 6, 6, 10), 2, 8) if direction == "down" else ((2, 8, 3, 5), 2, 6)
    x = random_tensor(x_shape, "sliced", device, dtype, generator).requires_grad_()
    out_shape = tuple(op.allocate_output(x, factor, out_channels).shape)
    residual = random_tensor(out_shape, "channels_last", device, dtype, generator).requires_grad_()
    with fastgen.use_backend(backend):
        out = custom_op(x, factor, out_channels, residual)
    grad_out = torch.randn(out_shape, generator=generator).to(device, dtype)
    out.backward(grad_out)
    x64 = x.detach().double().requires_grad_()
    residual64 = residual.detach().double().requires_grad_()
    reference(x64, factor, out_channels, residual64).backward(grad_out.double())
    for actual, expected in ((x.grad, x64.grad), (residual.grad, residual64.grad)):
        _, detail = mismatch(actual, expected)
        assert not detail, detail


def test_backward_accepts_broadcast_gradients(generator):
    """y.sum().backward() hands the backward an expanded gradient with all strides 0."""
    x = torch.randn(1, 4, 4, 4, generator=generator, requires_grad=True)
    with fastgen.use_backend("triton"):
        pixel_unshuffle_channel_avg(x, 2, 8).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5))


test_bad_input_gets_a_clear_error = clear_error_test(
    [
        (lambda: pixel_unshuffle_channel_avg(torch.ones(1, 4, 4, 4, dtype=torch.int32), 2, 8), TypeError, "x must be float"),
        (lambda: pixel_unshuffle_channel_avg(torch.ones(4, 4, 4), 2, 8), ValueError, "x must be 4-D"),
        (lambda: pixel_unshuffle_channel_avg(torch.ones(1, 4, 5, 4), 2, 8), ValueError, "H=5 and W=4 must be divisible by factor=2"),
        (lambda: pixel_unshuffle_channel_avg(torch.ones(1, 4, 4, 4), 2, 6), ValueError, "multiple of out_channels=6"),
        (lambda: pixel_unshuffle_channel_avg(torch.ones(1, 4, 4, 4), 0, 8), ValueError, "factor must be >= 1"),
        (lambda: pixel_unshuffle_channel_avg(torch.ones(1, 4, 4, 4), 2, 8, torch.ones(1, 8, 4, 4)), ValueError,
         "residual must have the output shape"),
        (lambda: pixel_unshuffle_channel_avg(torch.ones(1, 4, 4, 4), 2, 8, torch.ones(1, 8, 2, 2, dtype=torch.float16)),
         TypeError, "residual dtype"),
        (lambda: pixel_unshuffle_channel_avg(torch.ones(1, 4, 4, 4), 2, 8, torch.ones(1, 8, 2, 2, device="meta")),
         ValueError, "residual is on meta"),
        (lambda: channel_dup_pixel_shuffle(torch.ones(1, 3, 4, 4), 2, 5), ValueError, "must be a multiple of C=3"),
        (lambda: channel_dup_pixel_shuffle(torch.ones(1, 3, 4, 4), 1, 0), ValueError, "out_channels must be >= 1"),
    ],
)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_replays(backend, generator):
    x = torch.randn(2, 32, 64, 64, generator=generator).cuda()
    residual = torch.randn(2, 64, 32, 32, generator=generator).cuda()
    with fastgen.use_backend(backend):
        pixel_unshuffle_channel_avg(x, 2, 64, residual)  # compile / load outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = pixel_unshuffle_channel_avg(x, 2, 64, residual)
    x.copy_(torch.randn(x.shape, generator=generator))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, pixel_unshuffle_channel_avg_reference(x, 2, 64, residual))


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
def test_a_thousand_term_backward_sum_is_as_accurate_as_the_reference(device, backend, generator):
    """The x gradient of a 63-channel duplication of one channel at factor 4 sums 1008 terms per
    element: within twice the float32 reference's own error, as `fastgen check` demands (the
    CUDA kernel's single float32 running sum was 5e-5 off, 4.7 times the reference's 1.2e-5)."""
    x = torch.randn(2, 1, 12, 20, generator=generator).to(device).requires_grad_()
    grad = torch.randn(2, 63, 48, 80, generator=generator).to(device)
    with fastgen.use_backend(backend):
        channel_dup_pixel_shuffle(x, 4, 63).backward(grad)
    x32 = x.detach().cpu().requires_grad_()
    x64 = x.detach().cpu().double().requires_grad_()
    channel_dup_pixel_shuffle_reference(x32, 4, 63).backward(grad.cpu())
    channel_dup_pixel_shuffle_reference(x64, 4, 63).backward(grad.cpu().double())
    _, detail = mismatch(x.grad, x64.grad, same_dtype_reference=x32.grad)
    assert not detail, detail
