"""Every op, backend and direction on inputs with a size-0 dimension: each op's check cases with
the batch set to 0, and with each other dimension its eager formulation accepts at 0 (image rows
and columns, tokens, queries, keys). Outputs and gradients must have the reference's shapes and
values: the empty ones empty, the others (per-channel gradients, attention rows without keys,
usage counts) what an empty sum gives. Every op allocates NaN-poisoned outputs here, so an
output that a kernel skips writing for an empty input fails."""
import pytest
import torch

import fastgen.ops
from fastgen.ops.registry import OPS, Op, use_backend

# Per op, each size that may be 0: the (argument position, dimension) pairs that carry it. Not
# listed: channels of the filters' depthwise convolutions (conv2d rejects 0 groups) and group
# norm positions (torch's group_norm backward gives the weight a NaN gradient, 0 times the NaN
# rstd of an empty group, where the sum over no positions is 0).
ZERO_SIZES = {
    "ada_group_norm": {"batch": ((0, 0), (1, 0), (2, 0))},
    "ada_layer_norm": {"batch": ((0, 0), (1, 0), (2, 0)), "tokens": ((0, 1),)},
    "bias_act": {"batch": ((0, 0),)},
    "channel_dup_pixel_shuffle": {"batch": ((0, 0), (3, 0)), "height": ((0, 2), (3, 2)), "width": ((0, 3), (3, 3))},
    "cross_attention": {"batch": ((0, 0), (1, 0), (2, 0), (3, 0)), "queries": ((0, 1),),
                        "keys": ((1, 1), (2, 1), (3, 1))},
    "filtered_lrelu": {"batch": ((0, 0),)},
    "gated_residual_ada_layer_norm": {"batch": ((0, 0), (1, 0), (2, 0), (3, 0), (4, 0)), "tokens": ((0, 1), (1, 1))},
    "linear_attention": {"batch": ((0, 0), (1, 0), (2, 0)), "queries": ((0, 1),), "keys": ((1, 1), (2, 1))},
    "pixel_unshuffle_channel_avg": {"batch": ((0, 0), (3, 0)), "height": ((0, 2), (3, 2)), "width": ((0, 3), (3, 3))},
    "qk_norm_rope": {"batch": ((0, 0), (1, 0)), "tokens": ((0, 1), (1, 1), (4, 0), (5, 0)), "heads": ((0, 2), (1, 2))},
    "trms2d": {"batch": ((0, 0),), "height": ((0, 2),), "width": ((0, 3),)},
    "upfirdn2d": {"batch": ((0, 0),)},
    "vq_nearest": {"rows": ((0, 0),)},
    "vq_quantize": {"rows": ((0, 0),)},
}
CPU = torch.device("cpu")
# cross_attention with block ends (its argument 5) is self-attention over one sequence: its
# queries and keys are empty together, and so are the ends.
BLOCK_CAUSAL_ZERO_SIZES = {"batch": ZERO_SIZES["cross_attention"]["batch"], "tokens": ((0, 1), (1, 1), (2, 1), (5, 0))}
BACKENDS = ["reference", "triton", pytest.param("cuda", id="cuda-emulated", marks=pytest.mark.cuda_emulation)]


def test_every_op_has_its_zero_sizes_listed():
    assert set(ZERO_SIZES) == set(OPS)


def _every_op() -> list:
    """The registered ops and the backward and multi-output ops behind them."""
    found = {id(value): value for module in fastgen.ops.FAMILIES for value in vars(module).values()
             if isinstance(value, Op)}
    return list(found.values())


def _poison(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.fill_(float("nan") if tensor.is_floating_point() else -1)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every op's outputs start as NaN (or -1 for integers) instead of uninitialised memory."""
    for op in _every_op():
        def allocate(*args, allocate_output=op.allocate_output):
            out = allocate_output(*args)
            for tensor in out if isinstance(out, tuple) else (out,):
                _poison(tensor)
            return out

        monkeypatch.setattr(op, "allocate_output", allocate)


def _with_zero_size(args: tuple, carriers: tuple) -> tuple:
    """args with each carrier (position, dim) narrowed to size 0; absent (None) ones stay."""
    args = list(args)
    for position, dim in carriers:
        if args[position] is not None:
            args[position] = args[position].narrow(dim, 0, 0)
    return tuple(args)


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if actual is None or expected is None:  # a constant argument (a RoPE table) has no gradient
        assert actual is expected, f"{what}: {actual} where the reference gives {expected}"
        return
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _zero_sizes(name: str, case) -> dict:
    if name == "cross_attention" and case.make_args(CPU, torch.float32, torch.Generator())[5] is not None:
        return BLOCK_CAUSAL_ZERO_SIZES
    return ZERO_SIZES[name]


def _cases() -> list:
    return [pytest.param(name, size, carriers, case, id=f"{name}-{size}-{case.label}")
            for name in sorted(ZERO_SIZES) for case in OPS[name].check_cases()
            for size, carriers in _zero_sizes(name, case).items()]


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, size, carriers, case", _cases())
def test_forward_and_backward_with_a_zero_size(backend, name, size, carriers, case, generator):
    op = OPS[name]
    if backend != "reference" and backend not in op.implementations:
        pytest.skip(f"{name} has no {backend} implementation")
    args = _with_zero_size(case.make_args(CPU, torch.float32, generator), carriers)
    leaves = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    fast_args, reference_args = list(args), list(args)
    for i in leaves:
        fast_args[i] = args[i].detach().requires_grad_(op.differentiable)
        reference_args[i] = args[i].detach().requires_grad_(op.differentiable)
    with use_backend(backend):
        outputs = _as_tuple(getattr(torch.ops.fastgen, name)(*fast_args))
    expected = _as_tuple(op.reference(*reference_args))
    for i, (actual, wanted) in enumerate(zip(outputs, expected, strict=True)):
        _assert_same(actual, wanted, f"output {i}")
    if not op.differentiable:
        return
    differentiable = [i for i, o in enumerate(outputs) if o.is_floating_point()]
    grads = [torch.randn(outputs[i].shape, generator=generator) for i in differentiable]
    with use_backend(backend):
        torch.autograd.backward([outputs[i] for i in differentiable], grads)
    torch.autograd.backward([expected[i] for i in differentiable], grads)
    for i in leaves:
        _assert_same(fast_args[i].grad, reference_args[i].grad, f"gradient of argument {i}")
