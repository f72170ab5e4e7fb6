"""vq_nearest and vq_quantize: indices equal to the float64 reference, exact ties and near-ties,
gradients, memory (no N x K tensor), errors; for every implementation (Triton, under the
interpreter on a CPU, and on a GPU the Triton and CUDA kernels), and the CUDA extension's own
argument checks, which run without a GPU."""
import sys
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CPU, DEVICES_AND_BACKENDS, DTYPES, EMULATED_CUDA, FAKE_PTR, clear_error_test, fake_tensor_arg
import fastgen
from fastgen.check import mismatch
from fastgen.kernels import vq as vq_kernels
from fastgen.ops import vq  # registers torch.ops.fastgen.vq_nearest / vq_quantize
from fastgen.ops.registry import random_tensor

DIMS = (4, 8, 32, 40, 256)
LAYOUTS = ("contiguous", "transposed", "sliced")


GPU_BACKENDS = pytest.mark.parametrize("backend", ["triton", "cuda"])


def _matrix(rows, dim, layout, device, dtype, generator, scale=1.0):
    """A (rows, dim) matrix stored as `layout`: "transposed" is the .T of a (dim, rows) tensor."""
    if layout == "transposed":
        return (random_tensor((dim, rows), "contiguous", CPU, torch.float32, generator) * scale).to(device, dtype).T
    return (random_tensor((rows, dim), layout, CPU, torch.float32, generator) * scale).to(device, dtype)


@contextmanager
def _splits(mode):
    """Run the Triton search with the codebook split as the launcher decides ("auto") or unsplit
    ("one"); the CUDA launcher always decides."""
    if mode == "auto":
        yield
        return
    with mock.patch.object(vq_kernels, "_num_splits", lambda *args: 1):
        yield


def _run_nearest(z, codebook, metric, exact, input_precision="ieee", backend="triton"):
    """The backend's implementation into outputs poisoned beforehand."""
    idx, distance = vq.VQ_NEAREST.allocate_output(z, codebook, metric, exact, input_precision)
    idx.fill_(-1)
    distance.fill_(float("nan"))
    vq.VQ_NEAREST.implementations[backend].run(z, codebook, metric, exact, input_precision, out=(idx, distance))
    return idx, distance


def _float32_resolution(z64, e64, metric):
    """What float32 rounding of the expanded form's terms can move a row's score by."""
    if metric == "l2":
        return 2e-5 * (z64.square().sum(1) + e64.square().sum(1) + 2 * z64.norm(dim=1) * e64.norm(dim=1)) + 1e-6
    return torch.full((z64.shape[0],), 2e-5 + 1e-6, dtype=torch.float64)


def _assert_distances_close(distance, z, codebook, idx, metric):
    """Within float32 rounding of the terms of the expanded form (the result's cancellation)."""
    z64, e64 = z.double().cpu(), codebook.double().cpu()[idx.cpu()]
    expected = vq.vq_nearest_reference(z64, codebook.double().cpu(), metric)[1]
    error = (distance.double().cpu() - expected).abs()
    assert bool((error <= _float32_resolution(z64, e64, metric)).all()), f"max error {error.max().item():.3g}"


def _assert_nearest(idx, z, codebook, metric, exact):
    """exact=True: the float64 argmin, ties to the lowest index. exact=False promises the nearest
    code up to float32 rounding: a row may take another code only when its float64 score is
    within that rounding of the best (a near-tie), never a worse one."""
    z64, codebook64 = z.double().cpu(), codebook.double().cpu()
    expected_idx, best = vq.vq_nearest_reference(z64, codebook64, metric)
    differ = idx.cpu() != expected_idx
    if exact or not differ.any():
        assert not differ.any(), f"{int(differ.sum())} of {len(idx)} rows differ"
        return
    chosen64 = codebook64[idx.cpu()]
    if metric == "l2":
        chosen = (z64 - chosen64).square().sum(1)
    else:
        chosen = F.normalize(z64, dim=1).mul(F.normalize(chosen64, dim=1)).sum(1)
    gap = (chosen - best).abs()[differ]
    allowed = _float32_resolution(z64, chosen64, metric)[differ]
    assert bool((gap <= allowed).all()), (
        f"{int(differ.sum())} of {len(idx)} rows took a code that is not a near-tie: float64 score gaps "
        f"{gap.tolist()[:5]}, allowed {allowed.tolist()[:5]}")


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_nearest_matches_float64_reference(device, backend, data, generator):
    n, k = data.draw(st.integers(1, 90)), data.draw(st.integers(1, 300))
    dim = data.draw(st.sampled_from(DIMS))
    dtype, metric = data.draw(st.sampled_from(DTYPES)), data.draw(st.sampled_from(vq.METRICS))
    exact = data.draw(st.booleans())
    z = _matrix(n, dim, data.draw(st.sampled_from(LAYOUTS)), device, dtype, generator)
    codebook = _matrix(k, dim, data.draw(st.sampled_from(LAYOUTS)), device, dtype, generator)
    with _splits(data.draw(st.sampled_from(["auto", "one"]))):
        idx, distance = _run_nearest(z, codebook, metric, exact, backend=backend)
    _assert_nearest(idx, z, codebook, metric, exact)
    _assert_distances_close(distance, z, codebook, idx, metric)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", vq.METRICS)
