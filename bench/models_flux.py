"""FLUX.1 [dev] denoising step at 1024 px (issue #19: MM-DiT models).

One step is one transformer call on one image: 4096 packed image tokens (a 128 x 128 x 16 latent
through the 8x VAE, packed 2 x 2) against 512 T5 tokens, with the distilled guidance as an input
(no guidance batch), in bfloat16. The full run times the whole network (19 double-stream and 38
single-stream blocks, 24 GB of bf16 weights); the quick run times 2 double and 4 single blocks
of it, which its row's label says: the same block shapes, a tenth of the weights and of the
compile time. The eager baseline is the model with every op on its reference
(`use_backend("reference")`), torch.compile compiles that, and one row per fast backend runs
the same model under it. Weights are random (seeded, shared by every impl); inputs are fresh per
rotation copy.

Work is the FLOP count of the matmuls (torch's FlopCounterMode on a meta-device run) plus
4 B T^2 C for each joint attention over T tokens, so fraction_of_ceiling is against the bf16
matmul rate.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from fastgen.models import flux

from .harness import Benchmark, Case
from .mmdit_work import build_on, seeded_randn, step_flops, step_impls

_LATENT_SIDE = 128  # 1024 px through the 8x VAE
# The quick run's slice of the network: (double-stream, single-stream) blocks.
_QUICK_BLOCKS = (2, 4)


def _config(config_name: str, blocks: Optional[tuple]) -> flux.FluxConfig:
    config = flux.CONFIGS[config_name]
    if blocks is None:
        return config
    return dataclasses.replace(config, num_layers=blocks[0], num_single_layers=blocks[1])


@functools.lru_cache(maxsize=1)
def _model(config: flux.FluxConfig, device: str, dtype: torch.dtype) -> flux.FluxTransformer:
    return build_on(lambda: flux.build(config), device, dtype)


def _inputs(config: flux.FluxConfig, batch: int, side: int, text_tokens: int, device, dtype, seed: int) -> dict:
    random = seeded_randn(device, dtype, seed)
    return {"image_tokens": random(batch, (side // 2) ** 2, config.in_channels),
            "text": random(batch, text_tokens, config.joint_attention_dim),
            "pooled_text": random(batch, config.pooled_projection_dim)}


def _call(model: flux.FluxTransformer, side: int, image_tokens, text, pooled_text) -> torch.Tensor:
    batch, device = image_tokens.shape[0], image_tokens.device
    guidance = torch.full((batch,), flux.DEFAULT_GUIDANCE, device=device) if model.config.guidance_embeds else None
    return model(image_tokens, text, pooled_text, torch.full((batch,), 0.5, device=device),
                 flux.image_ids(side, side, device), flux.text_ids(text.shape[1], device), guidance)


def _label(config_name: str, config: flux.FluxConfig, side: int, text_tokens: int, batch: int) -> str:
    full = flux.CONFIGS[config_name]
    blocks = ("" if config == full else
              f", {config.num_layers} of {full.num_layers} double + {config.num_single_layers} of "
              f"{full.num_single_layers} single blocks")
    return (f"{config_name} {flux.AUTOENCODER_FACTOR * side} px ({(side // 2) ** 2} image + "
            f"{text_tokens} text tokens), batch {batch}{blocks}")


def benchmarks(quick: bool = False, config_name: str = "flux-dev", side: int = _LATENT_SIDE,
               blocks: Optional[tuple] = None, text_tokens: int = flux.EXAMPLE_TEXT_TOKENS) -> list:
    """`side`: the latent side (even); `blocks`: (double, single) blocks to keep, None for the
    whole network (the quick run keeps _QUICK_BLOCKS); `text_tokens`: the T5 sequence length."""
    config = _config(config_name, _QUICK_BLOCKS if quick and blocks is None else blocks)
    dtype, batch = torch.bfloat16, 1

    def step(image_tokens, text, pooled_text):
        model = _model(config, str(image_tokens.device), image_tokens.dtype)
        return _call(model, side, image_tokens, text, pooled_text)

    shapes = (config, batch, side, text_tokens)
    meta_inputs = {name: tensor.to("meta") for name, tensor in _inputs(*shapes, "cpu", torch.float32, 0).items()}
    flops = step_flops(lambda: flux.build(config), lambda model: _call(model, side, **meta_inputs))
    case = Case(_label(config_name, config, side, text_tokens, batch), dtype, "fwd",
                lambda device, dtype, seed: _inputs(*shapes, device, dtype, seed), flops)
    return [Benchmark(f"model.{config_name}.step", [case], step_impls(step), bound="compute")]
