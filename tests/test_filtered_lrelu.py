"""filtered_lrelu: the fused Triton and CUDA kernels against the float64 reference (values, codes,
first and second gradients), the reference against the SPEC's composition of upfirdn2d and
bias_act, torch.compile, errors, and the CUDA entry points' argument checks."""
import itertools
import math
from unittest import mock

import pytest
import torch

import fastgen
from conftest import CPU, DEVICES_AND_BACKENDS, fake_tensor_arg
from test_fuzz import TERM_SIZES, filtered_lrelu_gradient_terms
from fastgen.check import mismatch
from fastgen.ops import filtered_lrelu as filtered_lrelu_module
from fastgen.ops.bias_act import bias_act_reference
from fastgen.ops.filtered_lrelu import (
    FILTERED_LRELU,
    FILTERED_LRELU_BACKWARD,
    FILTERED_LRELU_WITH_CODES,
    filtered_lrelu,
    filtered_lrelu_backward_reference,
    filtered_lrelu_real_samples,
    filtered_lrelu_reference,
    filtered_lrelu_with_codes_reference,
    intermediate_size,
    normalized_padding,
    pack_codes,
    real_samples_pre_activation,
    sample_codes,
    unpack_codes,
)
from fastgen.ops.registry import TOLERANCES, Implementation, random_tensor
from fastgen.ops.upfirdn2d import upfirdn2d_real_samples, upfirdn2d_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SQRT2 = math.sqrt(2)

