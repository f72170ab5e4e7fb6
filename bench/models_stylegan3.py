"""StyleGAN3 generator forward at 1024 px, T and R configurations (issue: FIR resampling and
filtered nonlinearities).

One call is one generator forward (mapping and synthesis) from a batch of latents z to 1024 px
images, the model's `example_step`. The eager baseline is the model with every fastgen op on its
reference (`use_backend("reference")`: filtered_lrelu as zero insertion + pad + conv2d FIR, the
activation, and a second FIR, with the 2x-upsampled intermediate written to memory at every
layer); torch.compile compiles that; one row per fast backend runs the same model on that
backend's fused filtered_lrelu (and bias_act) kernels. Weights are random (seeded, shared by
every impl), float16: NVlabs runs the expensive high-resolution layers in float16, with the
activations clamped to +-256.

Work is the FLOP count of the modulated convolutions and matmuls (torch's FlopCounterMode on a
meta-device run; the FIR filtering inside filtered_lrelu is opaque to it and left out), so
fraction_of_ceiling is against the matmul rate and understates the work done.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastgen.models import stylegan3

from .harness import Benchmark, Case, Impl, backend_impls, compile_reference

CONFIG_NAMES = ("stylegan3-t-1024", "stylegan3-r-1024")
# float32 cases only (CPU tests of the declarations): fifteen layers accumulate in a different
# order in each implementation; a wrong kernel is off by O(1).
_MODEL_TOLERANCE = (1e-3, 1e-3)


@functools.lru_cache(maxsize=2)
def _model(config_name: str, device: str, dtype: torch.dtype) -> stylegan3.Generator:
    torch.manual_seed(0)
    model = stylegan3.build(config_name).to(device=device, dtype=dtype).eval()
    return model.requires_grad_(False)


def _latents(config: stylegan3.StyleGAN3Config, batch: int, device, dtype, seed: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    return {"z": torch.randn(batch, config.z_dim, generator=generator, device=device, dtype=dtype)}


def _forward_flops(config_name: str, batch: int) -> int:
    with torch.device("meta"):  # the full configs would otherwise allocate and run here
        model = stylegan3.build(config_name).eval()
        z = torch.empty(batch, model.config.z_dim)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(z)
    return counter.get_total_flops()


def benchmarks(quick: bool = False, config_names=CONFIG_NAMES, batch: int = 4,
               dtype: torch.dtype = torch.float16) -> list:
    """quick: only the first config (the T generator, the issue's target)."""
    benches = []
    for config_name in config_names[:1] if quick else config_names:
        config = stylegan3.CONFIGS[config_name]

        def forward(z, config_name=config_name):
            return _model(config_name, str(z.device), z.dtype)(z)

        impls = {
            "eager": Impl(lambda case, forward=forward: forward, backend="reference"),
            "compile": Impl(lambda case, forward=forward: compile_reference(forward), backend="reference"),
            **backend_impls(forward),
        }
        case = Case(f"B{batch} {config.resolution}px", dtype, "fwd",
                    lambda device, dtype, seed, config=config: _latents(config, batch, device, dtype, seed),
                    _forward_flops(config_name, batch))
        benches.append(Benchmark(f"model.{config_name}.forward", [case], impls, bound="compute",
                                 tolerance=_MODEL_TOLERANCE))
    return benches
