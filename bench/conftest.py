"""pytest setup for `pytest bench/ --benchmark-only`: one `bench_case` per (op benchmark, case,
implementation), skipped with the reason where there is no CUDA GPU. Plain `pytest` collects
tests/ only (pyproject's testpaths), so none of this runs in CI's test suite."""
from __future__ import annotations

import pytest
import torch

NO_GPU_REASON = "needs a CUDA GPU: the op micro-benchmarks time GPU kernels, and none is visible here"


def pytest_addoption(parser):
    parser.addoption("--full-suite", action="store_true",
                     help="every case of the op benchmarks, not only the --quick selection")


def op_benchmarks(quick: bool) -> list:
    """The op benchmarks of the suite (the ops_* modules of fastgen.bench.MODULES)."""
    from fastgen import bench

    return [b for module in bench.MODULES if module.__name__.rsplit(".", 1)[-1].startswith("ops_")
            for b in module.benchmarks(quick)]


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    quick = not metafunc.config.getoption("--full-suite")
    params, ids = [], []
    for bench in op_benchmarks(quick):
        for case in bench.cases:
            dtype = str(case.dtype).removeprefix("torch.")
            for impl in bench.impls:
                params.append((bench, case, impl))
                ids.append(f"{bench.name}|{case.shape}|{dtype}|{case.direction}|{impl}")
    metafunc.parametrize("bench_case", params, ids=ids)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        item.add_marker(pytest.mark.skip(reason=NO_GPU_REASON))