# (x shape, fu shape, fd shape, up, down, padding, clamp, slope, flip_filter). Sizes are odd and,
# where marked, larger than one tile so that tile seams and the codes' ownership are exercised.
GEOMETRIES = {
    "stylegan3 up2 down2 12-tap": ((2, 3, 7, 5), (12,), (12,), 2, 2, [11, 10, 11, 10], 1.5, 0.2, False),
    "up2 down2 12-tap 2x2 tiles": ((1, 2, 42, 26), (12,), (12,), 2, 2, [11, 10, 11, 10], None, 0.2, False),
    "up2 down1 (critically sampled end)": ((1, 2, 5, 9), (12,), (6,), 2, 1, [8, 7, 6, 9], 0.7, 0.2, True),
    "up1 down2 1x2 tiles": ((1, 2, 11, 100), (6,), (12,), 1, 2, [5, 6, 4, 4], None, 0.1, False),
    "2-D filters, crop, negative slope": ((1, 2, 9, 8), (3, 4), (4, 5), 2, 2, [2, -1, 3, 1], 2.0, -0.3, True),
    "identity filters": ((2, 2, 4, 5), None, None, 1, 1, [0, 0, 0, 0], 0.4, 0.2, False),
    "up4 down3": ((1, 1, 6, 7), (8,), (5, 3), 4, 3, [3, 4, 4, 3], None, 0.2, False),
    # A factor of 3: the mid tile, 3x the input tile, rounds up to a power of two.
    "up3 down2": ((1, 2, 7, 6), (7,), (4,), 3, 2, [3, 2, 2, 3], 0.9, 0.2, False),
    # fd shorter than down: a tile owns the codes of mid samples past its last output's taps.
    "up1 down4 1-tap fd 3x2 tiles": ((1, 1, 37, 41), (4,), None, 1, 4, [2, 1, 3, 0], 0.5, 0.2, False),
}


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """The reference's tiny float64 convolutions are 100x slower when split over threads on a
    busy CPU (measured: 0.6 ms vs 7 us); restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(geometry, layout, device, dtype, generator, gain=SQRT2, with_bias=True):
    shape, fu_shape, fd_shape, up, down, padding, clamp, slope, flip_filter = geometry
    x = random_tensor(shape, layout, device, dtype, generator)
    fu, fd = (None if s is None else (torch.randn(s, generator=generator) / s[0]).to(device)
              for s in (fu_shape, fd_shape))
    b = random_tensor((shape[1],), "contiguous", device, dtype, generator) if with_bias else None
    return (x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter)


def _float64(args):
    return tuple(a.detach().double().cpu() if isinstance(a, torch.Tensor) else a for a in args)


def _assert_close(actual, expected, what, magnitude=None):
    _, detail = mismatch(actual, expected, magnitude=magnitude)
    assert not detail, f"{what}: {detail}"


def _stated_term_sizes(backend, args, dy=None, dx=None) -> dict:
    """The sizes of the terms of y and (given dy and the float64 dx) of dx and db, for those the
    op states its precision by (the fuzz's TERM_SIZES: "Precision of db" on both backends, and
    "Precision of float16" for the Triton kernel's float16 y and dx)."""
    terms = {}
    dtypes, output_terms = TERM_SIZES.get(("filtered_lrelu", backend, "fwd"), ((), None))
    if args[0].dtype in dtypes:
        terms["y"] = output_terms(args, None, {})["output 0"]
    dtypes, gradient_terms = TERM_SIZES.get(("filtered_lrelu", backend, "bwd"), ((), None))
    if dx is not None and args[0].dtype in dtypes:
        terms.update({f"d{name}": size for name, size in gradient_terms(args, lambda: [dy], {"x": dx}).items()})
    return terms


def _assert_codes_agree(codes, args):
    """Codes equal the reference's except where the float64 v sits within rounding of a
    decision boundary (0, or +-clamp): there either answer is right."""
    x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter = _float64(args)
    _, expected = filtered_lrelu_with_codes_reference(x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter)
    zh, zw, _, _ = intermediate_size(x.shape, fu, fd, up, down, padding)
    codes, expected = unpack_codes(codes.cpu(), zw), unpack_codes(expected, zw)
    z = upfirdn2d_reference(x + b[:, None, None] if b is not None else x, fu, up, 1, padding, flip_filter, up * up)
    v = z[:, :, :zh, :zw] * gain
    near = v.abs() < 1e-5 * v.abs().max()
    if clamp is not None:
        near |= (torch.nn.functional.leaky_relu(v, slope).abs() - clamp).abs() < 1e-5 * clamp
    differ = (codes != expected) & ~near
    assert not differ.any(), (f"{int(differ.sum())} of {codes.numel()} codes differ, "
                              f"first at {differ.nonzero()[0].tolist()}")


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", GEOMETRIES)
def test_forward_and_codes_match_reference(device, backend, dtype, name, generator):
    """Both forward kernels (with and without codes) write every output and every code:
    they are poisoned first."""
    layout = ("contiguous", "channels_last", "sliced")[list(GEOMETRIES).index(name) % 3]
    args = _args(GEOMETRIES[name], layout, device, dtype, generator)
    expected = filtered_lrelu_reference(*_float64(args))
    y, codes = FILTERED_LRELU_WITH_CODES.allocate_output(*args)
    y.fill_(float("nan"))
    codes.fill_(0xFF)  # every code 3: no valid code
    FILTERED_LRELU_WITH_CODES.implementations[backend].run(*args, out=(y, codes))
    terms = _stated_term_sizes(backend, args).get("y")
    _assert_close(y, expected, "y", terms)
    _assert_codes_agree(codes, args)
    plain = FILTERED_LRELU.allocate_output(*args).fill_(float("nan"))
    FILTERED_LRELU.implementations[backend].run(*args, out=plain)
    _assert_close(plain, expected, "y without codes", terms)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
def test_nan_input_stays_nan_through_the_clamp(device, backend, generator):
    """torch.clamp keeps a NaN, so the kernel must too (Triton's default minimum / maximum return
    the other operand, on the GPU as in the interpreter). A non-finite input reaches more outputs
    than in the reference (kernels/filtered_lrelu.py), so only the reference's NaNs are required."""
    args = _args(GEOMETRIES["stylegan3 up2 down2 12-tap"], "contiguous", device, torch.float32, generator)
    args[0][1, 2, 3, 2] = float("nan")
    expected = filtered_lrelu_reference(*_float64(args)).isnan()
    with fastgen.use_backend(backend):
        actual = filtered_lrelu(*args).isnan().cpu()
    assert expected.any() and actual[expected].all(), f"{int((expected & ~actual).sum())} NaNs lost"


def test_filter_tables_are_cached_until_the_filter_changes(monkeypatch, generator):
    """Built once per (filter, flip, gain); an in-place change to a filter rebuilds them, and
    the result follows the new taps."""
    from fastgen.ops import filtered_lrelu as op_module

    built = []
    factor_tables = op_module.factor_tables
    monkeypatch.setattr(op_module, "factor_tables", lambda f, *rest: built.append(f) or factor_tables(f, *rest))
    args = list(_args(GEOMETRIES["up2 down1 (critically sampled end)"], "contiguous", CPU, torch.float32, generator))
    fu = args[1]
    with fastgen.use_backend("triton"):
        for _ in range(2):
            filtered_lrelu(*args)
        assert [f is fu for f in built].count(True) == 1
        fu.copy_(torch.randn(fu.shape, generator=generator))
        actual = filtered_lrelu(*args)
    assert [f is fu for f in built].count(True) == 2
    _assert_close(actual, filtered_lrelu_reference(*_float64(args)), "y after fu changed in place")


def test_tiles_own_only_mid_samples_they_compute_fully():
    """For every factor and filter length the kernel accepts: a tile's VO outputs need only its
    good mid samples (the last k1 - 1 of its BM lack taps), and so do the VO * down mid samples
    whose codes it stores; VO leaves room to round to whole code bytes. Ownership of the codes
    itself (disjoint byte ranges) is checked by the poisoned-buffer forward tests."""
    from fastgen.kernels.filtered_lrelu import _blocks, _valid_outputs

    for up, down, k1, k2 in itertools.product((1, 2, 3, 4, 5), (1, 2, 3, 4, 5), range(1, 25), range(1, 25)):
        bi, bm, bo = _blocks(k1, k2, up, down)
        vo, good = _valid_outputs(bi, up, down, k1, k2, bo), bm - k1 + 1
        assert vo >= 4 and (vo - 1) * down + k2 <= good and vo * down <= good, (up, down, k1, k2)


def test_2d_filter_split_keeps_only_significant_terms(generator):
    """A separable 2-D filter is one term (one pass, float16 stages); a random one keeps all."""
    from fastgen.ops.filtered_lrelu import factor_tables

    column, row = torch.randn(5, generator=generator), torch.randn(7, generator=generator)
    rows, cols = factor_tables(column[:, None] * row, False, 3.0, CPU)
    assert rows.shape == (1, 5) and cols.shape == (1, 7)
    torch.testing.assert_close(rows.mT @ cols, 3.0 * (column[:, None] * row).flip(0, 1))
    rows, cols = factor_tables(torch.randn(5, 7, generator=generator), True, 1.0, CPU)
    assert rows.shape == (5, 5) and cols.shape == (5, 7)


def test_2d_filter_split_keeps_every_tap_to_float32_resolution(generator):
    """One huge tap in a 2-D filter puts every other singular value below float32 resolution of
    the first, yet those terms carry the small taps outside the huge one's row and column (rank
    1 would make them 0): the filter is split exactly, by rows or columns, and y and dx match the
    float64 reference to the dtype's resolution of their terms' sizes: where the huge tap
    reaches, those of its terms; where it does not (x is 0 in a corner, so the samples it reads
    there are 0), those of the small taps, which a lost term would miss by their own size. A
    separable filter with taps far below its largest (a smooth window's corners) or exactly 0
    stays rank 1."""
    from fastgen.ops.filtered_lrelu import factor_tables

    fd = torch.randn(4, 5, generator=generator) / 4
    fd[1, 2] = 4e9
    for f in (fd, fd.mT):  # split along the smaller side: 4 terms either way
        rows, cols = factor_tables(f, False, 1.0, CPU)
        assert rows.shape[0] == 4 and torch.equal((rows.mT @ cols).flip(0, 1), f)
    window = torch.exp(-torch.linspace(-4, 4, 9).square())  # corners 1e-14 of the centre
    rows, _ = factor_tables(window[:, None] * window, False, 1.0, CPU)
    assert rows.shape[0] == 1
    # Exact zeros, where the SVD leaves about 1e-16 of the largest singular value.
    rows, _ = factor_tables(torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([0.0, 1, 2, 1, 0])), False, 1.0, CPU)
    assert rows.shape[0] == 1
    huge_tap_only = torch.zeros_like(fd)
    huge_tap_only[1, 2] = 1.0
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(1, 2, 9, 8, generator=generator)
        x[:, :, :6, :6] = 0
        x = x.to(dtype)
        fu = torch.randn(3, 3, generator=generator) / 3
        args = (x, fu, fd, None, 1, 2, [2, 1, 3, 1], SQRT2, 0.2, None, False)
        magnitudes = [a.abs() if isinstance(a, torch.Tensor) else a for a in _float64(args)]
        reached = filtered_lrelu_reference(*magnitudes[:2], huge_tap_only.double(), *magnitudes[3:8], 1.0, None,
                                           False) > 0
        assert 0 < reached.sum() < reached.numel() - 4  # both kinds of output, several of each
        leaf = x.clone().requires_grad_()
        with fastgen.use_backend("triton"):
            y = filtered_lrelu(leaf, *args[1:])
        dy = torch.randn(y.shape, generator=generator).to(dtype)
        y.backward(dy)
        x64 = x.double().requires_grad_()
        expected = filtered_lrelu_reference(x64, *_float64(args[1:]))
        expected.backward(dy.double())
        # The huge tap multiplies stage 1's rounding: a's error, float32 resolution of its terms
        # |fu| |x|, where a itself cancels (y -763,634 where float64 gives -763,578). y and dx
        # are held to the dtype's resolution of their terms' sizes through both stages.
        y_terms = filtered_lrelu_reference(*magnitudes[:8], 1.0, None, False)
        dx_terms = filtered_lrelu_gradient_terms(args, lambda: [dy], {"x": x64.grad})["x"]
        dx_reached = filtered_lrelu_gradient_terms((*args[:2], huge_tap_only, *args[3:]), lambda: [dy],
                                                   {"x": x64.grad})["x"] > 0
        assert 0 < dx_reached.sum() < dx_reached.numel() - 4
        finite = expected.to(dtype).isfinite()  # float16's y overflows where the huge tap reaches
        assert torch.equal(y.isfinite(), finite) and torch.equal(y[~finite], expected.to(dtype)[~finite])
        _, detail = mismatch(y[finite], expected[finite], magnitude=y_terms[finite])
        assert not detail, f"{dtype} y: {detail}"
        finite = x64.grad.to(dtype).isfinite()
        assert torch.equal(leaf.grad.isfinite(), finite)
        _, detail = mismatch(leaf.grad[finite], x64.grad[finite], magnitude=dx_terms[finite])
        assert not detail, f"{dtype} dx: {detail}"


