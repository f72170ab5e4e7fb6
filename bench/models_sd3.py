"""Stable Diffusion 3.5 Large denoising step at 1024 px (issue #19: MM-DiT models).

One step is one transformer call on the classifier-free-guidance batch (2 x 1 image) of 1024 px
latents (128 x 128 x 16 through the 8x VAE: 4096 patch tokens) against 333 text tokens (77 CLIP
+ 256 T5), in bfloat16. The full run times the whole network (38 joint blocks, 16 GB of bf16
weights); the quick run times 4 of its blocks (the last one context_pre_only), which its row's
label says. The eager baseline is the model with every op on its reference
(`use_backend("reference")`), torch.compile compiles that, and one row per fast backend runs
the same model under it. Weights are random (seeded, shared by every impl); inputs are fresh per
rotation copy.

Work is the FLOP count of the matmuls and the patch convolution (torch's FlopCounterMode on a
meta-device run) plus 4 B T^2 C for each joint attention over T tokens, so fraction_of_ceiling
is against the bf16 matmul rate.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from fastgen.models import sd3

from .harness import Benchmark, Case
from .mmdit_work import build_on, seeded_randn, step_flops, step_impls

_LATENT_SIDE = 128  # 1024 px through the 8x VAE
_QUICK_BLOCKS = 4


def _config(config_name: str, blocks: Optional[int]) -> sd3.SD3Config:
    config = sd3.CONFIGS[config_name]
    return config if blocks is None else dataclasses.replace(config, num_layers=blocks)


@functools.lru_cache(maxsize=1)
def _model(config: sd3.SD3Config, device: str, dtype: torch.dtype) -> sd3.SD3Transformer:
    return build_on(lambda: sd3.build(config), device, dtype)


def _inputs(config: sd3.SD3Config, batch: int, side: int, text_tokens: int, device, dtype, seed: int) -> dict:
    random = seeded_randn(device, dtype, seed)
    return {"latents": random(batch, config.in_channels, side, side),
            "text": random(batch, text_tokens, config.joint_attention_dim),
            "pooled_text": random(batch, config.pooled_projection_dim)}


def _call(model: sd3.SD3Transformer, latents, text, pooled_text) -> torch.Tensor:
    timestep = torch.full((latents.shape[0],), sd3.TIMESTEP_RANGE / 2, device=latents.device)
    return model(latents, text, pooled_text, timestep)


def benchmarks(quick: bool = False, config_name: str = "sd3.5-large", side: int = _LATENT_SIDE,
               blocks: Optional[int] = None, text_tokens: int = sd3.EXAMPLE_TEXT_TOKENS) -> list:
    """`side`: the latent side (a multiple of the patch size); `blocks`: joint blocks to keep,
    None for the whole network (the quick run keeps _QUICK_BLOCKS); `text_tokens`: the CLIP + T5
    sequence length."""
    config = _config(config_name, _QUICK_BLOCKS if quick and blocks is None else blocks)
    full_depth = sd3.CONFIGS[config_name].num_layers
    dtype, batch = torch.bfloat16, 2  # one image, doubled by classifier-free guidance

    def step(latents, text, pooled_text):
        return _call(_model(config, str(latents.device), latents.dtype), latents, text, pooled_text)

    shapes = (config, batch, side, text_tokens)
    meta_inputs = {name: tensor.to("meta") for name, tensor in _inputs(*shapes, "cpu", torch.float32, 0).items()}
    flops = step_flops(lambda: sd3.build(config), lambda model: _call(model, **meta_inputs))
    depth = "" if config.num_layers == full_depth else f", {config.num_layers} of {full_depth} blocks"
    tokens = (side // config.patch_size) ** 2
    label = (f"{config_name} {sd3.AUTOENCODER_FACTOR * side} px ({tokens} image + {text_tokens} text "
             f"tokens), CFG batch {batch}{depth}")
    case = Case(label, dtype, "fwd", lambda device, dtype, seed: _inputs(*shapes, device, dtype, seed), flops)
    return [Benchmark(f"model.{config_name}.step", [case], step_impls(step), bound="compute")]
