"""The benchmark suite times every implementation the op registry holds, and nothing else under
an op's name: a registered (op, backend) without a benchmark row fails here, as does a row that
would time a backend its op does not register (it would silently run another one)."""
import dataclasses
import importlib
import pkgutil

import pytest

import fastgen.ops
from fastgen import bench
from fastgen.ops.registry import FAST_BACKENDS, OPS, Op


def _family_ops() -> list:
    """Every Op of the op family modules. A backward or other companion op (such as
    ada_group_norm_backward or filtered_lrelu_with_codes) is not in OPS, so it is found here, as
    a module attribute of its family."""
    found = {}
    for module_info in pkgutil.iter_modules(fastgen.ops.__path__):
        module = importlib.import_module(f"{fastgen.ops.__name__}.{module_info.name}")
        found.update({id(value): value for value in vars(module).values() if isinstance(value, Op)})
    return list(found.values())


def _public_op(op: Op) -> str:
    """The registered op that `op` is or serves: a companion is named after its public op plus
    a suffix (the longest registered name that its name extends with "_")."""
    if op.name in OPS:
        return op.name
    owners = [name for name in OPS if op.name.startswith(name + "_")]
    if not owners:
        raise AssertionError(f"{op.name} is neither registered nor named <registered op>_<suffix>")
    return max(owners, key=len)


def _times(benchmark, op_name: str, backend: str, with_backward: bool) -> bool:
    """Whether `benchmark` times the op `op_name` under `backend` (in a fwd+bwd case if asked)."""
    return (op_name in benchmark.ops and any(impl.backend == backend for impl in benchmark.impls.values())
            and (not with_backward or any(case.direction == "fwd+bwd" for case in benchmark.cases)))


def _uncovered(benchmarks: list) -> list:
    """'op backend' for each implementation no benchmark times. A registered op needs a
    benchmark of it with an impl under that backend; a companion op needs the same of its public
    op in a fwd+bwd case, where the backward (and a forward that saves what it needs) runs."""
    return sorted(f"{op.name} {backend}" for op in _family_ops() for backend in op.implementations
                  if not any(_times(b, _public_op(op), backend, op.name not in OPS) for b in benchmarks))


@pytest.fixture(scope="module", params=[False, True], ids=["full", "quick"])
def suite(request):
    return bench.benchmarks(quick=request.param)


def test_every_op_is_registered_or_a_companion_of_a_registered_op():
    ops = _family_ops()
    assert {op.name for op in ops} >= set(OPS)
    assert {_public_op(op) for op in ops} == set(OPS)


def test_every_registered_implementation_has_a_benchmark_row(suite):
    assert _uncovered(suite) == []


def test_a_missing_backend_row_is_reported():
    without_cuda = [dataclasses.replace(b, impls={n: i for n, i in b.impls.items() if i.backend != "cuda"})
                    if b.name == "trms2d" else b for b in bench.benchmarks(quick=True)]
    assert _uncovered(without_cuda) == ["trms2d cuda", "trms2d_backward cuda"]


def test_op_benchmarks_time_only_the_backends_their_ops_register(suite):
    for b in (b for b in suite if b.ops):
        registered = {backend for op in b.ops for backend in OPS[op].implementations}
        timed = {impl.backend for impl in b.impls.values() if impl.backend in FAST_BACKENDS}
        assert timed <= registered, f"{b.name} times {sorted(timed - registered)}, which its ops lack"


def test_op_benchmarks_are_named_after_their_op(suite):
    """`fastgen bench order` ranks an op's backends by the rows named after the op."""
    assert [b.ops for b in suite if b.ops] == [(b.name,) for b in suite if b.ops]
    assert {b.name for b in suite if b.name in OPS} == {b.name for b in suite if b.ops}


def test_model_benchmarks_run_under_every_fast_backend(suite):
    for b in suite:
        if not b.ops:
            assert {impl.backend for impl in b.impls.values()} >= set(FAST_BACKENDS), b.name