def test_codes_pack_four_to_a_byte(generator):
    codes = torch.randint(0, 3, (2, 3, 5, 7), generator=generator)
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 5, 2)
    assert packed[0, 0, 0, 0] == sum(int(codes[0, 0, 0, j]) << (2 * j) for j in range(4))
    assert torch.equal(unpack_codes(packed, 7), codes)


def test_reference_is_the_specs_composition(generator):
    """bias, upfirdn2d(fu, up, gain up^2), bias_act's lrelu with gain and clamp, upfirdn2d(fd,
    down): the SPEC's sentence, with the existing ops (gain > 0, where gain and lrelu commute)."""
    x = torch.randn(2, 3, 7, 6, generator=generator, dtype=torch.float64)
    b = torch.randn(3, generator=generator, dtype=torch.float64)
    fu = torch.randn(12, generator=generator, dtype=torch.float64)
    fd = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    padding = [9, 8, 7, 10]
    z = upfirdn2d_reference(x + b[:, None, None], fu, 2, 1, padding, False, 4.0)
    a = bias_act_reference(z, None, "lrelu", alpha=0.25, gain=1.7, clamp=3.0)
    expected = upfirdn2d_reference(a, fd, 1, 2, 0, False, 1.0)
    actual = filtered_lrelu_reference(x, fu, fd, b, 2, 2, padding, 1.7, 0.25, 3.0)
    torch.testing.assert_close(actual, expected)
    zh, zw, out_h, out_w = intermediate_size(x.shape, fu, fd, 2, 2, padding)
    assert (out_h, out_w) == ((7 * 2 + 17 - 11 - 3 + 1) // 2, (6 * 2 + 17 - 11 - 4 + 1) // 2) == expected.shape[2:]


def _gradients(backend, args, dy, direct_op=False):
    """y, dx, db through autograd: the public function (codes saved by the forward) or the
    registered op called directly (codes recomputed in the backward)."""
    x, fu, fd, b, *rest = args
    x = x.detach().requires_grad_()
    b = b.detach().requires_grad_()
    with fastgen.use_backend(backend):
        if direct_op:
            y = torch.ops.fastgen.filtered_lrelu(x, fu, fd, b, *rest)
        else:
            y = filtered_lrelu(x, fu, fd, b, *rest)
    y.backward(dy)
    return y, x.grad, b.grad


def _expected_gradients(backend, args, dy):
    """y, dx, db in float64, the gradients taken with the backend's own codes once they agree
    with the reference's: a sample within rounding of a boundary may take either slope, and
    the other slope moves dx and db far more than rounding, so the float64 codes would fail a
    correct kernel there (about one CI run in 500)."""
    y, codes = FILTERED_LRELU_WITH_CODES.allocate_output(*args)
    FILTERED_LRELU_WITH_CODES.implementations[backend].run(*args, out=(y, codes))
    _assert_codes_agree(codes, args)
    x, fu, fd, _, up, down, padding, gain, slope, _, flip_filter = _float64(args)
    dx, db = filtered_lrelu_backward_reference(dy.double().cpu(), codes.cpu(), fu, fd, up, down, padding, gain, slope,
                                               flip_filter, x.shape[2], x.shape[3], True)
    return filtered_lrelu_reference(*_float64(args)), dx, db


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["stylegan3 up2 down2 12-tap", "up2 down1 (critically sampled end)",
                                  "2-D filters, crop, negative slope", "up1 down2 1x2 tiles", "up4 down3"])