@pytest.mark.parametrize("exact, splits", [(False, "auto"), (False, "one"), (True, "auto")])
def test_duplicate_codes_go_to_the_lowest_index(device, backend, dtype, metric, exact, splits, generator):
    """Every row's nearest code is repeated 128 and 256 rows further on (other codebook tiles,
    in other splits or, unsplit, later in the same program's stream): the lowest index wins, as
    with torch.argmin. The copies sit at the same
    column of their tiles because the interpreter's dot is numpy's BLAS, whose edge kernels
    may round a column differently by its position; the GPU's tensor-core dot and exact=True
    do not depend on it."""
    codebook = _matrix(400, 8, "contiguous", CPU, torch.float32, generator)
    targets = torch.randperm(128, generator=generator)[:20]
    codebook[targets + 128] = codebook[targets]
    codebook[targets + 256] = codebook[targets]
    z = codebook[targets].repeat(2, 1) + 0.01 * torch.randn(40, 8, generator=generator)
    z, codebook = z.to(device, dtype), codebook.to(device, dtype)
    with _splits(splits):
        idx, _ = _run_nearest(z, codebook, metric, exact, backend=backend)
    expected, _ = vq.vq_nearest_reference(z.double(), codebook.double(), metric)
    assert torch.equal(expected.cpu(), targets.repeat(2)), "the test's own premise: the reference picks the lowest"
    assert torch.equal(idx.cpu(), targets.repeat(2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exact", [False, True])
def test_wide_codes_on_the_triton_kernels(dtype, exact, generator):
    """D = 256 (VQGAN): float32 'ieee' dots run over D in slices of 32 (several slices, a
    partial last codebook tile) and the exact recheck takes 32 rows a program (70 rows: a
    partial last block); every row's index must be the float64 argmin, up to near-ties
    without exact."""
    z = _matrix(70, 256, "sliced", CPU, dtype, generator)
    codebook = _matrix(150, 256, "contiguous", CPU, dtype, generator)
    idx, distance = _run_nearest(z, codebook, "l2", exact)
    _assert_nearest(idx, z, codebook, "l2", exact)
    _assert_distances_close(distance, z, codebook, idx, "l2")


# Not under the CUDA emulation, which runs one block at a time: the ~8200 blocks of the
# code-norm pass alone take minutes there.
@pytest.mark.parametrize("device, backend", [p for p in DEVICES_AND_BACKENDS if p is not EMULATED_CUDA])
@pytest.mark.parametrize("exact", [False, True])
def test_large_codebook(device, backend, exact, generator):
    """K = 65536 + 37: indices past 2^16, a ragged last tile, many tiles per split."""
    z = _matrix(5, 4, "transposed", CPU, torch.float32, generator)
    codebook = _matrix(65536 + 37, 4, "contiguous", CPU, torch.float32, generator)
    codebook[-1] = z[0].double().mul(1.001).float()  # the last code is row 0's nearest
    z, codebook = z.to(device), codebook.to(device)
    idx, _ = _run_nearest(z, codebook, "l2", exact, backend=backend)
    expected, _ = vq.vq_nearest_reference(z.double(), codebook.double())
    assert expected[0] == len(codebook) - 1
    assert torch.equal(idx, expected)


def _codebook_with_non_finite_codes(generator, dtype, device):
    """40 rows of z, one holding NaN (every distance NaN: the reference takes code 0), and 300
    codes (three Triton tiles, several splits) among which +inf and -inf entries make the
    expanded l2 distance inf - inf = NaN for about half the rows (the reference's argmin takes
    the first NaN) and inf for the others, and codes near 1e19, whose float32 squared norm
    overflows (distance inf: never the nearest). For cosine, normalizing a code that holds inf
    gives NaN, so every row takes the first of those."""
    z = _matrix(40, 32, "contiguous", CPU, torch.float32, generator)
    z[11, 4] = float("nan")
    codebook = _matrix(300, 32, "contiguous", CPU, torch.float32, generator)
    codebook[5] = 1e19 * (1 + 0.1 * torch.randn(32, generator=generator))
    codebook[150, 7] = float("inf")
    codebook[260, 3] = float("-inf")
    codebook[290] = -1e19
    return z.to(device, dtype), codebook.to(device, dtype)


def _assert_within_the_codebook(idx, codebook):
    inside = (idx >= 0) & (idx < codebook.shape[0])
    assert bool(inside.all()), f"indices outside [0, {codebook.shape[0]}): {idx[~inside].tolist()}"


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", vq.METRICS)
@pytest.mark.parametrize("exact, splits", [(False, "auto"), (False, "one"), (True, "auto")])
def test_non_finite_and_overflowing_codes_follow_the_reference(device, backend, dtype, metric, exact, splits,
                                                               generator):
    """Indices equal to the reference's, so never a padding column past K (an infinite squared
    norm once made exact mode's candidate threshold infinite, padding included); distances NaN
    exactly where the reference's are."""
    z, codebook = _codebook_with_non_finite_codes(generator, dtype, device)
    with _splits(splits):
        idx, distance = _run_nearest(z, codebook, metric, exact, backend=backend)
    expected_idx, expected_distance = vq.vq_nearest_reference(z, codebook, metric)
    _assert_within_the_codebook(idx, codebook)
    assert torch.equal(idx.cpu(), expected_idx.cpu()), (
        f"{int((idx.cpu() != expected_idx.cpu()).sum())} of {len(idx)} rows differ: {idx.tolist()} "
        f"instead of {expected_idx.tolist()}")
    is_nan = expected_distance.isnan().cpu()
    assert torch.equal(distance.isnan().cpu(), is_nan), "NaN distances where the reference's are not, or not where"
    if metric == "l2":
        assert 0 < int(is_nan.sum()) < len(idx) - 1, "the test's premise: some rows take an inf code, some do not"
    finite = ~is_nan
    _assert_distances_close(distance.cpu()[finite], z.cpu()[finite], codebook, idx.cpu()[finite], metric)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("exact", [False, True])
def test_quantize_with_non_finite_codes_writes_only_its_counts(device, backend, exact, generator):
    """The chosen codes and their usage counts are the reference's, and nothing lands past the
    end of counts (a padding index K once did)."""
    z, codebook = _codebook_with_non_finite_codes(generator, torch.float32, device)
    k = codebook.shape[0]
    z_q, idx, loss, _ = vq.VQ_QUANTIZE.allocate_output(z, codebook, 0.25, exact)
    counts_buffer = torch.full((k + 1,), -1, dtype=torch.int64, device=device)
    counts = counts_buffer[:k]
    vq.VQ_QUANTIZE.implementations[backend].run(z, codebook, 0.25, exact, "ieee", out=(z_q, idx, loss, counts))
    assert counts_buffer[k] == -1, "a usage count was written past the end of counts"
    _, expected_idx, expected_loss, expected_counts = vq.vq_quantize_reference(z, codebook, 0.25)
    _assert_within_the_codebook(idx, codebook)
    assert torch.equal(idx, expected_idx)
    assert torch.equal(counts, expected_counts)
    # The code itself, but NaN where z is (the reference's straight-through z + (e - z)).
    expected_zq = codebook[expected_idx].masked_fill(~z.isfinite(), float("nan"))
    torch.testing.assert_close(z_q, expected_zq, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(loss, expected_loss, equal_nan=True)


def _subnormal_codes_problem(generator, dtype, device, codes=150, rows=40, dim=32):
    """Normal z rows and subnormal codes: every z_d - e_d rounds to z_d in float64, so every
    code scores ||z||^2 there and code 0 wins every row's tie, though their exact distances
    (and float32 fast scores) differ by ~1e-38. (A code of normal size would make the fast
    scores' error bound cover those differences and every code a candidate.)"""
    tiny = torch.finfo(dtype).tiny / 4
    z = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    codebook = tiny * torch.randn(codes, dim, generator=generator, dtype=torch.float64)
    return z.to(device, dtype), codebook.to(device, dtype)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantize", [False, True])
def test_exact_ties_subnormal_codes_to_the_lowest_index(device, backend, dtype, quantize, generator):
    """exact=True promises the float64 argmin with ties to the lowest index; the float32 fast
    scores rank subnormal codes that the float64 scores tie (an error bound that ignored
    underflow, and so was 0 here, once kept the fast winner)."""
    z, codebook = _subnormal_codes_problem(generator, dtype, device)
    expected = _direct_float64_argmin(z, codebook, "l2")
    assert bool((expected == 0).all()), "the test's premise: every row's float64 scores tie"
    assert torch.equal(vq.vq_nearest_reference(z.double(), codebook.double(), "l2")[0].cpu(), expected)
    if quantize:
        z_q, idx, _, counts = vq.VQ_QUANTIZE.allocate_output(z, codebook, 0.25, True)
        vq.VQ_QUANTIZE.implementations[backend].run(z, codebook, 0.25, True, "ieee", out=(z_q, idx, _, counts))
        assert torch.equal(z_q, codebook[expected.to(device)])
        assert torch.equal(counts.cpu(), torch.bincount(expected, minlength=codebook.shape[0]))
    else:
        idx, _ = _run_nearest(z, codebook, "l2", exact=True, backend=backend)
    assert torch.equal(idx.cpu(), expected), f"{int((idx.cpu() != expected).sum())} of {len(idx)} rows differ"


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("subnormal", ["z", "codebook"])
@pytest.mark.parametrize("exact", [False, True])
def test_cosine_search_over_subnormal_rows_or_codes(device, backend, dtype, subnormal, exact, generator):
    """Every element of z (or of the codebook) subnormal: exact mode picks the float64 argmax of
    the op's z . e / max(||e||, eps), and the fast search a code within float32 resolution of
    it, relative to the scores' own size (which the eps makes ~1e-27 ||z|| for subnormal
    codes). The Triton interpreter's bfloat16 conversion drops a subnormal's leading bit: it
    once put 16 of 21 rows on another code."""
    z, codebook = _matrix(21, 8, "sliced", device, dtype, generator), _matrix(70, 8, "contiguous", device, dtype,
                                                                            generator)
    largest_subnormal = torch.finfo(dtype).tiny / 2
    if subnormal == "z":
        z = (z.double() * (largest_subnormal / z.double().abs().max())).to(dtype)
    else:
        codebook = (codebook.double() * (largest_subnormal / codebook.double().abs().max())).to(dtype)
    idx, _ = _run_nearest(z, codebook, "cosine", exact, backend=backend)
    z64, e64 = z.double().cpu(), codebook.double().cpu()
    scaled_codes = e64 / e64.norm(dim=1).clamp_min(vq.COSINE_EPS)[:, None]
    scores = z64 @ scaled_codes.T
    if exact:
        differ = idx.cpu() != scores.argmax(1)
        assert not differ.any(), f"{int(differ.sum())} of 21 rows differ"
        return
    gap = scores.max(1).values - scores.gather(1, idx.cpu()[:, None]).squeeze(1)
    resolution = 2e-5 * z64.norm(dim=1) * scaled_codes.norm(dim=1).max()
    assert bool((gap <= resolution).all()), f"score gaps {gap.tolist()[:5]} past float32 resolution {resolution[0]:.3g}"


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exact", [False, True])
def test_quantize_z_q_is_nan_where_z_is_not_finite(device, backend, dtype, exact, generator):
    """The straight-through z + (e - z) is NaN where z is NaN or +-inf: z_q too, and the code
    elsewhere."""
    z, codebook = _quantize_problem(device, dtype, generator)
    flat = z.view(-1)
    flat[torch.randperm(flat.numel(), generator=generator)[:9].to(device)] = torch.tensor(
        [float("nan"), float("inf"), float("-inf")] * 3, dtype=dtype, device=device)
    out = vq.VQ_QUANTIZE.allocate_output(z, codebook, 0.25, exact)
    vq.VQ_QUANTIZE.implementations[backend].run(z, codebook, 0.25, exact, "ieee", out=out)
    z_q, idx = out[:2]
    expected_zq = vq.vq_quantize_reference(z.double(), codebook.double(), 0.25)[0]
    assert torch.equal(z_q.isnan().cpu(), expected_zq.isnan().cpu())
    assert torch.equal(z_q.isnan(), ~z.isfinite())
    finite = z.isfinite()
    assert torch.equal(z_q[finite], codebook[idx].expand_as(z_q)[finite])


@pytest.mark.parametrize("device, backend", [p for p in DEVICES_AND_BACKENDS if p.values[0] == CPU])
@pytest.mark.parametrize("exact", [False, True])
def test_codebook_row_offsets_past_int32(device, backend, exact, generator):
    """A (3, 8) float16 codebook view with a row stride just below 2^31 elements (so Triton
    passes it as an int32) into an 8.6 GB buffer that torch.empty maps lazily: only the pages
    written take memory. Row 2 starts at element 2^32 - 2^21 of the view; as an int32 product
    that offset wraps to 2^21 elements before row 0, which holds zeros."""
    dim, stride, wrapped_below = 8, 2**31 - 2**20, 2**21
    try:
        buffer = torch.empty(wrapped_below + 2 * stride + dim, dtype=torch.float16)
    except RuntimeError as error:
        pytest.skip(f"this machine does not lend 8.6 GB of address space: {error}")
    buffer[:dim] = 0.0
    codebook = buffer[wrapped_below:].as_strided((3, dim), (stride, 1))
    codebook.copy_(torch.randn(3, dim, generator=generator))
    z = (codebook.float()[[2, 0, 2, 1]] + 0.01 * torch.randn(4, dim, generator=generator)).half()
    idx, _ = _run_nearest(z, codebook, "l2", exact, backend=backend)
    assert torch.equal(idx, torch.tensor([2, 0, 2, 1]))


def _near_tie_problem(generator, dtype, device):
    """Groups of codes a hair apart around centres of large norm: distances (and cosines) of a
    row to its group's codes differ far below float32's resolution of the expanded form."""
    groups, per_group, dim = 16, 8, 32
    centres = 300.0 * torch.randn(groups, 1, dim, generator=generator, dtype=torch.float64)
    near = (centres + 0.05 * torch.randn(groups, per_group, dim, generator=generator, dtype=torch.float64))
    far = 300.0 * torch.randn(60, dim, generator=generator, dtype=torch.float64)
    codebook = torch.cat([far[:30], near.reshape(-1, dim), far[30:]])
    z = (centres + 0.05 * torch.randn(groups, 4, dim, generator=generator, dtype=torch.float64)).reshape(-1, dim)
    return z.to(device, dtype), codebook.to(device, dtype)


def test_the_reference_and_the_kernels_take_one_cosine_eps():
    assert vq.COSINE_EPS == vq_kernels.COSINE_EPS


@pytest.mark.parametrize("metric", vq.METRICS)
@pytest.mark.parametrize("dim, layout", [(32, "contiguous"), (7, "permuted")])
def test_exact_reference_scores_identical_codes_identically(metric, dim, layout, generator):
    """An expanded codebook (every code the same values): the exact reference's direct form
    scores all codes alike and picks index 0, where a matrix product's blocking can round the
    last columns differently, and so can a vectorized sum over d, whose order follows each
    code's place in memory (dim 7 over a column-major z: some rows picked code 4 of 5)."""
    z = torch.randn(37, dim, generator=generator, dtype=torch.float64)
    if layout == "permuted":
        z = z.T.contiguous().T
    codebook = torch.randn(1, dim, generator=generator, dtype=torch.float64).expand(70 if dim == 32 else 5, dim)
    idx, distance = vq.vq_nearest_reference(z, codebook, metric, True)
    assert idx.tolist() == [0] * 37
    assert torch.equal(idx, _direct_float64_argmin(z, codebook, metric))
    z_q, quantize_idx, _, counts = vq.vq_quantize_reference(z, codebook, 0.25, True)
    assert quantize_idx.tolist() == [0] * 37 and counts[0] == 37


def _direct_float64_argmin(z, codebook, metric):
    """The direct form's best code in float64, each code's terms summed over d in order."""
    z64, e64 = z.double().cpu(), codebook.double().cpu()
    sums = torch.zeros(len(z64), len(e64), dtype=torch.float64)
    for d in range(z64.shape[1]):
        sums += (z64[:, d, None] - e64[None, :, d]).square() if metric == "l2" else z64[:, d, None] * e64[None, :, d]
    if metric == "l2":
        return sums.argmin(1)
    return (sums / e64.norm(dim=1).clamp_min(vq_kernels.COSINE_EPS)).argmax(1)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", vq.METRICS)
def test_exact_resolves_near_ties(device, backend, dtype, metric, generator):
    # exact=True promises the direct form's float64 argmin. The reference (the expanded form in
    # float64) is not compared: rounded to bfloat16, two different codes can score within
    # float64 rounding of each other, and the two forms may then break the tie differently.
    z, codebook = _near_tie_problem(generator, dtype, device)
    expected = _direct_float64_argmin(z, codebook, metric)
    idx, distance = _run_nearest(z, codebook, metric, exact=True, backend=backend)
    assert torch.equal(idx.cpu(), expected), f"{int((idx.cpu() != expected).sum())} of {len(idx)} rows differ"
    if dtype == torch.float32:
        fast, _ = _run_nearest(z, codebook, metric, exact=False, backend=backend)
        assert not torch.equal(fast.cpu(), expected), "the problem is meant to defeat float32's expanded form"


@pytest.mark.gpu
@GPU_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("input_precision", vq.INPUT_PRECISIONS)
def test_exact_with_every_input_precision_on_gpu(backend, dtype, input_precision, generator):
    """On a GPU tf32 really rounds the operands; exact=True must still give the float64 answer."""
    z = _matrix(4096, 32, "contiguous", "cuda", dtype, generator)
    codebook = _matrix(4096, 32, "contiguous", "cuda", dtype, generator)
    expected, _ = vq.vq_nearest_reference(z.double(), codebook.double())
    idx, _ = _run_nearest(z, codebook, "l2", True, input_precision, backend)
    assert torch.equal(idx, expected)


@contextmanager
def _recorded_launcher_allocations():
    """Sizes (element counts) of every tensor the kernels' launcher allocates."""
    sizes = []
    patches = []
    for name in ("empty", "zeros", "full", "ones", "empty_like", "zeros_like", "full_like", "empty_strided"):
        original = getattr(torch, name)

        def recording(*args, _original=original, **kwargs):
            tensor = _original(*args, **kwargs)
            if sys._getframe(1).f_globals.get("__name__") == vq_kernels.__name__:
                sizes.append(tensor.numel())
            return tensor

        patches.append(mock.patch.object(torch, name, recording))
    for patch in patches:
        patch.start()
    try:
        yield sizes
    finally:
        for patch in patches:
            patch.stop()


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("quantize", [False, True])
def test_launcher_allocates_no_n_by_k_tensor(exact, quantize, generator):
    n, k, dim = 256, 1000, 8
    z = torch.randn(n, dim, generator=generator)
    codebook = torch.randn(k, dim, generator=generator)
    with _recorded_launcher_allocations() as sizes:
        if quantize:
            out = vq.VQ_QUANTIZE.allocate_output(z, codebook, 0.25, exact)
            vq.VQ_QUANTIZE.implementations["triton"].run(z, codebook, 0.25, exact, "ieee", out=out)
        else:
            _run_nearest(z, codebook, "l2", exact)
    assert k in sizes, f"the hook must see the launcher's allocations (the codebook norms), saw {sizes}"
    assert sum(sizes) <= 4 * (n + k), f"launcher allocations {sizes} for N={n}, K={k}"


@pytest.mark.gpu
@GPU_BACKENDS
@pytest.mark.parametrize("quantize", [False, True])
def test_peak_gpu_memory_is_linear(backend, quantize, generator):
    """N = K = 16384: a distance matrix would be 1 GiB; the ops must stay far below."""
    n = k = 16384
    z = _matrix(n, 32, "contiguous", "cuda", torch.float32, generator)
    codebook = _matrix(k, 32, "contiguous", "cuda", torch.float32, generator)
    with fastgen.use_backend(backend):
        call = (lambda: vq.vq_quantize(z, codebook)) if quantize else (lambda: vq.vq_nearest(z, codebook, exact=True))
        call()  # compile outside the measurement
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - baseline < 16 * 2**20


def _quantize_problem(device, dtype, generator, n=70, k=129, dim=32, layout="contiguous"):
    z = _matrix(n, dim, layout, device, dtype, generator)
    codebook = _matrix(k, dim, "contiguous", device, dtype, generator)
    return z, codebook


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_quantize_matches_float64_reference(device, backend, data, generator):
    n, k, dim = data.draw(st.integers(1, 90)), data.draw(st.integers(1, 200)), data.draw(st.sampled_from(DIMS))
    dtype, exact = data.draw(st.sampled_from(DTYPES)), data.draw(st.booleans())
    z, codebook = _quantize_problem(device, dtype, generator, n, k, dim, data.draw(st.sampled_from(LAYOUTS)))
    beta = data.draw(st.sampled_from([0.25, 1.0, 0.0]))
    out = vq.VQ_QUANTIZE.allocate_output(z, codebook, beta, exact)
    for tensor in out:
        tensor.fill_(-1 if not tensor.is_floating_point() else float("nan"))
    with _splits(data.draw(st.sampled_from(["auto", "one"]))):
        vq.VQ_QUANTIZE.implementations[backend].run(z, codebook, beta, exact, "ieee", out=out)
    z_q, idx, loss, counts = out
    expected_zq, expected_idx, expected_loss, expected_counts = vq.vq_quantize_reference(
        z.double(), codebook.double(), beta)
    _assert_nearest(idx, z, codebook, "l2", exact)
    assert torch.equal(z_q, codebook[idx]), "z_q's value is the code itself"
    assert torch.equal(counts.cpu(), torch.bincount(idx.cpu(), minlength=k)), "counts are the chosen codes' usage"
    _, detail = mismatch(loss, expected_loss)  # a near-tie changes the loss by rounding only
    assert not detail, detail
    if torch.equal(idx.cpu(), expected_idx.cpu()):
        assert torch.equal(counts, expected_counts)
        _, detail = mismatch(z_q, expected_zq)
        assert not detail, detail


def test_quantize_gradients_in_float64():
    """Straight-through and stop-gradient are not derivatives, so finite differences can check
    only the codebook gradient of the loss with beta = 0 (then loss = mse(z, e) in e). The
    whole registered backward is checked against autograd through the eager reference."""
    generator = torch.Generator().manual_seed(0)  # fixed: a code switch under the probe's eps would be a kink
    z = torch.randn(12, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(7, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    with fastgen.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda e: vq.vq_quantize(z.detach(), e, 0.0)[2], (codebook,))
        z_q, _, loss, _ = vq.vq_quantize(z, codebook, 0.3)
    grad_zq = torch.randn(z_q.shape, generator=generator, dtype=torch.float64)
    actual = torch.autograd.grad((z_q, loss), (z, codebook), (grad_zq, torch.tensor(0.6, dtype=torch.float64)))
    z_q, _, loss, _ = vq.vq_quantize_reference(z, codebook, 0.3)
    expected = torch.autograd.grad((z_q, loss), (z, codebook), (grad_zq, torch.tensor(0.6, dtype=torch.float64)))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_backward_matches_reference(device, backend, dtype, generator):
    """exact=True, so that both sides take the same codes: without it a near-tie row may take
    another code (the nearest tests cover which), which moves whole rows of the gradients."""
    z, codebook = _quantize_problem(device, dtype, generator, layout="transposed")
    z.requires_grad_()
    codebook.requires_grad_()
    with fastgen.use_backend(backend):
        z_q, _, loss, _ = vq.vq_quantize(z, codebook, 0.4, exact=True)
    grad_zq = torch.randn(z_q.shape, generator=generator).to(device, dtype)
    torch.autograd.backward((z_q, loss), (grad_zq, torch.tensor(1.7, device=device)))
    z64, codebook64 = (t.detach().double().requires_grad_() for t in (z, codebook))
    z_q64, _, loss64, _ = vq.vq_quantize_reference(z64, codebook64, 0.4, exact=True)
    torch.autograd.backward((z_q64, loss64), (grad_zq.double(), torch.tensor(1.7, device=device, dtype=torch.float64)))
    for actual, expected in ((z.grad, z64.grad), (codebook.grad, codebook64.grad)):
        _, detail = mismatch(actual, expected)
        assert not detail, detail


def test_loss_alone_trains_the_codebook(generator):
    """VQ-VAE training without using z_q: only loss.backward(); z_q's gradient is absent."""
    z, codebook = _quantize_problem(CPU, torch.float32, generator)
    codebook.requires_grad_()
    with fastgen.use_backend("triton"):
        _, idx, loss, _ = vq.vq_quantize(z, codebook)
    loss.backward()
    expected = torch.zeros_like(codebook).index_add_(0, idx, 2 * (codebook.detach()[idx] - z) / z.numel())
    torch.testing.assert_close(codebook.grad, expected)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend, generator):
    """Schema, fake tensors, autograd registration and AOT dispatch of both custom ops."""
    z, codebook = _quantize_problem(CPU, torch.float32, generator, n=20, k=40, dim=8)
    with fastgen.use_backend(backend):
        torch.library.opcheck(torch.ops.fastgen.vq_nearest, (z, codebook, "cosine", True, "ieee"))
        torch.library.opcheck(torch.ops.fastgen.vq_quantize,
                              (z.requires_grad_(), codebook.requires_grad_(), 0.25, False, "ieee"))


@pytest.mark.parametrize("device, backend", DEVICES_AND_BACKENDS)
def test_empty_z(device, backend, generator):
    codebook = torch.randn(5, 4, generator=generator).to(device)
    z = torch.empty(0, 4, device=device)
    with fastgen.use_backend(backend):
        idx, distance = vq.vq_nearest(z, codebook, return_distance=True)
        _, quantized_idx, loss, counts = vq.vq_quantize(z, codebook)
    assert idx.shape == distance.shape == quantized_idx.shape == (0,)
    assert torch.isnan(loss) and torch.equal(counts.cpu(), torch.zeros(5, dtype=torch.int64))


def test_public_function_returns_what_was_asked(generator):
    z, codebook = _quantize_problem(CPU, torch.float32, generator, n=9, k=20, dim=4)
    idx = vq.vq_nearest(z, codebook)
    assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64
    pair = vq.vq_nearest(z, codebook, return_distance=True)
    assert torch.equal(pair[0], idx) and pair[1].dtype == torch.float32


_Z, _E = torch.ones(3, 4), torch.ones(5, 4)


test_bad_input_gets_a_clear_error = clear_error_test(
    [
        (lambda: vq.vq_nearest(_Z.tolist(), _E), TypeError, "vq_nearest: z must be a torch.Tensor"),
        (lambda: vq.vq_nearest(_Z.int(), _E), TypeError,
         "z must be float32, float16, bfloat16 or float64, got torch.int32"),
        (lambda: vq.vq_nearest(_Z, _E[None]), ValueError, r"codebook must be 2-D \(K, D\), got shape \(1, 5, 4\)"),
        (lambda: vq.vq_nearest(_Z, _E.half()), TypeError, "codebook dtype torch.float16 must match z dtype"),
        (lambda: vq.vq_nearest(_Z, _E.to("meta")), ValueError, "codebook is on meta but z is on cpu"),
        (lambda: vq.vq_nearest(_Z, torch.ones(5, 8)), ValueError, "codebook dim D=8 must match z's D=4"),
        (lambda: vq.vq_nearest(_Z, torch.ones(0, 4)), ValueError, r"codebook is empty \(K=0\)"),
        (lambda: vq.vq_nearest(_Z, torch.ones(1, 4).expand(2**31, 4)), ValueError,
         "codebook has K=2147483648 codes, at most 2147483647"),
        (lambda: vq.vq_nearest(torch.ones(3, 600), torch.ones(5, 600)), ValueError, "D must be between 1 and 512"),
        (lambda: vq.vq_nearest(_Z, _E, metric="dot"), ValueError, "metric must be 'l2' or 'cosine', got 'dot'"),
        (lambda: vq.vq_nearest(_Z, _E, exact=1), TypeError, "exact must be a bool"),
        (lambda: vq.vq_nearest(_Z, _E, input_precision="bf16"), ValueError, "input_precision must be one of ieee"),
        (lambda: vq.vq_quantize(_Z, _E, float("inf")), ValueError, "vq_quantize: beta must be a finite number"),
    ],
)


@pytest.mark.gpu
@GPU_BACKENDS
def test_quantize_is_reproducible_on_gpu(backend, generator):
    """Loss (fixed-order sum) and counts (integer atomics) are bitwise equal run to run."""
    z, codebook = _quantize_problem("cuda", torch.bfloat16, generator, n=43520, k=4096, dim=32)
    with fastgen.use_backend(backend):
        first, second = vq.vq_quantize(z, codebook), vq.vq_quantize(z, codebook)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda_emulation
def test_benchmark_declarations_check_out_on_cpu(tmp_path, monkeypatch):
    """Every declared impl agrees with eager on small stand-ins for the tokenizers' shapes
    (timing stubbed out: the interpreter's and the emulation's times mean nothing)."""
    from fastgen.bench import harness, ops_vq

    monkeypatch.setattr(ops_vq, "_TOKENIZERS", (("VAR", 2, 100, 32, "l2"), ("l2-normalized", 1, 150, 8, "cosine")))
    rows, _, _ = harness.run(ops_vq.benchmarks(quick=True), quick=True, out_dir=tmp_path, no_compile=True,
                             timer=lambda prepare, reps, warmup: [1.0] * reps, device="cpu")
    assert {r["name"] for r in rows} == {"vq_nearest", "vq_quantize"}
    bad = [(r["name"], r["shape"], r["impl"], r["status"]) for r in rows
           if r["status"] != "ok" and not (r["impl"] == "faiss" and r["status"].startswith("skipped"))]
    assert not bad, bad


# ---------------------------------------------------------------------------------------
# The CUDA kernels at the edges of their tiles (64 rows, 64 codes, 32 features), on a GPU

# (N, K, D): one row / one code / one feature, sizes one past and one short of the tiles, the
# largest D, and enough rows and codes for several row blocks and codebook splits.
EDGE_SHAPES = [(1, 1, 3), (1, 1, 1), (1, 65, 512), (65, 1, 33), (63, 129, 31), (64, 64, 32),
               (130, 1000, 1), (3, 4097, 8), (257, 300, 512), (700, 4096, 32)]


@pytest.mark.gpu
@GPU_BACKENDS
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", vq.METRICS)
@pytest.mark.parametrize("exact", [False, True])
def test_nearest_at_tile_edges_on_gpu(backend, shape, dtype, metric, exact, generator):
    n, k, dim = shape
    for z_layout, e_layout in (("contiguous", "contiguous"), ("sliced", "transposed"), ("transposed", "sliced")):
        z = _matrix(n, dim, z_layout, "cuda", dtype, generator)
        codebook = _matrix(k, dim, e_layout, "cuda", dtype, generator)
        idx, distance = _run_nearest(z, codebook, metric, exact, backend=backend)
        expected = _direct_float64_argmin(z, codebook, metric) if exact else (
            vq.vq_nearest_reference(z.double(), codebook.double(), metric)[0].cpu())
        if not exact:  # the fast search may differ from the reference only on a near-tie
            expected = torch.where(_is_near_tie(z, codebook, idx, expected, metric), idx.cpu(), expected)
        assert torch.equal(idx.cpu(), expected), f"{z_layout}/{e_layout}: {int((idx.cpu() != expected).sum())} rows"
        _assert_distances_close(distance, z, codebook, idx, metric)


def _is_near_tie(z, codebook, idx, expected, metric):
    """Rows whose pick and the reference's pick score closer than twice the fast scores' error
    bound (module docstring of fastgen.ops.vq: D 2^-24 (||e||^2 + 2 ||z|| ||e||) for l2)."""
    z64, e64 = z.double().cpu(), codebook.double().cpu()
    max_norm = e64.norm(dim=1).max()
    if metric == "l2":
        def score(k):
            return (z64 - e64[k]).square().sum(1)
        scale = max_norm**2 + 2 * z64.norm(dim=1) * max_norm
    else:
        def score(k):
            return -(z64 * e64[k]).sum(1) / e64[k].norm(dim=1).clamp_min(vq_kernels.COSINE_EPS)
        scale = z64.norm(dim=1)
    bound = (1.5 * z.shape[1] + 3) * 2.0**-24 * scale
    return (score(idx.cpu()) - score(expected)).abs() <= 2 * bound


@pytest.mark.gpu
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_writes_strided_outputs_in_place(exact, dtype, generator):
    """The CUDA implementations honour the outputs' strides and write nothing beside them."""
    z = _matrix(70, 40, "sliced", "cuda", dtype, generator)
    codebook = _matrix(129, 40, "transposed", "cuda", dtype, generator)
    idx_buffer = torch.full((140,), -1, dtype=torch.int64, device="cuda")
    distance_buffer = torch.full((210,), float("nan"), device="cuda")
    idx, distance = idx_buffer[::2], distance_buffer[::3]
    vq.VQ_NEAREST.implementations["cuda"].run(z, codebook, "l2", exact, "ieee", out=(idx, distance))
    expected, _ = _run_nearest(z, codebook, "l2", exact, backend="cuda")
    assert torch.equal(idx, expected)
    assert bool((idx_buffer[1::2] == -1).all()) and bool(distance_buffer.view(70, 3)[:, 1:].isnan().all())

    zq_buffer = torch.full((70, 81), float("nan"), dtype=dtype, device="cuda")
    counts_buffer = torch.full((258,), -1, dtype=torch.int64, device="cuda")
    z_q, counts = zq_buffer[:, 1::2], counts_buffer[::2]
    loss = torch.empty((), device="cuda")
    quantized_idx = torch.empty(70, dtype=torch.int64, device="cuda")
    vq.VQ_QUANTIZE.implementations["cuda"].run(z, codebook, 0.25, exact, "ieee", out=(z_q, quantized_idx, loss, counts))
    assert torch.equal(quantized_idx, expected) and torch.equal(z_q, codebook[expected])
    assert torch.equal(counts, torch.bincount(expected, minlength=129))
    assert bool(zq_buffer[:, ::2].isnan().all()) and bool((counts_buffer[1::2] == -1).all())


# ---------------------------------------------------------------------------------------
# The CUDA extension's entry points: argument checks run before any device is touched, so
# they are tested everywhere with fake pointers.

def _int64_vector(size, stride=1, ptr=FAKE_PTR):
    return (ptr, size, stride)


def _nearest_args(n=3, k=5, dim=4, **changes):
    args = dict(z=fake_tensor_arg((n, dim, 1, 1)), codebook=fake_tensor_arg((k, dim, 1, 1)),
                code_norms=fake_tensor_arg((k + 1, 1, 1, 1)), packed=_int64_vector(n), idx=_int64_vector(n),
                distance=fake_tensor_arg((n, 1, 1, 1)), cosine=False, exact=False, stream=0)
    args.update(changes)
    return args


def _quantize_args(n=3, k=5, dim=4, **changes):
    args = _nearest_args(n, k, dim)
    del args["distance"], args["cosine"]
    args.update(z_q=fake_tensor_arg((n, dim, 1, 1)), row_errors=fake_tensor_arg((n, 1, 1, 1)),
                counts=_int64_vector(k))
    args.update(changes)
    return args


SEARCH_BAD = [
    # (changed arguments, the argument the message must name)
    (dict(z=fake_tensor_arg((3, 4, 1, 1), "float64")), "z"),
    (dict(z=fake_tensor_arg((3, 4, 1, 1), "uint8"), codebook=fake_tensor_arg((5, 4, 1, 1), "uint8")), "z"),
    (dict(z=fake_tensor_arg((3, 4, 2, 1))), "z"),
    (dict(z=fake_tensor_arg((3, 4, 1, 1), ptr=0)), "z"),
    (dict(z=(FAKE_PTR, "float32", (3, 4, 1), (4, 1, 1))), "z"),
    (dict(codebook=fake_tensor_arg((5, 4, 1, 1), "float16")), "codebook"),
    (dict(codebook=fake_tensor_arg((5, 3, 1, 1))), "codebook"),
    (dict(codebook=fake_tensor_arg((5, -4, 1, 1))), "codebook"),
    (dict(code_norms=fake_tensor_arg((5, 1, 1, 1))), "code_norms"),
    (dict(code_norms=fake_tensor_arg((6, 1, 1, 1), "bfloat16")), "code_norms"),
    (dict(code_norms=fake_tensor_arg((6, 1, 1, 1), strides=(2, 1, 1, 1))), "code_norms"),
    (dict(packed=_int64_vector(2)), "packed"),
    (dict(packed=_int64_vector(3, stride=2)), "packed"),
    (dict(packed=[FAKE_PTR, 3, 1]), "packed"),
    (dict(idx=_int64_vector(4)), "idx"),
    (dict(idx=_int64_vector(3, stride=0)), "idx"),
    (dict(idx=_int64_vector(3, ptr=0)), "idx"),
    (dict(idx=_int64_vector(3, ptr=-8)), "idx"),
    (dict(idx=(FAKE_PTR, 3.0, 1)), "idx"),
]


@pytest.mark.parametrize("changes, name", SEARCH_BAD + [
    (dict(z=fake_tensor_arg((3, 0, 1, 1)), codebook=fake_tensor_arg((5, 0, 1, 1))), "z"),
    (dict(z=fake_tensor_arg((3, 513, 1, 1)), codebook=fake_tensor_arg((5, 513, 1, 1))), "z"),
    (dict(codebook=fake_tensor_arg((0, 4, 1, 1)), code_norms=fake_tensor_arg((1, 1, 1, 1))), "codebook"),
    (dict(distance=fake_tensor_arg((3, 1, 1, 1), "float16")), "distance"),
    (dict(distance=fake_tensor_arg((4, 1, 1, 1))), "distance"),
    (dict(distance=fake_tensor_arg((3, 1, 1, 1), strides=(0, 1, 1, 1))), "distance"),
])
def test_vq_nearest_entry_point_names_the_bad_argument(cuda_extension, changes, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        cuda_extension.vq_nearest(**_nearest_args(**changes))


@pytest.mark.parametrize("changes, name", SEARCH_BAD + [
    (dict(z_q=fake_tensor_arg((3, 4, 1, 1), "bfloat16")), "z_q"),
    (dict(z_q=fake_tensor_arg((3, 5, 1, 1))), "z_q"),
    (dict(z_q=fake_tensor_arg((3, 4, 1, 1), strides=(1, 0, 1, 1))), "z_q"),
    (dict(row_errors=fake_tensor_arg((2, 1, 1, 1))), "row_errors"),
    (dict(counts=_int64_vector(4)), "counts"),
    (dict(counts=_int64_vector(5, stride=0)), "counts"),
])
def test_vq_quantize_entry_point_names_the_bad_argument(cuda_extension, changes, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        cuda_extension.vq_quantize(**_quantize_args(**changes))


@pytest.mark.parametrize("entry_point, args", [("vq_nearest", _nearest_args()), ("vq_quantize", _quantize_args()),
                                               ("vq_nearest", _nearest_args(n=0, cosine=True, exact=True))])
def test_vq_entry_points_without_device_raise(cuda_extension, entry_point, args):
    if cuda_extension.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="no CUDA device available"):
        getattr(cuda_extension, entry_point)(**args)
