"""upfirdn2d: the Triton kernel against the float64 reference, the reference against the
definition, first and second gradients, errors."""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastgen
from conftest import (CPU, DEVICES_AND_BACKENDS, DTYPES, LAYOUTS, assert_compiles_as_one_graph,
                      clear_error_test, fake_tensor_arg)
from fastgen.check import mismatch
from fastgen.ops.registry import random_tensor
from fastgen.ops.upfirdn2d import UPFIRDN2D, output_size, upfirdn2d, upfirdn2d_real_samples, upfirdn2d_reference


def _filter(shape, generator, device=CPU, dtype=torch.float32):
    return None if shape is None else torch.randn(shape, generator=generator).to(device, dtype)


def _assert_matches_reference(x, f, up, down, padding, flip_filter, gain, backend="triton"):
    args = (x, f, up, down, padding, flip_filter, gain)
    out = UPFIRDN2D.allocate_output(*args)
    out.fill_(float("nan"))
    UPFIRDN2D.implementations[backend].run(*args, out=out)
    expected = upfirdn2d_reference(x.double(), None if f is None else f.double(), up, down, padding, flip_filter, gain)
    _, detail = mismatch(out, expected)
    assert not detail, detail


@st.composite
def problems(draw):
    """(x shape, filter shape or None, up, down, padding) with a non-empty output."""
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 5)), draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    filter_shape = draw(st.sampled_from([None, (1,), (2,), (4,), (5,), (12,), (3, 3), (2, 5), (4, 1)]))
    factor = st.integers(1, 3)
    up = draw(st.one_of(factor, st.tuples(factor, factor).map(list)))
    down = draw(st.one_of(factor, st.tuples(factor, factor).map(list)))
    padding = draw(st.lists(st.integers(-2, 7), min_size=4, max_size=4))
    f = None if filter_shape is None else torch.empty(filter_shape)
    try:
        output_size(torch.empty(shape), f, up, down, padding)
    except ValueError:
        assume(False)
    return shape, filter_shape, up, down, padding


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=problems(), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       flip_filter=st.booleans(), gain=st.sampled_from([1.0, 4.0, -0.5]))
def test_forward_matches_reference(device, backend, problem, dtype, layout, flip_filter, gain, generator):
    shape, filter_shape, up, down, padding = problem
    x = random_tensor(shape, layout, device, dtype, generator)
    _assert_matches_reference(x, _filter(filter_shape, generator, device), up, down, padding, flip_filter, gain,
                              backend)