def test_backward_matches_reference(device, backend, dtype, name, generator):
    layout = "channels_last" if dtype == torch.float16 else "sliced" if dtype == torch.bfloat16 else "contiguous"
    args = _args(GEOMETRIES[name], layout, device, dtype, generator)
    dy = torch.randn(FILTERED_LRELU.allocate_output(*args).shape, generator=generator).to(device, dtype)
    actual = _gradients(backend, args, dy)
    expected = _expected_gradients(backend, args, dy)
    terms = _stated_term_sizes(backend, args, dy, expected[1])
    for what, a, e in zip(("y", "dx", "db"), actual, expected):
        _assert_close(a, e, what, terms.get(what))


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
def test_strided_one_tap_filters_are_accepted(device, backend, generator):
    """A one-tap filter viewed with a stride (every other element of a longer buffer) keeps
    that stride through the tap tables, on a dimension of size 1 that the kernels never step
    along: the CUDA launcher rejected it as non-contiguous."""
    fu, fd = (torch.randn(3, generator=generator).to(device)[1::2][:1] for _ in range(2))
    fd_2d = torch.randn(1, 3, generator=generator).to(device)[:, ::2][:, :1]
    assert fu.stride() == (2,) and fd_2d.stride() == (3, 2)
    x = random_tensor((2, 3, 5, 6), "contiguous", device, torch.float32, generator)
    b = random_tensor((3,), "contiguous", device, torch.float32, generator)
    for filters in ((fu, fd), (fu, fd_2d)):
        args = (x, *filters, b, 2, 1, [1, 0, 0, 1], SQRT2, 0.2, 0.8, False)
        dy = torch.randn(FILTERED_LRELU.allocate_output(*args).shape, generator=generator).to(device)
        for what, a, e in zip(("y", "dx", "db"), _gradients(backend, args, dy), _expected_gradients(backend, args, dy)):
            _assert_close(a, e, what)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_subnormal_inputs_get_their_own_slope(device, backend, dtype, generator):
    """x of subnormal values only: every code, so every slope of the gradient, is the sign of
    the sample's z, however small, wherever float32 resolves that sign (the Triton interpreter's
    bfloat16 conversion turned a positive subnormal into 0 and the forward coded it negative:
    dx 0.084 for 0.42). A z within rounding of 0 may take either code (_assert_codes_agree: one
    seed gave a float64 z of 4.6e-46, under float32's least subnormal, from terms of 3.6e-40),
    so dx is compared with the float64 backward of the kernel's own codes."""
    args = list(_args(GEOMETRIES["up2 down1 (critically sampled end)"], "contiguous", device, dtype, generator,
                      with_bias=False))
    args[0] = (torch.randn(args[0].shape, generator=generator, dtype=torch.float64)
               * (torch.finfo(dtype).tiny / 4)).to(device, dtype)
    args[9] = None  # clamp: every sample takes one of the two slopes
    y, codes = FILTERED_LRELU_WITH_CODES.allocate_output(*args)
    FILTERED_LRELU_WITH_CODES.implementations[backend].run(*args, out=(y, codes))
    _assert_codes_agree(codes, args)
    x = args[0].detach().requires_grad_()
    dy = torch.randn(y.shape, generator=generator).to(device, dtype)
    with fastgen.use_backend(backend):
        filtered_lrelu(x, *args[1:]).backward(dy)
    _, fu, fd, _, up, down, padding, gain, slope, _, flip_filter = _float64(args)
    expected, _ = filtered_lrelu_backward_reference(dy.double().cpu(), codes.cpu(), fu, fd, up, down,
                                                    normalized_padding(padding), gain, slope, flip_filter,
                                                    *x.shape[2:], False)
    _assert_close(x.grad, expected, "dx")


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("tap", [8000.0, 4e9], ids=["inside float16", "past float16"])
def test_float16_gradient_overflows_to_infinities_not_nan(device, backend, tap, generator):
    """A huge fd tap makes float16 dx overflow, to the reference's signed infinities: the Triton
    kernel's float16 stages rounded the half-filtered rows to infinities first, and the banded
    matrix's zeros times those made NaN; a tap past float16's range (4e9, the fuzz's "huge")
    was an infinity in the float16 tap table itself, with the same effect."""
    args = list(_args(GEOMETRIES["stylegan3 up2 down2 12-tap"], "contiguous", device, torch.float16, generator))
    args[2] = args[2].clone()
    args[2][3] = tap
    args[9] = None  # clamp: every sample's gradient goes through
    x = args[0].detach().requires_grad_()
    dy = torch.randn(FILTERED_LRELU.allocate_output(*args).shape, generator=generator).to(device, torch.float16)
    with fastgen.use_backend(backend):
        filtered_lrelu(x, *args[1:]).backward(dy)
    x64 = args[0].double().cpu().requires_grad_()
    filtered_lrelu_reference(x64, *_float64(args[1:])).backward(dy.double().cpu())
    expected = x64.grad.half()
    assert expected.isinf().any() and not expected.isnan().any()
    grad = x.grad.cpu()
    assert not grad.isnan().any()
    # Within float16 rounding of the terms' size: the float16 stages round half-filtered rows of
    # about tap * dy, and the sum cancels far below that near the edges.
    _, fu, fd, _, up, down, padding, gain, slope, _, flip_filter = _float64(args)
    zh, zw, _, _ = intermediate_size(x.shape, fu, fd, up, down, padding)
    all_positive = pack_codes(torch.ones(*x.shape[:2], zh, zw, dtype=torch.int64))
    terms, _ = filtered_lrelu_backward_reference(dy.double().cpu().abs(), all_positive, fu.abs(), fd.abs(), up, down,
                                                 padding, gain, 1.0, flip_filter, *x.shape[2:], False)
    # Where the exact dx lies within that rounding of float16's overflow threshold (65520: the
    # smallest magnitude float16 rounds to infinity), a finite value near the maximum and an
    # infinity are both correct roundings (seen: 64448 for an exact 66061, 2.5% under); the
    # infinities must coincide everywhere else, signs included.
    rtol, atol = TOLERANCES[torch.float16]
    allowed = atol + rtol * torch.maximum(x64.grad.detach().abs(), terms)
    decided = ((x64.grad.detach().abs() - 65520.0).abs() > allowed)
    assert torch.equal(grad.isinf()[decided], expected.isinf()[decided])
    overflowed = grad.isinf()
    assert torch.equal(grad[overflowed].sign(), x64.grad.detach()[overflowed].sign())
    finite = grad.isfinite()
    _, detail = mismatch(grad[finite], x64.grad[finite], magnitude=terms[finite])
    assert not detail, f"finite dx: {detail}"


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gradient_within_tolerance_of_its_terms(device, backend, dtype, generator):
    """db sums dx over (B, H, W); where dx's signs balance the sum cancels, and db is held to its
    dtype's tolerance of sum |dx| (the op's docstring, "Precision of db"), not of |db|. dy is
    drawn so that every channel's float64 db is near 0: two random dy combined per channel
    (db is linear in dy under fixed codes). The geometry of the fuzz draws that found it:
    StyleGAN3's up2 down2 with a 16-tap down filter and a clamp (float16, CI), and a float32
    db 3.2e-5 of |db| off in the deep profile."""
    geometry = (GEOMETRIES["stylegan3 up2 down2 12-tap"][0], (12,), (16,), 2, 2, [11, 10, 11, 10], 1.5, 0.2, False)
    args = _args(geometry, "contiguous", device, dtype, generator)
    shape = FILTERED_LRELU.allocate_output(*args).shape
    dy1, dy2 = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(2))
    db1, db2 = (_expected_gradients(backend, args, dy.to(device, dtype))[2] for dy in (dy1, dy2))
    dy = (dy1 - (db1 / db2).view(1, -1, 1, 1) * dy2).to(device, dtype)
    _, _, db = _gradients(backend, args, dy)
    _, dx64, db64 = _expected_gradients(backend, args, dy)
    sum_of_sizes = dx64.abs().sum((0, 2, 3))
    assert (db64.abs() < 1e-2 * sum_of_sizes).all(), "dy does not make db cancel"
    _, detail = mismatch(db, db64, magnitude=sum_of_sizes)
    assert not detail, f"db: {detail}"


def _assert_same_non_finite_and_close(actual, expected, what):
    actual, expected = actual.cpu(), expected.double().cpu()
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"{what}: NaN at {int(actual.isnan().sum())} places, expected at {int(expected.isnan().sum())}")
    assert torch.equal(actual[actual.isinf()], expected[actual.isinf()]), f"{what}: infinities differ"
    finite = expected.isfinite()
    _assert_close(actual[finite], expected[finite], what)


@pytest.mark.parametrize("device, backend", [t for t in DEVICES_AND_BACKENDS if t.values[1] == "cuda"])
def test_clamped_samples_pass_no_gradient_at_nan(device, backend, generator):
    """torch.clamp's gradient mask is false at NaN, and its backward selects: a NaN sample of z
    is coded clamped, and a clamped sample's gradient is 0 even where the incoming one is NaN.
    The backward reference agrees with the eager reference's autograd there, and the kernels
    with it given the same codes (they coded NaN negative and multiplied by 0). Not the Triton
    kernel yet: its banded products spread a NaN of dy over its tile (kernels/filtered_lrelu.py)."""
    args = _args(GEOMETRIES["stylegan3 up2 down2 12-tap"], "contiguous", device, torch.float32, generator)
    x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter = args
    x[0, 1, 3, 2] = float("nan")
    dy = torch.randn(FILTERED_LRELU.allocate_output(*args).shape, generator=generator).to(device)
    x64 = x.double().cpu().requires_grad_()
    filtered_lrelu_reference(x64, *_float64(args[1:])).backward(dy.double().cpu())
    _, codes = filtered_lrelu_with_codes_reference(*_float64(args))
    assert (unpack_codes(codes, codes.shape[-1] * 4) == 2).any()
    backward_args = (dy, codes.to(device), fu, fd, up, down, padding, gain, slope, flip_filter, *x.shape[2:], False)
    dx, _ = filtered_lrelu_backward_reference(dy.double().cpu(), codes, *_float64(backward_args[2:]))
    _assert_same_non_finite_and_close(dx, x64.grad, "backward reference")
    dy[0, 1, 2, 1] = float("nan")  # reaches clamped samples of da, where the gradient is 0 all the same
    expected, _ = filtered_lrelu_backward_reference(dy.double().cpu(), codes, *_float64(backward_args[2:]))
    out = FILTERED_LRELU_BACKWARD.allocate_output(*backward_args)
    FILTERED_LRELU_BACKWARD.implementations[backend].run(*backward_args, out=out)
    assert expected.isfinite().any() and expected.isnan().any()
    _assert_same_non_finite_and_close(out[0], expected, "dx")


