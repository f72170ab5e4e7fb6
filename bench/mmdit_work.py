"""What the MM-DiT model benchmarks (models_flux, models_sd3) share: building a large model
straight on the GPU in its dtype, seeded random inputs, a step's FLOP count, and the impls that
time a step."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastgen.models import mmdit

from .harness import Impl, backend_impls, compile_reference


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_on(build: Callable[[], torch.nn.Module], device: str, dtype: torch.dtype) -> torch.nn.Module:
    """An inference model with random weights (seed 0) created on `device` in `dtype`: a
    12B-parameter model built in float32 and cast afterwards would need three times the memory."""
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(dtype):
        model = build()
    return model.to(dtype).eval().requires_grad_(False)


def seeded_randn(device, dtype: torch.dtype, seed: int) -> Callable[..., torch.Tensor]:
    """randn(*shape): standard normal values on `device` in `dtype`, from one generator seeded with `seed`."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    return randn


def step_flops(build: Callable[[], torch.nn.Module], call: Callable[[torch.nn.Module], object]) -> int:
    """FLOPs of call(model) on a meta-device model: the matmuls and convolutions torch's
    FlopCounterMode counts, plus 4 B T^2 H D for each joint attention over T tokens, which the
    counter does not see inside the fastgen op."""
    with torch.device("meta"):  # the released configs would otherwise allocate gigabytes here
        model = build()
    attention_flops = []

    def count_attention(module, args, output):
        tokens = args[0].shape[1] + (args[1].shape[1] if len(args) > 1 and args[1] is not None else 0)
        attention_flops.append(4 * args[0].shape[0] * tokens ** 2 * module.heads * module.head_dim)

    hooks = [m.register_forward_hook(count_attention) for m in model.modules() if isinstance(m, mmdit.JointAttention)]
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            call(model)
    finally:
        for hook in hooks:
            hook.remove()
    return counter.get_total_flops() + sum(attention_flops)


def step_impls(step: Callable) -> dict:
    """The model with every op on its reference ("eager"), torch.compile of that, and the same
    model under each fast backend."""
    return {"eager": Impl(lambda case: step, backend="reference"),
            "compile": Impl(lambda case: compile_reference(step), backend="reference"),
            **backend_impls(step)}
