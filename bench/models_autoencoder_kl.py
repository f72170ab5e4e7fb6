"""AutoencoderKL decode: the VAE of SD 1.5 (sd15-vae; SDXL's and FLUX.1's have the same decoder
but for FLUX.1's 16 latent channels) (issue #20).

Decoding the latent ends every SD, SDXL and FLUX.1 generation: 2.5 TFLOP at 512 px (a guided
SD 1.5 UNet step is 1.6), 10.5 at 1024 px and 48 at 2048 px, where the middle attention over
65536 pixels adds its quadratic share to the full-resolution convolutions. One benchmark per
image side (512, 1024 and 2048 px: latents of 64, 128 and 256; quick: 1024 px), each one plain
decode of a batch-1 latent. The eager baseline is fastgen's model with every op on its
reference (`use_backend("reference")`: GroupNorm, then the zero modulation, then SiLU);
torch.compile compiles that; one row per fast backend runs the same model under it. diffusers'
AutoencoderKL with the same weights is timed beside them ("diffusers", skipped when diffusers
is not installed); `fastgen.accelerate` changes nothing in it (its ResnetBlocks have no
modulated norm to fuse and its attention head, 512 wide, is above the attention op's limit), so
there is no accelerated diffusers row. Weights are random (seeded, shared by every impl),
bfloat16.

Work is the FLOP count of the convolutions and matmuls, the attention's included (torch's
FlopCounterMode on a meta-device run), so fraction_of_ceiling is against the bf16 matmul rate.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastgen.models import autoencoder_kl

from .harness import Benchmark, Case, Impl, backend_impls, compile_reference, diffusers_twin

# bfloat16 rounding through some thirty ResnetBlocks, each implementation in its own order; a
# wrong kernel is off by O(1).
_MODEL_TOLERANCE = (0.1, 0.1)


@functools.lru_cache(maxsize=2)
def _model(config_name: str, device: str, dtype: torch.dtype) -> autoencoder_kl.AutoencoderKL:
    torch.manual_seed(0)
    return autoencoder_kl.build(config_name).to(device=device, dtype=dtype).eval().requires_grad_(False)


@functools.lru_cache(maxsize=2)
def _diffusers_autoencoder(config_name: str, device: str, dtype: torch.dtype):
    """diffusers' AutoencoderKL sharing `_model`'s weight tensors."""
    import diffusers

    return diffusers_twin(diffusers.AutoencoderKL, _model(config_name, device, dtype))


def _latent_shape(config: autoencoder_kl.AutoencoderKLConfig, batch: int, resolution: int) -> tuple:
    side = resolution // config.spatial_compression
    return batch, config.latent_channels, side, side


def _flops(config_name: str, batch: int, resolution: int) -> int:
    with torch.device("meta"):
        model = autoencoder_kl.build(config_name)
        latents = torch.empty(_latent_shape(model.config, batch, resolution))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.decode(latents)
    return counter.get_total_flops()


def _inputs(config: autoencoder_kl.AutoencoderKLConfig, batch: int, resolution: int, device, dtype, seed: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = _latent_shape(config, batch, resolution)
    return {"z": torch.randn(shape, generator=generator, device=device, dtype=dtype)}


def _decode(config_name: str):
    def run(z: torch.Tensor) -> torch.Tensor:
        model = _model(config_name, str(z.device), z.dtype)
        with torch.no_grad():
            return model.decode(z)

    return run


def _diffusers_decode(config_name: str):
    def run(z: torch.Tensor) -> torch.Tensor:
        autoencoder = _diffusers_autoencoder(config_name, str(z.device), z.dtype)
        with torch.no_grad():
            return autoencoder.decode(z).sample

    return run


def benchmarks(quick: bool = False, config_name: str = "sd15-vae", resolutions: tuple = (512, 1024, 2048),
               batch: int = 1) -> list:
    """quick: the decode at 1024 px only (the middle of `resolutions`); tests pass the tiny
    config and small resolutions."""
    config = autoencoder_kl.CONFIGS[config_name]
    call = _decode(config_name)
    impls = {
        "eager": Impl(lambda case: call, backend="reference"),
        "compile": Impl(lambda case: compile_reference(call), backend="reference"),
        **backend_impls(call),
        "diffusers": Impl(lambda case: _diffusers_decode(config_name)),
    }
    benches = []
    for resolution in [resolutions[len(resolutions) // 2]] if quick else resolutions:
        case = Case(f"{config_name} {resolution}px B{batch}", torch.bfloat16, "fwd",
                    functools.partial(_inputs, config, batch, resolution), _flops(config_name, batch, resolution))
        benches.append(Benchmark(f"model.{config_name}.decode{resolution}", [case], impls, bound="compute",
                                 tolerance=_MODEL_TOLERANCE))
    return benches