# (geometry, argument, index, value): one non-finite tap of fu or fd, where the reference's
# zero-stuffed, padded convolutions (and their adjoints in the backward) multiply it by
# structural zeros; the 2-D filters exercise the split of a filter holding NaN or inf.
NON_FINITE_CASES = [
    ("2-D filters, crop, negative slope", "fu", (1, 2), float("inf")),
    ("2-D filters, crop, negative slope", "fd", (2, 4), float("-inf")),
    ("2-D filters, crop, negative slope", "fd", (3, 4), float("nan")),
    ("up2 down1 (critically sampled end)", "fu", (1,), float("inf")),
    ("up1 down2 1x2 tiles", "fd", (1,), float("nan")),
    ("up1 down4 1-tap fd 3x2 tiles", "fu", (2,), float("-inf")),
    ("up4 down3", "fd", (1, 1), float("inf")),
]


def _non_finite_args(case, device, generator):
    name, argument, index, value = case
    args = list(_args(GEOMETRIES[name], "contiguous", device, torch.float32, generator))
    position = ("fu", "fd").index(argument) + 1
    args[position] = args[position].clone()
    args[position][index] = value
    return tuple(args)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("index", [(0, 0), (1, 2), (2, 3)])
def test_codes_around_a_non_finite_tap_are_the_contracts(device, backend, index, generator):
    """A NaN tap of a 2-D fu reaches only the mid samples where it meets a real sample; the
    others' v is finite, and the backward's slopes come from their codes, which must be the
    contract's. The Triton kernel splits a non-finite filter by rows, and multiplied the other
    rows' zero factors by the NaN, so the tap's whole column was NaN: the deep fuzz's draw had 5
    of 42 finite samples coded otherwise and dfu 0.1615 where the contract gives 0.3765."""
    args = _non_finite_args(("2-D filters, crop, negative slope", "fu", index, float("nan")), device, generator)
    x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter = _float64(args)
    v = real_samples_pre_activation(x, fu, fd, b, up, down, padding, gain, flip_filter)
    y, packed = FILTERED_LRELU_WITH_CODES.allocate_output(*args)
    FILTERED_LRELU_WITH_CODES.implementations[backend].run(*args, out=(y, packed))
    codes = unpack_codes(packed.cpu(), v.shape[-1])
    # Samples within float32 rounding of 0 may take either side (a tie: the gradients follow
    # the code the kernel records).
    compared = v.isfinite() & (v.abs() > 1e-4)
    assert compared.any() and v.isnan().any()
    assert torch.equal(codes[compared], sample_codes(v, slope, clamp)[compared])


def _over_real_samples():
    """The references with each FIR stage over real samples only: the op's contract."""
    return mock.patch.object(filtered_lrelu_module, "upfirdn2d_reference", upfirdn2d_real_samples)


@pytest.mark.parametrize("case", NON_FINITE_CASES, ids=lambda case: f"{case[1]}={case[3]} {case[0]}")
def test_real_samples_oracle_is_the_contract_and_its_autograd_the_backward(case, generator):
    """filtered_lrelu_real_samples gives the forward of the contract, and autograd through it
    the backward reference over real samples, given its codes; the eager reference puts NaN
    at more outputs (0 * inf with structural zeros) on these inputs."""
    args = _float64(_non_finite_args(case, CPU, generator))
    x = args[0].clone().requires_grad_()
    y = filtered_lrelu_real_samples(x, *args[1:])
    dy = torch.randn(y.shape, generator=generator, dtype=torch.float64)
    y.backward(dy)
    with _over_real_samples():
        expected_y, codes = filtered_lrelu_with_codes_reference(*args)
        expected_dx, _ = filtered_lrelu_backward_reference(dy, codes, *args[1:3], *args[4:9], args[10],
                                                           *x.shape[2:], False)
    _assert_same_non_finite_and_close(y, expected_y, "y")
    _assert_same_non_finite_and_close(x.grad, expected_dx, "dx")
    _, reference_codes = filtered_lrelu_with_codes_reference(*args)
    reference_dx, _ = filtered_lrelu_backward_reference(dy, reference_codes, *args[1:3], *args[4:9], args[10],
                                                        *x.shape[2:], False)
    more_nan = int(filtered_lrelu_reference(*args).isnan().sum() + reference_dx.isnan().sum())
    assert more_nan > int(y.isnan().sum() + x.grad.isnan().sum())


@pytest.mark.parametrize("device, backend", [t for t in DEVICES_AND_BACKENDS if t.values[1] == "cuda"])
@pytest.mark.parametrize("case", NON_FINITE_CASES, ids=lambda case: f"{case[1]}={case[3]} {case[0]}")
def test_non_finite_values_follow_the_real_samples_contract(device, backend, case, generator):
    """A tap multiplies only samples of the signal it filters (module docstring of the op):
    y matches filtered_lrelu_real_samples, and the backward kernel, given the contract's
    codes, its backward, NaN for NaN and infinity for infinity. The CUDA kernel multiplied the
    padding around x and, in the backward, the zeros outside z's extent (NaN there for a
    non-finite tap), and the split of a 2-D filter holding NaN or inf was NaN throughout."""
    args = _non_finite_args(case, device, generator)
    x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter = args
    y = FILTERED_LRELU.allocate_output(*args)
    FILTERED_LRELU.implementations[backend].run(*args, out=y)
    _assert_same_non_finite_and_close(y, filtered_lrelu_real_samples(*_float64(args)), "y")
    with _over_real_samples():
        _, codes = filtered_lrelu_with_codes_reference(*_float64(args))
    dy = torch.randn(y.shape, generator=generator).to(device)
    backward_args = (dy, codes.to(device), fu, fd, up, down, padding, gain, slope, flip_filter, *x.shape[2:], True)
    out = FILTERED_LRELU_BACKWARD.allocate_output(*backward_args)
    FILTERED_LRELU_BACKWARD.implementations[backend].run(*backward_args, out=out)
    with _over_real_samples():
        expected = filtered_lrelu_backward_reference(dy.double().cpu(), codes, *_float64(backward_args[2:]))
    for what, actual, e in zip(("dx", "db"), out, expected):
        _assert_same_non_finite_and_close(actual, e, what)


