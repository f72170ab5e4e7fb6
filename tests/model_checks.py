"""What the reference models' tests share: seeding the weights' initialisation, the (device,
backend) parameters and the check of a model's output and parameter gradients under a backend
against the reference ops, the check of a released config against its diffusers counterpart,
and the call an example_step makes."""
import pytest
import torch

import fastgen
from conftest import EMULATED_CUDA


def seed_global_rng(generator: torch.Generator) -> None:
    """Module initialisers draw from the global RNG: seed it from the per-test generator, so the
    weights are fresh every run and replayable from the printed seed."""
    torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))


_ON_A_GPU = [pytest.param("cuda", "triton", marks=pytest.mark.gpu), pytest.param("cuda", "cuda", marks=pytest.mark.gpu)]
# (device, backend): the Triton kernels under the interpreter here, the CUDA kernels emulated, and
# both backends on a GPU. A model of many GroupNorm launches leaves out the emulation
# (NOT_EMULATED): they take minutes there, and test_ada_norm.py runs those kernels emulated already.
EVERY_BACKEND = [("cpu", "triton"), EMULATED_CUDA, *_ON_A_GPU]
NOT_EMULATED = [("cpu", "triton"), *_ON_A_GPU]


def output_and_grads(model, *inputs):
    """model(*inputs) and the gradient of its mean square for every parameter that gets one."""
    model.zero_grad()
    out = model(*inputs)
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_backend_matches_reference(model, inputs, backend, *, atol=1e-5, grad_rtol=1e-4):
    """output_and_grads under `backend` against the reference ops': the output within rtol 1e-4,
    the same parameters with gradients, each within grad_rtol. Skips the test where the backend
    cannot run. Returns the backend's gradients."""
    with fastgen.use_backend("reference"):
        expected, expected_grads = output_and_grads(model, *inputs)
    try:
        with fastgen.use_backend(backend):
            out, grads = output_and_grads(model, *inputs)
    except fastgen.BackendUnavailable as reason:
        pytest.skip(f"backend {backend!r} cannot run here: {reason}")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=atol)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=grad_rtol, atol=atol, msg=name)
    return grads


def assert_released_config_matches_diffusers(module, reference_type, published: dict, name: str) -> int:
    """module.CONFIGS[name] is what the diffusers config.json `published` gives, and the model of
    that config, built on the meta device, has the parameters (names and shapes) of diffusers'
    `reference_type` built from it. Returns the parameter count."""
    assert type(module.CONFIGS[name]).from_diffusers(published) == module.CONFIGS[name]
    with torch.device("meta"):
        model = module.build(name)
        reference = reference_type(**{key: value for key, value in published.items() if not key.startswith("_")})
    assert all(p.is_meta for p in model.parameters())
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in reference.named_parameters()}
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    return count


def example_step_call(module, batch: int, generator) -> tuple:
    """Runs module.example_step twice on the tiny model in float64, checking that each step is one
    model call, on inputs made once, and returns that call's output. Returns (the model, the
    call's inputs)."""
    model = module.build("tiny").to(torch.float64).eval()
    calls = []
    model.register_forward_hook(lambda _, args, output: calls.append((args, output)))
    step = module.example_step(model, batch=batch, generator=generator)
    with torch.no_grad():
        out = step()
        step()
    (inputs, first), (second_inputs, _) = calls
    assert second_inputs[0] is inputs[0], "inputs are made once"
    assert out is first and out.shape == inputs[0].shape
    return model, inputs
