"""vq_nearest and vq_quantize: indices equal to the float64 reference, exact ties and near-ties,
gradients, memory (no N x K tensor), errors."""
import sys
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastgen
from fastgen.check import mismatch
from fastgen.kernels import vq as vq_kernels
from fastgen.ops import vq  # registers torch.ops.fastgen.vq_nearest / vq_quantize
from fastgen.ops.registry import random_tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DIMS = (4, 8, 32, 40, 256)
LAYOUTS = ("contiguous", "transposed", "sliced")
CPU = torch.device("cpu")


def _devices():
    return [pytest.param(CPU, id="cpu-triton-interpreter"),
            pytest.param(torch.device("cuda"), id="cuda-triton", marks=pytest.mark.gpu)]


def _matrix(rows, dim, layout, device, dtype, generator, scale=1.0):
    """A (rows, dim) matrix stored as `layout`: "transposed" is the .T of a (dim, rows) tensor."""
    if layout == "transposed":
        return (random_tensor((dim, rows), "contiguous", CPU, torch.float32, generator) * scale).to(device, dtype).T
    return (random_tensor((rows, dim), layout, CPU, torch.float32, generator) * scale).to(device, dtype)


@contextmanager
def _splits(mode):
    """Run the search with the codebook split as the launcher decides ("auto") or unsplit ("one")."""
    if mode == "auto":
        yield
        return
    with mock.patch.object(vq_kernels, "_num_splits", lambda *args: 1):
        yield


def _run_nearest(z, codebook, metric, exact, input_precision="ieee"):
    """The Triton implementation into outputs poisoned beforehand."""
    idx, distance = vq.VQ_NEAREST.allocate_output(z, codebook, metric, exact, input_precision)
    idx.fill_(-1)
    distance.fill_(float("nan"))
    vq.VQ_NEAREST.implementations["triton"].run(z, codebook, metric, exact, input_precision, out=(idx, distance))
    return idx, distance


def _assert_distances_close(distance, z, codebook, idx, metric):
    """Within float32 rounding of the terms of the expanded form (the result's cancellation)."""
    z64, e64 = z.double().cpu(), codebook.double().cpu()[idx.cpu()]
    expected = vq.vq_nearest_reference(z64, codebook.double().cpu(), metric)[1]
    if metric == "l2":
        scale = z64.square().sum(1) + e64.square().sum(1) + 2 * z64.norm(dim=1) * e64.norm(dim=1)
    else:
        scale = torch.ones_like(expected)
    error = (distance.double().cpu() - expected).abs()
    assert bool((error <= 2e-5 * scale + 1e-6).all()), f"max error {error.max().item():.3g}"


@pytest.mark.parametrize("device", _devices())
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_nearest_matches_float64_reference(device, data, generator):
    n, k = data.draw(st.integers(1, 90)), data.draw(st.integers(1, 300))
    dim = data.draw(st.sampled_from(DIMS))
    dtype, metric = data.draw(st.sampled_from(DTYPES)), data.draw(st.sampled_from(vq.METRICS))
    exact = data.draw(st.booleans())
    z = _matrix(n, dim, data.draw(st.sampled_from(LAYOUTS)), device, dtype, generator)
    codebook = _matrix(k, dim, data.draw(st.sampled_from(LAYOUTS)), device, dtype, generator)
    with _splits(data.draw(st.sampled_from(["auto", "one"]))):
        idx, distance = _run_nearest(z, codebook, metric, exact)
    expected_idx, _ = vq.vq_nearest_reference(z.double(), codebook.double(), metric)
    assert torch.equal(idx, expected_idx), f"{int((idx != expected_idx).sum())} of {n} rows differ"
    _assert_distances_close(distance, z, codebook, idx, metric)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", vq.METRICS)
@pytest.mark.parametrize("exact, splits", [(False, "auto"), (False, "one"), (True, "auto")])
def test_duplicate_codes_go_to_the_lowest_index(device, dtype, metric, exact, splits, generator):
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
        idx, _ = _run_nearest(z, codebook, metric, exact)
    expected, _ = vq.vq_nearest_reference(z.double(), codebook.double(), metric)
    assert torch.equal(expected.cpu(), targets.repeat(2)), "the test's own premise: the reference picks the lowest"
    assert torch.equal(idx.cpu(), targets.repeat(2))