def _assert_non_finite_at_least_where_expected(actual, expected, what):
    """The Triton kernel's weaker promise (op docstring, "Non-finite values"): non-finite
    wherever the contract is, never finite where it is not; where it is finite, close."""
    actual, expected = actual.cpu(), expected.double().cpu()
    missed = ~expected.isfinite() & actual.isfinite()
    assert not missed.any(), f"{what}: finite at {int(missed.sum())} places where the contract is not"
    both = actual.isfinite()
    _assert_close(actual[both], expected[both], what)


@pytest.mark.parametrize("case", NON_FINITE_CASES + [
    ("up2 down2 12-tap 2x2 tiles", "x", (0, 1, 31, 25), float("inf")),
    ("up1 down2 1x2 tiles", "x", (0, 0, 4, 50), float("nan")),
], ids=lambda case: f"{case[1]}={case[3]} {case[0]}")
@pytest.mark.parametrize("device", [CPU, pytest.param(torch.device("cuda"), marks=pytest.mark.gpu)])
def test_triton_non_finite_values_are_at_least_the_contracts(device, case, generator):
    """The Triton kernel's banded products spread a NaN or infinity over its tile, and only
    ever to more outputs: y and, given the contract's codes, dx and db are non-finite at least
    wherever filtered_lrelu_real_samples's are, and otherwise match it."""
    name, argument, index, value = case
    args = list(_args(GEOMETRIES[name], "contiguous", device, torch.float32, generator))
    position = ("x", "fu", "fd").index(argument)
    args[position] = args[position].clone()
    args[position][index] = value
    x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter = args
    y = FILTERED_LRELU.allocate_output(*args)
    FILTERED_LRELU.implementations["triton"].run(*args, out=y)
    _assert_non_finite_at_least_where_expected(y, filtered_lrelu_real_samples(*_float64(args)), "y")
    with _over_real_samples():
        _, codes = filtered_lrelu_with_codes_reference(*_float64(args))
    dy = torch.randn(y.shape, generator=generator).to(device)
    backward_args = (dy, codes.to(device), fu, fd, up, down, padding, gain, slope, flip_filter, *x.shape[2:], True)
    out = FILTERED_LRELU_BACKWARD.allocate_output(*backward_args)
    FILTERED_LRELU_BACKWARD.implementations["triton"].run(*backward_args, out=out)
    with _over_real_samples():
        expected = filtered_lrelu_backward_reference(dy.double().cpu(), codes, *_float64(backward_args[2:]))
    for what, actual, e in zip(("dx", "db"), out, expected):
        _assert_non_finite_at_least_where_expected(actual, e, what)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_codes_of_a_tile_holding_nan_or_inf_are_the_contracts(device, backend, value, generator):
    """One non-finite x: every code equals the contract's away from a decision boundary, so the
    gradients of the samples it does not reach keep their slopes. The Triton kernel's banded
    products made the whole tile's z NaN, coding it negative or clamped (dx 0.03 off)."""
    for name in ("up2 down2 12-tap 2x2 tiles", "stylegan3 up2 down2 12-tap"):
        args = list(_args(GEOMETRIES[name], "contiguous", device, torch.float32, generator))
        args[0] = args[0].clone()
        args[0][0, 1, 5, 3] = value
        y, codes = FILTERED_LRELU_WITH_CODES.allocate_output(*args)
        FILTERED_LRELU_WITH_CODES.implementations[backend].run(*args, out=(y, codes))
        x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter = _float64(args)
        with _over_real_samples():
            _, expected = filtered_lrelu_with_codes_reference(*_float64(args))
        zh, zw, _, _ = intermediate_size(x.shape, fu, fd, up, down, padding)
        v = upfirdn2d_real_samples(x + b[:, None, None], fu, up, 1, padding, flip_filter, up * up)[:, :, :zh, :zw]
        v = v * gain
        finite = v.isfinite()
        near = finite & (v.abs() < 1e-5 * v[finite].abs().max())
        if clamp is not None:
            near |= finite & ((torch.nn.functional.leaky_relu(v, slope).abs() - clamp).abs() < 1e-5 * clamp)
        differ = (unpack_codes(codes.cpu(), zw) != unpack_codes(expected, zw)) & ~near
        assert not differ.any(), f"{name}: {int(differ.sum())} of {differ.numel()} codes differ"


def test_direct_op_recomputes_the_codes(generator):
    args = _args(GEOMETRIES["stylegan3 up2 down2 12-tap"], "contiguous", CPU, torch.float32, generator)
    dy = torch.randn(FILTERED_LRELU.allocate_output(*args).shape, generator=generator)
    actual = _gradients("triton", args, dy, direct_op=True)
    for what, a, e in zip(("y", "dx", "db"), actual, _expected_gradients("triton", args, dy)):
        _assert_close(a, e, what)


def test_codes_are_stored_only_when_a_gradient_is_needed(monkeypatch, generator):
    """No grad: the forward without codes; grad: codes from the forward, no recomputation."""
    calls = []
    for op, label in ((FILTERED_LRELU, "plain"), (FILTERED_LRELU_WITH_CODES, "codes")):
        run = op.implementations["triton"].run

        def counting_run(*args, out, run=run, label=label):
            calls.append(label)
            run(*args, out=out)

        monkeypatch.setitem(op.implementations, "triton", Implementation("triton", counting_run))
    args = _args(GEOMETRIES["identity filters"], "contiguous", CPU, torch.float32, generator)
    with fastgen.use_backend("triton"):
        filtered_lrelu(*args)
        assert calls == ["plain"]
        filtered_lrelu(args[0].requires_grad_(), *args[1:]).sum().backward()
    assert calls == ["plain", "codes"]


def test_empty_batch(generator):
    args = _args(GEOMETRIES["stylegan3 up2 down2 12-tap"], "contiguous", CPU, torch.float32, generator)
    x = args[0][:0].requires_grad_()
    b = args[3].requires_grad_()
    with fastgen.use_backend("triton"):
        y = filtered_lrelu(x, *args[1:3], b, *args[4:])
    y.sum().backward()
    assert y.shape[0] == 0 and x.grad.shape == x.shape and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_kernel_given_the_same_codes(device, backend, dtype, generator):
    """The backward kernel alone, fed the reference's codes: dx and db (summed in float32 before
    rounding) match even where a forward in another precision could decide a code differently."""
    args = _args(GEOMETRIES["up2 down2 12-tap 2x2 tiles"], "contiguous", device, dtype, generator)
    x, fu, fd, b, up, down, padding, gain, slope, clamp, flip_filter = args
    _, codes = filtered_lrelu_with_codes_reference(*_float64(args))
    codes = codes.to(device)
    dy = torch.randn(FILTERED_LRELU.allocate_output(*args).shape, generator=generator).to(device, dtype)
    backward_args = (dy, codes, fu, fd, up, down, padding, gain, slope, flip_filter, x.shape[2], x.shape[3], True)
    out = FILTERED_LRELU_BACKWARD.allocate_output(*backward_args)
    for tensor in out:
        tensor.fill_(float("nan"))
    FILTERED_LRELU_BACKWARD.implementations[backend].run(*backward_args, out=out)
    dy64, fu64, fd64 = _float64((dy, fu, fd))
    expected = filtered_lrelu_backward_reference(dy64, codes.cpu(), fu64, fd64, *backward_args[4:])
    for what, actual, e in zip(("dx", "db"), out, expected):
        _assert_close(actual, e, what)


