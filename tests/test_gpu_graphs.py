"""Every op, under every fast backend it has, inside the two ways a deployment removes Python
and launch overhead: `torch.compile(fullgraph=True)` with the default (Inductor) backend, and
CUDA-graph capture and replay with new inputs. Each result must equal the op's eager call on
the same inputs. GPU only: without one, tests/test_compile_fullgraph.py traces the models."""
import pytest
import torch

import fastgen
from fastgen.ops.registry import OPS, TOLERANCES

CASES = [pytest.param(name, backend, id=f"{name}-{backend}")
         for name, op in sorted(OPS.items()) for backend in sorted(op.implementations)]


def _first_case_args(name: str, generator: torch.Generator) -> tuple:
    op = OPS[name]
    dtype = op.implementations[sorted(op.implementations)[0]].dtypes[-1]  # a 16-bit dtype where offered
    return op.check_cases()[0].make_args(torch.device("cuda"), dtype, generator)


def _as_tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def _assert_same(actual, expected, what: str) -> None:
    """Within the output dtype's tolerance (the same kernel may sum in another order under a
    new launch), indices and counts exactly."""
    for got, want in zip(_as_tuple(actual), _as_tuple(expected)):
        rtol, atol = TOLERANCES[want.dtype] if want.is_floating_point() else (0, 0)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("name, backend", CASES)
def test_compiles_as_one_graph(name, backend, generator):
    args = _first_case_args(name, generator)
    op = getattr(torch.ops.fastgen, name)
    with fastgen.use_backend(backend):
        expected = op(*args)
        torch._dynamo.reset()
        compiled = torch.compile(lambda *a: op(*a), fullgraph=True)
        _assert_same(compiled(*args), expected, f"torch.compile of {name} under {backend}")


@pytest.mark.gpu
@pytest.mark.parametrize("name, backend", CASES)
def test_cuda_graph_replays_with_new_inputs(name, backend, generator):
    static = _first_case_args(name, generator)
    fresh = _first_case_args(name, generator)
    op = getattr(torch.ops.fastgen, name)
    with fastgen.use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile, autotune) outside the capture
            op(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = op(*static)
        for target, source in zip(static, fresh):
            if isinstance(target, torch.Tensor):
                target.copy_(source)
        graph.replay()
        torch.cuda.synchronize()
        _assert_same(captured, op(*fresh), f"CUDA graph of {name} under {backend}")
