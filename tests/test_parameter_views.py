"""Every op's tensor arguments after the primary one (per-channel weights and biases, modulation,
filters, residuals, key masks, keys and values, codebooks) passed as views that are not plain
contiguous tensors: each fast backend must read them through their strides and data pointer,
forward and backward, against the float64 reference (outputs and gradients whose precision an
op states by its terms' sizes held to those)."""
import pytest
import torch

from conftest import EMULATED_CUDA
from fastgen.ops.registry import OPS
from test_fuzz import check_at_stated_precision


def strided_view(t: torch.Tensor) -> torch.Tensor:
    """t's values at every other element of the last dim of a wider tensor, from the second:
    `w[1::2]`, a stride of 2 and an offset of 1 element."""
    wide = t.new_empty(*t.shape[:-1], 2 * t.shape[-1])
    view = wide[..., 1::2]
    view.copy_(t)
    return view


def offset_view(t: torch.Tensor) -> torch.Tensor:
    """t's values, contiguous, one element into a larger storage (misaligned for vector loads)."""
    view = t.new_empty(t.numel() + 1)[1:].view(t.shape)
    view.copy_(t)
    return view


VIEWS = {"strided": strided_view, "offset": offset_view}


def _as_views(args: tuple, view) -> tuple:
    primary, *rest = args
    return (primary, *(view(a) if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in rest))


def _cases() -> list:
    """(op name, case) for every check case with a tensor argument besides the primary one."""
    params = []
    cpu = torch.device("cpu")
    for name in sorted(OPS):
        for case in OPS[name].check_cases():
            args = case.make_args(cpu, torch.float32, torch.Generator().manual_seed(0))
            if any(isinstance(a, torch.Tensor) for a in args[1:]):
                params.append(pytest.param(name, case, id=f"{name}-{case.label}"))
    return params


@pytest.mark.parametrize("device, backend", [pytest.param(torch.device("cpu"), "triton", id="cpu-triton-interpreter"),
                                             EMULATED_CUDA])
@pytest.mark.parametrize("view", sorted(VIEWS))
@pytest.mark.parametrize("name, case", _cases())
def test_non_primary_tensor_arguments_are_read_through_their_strides(device, backend, view, name, case, generator):
    op = OPS[name]
    if backend not in op.implementations:
        pytest.skip(f"{name} has no {backend} implementation")
    args = _as_views(case.make_args(device, torch.float32, generator), VIEWS[view])
    failures = []
    for direction in ("fwd", "bwd") if op.differentiable else ("fwd",):
        seed = int(torch.randint(2**62, (), generator=generator))
        _, detail = check_at_stated_precision(op, backend, torch.float32, direction, args, seed)
        if detail:
            failures.append(f"{direction}: {detail}")
    assert not failures, "\n".join(failures)