@pytest.mark.parametrize("geometry", [((1, 2, 3, 4), (4,), (2, 3), 2, 2, [2, 1, 2, 1], 0.9, 0.2, False),
                                      ((1, 1, 4, 3), (2, 3), (3,), 1, 2, [1, 2, 0, 2], None, -0.5, True)])
def test_reference_gradients_gradcheck(geometry, generator):
    """First and second order in float64 for x and b, first order for the filters (tiny
    shapes: gradgradcheck differentiates numerically per element)."""
    x, fu, fd, b, *rest = _float64(_args(geometry, "contiguous", CPU, torch.float64, generator))
    x.requires_grad_()
    b.requires_grad_()
    with fastgen.use_backend("reference"):
        def fn(x, b):
            return filtered_lrelu(x, fu, fd, b, *rest)

        assert torch.autograd.gradcheck(fn, (x, b))
        assert torch.autograd.gradgradcheck(fn, (x, b))
        assert torch.autograd.gradcheck(lambda u, d: filtered_lrelu(x, u, d, b, *rest),
                                        (fu.requires_grad_(), fd.requires_grad_()))


def _r1_penalty_gradients(backend, args, weight):
    """StyleGAN's R1: the squared gradient of a discriminator-like score with respect to the
    input, differentiated again with respect to the input and a downstream weight."""
    x, fu, fd, b, *rest = args
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    with fastgen.use_backend(backend):
        score = (filtered_lrelu(x, fu, fd, b, *rest) * weight).square().sum()
        (grad_x,) = torch.autograd.grad(score, x, create_graph=True)
        grad_x.square().sum().backward()
    return x.grad, weight.grad


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
def test_second_order_through_the_kernels_matches_reference(device, backend, generator):
    args = _args(GEOMETRIES["stylegan3 up2 down2 12-tap"], "contiguous", device, torch.float32, generator)
    weight = torch.randn(FILTERED_LRELU.allocate_output(*args).shape, generator=generator).to(device)
    actual = _r1_penalty_gradients(backend, args, weight)
    expected = _r1_penalty_gradients("reference", _float64(args), weight.double().cpu())
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double().cpu(), e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


def test_torch_compile_fullgraph_forward_and_backward(generator):
    args = _args(GEOMETRIES["up2 down1 (critically sampled end)"], "contiguous", CPU, torch.float32, generator)
    x = args[0].requires_grad_()

    def layer(x):
        return torch.tanh(filtered_lrelu(x, *args[1:]))

    with fastgen.use_backend("triton"):
        expected = layer(x)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x)
        actual = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        (actual_grad,) = torch.autograd.grad(actual.sum(), x)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_grad, expected_grad)


def test_stylegan3_output_sizes_and_padding_forms():
    """A StyleGAN3 layer (up 2, down 2, 12-tap filters) keeps its 'valid' size bookkeeping; an
    int and (px, py) padding expand like upfirdn2d's."""
    fu, fd = torch.empty(12, device="meta"), torch.empty(12, device="meta")
    x = torch.empty(1, 512, 36, 36, device="meta")
    with torch.no_grad():
        y = filtered_lrelu(x, fu, fd, None, up=2, down=2, padding=[20, 19, 20, 19])
    assert y.shape == (1, 512, (72 + 39 - 22 + 1) // 2, (72 + 39 - 22 + 1) // 2)
    assert normalized_padding(3) == [3, 3, 3, 3] and normalized_padding((1, 2)) == [1, 1, 2, 2]


def test_output_keeps_channels_last(generator):
    args = _args(GEOMETRIES["up2 down1 (critically sampled end)"], "channels_last", CPU, torch.float32, generator)
    with fastgen.use_backend("triton"):
        y = filtered_lrelu(*args)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


_X = torch.ones(1, 2, 4, 4)
_F = torch.ones(4)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: filtered_lrelu(_X, torch.ones(2, 2, 2)), ValueError,
         r"fu must be a non-empty 1-D .* got shape \(2, 2, 2\)"),
        (lambda: filtered_lrelu(_X, None, torch.ones(0)), ValueError, r"fd must be a non-empty 1-D"),
        (lambda: filtered_lrelu(_X, [1.0, 2.0]), TypeError, "fu must be a torch.Tensor or None, got list"),
        (lambda: filtered_lrelu(_X, None, torch.ones(3, dtype=torch.int64)), TypeError, "fd must be a floating-point"),
        (lambda: filtered_lrelu(_X, torch.ones(3, device="meta")), ValueError, "fu is on meta but x is on cpu"),
        (lambda: filtered_lrelu(_X, up=0), ValueError, "up must be >= 1, got 0"),
        (lambda: filtered_lrelu(_X, down=2.0), TypeError, "down must be an int, got 2.0"),
        (lambda: filtered_lrelu(_X, up=True), TypeError, "up must be an int, got True"),
        (lambda: filtered_lrelu(_X, padding=[1, 2, 3]), TypeError, r"padding must be an int, \(px, py\) or"),
        (lambda: filtered_lrelu(_X, _F, _F, padding=[0, 0, 0, 0]), ValueError,
         r"padding \[0, 0, 0, 0\] leaves an empty output: the upsampled, padded, fu-filtered image is 1 x 1, "
         r"smaller than the 4 x 4 fd filter"),
        (lambda: filtered_lrelu(_X, None, None, padding=[-2, -2, 0, 0]), ValueError,
         r"padding \[-2, -2, 0, 0\] leaves an empty output: .* is 4 x 0, smaller than the 1 x 1 fd filter"),
        (lambda: filtered_lrelu(_X, b=torch.ones(3)), ValueError, r"b must have shape \(2,\)"),
        (lambda: filtered_lrelu(_X, b=torch.ones(2, dtype=torch.float64)), TypeError,
         "b dtype torch.float64 must match"),
        (lambda: filtered_lrelu(_X, gain=float("nan")), ValueError, "gain must be a finite number, got nan"),
        (lambda: filtered_lrelu(_X, slope=None), TypeError, "slope must be a finite number, got NoneType None"),
        (lambda: filtered_lrelu(_X, clamp=-1.0), ValueError, "clamp must be >= 0 or None, got -1.0"),
        (lambda: filtered_lrelu(torch.ones(2, 4, 4)), ValueError, r"x must be 4-D \(B, C, H, W\)"),
        (lambda: filtered_lrelu(torch.ones(1, 1, 4, 4, dtype=torch.int32)), TypeError, "x must be float32"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=f"filtered_lrelu: {message}"):
        call()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stylegan3_layer_shapes_on_cuda(backend, layout, dtype, generator):
    """Real StyleGAN3 sizes compile and match: the up2/down2 body, the up2/down1 and up1/down2 ends."""
    for up, down, side, padding in [(2, 2, 148, [11, 10, 11, 10]), (2, 1, 84, [11, 10, 11, 10]),
                                    (1, 2, 276, [5, 6, 5, 6])]:
        geometry = ((2, 64, side, side), (12,), (12,), up, down, padding, 256.0, 0.2, False)
        args = _args(geometry, layout, "cuda", dtype, generator)
        dy = torch.randn(FILTERED_LRELU.allocate_output(*args).shape, generator=generator).to("cuda", dtype)
        actual = _gradients(backend, args, dy)
        for what, a, e in zip(("y", "dx", "db"), actual, _expected_gradients(backend, args, dy)):
            _assert_close(a, e, what)


