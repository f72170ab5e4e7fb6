"""StyleGAN2 and StyleGAN (v1) generators at 1024 px and a StyleGAN2 R1 discriminator step at
256 px (issues: FIR resampling / StyleGAN2, adaptive normalization / StyleGAN).

- model.stylegan2-ffhq-1024.forward: one generator forward (mapping and synthesis) from a batch
  of z to 1024 px images, constant noise (`noise_mode="const"`, so every impl computes the same
  function). fastgen ops in it: upfirdn2d (every up-conv and the toRGB skip path) and bias_act.
- model.stylegan-ffhq-1024.forward: the same for the v1 generator; fastgen ops: ada_group_norm
  (AdaIN, 18 layers), upfirdn2d (the blur after upsampling) and bias_act.
- model.stylegan2-ffhq-256.r1_step: `stylegan2.r1_step`, a discriminator step with R1: G forward
  for the fakes, D on fakes and reals, the gradient of D(real) with respect to the reals with
  create_graph, and the backward through it (second derivatives of upfirdn2d and bias_act). The
  checked output is the stacked losses (fake, real, R1 penalty, total). No torch.compile row:
  AOTAutograd's compiled backward cannot be differentiated again.

The eager baseline is the model with every fastgen op on its reference
(`use_backend("reference")`), torch.compile compiles that, and one row per fast backend runs
the same model on that backend's kernels. Weights are random (seeded, shared by every impl),
bfloat16 (float16 would need StyleGAN2-ADA's overflow guards in the demodulation, which are not
implemented). Work is the FLOP count of the convolutions and matmuls (torch's FlopCounterMode
formulas on a meta-device run; the ops' FIR filtering and normalization are opaque to them and
left out), so fraction_of_ceiling is against the matmul rate and understates the work done.
"""
from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fastgen.models import stylegan, stylegan2

from .harness import Benchmark, Case, Impl, backend_impls, compile_reference

FAMILIES = {"stylegan": stylegan, "stylegan2": stylegan2}
# float32 cases only (CPU tests of the declarations): about twenty layers accumulate in a different
# order in each implementation; a wrong kernel is off by O(1).
_MODEL_TOLERANCE = (1e-3, 1e-3)


@functools.lru_cache(maxsize=4)
def _network(family: str, config_name: str, network: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    module = FAMILIES[family]
    model = module.build(config_name) if network == "generator" else module.build(config_name, network)
    return model.to(device=device, dtype=dtype).eval()


def _latents(config, batch: int, device, dtype, seed: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    return {"z": torch.randn(batch, config.z_dim, generator=generator, device=device, dtype=dtype)}


def _r1_inputs(config, batch: int, device, dtype, seed: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    real = torch.randn(batch, config.img_channels, config.resolution, config.resolution, generator=generator,
                       device=device, dtype=dtype)
    return {"real": real, **_latents(config, batch, device, dtype, seed + 1)}


class _FlopCount(TorchDispatchMode):
    """FlopCounterMode's per-op formulas without its module tracking, whose backward hooks
    break torch.autograd.grad (the R1 penalty) and no_grad regions of modules with trainable
    parameters."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def _meta_flops(call) -> int:
    with torch.device("meta"), _FlopCount() as counter:
        call()
    return counter.total


def _generator_benchmark(family: str, config_name: str, batch: int, dtype: torch.dtype) -> Benchmark:
    module = FAMILIES[family]
    config = module.CONFIGS[config_name]

    def forward(z):
        return _network(family, config_name, "generator", str(z.device), z.dtype)(z, noise_mode="const")

    def meta_forward():
        with torch.no_grad():
            module.build(config_name).eval()(torch.empty(batch, config.z_dim), noise_mode="const")

    impls = {
        "eager": Impl(lambda case: forward, backend="reference"),
        "compile": Impl(lambda case: compile_reference(forward), backend="reference"),
        **backend_impls(forward),
    }
    case = Case(f"B{batch} {config.resolution}px", dtype, "fwd",
                lambda device, dtype, seed: _latents(config, batch, device, dtype, seed), _meta_flops(meta_forward))
    return Benchmark(f"model.{family}-{config_name}.forward", [case], impls, bound="compute",
                     tolerance=_MODEL_TOLERANCE)


def _r1_benchmark(config_name: str, batch: int, dtype: torch.dtype) -> Benchmark:
    config = stylegan2.CONFIGS[config_name]

    def step(real, z):
        G = _network("stylegan2", config_name, "generator", str(real.device), real.dtype)
        D = _network("stylegan2", config_name, "discriminator", str(real.device), real.dtype)
        D.zero_grad(set_to_none=True)
        losses = stylegan2.r1_step(G, D, real, z=z, noise_mode="const")
        return torch.stack([losses[key] for key in ("loss_fake", "loss_real", "r1_penalty", "loss")])

    def meta_step():
        G, D = stylegan2.build(config_name), stylegan2.build(config_name, "discriminator")
        real = torch.empty(batch, config.img_channels, config.resolution, config.resolution)
        stylegan2.r1_step(G, D, real, z=torch.empty(batch, config.z_dim), noise_mode="const")

    impls = {"eager": Impl(lambda case: step, backend="reference"), **backend_impls(step)}
    case = Case(f"B{batch} {config.resolution}px", dtype, "fwd",
                lambda device, dtype, seed: _r1_inputs(config, batch, device, dtype, seed), _meta_flops(meta_step))
    return Benchmark(f"model.stylegan2-{config_name}.r1_step", [case], impls, bound="compute",
                     tolerance=_MODEL_TOLERANCE)


def benchmarks(quick: bool = False, batch: int = 4, dtype: torch.dtype = torch.bfloat16,
               stylegan2_config: str = "ffhq-1024", stylegan_config: str = "ffhq-1024", r1_config: str = "ffhq-256",
               r1_batch: int = 8) -> list:
    """Batch 4 generator forwards (StyleGAN2-ADA's per-GPU batch at 1024 px) and a batch 8 R1
    step at 256 px (the paper256 setup's per-GPU batch). The three are one case each, so
    `quick` runs them all."""
    return [
        _generator_benchmark("stylegan2", stylegan2_config, batch, dtype),
        _r1_benchmark(r1_config, r1_batch, dtype),
        _generator_benchmark("stylegan", stylegan_config, batch, dtype),
    ]
