"""The op micro-benchmarks through pytest-benchmark: `pytest bench/ --benchmark-only` on a CUDA
GPU (add `--full-suite` for every case instead of the --quick selection).

One test per (op benchmark, case, implementation) of the harness's declarations (the
`bench/ops_*.py` modules; the model benchmarks stay with `fastgen bench`). Each test runs that
one case through the harness (`harness.run`, eager and the implementation): the implementation is
checked against eager there, so a mismatch or an error fails the test, a backend that cannot run
here skips it with the reason, and the harness's CUDA-event median (inputs rotated through more
than the L2 size) with its speedup and fraction of the ceiling go into pytest-benchmark's
`extra_info`. pytest-benchmark's own statistics come from its pedantic mode: one call on the first
input set per round, synchronized so the host clock sees the kernel's end (so they include the
launch and synchronization overhead, and small inputs may sit in L2). Without a GPU every test is
skipped (bench/conftest.py).
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from fastgen import use_backend
from fastgen.bench import harness

_ROUNDS, _WARMUP_ROUNDS = 50, 5
DEVICE = "cuda"


def _single_call(case: harness.Case, fn, device: torch.device):
    """One call of `fn` on the case's first input set, backward included for fwd+bwd, ending
    with a device synchronization."""
    inputs = case.make_inputs(device, case.dtype, 0)
    leaves = []
    if case.direction == "fwd+bwd":
        leaves = [value for value in inputs.values() if isinstance(value, torch.Tensor) and value.is_floating_point()]
    for leaf in leaves:
        leaf.requires_grad_()
    grads = tuple(torch.randn_like(output) for output in harness.as_outputs(fn(**inputs))) if leaves else None

    def call() -> None:
        for leaf in leaves:
            leaf.grad = None
        result = fn(**inputs)
        if grads is not None:
            torch.autograd.backward(harness.as_outputs(result), grads)
        torch.cuda.synchronize(device)

    return call


def test_op(benchmark, bench_case, tmp_path):
    bench, case, impl_name = bench_case
    device = torch.device(DEVICE)
    one_case = dataclasses.replace(bench, cases=[case])
    rows, _, _ = harness.run([one_case], quick=True, impls=[impl_name], out_dir=tmp_path, device=str(device))
    row = next(row for row in rows if row["impl"] == impl_name)
    if row["status"].startswith("skipped"):
        pytest.skip(row["status"])
    assert row["status"] == "ok", row["status"]
    benchmark.group = f"{bench.name} {case.shape} {row['dtype']} {case.direction}"
    benchmark.extra_info.update(cuda_event_ms=row["ms"], speedup_vs_eager=row["speedup_vs_eager"],
                                fraction_of_ceiling=row["fraction_of_ceiling"])
    impl = bench.impls[impl_name]
    with use_backend(impl.backend) if impl.backend else contextlib.nullcontext():
        benchmark.pedantic(_single_call(case, impl.make(case), device), rounds=_ROUNDS, warmup_rounds=_WARMUP_ROUNDS)
