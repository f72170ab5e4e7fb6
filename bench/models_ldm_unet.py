"""Stable Diffusion 1.5 UNet denoising step (issue: cross-attention + LDM UNet).

One step is one UNet call on the classifier-free-guidance batch (2 x 1 image) of 512 px latents
(64 x 64 x 4 through SD's f8 VAE) against 77 CLIP tokens, in float16 as SD is deployed. The
eager baseline is fastgen's model with every op on its reference (`use_backend("reference")`),
torch.compile compiles that, and one row per fast backend runs the same model under it.
Because fastgen's eager GroupNorms carry the (zero) modulation of the ada_group_norm reference,
the model as users run it is timed beside them: diffusers' UNet2DConditionModel with the same
weights and its default SDPA attention ("diffusers"), and the same after
`fastgen.accelerate` ("diffusers-accelerated", attention only: SD's ResBlocks have no fused
norm replacement). Those rows skip when diffusers is not installed. Weights are random (seeded,
shared by every impl); inputs are fresh per rotation copy.

Work is the FLOP count of the matmuls and convolutions (torch's FlopCounterMode on a
meta-device run) plus 4 B Lq Lkv C for each attention call, which the counter does not see
inside the fastgen op, so fraction_of_ceiling is against the bf16 matmul rate.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastgen.models import ldm_unet

from .harness import Benchmark, Case, Impl, backend_impls, compile_reference, diffusers_twin

_TIMESTEP = 500.0


@functools.lru_cache(maxsize=2)
def _model(config_name: str, device: str, dtype: torch.dtype) -> ldm_unet.LDMUNet:
    torch.manual_seed(0)
    return ldm_unet.build(config_name).to(device=device, dtype=dtype).eval().requires_grad_(False)


@functools.lru_cache(maxsize=2)
def _diffusers_unet(config_name: str, device: str, dtype: torch.dtype, accelerated: bool):
    """diffusers' UNet2DConditionModel sharing `_model`'s weight tensors."""
    import diffusers

    unet = diffusers_twin(diffusers.UNet2DConditionModel, _model(config_name, device, dtype))
    if accelerated:
        from fastgen.accelerator import accelerate

        accelerate(unet, ops=["cross_attention"])
    return unet


def _inputs(config: ldm_unet.LDMUNetConfig, batch: int, side: int, device, dtype, seed: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    latents = torch.randn(batch, config.in_channels, side, side, generator=generator, device=device, dtype=dtype)
    context = torch.randn(batch, ldm_unet.CONTEXT_TOKENS, config.cross_attention_dim, generator=generator,
                          device=device, dtype=dtype)
    return {"latents": latents, "context": context}


def _step_flops(config_name: str, batch: int, side: int) -> int:
    with torch.device("meta"):  # 860M parameters for sd15: nothing is allocated
        model = ldm_unet.build(config_name)
    attention_flops = []

    def count_attention(module, args, output):
        tokens = args[0]
        keys = tokens if len(args) < 2 or args[1] is None else args[1]
        attention_flops.append(4 * tokens.shape[0] * tokens.shape[1] * keys.shape[1] * tokens.shape[2])

    hooks = [m.register_forward_hook(count_attention) for m in model.modules() if isinstance(m, ldm_unet.Attention)]
    inputs = _inputs(model.config, batch, side, "cpu", torch.float32, 0)
    meta = {name: t.to("meta") for name, t in inputs.items()}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(meta["latents"], torch.zeros(batch, device="meta"), meta["context"])
    for hook in hooks:
        hook.remove()
    return counter.get_total_flops() + sum(attention_flops)


def benchmarks(quick: bool = False, config_name: str = "sd15", resolution: int = 512) -> list:
    """The step at `resolution` pixels; tests pass the tiny config and a small resolution."""
    config = ldm_unet.CONFIGS[config_name]
    batch = 2  # one image, doubled by classifier-free guidance
    side = resolution // ldm_unet.VAE_SCALE

    def timesteps(latents):
        return torch.full((latents.shape[0],), _TIMESTEP, device=latents.device)

    def step(latents, context):
        return _model(config_name, str(latents.device), latents.dtype)(latents, timesteps(latents), context)

    def diffusers_step(accelerated: bool):
        def call(latents, context):
            unet = _diffusers_unet(config_name, str(latents.device), latents.dtype, accelerated)
            return unet(latents, timesteps(latents), context).sample

        return call

    impls = {
        "eager": Impl(lambda case: step, backend="reference"),
        "compile": Impl(lambda case: compile_reference(step), backend="reference"),
        **backend_impls(step),
        "diffusers": Impl(lambda case: diffusers_step(False)),
        "diffusers-accelerated": Impl(lambda case: diffusers_step(True), backend="triton"),
    }
    case = Case(f"{config_name} {resolution}px {side}x{side} latent, CFG batch {batch}, "
                f"{ldm_unet.CONTEXT_TOKENS} tokens", torch.float16, "fwd",
                lambda device, dtype, seed: _inputs(config, batch, side, device, dtype, seed),
                _step_flops(config_name, batch, side))
    return [Benchmark(f"model.{config_name}.step", [case], impls, bound="compute")]