@pytest.mark.parametrize("up, down", [(2, 2), (2, 1), (1, 2)])
def test_benchmark_layers_keep_stylegan3_sizes_and_match_the_op(up, down, generator):
    """bench/ops_filtered_lrelu.py's layers: output side = side * up / down, and its eager
    formulation (StyleGAN3's reference path in x's dtype) agrees with the op."""
    from fastgen.bench.ops_filtered_lrelu import _STYLEGAN3_CLAMP, _filtered_lrelu_eager, _FilteredLayer

    layer = _FilteredLayer(up, down)
    fu, fd = layer.filters(CPU)
    for side in (16, 36, 64):
        size = intermediate_size((1, 1, side, side), fu, fd, up, down, layer.padding)[2:]
        assert size == (side * up // down,) * 2
    x = torch.randn(1, 2, 8, 8, generator=generator)
    b = torch.randn(2, generator=generator)
    expected = filtered_lrelu_reference(x, fu, fd, b, up, down, layer.padding, clamp=_STYLEGAN3_CLAMP)
    torch.testing.assert_close(_filtered_lrelu_eager(x, b, layer), expected)


def _pass_args(mode=0, src=(1, 2, 8, 8), bias=(1, 2, 1, 1), dst=(1, 2, 8, 8), codes=None, rows1=(1, 1, 1, 4),
               cols1=(1, 1, 1, 4), rows2=(1, 1, 1, 4), cols2=(1, 1, 1, 4), up=2, down=2, pads=(3, 3, 0, 0),
               mid_shape=(18, 18), gain=SQRT2, slope=0.2, clamp=None, dtype="float32", codes_dtype="uint8",
               taps_dtype="float32"):
    def tensor(shape, kind=dtype):
        return None if shape is None else fake_tensor_arg(shape, kind)

    return dict(mode=mode, src=tensor(src), bias=tensor(bias), dst=tensor(dst), codes=tensor(codes, codes_dtype),
                rows1=tensor(rows1, taps_dtype), cols1=tensor(cols1, taps_dtype), rows2=tensor(rows2, taps_dtype),
                cols2=tensor(cols2, taps_dtype), up=up, down=down, pads=pads, mid_shape=mid_shape, gain=gain,
                slope=slope, clamp=clamp)


@pytest.mark.parametrize("changes, name", [
    (dict(mode=3), "mode"),
    (dict(src=(1, 2, 8, 8), dtype="uint8"), "src"),
    (dict(dst=(1, 3, 8, 8)), "dst"),
    (dict(bias=(1, 3, 1, 1)), "bias"),
    (dict(up=0), "up"),
    (dict(down=65), "down"),
    (dict(mid_shape=(0, 18)), "mid_shape"),
    (dict(mid_shape=(10, 18)), "dst"),  # 8 outputs at down 2 with 4 taps need 18 mid rows
    (dict(pads=(3, 3, 1, 0)), "pads"),  # the forward starts output o at mid o*down
    (dict(gain=math.inf), "gain"),
    (dict(clamp=-1.0), "clamp"),
    (dict(rows1=(1, 1, 1, 4), taps_dtype="float16"), "rows1"),
    (dict(rows2=(1, 1, 2, 4)), "rows2"),  # a separable stage's rows are one row
    (dict(cols1=(1, 2, 1, 4)), "cols1"),
    (dict(codes=(1, 2, 18, 5)), "codes"),  # mode 0 takes none
    (dict(mode=1), "codes"),  # modes 1 and 2 need them
    (dict(mode=1, codes=(1, 2, 18, 4)), "codes"),  # ceil(18 / 4) = 5 bytes per row
    (dict(mode=2, codes=(1, 2, 18, 5), codes_dtype="float32"), "codes"),
])
def test_cuda_entry_points_reject_bad_arguments_naming_them(cuda_extension, changes, name):
    args = _pass_args(**changes)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        cuda_extension.filtered_lrelu_tiles(**args)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        cuda_extension.filtered_lrelu_pass(**args, tile_sums=None, stream=0)


def test_cuda_entry_points_need_a_device(cuda_extension):
    if cuda_extension.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        cuda_extension.filtered_lrelu_pass(**_pass_args(), tile_sums=None, stream=0)
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        cuda_extension.filtered_lrelu_tiles(**_pass_args(mode=2, codes=(1, 2, 18, 5)))


@pytest.mark.parametrize("clamp", [None, 0.5])
@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
def test_every_gradient_follows_the_recorded_code_where_z_cancels(device, backend, clamp, generator):
    """Pairs of x of opposite sign under two equal taps: float64 z is exactly 0 at every other
    sample (the negative side), where a fused multiply-add leaves the rounding error of the first
    product, of either sign. A sample within rounding of a boundary may take either case, and
    every gradient follows the case the forward recorded: dx, db and the filters' (which took
    the eager float32 v's case instead: dfu -6.23 where the recorded codes give -6.69 in a
    bfloat16 fuzz draw)."""
    pairs = torch.randn(2, 3, 5, 4, generator=generator) * 3
    x = torch.stack((pairs, -pairs), dim=-1).flatten(-2).to(device)  # (2, 3, 5, 8)
    fu = torch.full((1, 2), 0.1, device=device)  # one row: its two taps meet the two columns of a pair
    fd = torch.tensor([0.3, 0.6, 0.1], device=device)
    b = torch.zeros(3, device=device)
    args = (x, fu, fd, b, 1, 1, [0, 0, 0, 0], SQRT2, 0.2, clamp, False)
    y, codes = FILTERED_LRELU_WITH_CODES.allocate_output(*args)
    FILTERED_LRELU_WITH_CODES.implementations[backend].run(*args, out=(y, codes))
    dy = torch.randn(y.shape, generator=generator).to(device)
    leaves = [a.detach().requires_grad_() for a in (x, fu, fd, b)]
    with fastgen.use_backend(backend):
        filtered_lrelu(*leaves, *args[4:]).backward(dy)
    expected = [a.detach().cpu().double().requires_grad_() for a in (x, fu, fd, b)]
    filtered_lrelu_real_samples(*expected, *args[4:], codes=codes.cpu()).backward(dy.cpu().double())
    for what, actual, wanted in zip(("dx", "dfu", "dfd", "db"), leaves, expected):
        _assert_close(actual.grad, wanted.grad, what)
