"""SANA Linear DiT denoising step and a full sample (issue: linear attention + SANA).

One step is one transformer call on the classifier-free-guidance batch (2 x B) of 1024 px
latents (32 x 32 x 32 with the f32 DC-AE) against 300 caption tokens; the sample is SANA's
20-step Flow-DPM-Solver loop with guidance (sana.sample's default: one transformer call per
step, as Euler's). The eager baseline is the model with every op
on its reference (`use_backend("reference")`), torch.compile compiles that, and one row per
fast backend runs the same model under it. Weights are random (seeded, shared by every
impl); inputs are fresh per rotation copy.

Work is the FLOP count of the matmuls and convolutions (torch's FlopCounterMode on a meta-device
run) plus linear attention's 4 B N H D^2, so fraction_of_ceiling is against the bf16 matmul rate.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastgen.models import sana

from .harness import Benchmark, Case, Impl, backend_impls, compile_reference

_CAPTION_TOKENS = 300
_LATENT_SIDE = 32  # 1024 px through the f32 DC-AE


@functools.lru_cache(maxsize=2)
def _model(config_name: str, device: str, dtype: torch.dtype) -> sana.SanaTransformer:
    torch.manual_seed(0)
    model = sana.build(config_name).to(device=device, dtype=dtype).eval()
    return model.requires_grad_(False)


def _inputs(config: sana.SanaConfig, batch: int, side: int, device, dtype, seed: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    latents = torch.randn(batch, config.in_channels, side, side, generator=generator, device=device, dtype=dtype)
    caption = torch.randn(batch, _CAPTION_TOKENS, config.caption_channels, generator=generator, device=device,
                          dtype=dtype)
    mask = torch.ones(batch, _CAPTION_TOKENS, dtype=torch.bool, device=device)
    mask[batch // 2:, 120:] = False  # the guidance half's null caption is shorter
    return {"latents": latents, "caption": caption, "caption_mask": mask}


def _step_flops(config: sana.SanaConfig, batch: int, side: int) -> int:
    with torch.device("meta"):  # the full configs would otherwise allocate gigabytes here
        model = sana.build(config)
    inputs = _inputs(config, batch, side, "cpu", torch.float32, 0)
    meta_inputs = {name: tensor.to("meta") for name, tensor in inputs.items()}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(meta_inputs["latents"], meta_inputs["caption"], torch.zeros(batch, device="meta"),
              meta_inputs["caption_mask"])
    tokens = (side // config.patch_size) ** 2
    linear_attention = 4 * batch * tokens * config.hidden_size * config.attention_head_dim * config.num_layers
    return counter.get_total_flops() + linear_attention


def _impls(call) -> dict:
    return {
        "eager": Impl(lambda case: call, backend="reference"),
        "compile": Impl(lambda case: compile_reference(call), backend="reference"),
        **backend_impls(call),
    }


def benchmarks(quick: bool = False, config_name: str = "sana-1600m", side: int = _LATENT_SIDE,
               num_steps: int = sana.DEFAULT_NUM_STEPS) -> list:
    config = sana.CONFIGS[config_name]
    dtype = torch.bfloat16
    batch = 2  # one image, doubled by classifier-free guidance

    def step(latents, caption, caption_mask):
        model = _model(config_name, str(latents.device), latents.dtype)
        timestep = torch.full((latents.shape[0],), 500.0, device=latents.device)
        return model(latents, caption, timestep, caption_mask)

    def sample(latents, caption, caption_mask):
        model = _model(config_name, str(latents.device), latents.dtype)
        half = latents.shape[0] // 2
        return sana.sample(model, latents[:half], caption[:half], caption_mask[:half],
                           null_caption=caption[half:], null_caption_mask=caption_mask[half:], num_steps=num_steps)

    step_flops = _step_flops(config, batch, side)
    shape = f"{config_name} {side}x{side} latent, CFG batch {batch}"

    def case(direction_label: str, work: int) -> Case:
        return Case(f"{shape}{direction_label}", dtype, "fwd",
                    lambda device, dtype, seed: _inputs(config, batch, side, device, dtype, seed), work)

    benches = [Benchmark(f"model.{config_name}.step", [case("", step_flops)], _impls(step), bound="compute")]
    if not quick:
        benches.append(Benchmark(f"model.{config_name}.sample{num_steps}", [case(f", {num_steps} steps",
                                                                              num_steps * step_flops)],
                                 _impls(sample), bound="compute"))
    return benches