def _by_definition(x, f, up, down, padding, flip_filter, gain):
    """The module docstring's four steps with explicit loops, for tiny float64 inputs."""
    (upx, upy), (downx, downy) = [(v, v) if isinstance(v, int) else v for v in (up, down)]
    px0, px1, py0, py1 = padding
    f2 = torch.ones(1, 1, dtype=x.dtype) if f is None else (torch.outer(f, f) if f.dim() == 1 else f)
    w = f2 if flip_filter else f2.flip(0, 1)
    fh, fw = w.shape
    batch, channels, height, width = x.shape
    padded_h, padded_w = height * upy + py0 + py1, width * upx + px0 + px1
    p = torch.zeros(batch, channels, padded_h, padded_w, dtype=x.dtype)
    for v in range(padded_h):
        for u in range(padded_w):
            sy, sx = v - py0, u - px0  # position in the upsampled image
            if sy % upy == 0 and sx % upx == 0 and 0 <= sy // upy < height and 0 <= sx // upx < width:
                p[:, :, v, u] = x[:, :, sy // upy, sx // upx]
    out = torch.zeros(batch, channels, (padded_h - fh) // downy + 1, (padded_w - fw) // downx + 1, dtype=x.dtype)
    for oy in range(out.shape[2]):
        for ox in range(out.shape[3]):
            window = p[:, :, oy * downy: oy * downy + fh, ox * downx: ox * downx + fw]
            out[:, :, oy, ox] = gain * (window * w).sum((2, 3))
    return out


@pytest.mark.parametrize(
    "filter_shape, up, down, padding, flip_filter",
    [((4,), 2, 1, [2, 1, 2, 1], False), ((3, 2), [1, 2], [2, 1], [-1, 3, 0, -2], False),
     ((5,), [3, 1], 2, [4, 2, 1, 5], True), (None, 1, [1, 2], [1, -1, 2, 0], False)],
)
def test_reference_follows_the_definition(filter_shape, up, down, padding, flip_filter, generator):
    """Checks the reference's conventions (flip, padding order, per-axis factors) against a
    loop written straight from the docstring, so the kernel is not compared with a wrong oracle."""
    x = torch.randn(1, 2, 4, 5, generator=generator, dtype=torch.float64)
    f = None if filter_shape is None else torch.randn(filter_shape, generator=generator, dtype=torch.float64)
    expected = _by_definition(x, f, up, down, padding, flip_filter, 1.5)
    torch.testing.assert_close(upfirdn2d_reference(x, f, up, down, padding, flip_filter, 1.5), expected)


@pytest.mark.parametrize("max_fused_taps", [0, 1000], ids=["two-1d-passes", "one-fused-pass"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_separable_paths_agree(max_fused_taps, layout, monkeypatch, generator):
    from fastgen.kernels import upfirdn2d as kernels

    monkeypatch.setattr(kernels, "_MAX_FUSED_TAPS", max_fused_taps)
    x = random_tensor((2, 3, 7, 6), layout, CPU, torch.float32, generator)
    f = _filter((12,), generator)
    _assert_matches_reference(x, f, [2, 1], [1, 2], [6, 5, 5, 6], False, 2.0)
    _assert_matches_reference(x, f, 2, 2, [5, 6, 6, 5], True, 1.0)


def test_argument_forms_are_stylegans(generator):
    """up / down as int or (x, y); padding as int, (px, py) or (px0, px1, py0, py1)."""
    x = torch.randn(1, 2, 5, 6, generator=generator)
    f = torch.randn(4, generator=generator)
    with fastgen.use_backend("triton"):
        torch.testing.assert_close(upfirdn2d(x, f, up=2, padding=1), upfirdn2d(x, f, up=[2, 2], padding=[1, 1, 1, 1]))
        torch.testing.assert_close(upfirdn2d(x, f, down=(2, 1), padding=(2, 1)), upfirdn2d(x, f, down=[2, 1], padding=[2, 2, 1, 1]))


def test_output_keeps_channels_last(generator):
    x = random_tensor((2, 4, 5, 6), "channels_last", CPU, torch.float32, generator)
    with fastgen.use_backend("triton"):
        y = upfirdn2d(x, torch.ones(4), up=2, padding=[2, 1, 2, 1])
    assert y.shape == (2, 4, 10, 12)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


@pytest.mark.parametrize(
    "filter_shape, up, down, padding",
    [((4,), [2, 2], [1, 1], [2, 1, 2, 1]), ((3, 2), [1, 2], [2, 1], [-1, 2, 1, 0])],
)
def test_custom_op_gradients_gradcheck(filter_shape, up, down, padding, generator):
    """First and second order, for x and the filter, in float64 through the registered autograd."""
    x = torch.randn(1, 2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    f = torch.randn(filter_shape, generator=generator, dtype=torch.float64, requires_grad=True)
    with fastgen.use_backend("reference"):
        fn = lambda a, w: upfirdn2d(a, w, up, down, padding, True, 1.5)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, f))
        assert torch.autograd.gradgradcheck(fn, (x, f))


def _gradients(backend, x, f, up, down, padding, grad_out):
    x = x.detach().requires_grad_()
    f = f.detach().requires_grad_()
    with fastgen.use_backend(backend):
        y = upfirdn2d(x, f, up, down, padding, False, 2.0)
    y.backward(grad_out)
    return y, x.grad, f.grad


def _eager_gradients(x, f, up, down, padding, grad_out):
    """(y, dx, df) of _gradients' call from float64 eager autograd through upfirdn2d_reference on
    the CPU: independent of the op's backward and of _filter_gradient, which it checks."""
    x, f = (t.detach().cpu().double().requires_grad_() for t in (x, f))
    y = upfirdn2d_reference(x, f, up, down, padding, False, 2.0)
    return (y, *torch.autograd.grad(y, (x, f), grad_out.cpu().double()))


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "filter_shape, up, down, padding",
    [((4,), 2, 1, [2, 1, 2, 1]), ((4,), 1, 2, [1, 1, 1, 1]), ((2, 3), [1, 2], [3, 1], [0, 2, -1, 1]),
     ((12,), 2, 1, [6, 5, 6, 5])],
)
def test_backward_matches_reference(device, backend, dtype, filter_shape, up, down, padding, generator):
    x = random_tensor((2, 3, 5, 6), "sliced", device, dtype, generator)
    f = _filter(filter_shape, generator, device)
    out_shape = UPFIRDN2D.allocate_output(x, f, up, down, padding).shape
    grad_out = torch.randn(out_shape, generator=generator).to(device, dtype)
    actual = _gradients(backend, x, f, up, down, padding, grad_out)
    expected = _eager_gradients(x, f, up, down, padding, grad_out)
    for name, a, e in zip(("y", "dx"), actual, expected):
        _, detail = mismatch(a, e)
        assert not detail, f"{name}: {detail}"
    # df sums B*C*out_h*out_w float32 products with cancellation: scale the tolerance to them.
    df, df_expected = actual[2].double().cpu(), expected[2]
    torch.testing.assert_close(df, df_expected, rtol=1e-4, atol=1e-5 * df_expected.abs().max().item())


def _second_order(backend, x, f):
    """An R1-like penalty: the gradient of a nonlinear loss, squared, differentiated again."""
    x = x.detach().requires_grad_()
    f = f.detach().requires_grad_()
    with fastgen.use_backend(backend):
        y = upfirdn2d(x, f, up=[1, 2], down=[2, 1], padding=[1, 2, 2, 1])
        (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        grad_x.square().sum().backward()
    return x.grad, f.grad


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
def test_second_order_through_kernels_matches_reference(device, backend, generator):
    x = torch.randn(2, 3, 5, 4, generator=generator).to(device)
    f = torch.randn(4, generator=generator).to(device)
    actual = _second_order(backend, x, f)
    expected = _second_order("reference", x.double().cpu(), f.double().cpu())
    # Unnormalised taps make these fourth-degree values reach 1e4..5e6: elements near zero
    # carry the larger ones' float32 rounding (the float32 reference failed a fixed 1e-4 in 9
    # of 2000 seeds).
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double().cpu(), e, rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max().item()))


def test_torch_compile_fullgraph(generator):
    x = torch.randn(1, 2, 5, 6, generator=generator, requires_grad=True)
    f = torch.randn(4, generator=generator)

    def layer(x):
        return torch.tanh(upfirdn2d(x, f, up=2, padding=[2, 1, 2, 1], gain=4))

    assert_compiles_as_one_graph(layer, x)


@pytest.mark.parametrize("taps", [4, 12])
@pytest.mark.parametrize("up, down", [(2, 1), (1, 2)])
def test_benchmark_padding_scales_the_side_exactly(taps, up, down):
    """The benchmark's StyleGAN upsample2d / downsample2d padding: side * up / down out."""
    from fastgen.bench.ops_upfirdn2d import _Resampling

    resampling = _Resampling(taps, up, down)
    for side in (4, 8, 64):
        x = torch.empty(1, 1, side, side, device="meta")
        size = output_size(x, resampling.filter(CPU), up, down, resampling.padding)
        assert size == (side * up // down,) * 2


_X = torch.ones(1, 1, 4, 4)


test_bad_input_gets_a_clear_error = clear_error_test(
    [
        (lambda: upfirdn2d(_X, torch.ones(2, 2, 2)), ValueError, r"f must be a non-empty 1-D .* or 2-D .* got shape \(2, 2, 2\)"),
        (lambda: upfirdn2d(_X, torch.ones(0)), ValueError, r"f must be a non-empty 1-D"),
        (lambda: upfirdn2d(_X, [1.0, 2.0]), TypeError, "f must be a torch.Tensor or None, got list"),
        (lambda: upfirdn2d(_X, torch.ones(3, dtype=torch.int64)), TypeError, "f must be a floating-point tensor"),
        (lambda: upfirdn2d(_X, torch.ones(3, device="meta")), ValueError, "f is on meta but x is on cpu"),
        (lambda: upfirdn2d(_X, None, up=0), ValueError, "up factors must be >= 1, got 0"),
        (lambda: upfirdn2d(_X, None, down=[1, -2]), ValueError, r"down factors must be >= 1, got \[1, -2\]"),
        (lambda: upfirdn2d(_X, None, up=1.5), TypeError, "up must be an int or a sequence of 2 ints, got 1.5"),
        (lambda: upfirdn2d(_X, None, padding=[1, 2, 3]), TypeError, "padding must be an int or a sequence of 2 ints or 4 ints"),
        (lambda: upfirdn2d(_X, torch.ones(4), padding=[-1, 0, 0, 0]), ValueError,
         r"leaves an empty output: the upsampled, padded image is 4 x 3, smaller than the 4 x 4 filter"),
        (lambda: upfirdn2d(_X, None, gain=float("inf")), ValueError, "gain must be a finite number, got inf"),
        (lambda: upfirdn2d(torch.ones(4, 4), None), ValueError, r"x must be 4-D \(B, C, H, W\)"),
        (lambda: upfirdn2d(torch.ones(1, 1, 4, 4, dtype=torch.int32), None), TypeError, "x must be float32"),
    ],
)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stylegan_layer_shapes_on_cuda(backend, layout, dtype, generator):
    """Real sizes compile and match: StyleGAN2's up / down resampling and a 12-tap filter."""
    x = random_tensor((2, 64, 128, 128), layout, "cuda", dtype, generator)
    for taps, up, down, padding in [(4, 2, 1, [2, 1, 2, 1]), (4, 1, 2, [1, 1, 1, 1]), (12, 2, 2, [5, 6, 5, 6])]:
        _assert_matches_reference(x, _filter((taps,), generator, "cuda"), up, down, padding, False, float(up * up),
                                  backend)


def test_backward_accepts_broadcast_gradients(generator):
    """y.sum().backward() hands the backward an expanded gradient with all strides 0."""
    x = torch.randn(1, 2, 4, 5, generator=generator, requires_grad=True)
    f = torch.randn(4, generator=generator)
    with fastgen.use_backend("triton"):
        upfirdn2d(x, f, down=2, padding=1).sum().backward()
    x64 = x.detach().double().requires_grad_()
    upfirdn2d_reference(x64, f.double(), 2 * [1], 2 * [2], 4 * [1]).sum().backward()
    _, detail = mismatch(x.grad, x64.grad)
    assert not detail, detail


def _assert_matches_with_non_finite_in_place(actual, expected, what):
    """NaN exactly where `expected` has NaN, its infinities (rounded to actual's dtype) with
    their signs, and the rest within `mismatch`'s tolerance."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    rounded = expected.to(actual.dtype)
    assert torch.equal(actual.isnan(), rounded.isnan()), f"{what}: NaN at {actual.isnan().nonzero().tolist()}, " \
                                                         f"expected at {rounded.isnan().nonzero().tolist()}"
    infinite = rounded.isinf()
    assert torch.equal(actual.isinf(), infinite) and torch.equal(actual[infinite], rounded[infinite]), what
    finite = rounded.isfinite()
    _, detail = mismatch(actual.where(finite, 0), expected.where(finite, 0))
    assert not detail, f"{what}: {detail}"


def _with_special_taps(f, value, count, generator):
    """A copy of f with `count` random taps set to `value` times a random sign."""
    flat = f.detach().clone().flatten()
    where = torch.randperm(flat.numel(), generator=generator)[:count]
    flat[where] = value * torch.randn(len(where), generator=generator).sign().to(flat.dtype)
    return flat.view(f.shape)


NON_FINITE_TAP_PROBLEMS = [
    ((4,), [2, 2], [1, 1], [2, 1, 2, 1]),  # separable, one fused pass
    ((4,), [1, 1], [2, 2], [1, 1, 1, 1]),
    ((12,), [2, 2], [2, 2], [5, 6, 6, 5]),  # separable, two 1-D passes in Triton
    ((5,), [1, 1], [1, 1], [7, 6, 6, 7]),  # outputs whose taps all land in the padding
    ((3, 5), [1, 3], [2, 1], [-1, 2, 0, -2]),  # 2-D, cropped
    ((3, 3), [2, 2], [1, 1], [4, 1, 3, 2]),
]


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("filter_shape, up, down, padding", NON_FINITE_TAP_PROBLEMS, ids=str)
def test_non_finite_taps_reach_exactly_the_outputs_that_weight_x_by_them(device, backend, value, filter_shape, up,
                                                                         down, padding, generator):
    """The module docstring's contract: no tap meets a zero of the upsampling or the padding, in
    the forward and in the x gradient (the op on the adjoint problem), against
    upfirdn2d_real_samples in float64; the filter gradient is the reference's."""
    x = random_tensor((2, 3, 5, 6), "contiguous", device, torch.float32, generator)
    f = _with_special_taps(_filter(filter_shape, generator, device), value, 3, generator)
    out_shape = UPFIRDN2D.allocate_output(x, f, up, down, padding).shape
    grad_out = torch.randn(out_shape, generator=generator).to(device)
    actual = _gradients(backend, x, f, up, down, padding, grad_out)
    x64, f64 = x.double().requires_grad_(), f.double().requires_grad_()
    y64 = upfirdn2d_real_samples(x64, f64, up, down, padding, False, 2.0)
    y64.backward(grad_out.double())
    _, _, df64 = _eager_gradients(x, f, up, down, padding, grad_out)
    for name, a, e in zip(("y", "dx", "df"), actual, (y64, x64.grad, df64)):
        _assert_matches_with_non_finite_in_place(a, e, name)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("filter_shape, up, down, padding", NON_FINITE_TAP_PROBLEMS, ids=str)
def test_real_samples_oracle_is_the_reference_but_for_products_with_inserted_zeros(value, filter_shape, up, down,
                                                                                   padding, generator):
    """Finite taps: the reference and its gradients, to rounding. Non-finite taps: NaN only
    where the reference has NaN, and each infinity the reference's or where it has NaN (its
    extra products are with zeros), so the contract hides no NaN but the zeros' own."""
    x = torch.randn(2, 3, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    f = torch.randn(filter_shape, generator=generator, dtype=torch.float64, requires_grad=True)
    y = upfirdn2d_real_samples(x, f, up, down, padding, True, -1.5)
    y_reference = upfirdn2d_reference(x, f, up, down, padding, True, -1.5)
    torch.testing.assert_close(y, y_reference)
    grad_out = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(y, (x, f), grad_out),
                               torch.autograd.grad(y_reference, (x, f), grad_out))
    f = _with_special_taps(f, value, 3, generator)
    y = upfirdn2d_real_samples(x.detach(), f, up, down, padding, True, -1.5)
    y_reference = upfirdn2d_reference(x.detach(), f, up, down, padding, True, -1.5)
    assert not (y.isnan() & ~y_reference.isnan()).any()
    infinite = y.isinf()
    assert (y[infinite] == y_reference[infinite]).logical_or(y_reference[infinite].isnan()).all()


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("filter_shape, up, down, padding", [((4,), 2, 1, [2, 1, 2, 1]), ((12,), 2, 2, [5, 6, 6, 5])],
                         ids=str)
def test_filter_gradient_of_an_infinite_x_sums_the_reference_passes(device, backend, filter_shape, up, down, padding,
                                                                    generator):
    """A separable tap's gradient sums the products of each of the reference's two 1-D passes:
    their infinities can share a sign where those of the 2-D filter's products f[i] * f[j]
    mix (that sum was NaN where the reference's is an infinity in about half of these draws)."""
    for _ in range(6):
        x = random_tensor((2, 3, 5, 6), "contiguous", device, torch.float32, generator)
        x.view(-1)[torch.randint(x.numel(), (1,), generator=generator)] = float("inf")
        f = _filter(filter_shape, generator, device)
        grad_out = torch.randn(UPFIRDN2D.allocate_output(x, f, up, down, padding).shape, generator=generator)
        actual = _gradients(backend, x, f, up, down, padding, grad_out.to(device))
        expected = _eager_gradients(x, f, up, down, padding, grad_out)
        for name, a, e in zip(("y", "dx", "df"), actual, expected):
            _assert_matches_with_non_finite_in_place(a, e, name)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_filter_gradient_under_16_bit_x_has_float32_accuracy(device, backend, dtype, generator):
    """The filter's gradient has f's dtype: float32 under 16-bit activations, within float32's
    tolerance with nothing to widen it (`fastgen check` widens by the 16-bit reference's error,
    and that reference overflows for taps this large). Summed in float32, 2 in 3 of these
    draws were off by more (1e-5 relative: thousands of products that cancel)."""
    for _ in range(5):
        x = random_tensor((4, 8, 16, 16), "contiguous", device, dtype, generator)
        f = _filter((12,), generator, device) * 2.0**32
        grad_out = torch.randn(UPFIRDN2D.allocate_output(x, f, 2, 1, [6, 5, 6, 5]).shape, generator=generator)
        _, _, df = _gradients(backend, x, f, 2, 1, [6, 5, 6, 5], grad_out.to(device, dtype))
        _, _, expected = _eager_gradients(x, f, 2, 1, [6, 5, 6, 5], grad_out.to(dtype))
        _, detail = mismatch(df, expected)
        assert not detail, detail


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_replays(backend, generator):
    """Both paths (fused, and two passes with their intermediate) capture and replay."""
    x = torch.randn(2, 32, 64, 64, generator=generator).cuda()
    filters = [torch.randn(taps, generator=generator).cuda() for taps in (4, 12)]
    with fastgen.use_backend(backend):
        for f in filters:  # compile outside the capture
            upfirdn2d(x, f, up=2, padding=[2, 1, 2, 1])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = [upfirdn2d(x, f, up=2, padding=[2, 1, 2, 1]) for f in filters]
    x.copy_(torch.randn(x.shape, generator=generator))
    graph.replay()
    torch.cuda.synchronize()
    for f, y in zip(filters, outputs):
        torch.testing.assert_close(y, upfirdn2d_reference(x, f, 2, 1, [2, 1, 2, 1]), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------
# The CUDA extension's entry point (csrc/upfirdn2d.cu)

def _cuda_args(**changes):
    """Valid arguments: x (1, 2, 5, 6), 4 separable taps, up 2, padding (2, 1, 2, 1)."""
    args = dict(x=fake_tensor_arg((1, 2, 5, 6)), f=fake_tensor_arg((1, 1, 1, 4)), separable=True,
                y=fake_tensor_arg((1, 2, 10, 12)), up_x=2, up_y=2, down_x=1, down_y=1,
                pad_x0=2, pad_x1=1, pad_y0=2, pad_y1=1, flip_filter=False, gain=4.0, stream=0)
    args.update(changes)
    return args


CUDA_BAD = [
    ("x", dict(x=fake_tensor_arg((1, 2, 5, 6), "float64"))),
    ("x", dict(x=fake_tensor_arg((1, 2, -5, 6)))),
    ("x", dict(x=fake_tensor_arg((1, 2, 5, 6), ptr=0))),
    ("y", dict(y=fake_tensor_arg((1, 2, 10, 12), "bfloat16"))),
    ("y", dict(y=fake_tensor_arg((1, 2, 10, 11)))),
    ("y", dict(y=fake_tensor_arg((1, 3, 10, 12)))),
    ("y", dict(y=fake_tensor_arg((1, 2, 10, 12), strides=(240, 120, 0, 1)))),
    ("up", dict(up_x=0)),
    ("up", dict(up_y=-1)),
    ("down", dict(down_y=0)),
    ("down", dict(down_x=1 << 16)),
    ("padding", dict(pad_x0=1 << 40)),
    ("padding", dict(pad_x0=-10, pad_x1=-1)),  # crops everything: the output would be empty
    ("gain", dict(gain=float("nan"))),
    ("f", dict(f=fake_tensor_arg((1, 1, 1, 4), "float16"))),
    ("f", dict(f=fake_tensor_arg((1, 1, 2, 4)))),
    ("f", dict(f=fake_tensor_arg((2, 1, 1, 4)))),
    ("f", dict(f=fake_tensor_arg((1, 1, 1, 0)))),
    ("f", dict(f=fake_tensor_arg((1, 1, 1, 4), ptr=0))),
    ("f", dict(f=None)),  # the identity is not separable
]


@pytest.mark.parametrize("name, changes", CUDA_BAD)
def test_cuda_bad_arguments_name_them(cuda_extension, name, changes):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        cuda_extension.upfirdn2d(**_cuda_args(**changes))


@pytest.mark.parametrize("changes", [{}, dict(f=None, separable=False, y=fake_tensor_arg((1, 2, 13, 15))),
                                     dict(f=fake_tensor_arg((1, 1, 3, 2)), separable=False,
                                          y=fake_tensor_arg((1, 2, 11, 14)))])
def test_cuda_call_without_device_raises(cuda_extension, changes):
    if cuda_extension.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        cuda_extension.upfirdn2d(**_cuda_args(**changes))


def _poisoned_output(shape, dtype, kind):
    """A NaN tensor of `shape` laid out as `kind`, and the buffer it lives in: "sliced" is a view
    with no unit stride inside a larger NaN buffer, to catch writes outside the view."""
    if kind == "sliced":
        big = torch.full((shape[0] + 1, shape[1], shape[2] + 2, 2 * shape[3] + 1), float("nan"), dtype=dtype,
                         device="cuda")
        return big[1:, :, 2:, 1::2], big
    t = torch.full(shape, float("nan"), dtype=dtype, device="cuda")
    if kind == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t, t


def _assert_cuda_matches_reference(x, f, up, down, padding, flip_filter, gain, out_layout):
    args = (x, f, up, down, padding, flip_filter, gain)
    shape = UPFIRDN2D.allocate_output(*args).shape
    out, buffer = _poisoned_output(shape, x.dtype, out_layout)
    UPFIRDN2D.implementations["cuda"].run(*args, out=out)
    expected = upfirdn2d_reference(x.double(), None if f is None else f.double(), up, down, padding, flip_filter, gain)
    _, detail = mismatch(out, expected)
    assert not detail, detail
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside.as_strided(out.shape, out.stride(), out.storage_offset() - buffer.storage_offset()).fill_(False)
    assert buffer[outside].isnan().all(), "a write landed outside the output view"


FILTER_SHAPES = [None, (1,), (2,), (4,), (5,), (12,), (3, 3), (2, 5), (4, 1)]
FACTORS = [([1, 1], [1, 1]), ([2, 2], [1, 1]), ([1, 1], [2, 2]), ([2, 2], [2, 2]), ([3, 1], [1, 2]), ([1, 3], [3, 2])]
PADDINGS = [[0, 0, 0, 0], [2, 1, 1, 2], [-2, 7, 5, -1], [6, 5, 5, 6]]


@pytest.mark.gpu
@pytest.mark.parametrize("filter_shape", FILTER_SHAPES, ids=str)
@pytest.mark.parametrize("up, down", FACTORS, ids=str)
@pytest.mark.parametrize("padding", PADDINGS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_every_filter_factor_and_padding(filter_shape, up, down, padding, dtype, generator):
    """Odd plane sizes (no tile divides them) into NaN-poisoned outputs of every layout."""
    x = random_tensor((2, 3, 37, 45), "contiguous", "cuda", dtype, generator)
    f = _filter(filter_shape, generator, "cuda")
    for x_layout, out_layout, flip_filter in [("contiguous", "contiguous", False), ("channels_last", "sliced", True),
                                              ("sliced", "channels_last", False)]:
        x_view = random_tensor(tuple(x.shape), x_layout, "cuda", dtype, generator)
        _assert_cuda_matches_reference(x_view, f, up, down, padding, flip_filter, -1.5, out_layout)


@pytest.mark.gpu
@pytest.mark.parametrize("shape, filter_shape, up, down, padding", [
    ((1, 1, 300, 257), (4,), 2, 1, [2, 1, 2, 1]),  # many tiles, ragged ones at both edges
    ((3, 30000, 3, 2), (2,), 1, 1, [1, 0, 1, 0]),  # more planes than a grid's y or z dimension
    ((1, 2, 1, 1), (12,), 2, 2, [6, 5, 6, 5]),  # a 1 x 1 plane: the window is mostly padding
    ((1, 2, 9, 130), (400, 3), 1, [1, 2], [1, 1, 200, 199]),  # a tall 2-D filter shrinks the tile
])
def test_cuda_sizes_and_tiles(shape, filter_shape, up, down, padding, generator):
    x = random_tensor(shape, "contiguous", "cuda", torch.float32, generator)
    _assert_cuda_matches_reference(x, _filter(filter_shape, generator, "cuda", torch.float64), up, down, padding,
                                   False, 1.0, "contiguous")


@pytest.mark.gpu
def test_cuda_large_filter_opts_into_more_shared_memory_or_says_why(generator):
    x = random_tensor((1, 2, 130, 130), "contiguous", "cuda", torch.float32, generator)
    # 120 x 120 taps: 57.6 KB of filter alone, past the default 48 KiB but within an A100's / H100's opt-in.
    _assert_cuda_matches_reference(x, _filter((120, 120), generator, "cuda"), 1, 1, 0, False, 1e-2, "contiguous")
    with pytest.raises(ValueError, match=r"^f: a 250 x 250 filter .* bytes of shared memory"):
        with fastgen.use_backend("cuda"):
            upfirdn2d(random_tensor((1, 1, 260, 260), "contiguous", "cuda", torch.float32, generator),
                      _filter((250, 250), generator, "cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("taps", [4, 12])
def test_cuda_gradients_match_reference(taps, generator):
    """dx is the op itself on the CUDA kernel (flipped filter, factors swapped), at first and
    second order; the filter's gradient goes through eager ops."""
    x = random_tensor((2, 3, 11, 9), "channels_last", "cuda", torch.float32, generator)
    f = _filter((taps,), generator, "cuda")
    for up, down, padding in [(2, 1, [taps // 2, taps // 2 - 1] * 2), (1, 2, [taps // 2 - 1] * 4)]:
        out_shape = UPFIRDN2D.allocate_output(x, f, up, down, padding).shape
        grad_out = torch.randn(out_shape, generator=generator).cuda()
        actual = _gradients("cuda", x, f, up, down, padding, grad_out)
        expected = _eager_gradients(x, f, up, down, padding, grad_out)
        for a, e in zip(actual, expected):  # y, dx, and df, a sum over every output: scaled
            torch.testing.assert_close(a.double().cpu(), e, rtol=1e-4, atol=1e-5 * max(1.0, e.abs().max().item()))
    actual = _second_order("cuda", x, f)
    expected = _second_order("reference", x.double(), f.double())
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)