@pytest.mark.parametrize("exact", [False, True])
def test_large_codebook(exact, generator):
    """K = 65536 + 37: indices past 2^16, a ragged last tile, many tiles per split."""
    z = _matrix(5, 4, "transposed", CPU, torch.float32, generator)
    codebook = _matrix(65536 + 37, 4, "contiguous", CPU, torch.float32, generator)
    codebook[-1] = z[0].double().mul(1.001).float()  # the last code is row 0's nearest
    idx, _ = _run_nearest(z, codebook, "l2", exact)
    expected, _ = vq.vq_nearest_reference(z.double(), codebook.double())
    assert expected[0] == len(codebook) - 1
    assert torch.equal(idx, expected)


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


def _direct_float64_argmin(z, codebook, metric):
    z64, e64 = z.double().cpu(), codebook.double().cpu()
    if metric == "l2":
        return (z64[:, None, :] - e64[None]).square().sum(-1).argmin(1)
    return ((z64 @ e64.T) / e64.norm(dim=1).clamp_min(vq_kernels.COSINE_EPS)).argmax(1)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("metric", vq.METRICS)
def test_exact_resolves_near_ties(device, dtype, metric, generator):
    z, codebook = _near_tie_problem(generator, dtype, device)
    expected = _direct_float64_argmin(z, codebook, metric)
    assert torch.equal(vq.vq_nearest_reference(z.double(), codebook.double(), metric)[0].cpu(), expected)
    idx, distance = _run_nearest(z, codebook, metric, exact=True)
    assert torch.equal(idx.cpu(), expected), f"{int((idx.cpu() != expected).sum())} of {len(idx)} rows differ"
    if dtype == torch.float32:
        fast, _ = _run_nearest(z, codebook, metric, exact=False)
        assert not torch.equal(fast.cpu(), expected), "the problem is meant to defeat float32's expanded form"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("input_precision", vq.INPUT_PRECISIONS)
def test_exact_with_every_input_precision_on_gpu(dtype, input_precision, generator):
    """On a GPU tf32 really rounds the operands; exact=True must still give the float64 answer."""
    z = _matrix(4096, 32, "contiguous", "cuda", dtype, generator)
    codebook = _matrix(4096, 32, "contiguous", "cuda", dtype, generator)
    expected, _ = vq.vq_nearest_reference(z.double(), codebook.double())
    idx, _ = _run_nearest(z, codebook, "l2", True, input_precision)
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
@pytest.mark.parametrize("quantize", [False, True])
def test_peak_gpu_memory_is_linear(quantize, generator):
    """N = K = 16384: a distance matrix would be 1 GiB; the ops must stay far below."""
    n = k = 16384
    z = _matrix(n, 32, "contiguous", "cuda", torch.float32, generator)
    codebook = _matrix(k, 32, "contiguous", "cuda", torch.float32, generator)
    with fastgen.use_backend("triton"):
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


@pytest.mark.parametrize("device", _devices())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_quantize_matches_float64_reference(device, data, generator):
    n, k, dim = data.draw(st.integers(1, 90)), data.draw(st.integers(1, 200)), data.draw(st.sampled_from(DIMS))
    dtype, exact = data.draw(st.sampled_from(DTYPES)), data.draw(st.booleans())
    z, codebook = _quantize_problem(device, dtype, generator, n, k, dim, data.draw(st.sampled_from(LAYOUTS)))
    beta = data.draw(st.sampled_from([0.25, 1.0, 0.0]))
    out = vq.VQ_QUANTIZE.allocate_output(z, codebook, beta, exact)
    for tensor in out:
        tensor.fill_(-1 if not tensor.is_floating_point() else float("nan"))
    with _splits(data.draw(st.sampled_from(["auto", "one"]))):
        vq.VQ_QUANTIZE.implementations["triton"].run(z, codebook, beta, exact, "ieee", out=out)
    z_q, idx, loss, counts = out
    expected_zq, expected_idx, expected_loss, expected_counts = vq.vq_quantize_reference(
        z.double(), codebook.double(), beta)
    assert torch.equal(idx, expected_idx)
    assert torch.equal(z_q, codebook[idx]), "z_q's value is the code itself"
    assert torch.equal(counts, expected_counts)
    _, detail = mismatch(loss, expected_loss)
    assert not detail, detail
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


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_backward_matches_reference(device, dtype, generator):
    z, codebook = _quantize_problem(device, dtype, generator, layout="transposed")
    z.requires_grad_()
    codebook.requires_grad_()
    with fastgen.use_backend("triton"):
        z_q, _, loss, _ = vq.vq_quantize(z, codebook, 0.4)
    grad_zq = torch.randn(z_q.shape, generator=generator).to(device, dtype)
    torch.autograd.backward((z_q, loss), (grad_zq, torch.tensor(1.7, device=device)))
    z64, codebook64 = (t.detach().double().requires_grad_() for t in (z, codebook))
    z_q64, _, loss64, _ = vq.vq_quantize_reference(z64, codebook64, 0.4)
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


def test_empty_z(generator):
    codebook = torch.randn(5, 4, generator=generator)
    z = torch.empty(0, 4)
    with fastgen.use_backend("triton"):
        idx, distance = vq.vq_nearest(z, codebook, return_distance=True)
        _, quantized_idx, loss, counts = vq.vq_quantize(z, codebook)
    assert idx.shape == distance.shape == quantized_idx.shape == (0,)
    assert torch.isnan(loss) and torch.equal(counts, torch.zeros(5, dtype=torch.int64))


def test_public_function_returns_what_was_asked(generator):
    z, codebook = _quantize_problem(CPU, torch.float32, generator, n=9, k=20, dim=4)
    idx = vq.vq_nearest(z, codebook)
    assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64
    pair = vq.vq_nearest(z, codebook, return_distance=True)
    assert torch.equal(pair[0], idx) and pair[1].dtype == torch.float32


_Z, _E = torch.ones(3, 4), torch.ones(5, 4)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: vq.vq_nearest(_Z.tolist(), _E), TypeError, "vq_nearest: z must be a torch.Tensor"),
        (lambda: vq.vq_nearest(_Z.int(), _E), TypeError,
         "z must be float32, float16, bfloat16 or float64, got torch.int32"),
        (lambda: vq.vq_nearest(_Z, _E[None]), ValueError, r"codebook must be 2-D \(K, D\), got shape \(1, 5, 4\)"),
        (lambda: vq.vq_nearest(_Z, _E.half()), TypeError, "codebook dtype torch.float16 must match z dtype"),
        (lambda: vq.vq_nearest(_Z, _E.to("meta")), ValueError, "codebook is on meta but z is on cpu"),
        (lambda: vq.vq_nearest(_Z, torch.ones(5, 8)), ValueError, "codebook dim D=8 must match z's D=4"),
        (lambda: vq.vq_nearest(_Z, torch.ones(0, 4)), ValueError, r"codebook is empty \(K=0\)"),
        (lambda: vq.vq_nearest(torch.ones(3, 600), torch.ones(5, 600)), ValueError, "D must be between 1 and 512"),
        (lambda: vq.vq_nearest(_Z, _E, metric="dot"), ValueError, "metric must be 'l2' or 'cosine', got 'dot'"),
        (lambda: vq.vq_nearest(_Z, _E, exact=1), TypeError, "exact must be a bool"),
        (lambda: vq.vq_nearest(_Z, _E, input_precision="bf16"), ValueError, "input_precision must be one of ieee"),
        (lambda: vq.vq_quantize(_Z, _E, float("inf")), ValueError, "vq_quantize: beta must be a finite number"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.gpu
def test_quantize_is_reproducible_on_gpu(generator):
    """Loss (fixed-order sum) and counts (integer atomics) are bitwise equal run to run."""
    z, codebook = _quantize_problem("cuda", torch.bfloat16, generator, n=43520, k=4096, dim=32)
    with fastgen.use_backend("triton"):
        first, second = vq.vq_quantize(z, codebook), vq.vq_quantize(z, codebook)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_benchmark_declarations_check_out_on_cpu(tmp_path, monkeypatch):
    """Every declared impl agrees with eager on small stand-ins for the tokenizers' shapes
    (timing stubbed out: the interpreter's times mean nothing)."""
    from fastgen.bench import harness, ops_vq

    monkeypatch.setattr(ops_vq, "_TOKENIZERS", (("VAR", 2, 100, 32, "l2"), ("l2-normalized", 1, 150, 8, "cosine")))
    rows, _, _ = harness.run(ops_vq.benchmarks(quick=True), quick=True, out_dir=tmp_path, no_compile=True,
                             timer=lambda prepare, reps, warmup: [1.0] * reps, device="cpu")
    assert {r["name"] for r in rows} == {"vq_nearest", "vq_quantize"}
    bad = [(r["name"], r["shape"], r["impl"], r["status"]) for r in rows
           if r["status"] != "ok" and not (r["impl"] == "faiss" and r["status"].startswith("skipped"))]
    assert not bad, bad
