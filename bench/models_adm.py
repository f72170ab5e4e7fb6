"""ADM (guided-diffusion) UNet denoising step (issue: adaptive normalization + ADM).

One step is one UNet call on the classifier-free-guidance batch (2 x B) of pixel-space images:
256 x 256 x 3 for the ImageNet 256 model (554M parameters) and 64 x 64 x 3 for the ImageNet
64 model (296M), at random timesteps and class labels. The eager baseline is the model with
every fastgen op on its reference (GroupNorm, multiply, add, SiLU for AdaGN; math attention),
torch.compile compiles that, and one row per fast backend runs the same model with that
backend's fused AdaGN and flash attention kernels. Weights are random (seeded, shared by every
impl); inputs are fresh per rotation copy.

Work is the FLOP count of the convolutions and matmuls (torch's FlopCounterMode on a
meta-device run) plus attention's 4 B T^2 C per attention block (the fastgen op is opaque to
the counter), so fraction_of_ceiling is against the bf16 matmul rate.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastgen.models import adm_unet

from .harness import Benchmark, Case, Impl, backend_impls, compile_reference

# bfloat16 through ~30 residual blocks rounds differently in each implementation; a wrong kernel
# is off by O(1).
_MODEL_TOLERANCE = (0.1, 0.1)


@functools.lru_cache(maxsize=2)
def _model(config_name: str, device: str, dtype: torch.dtype) -> adm_unet.ADMUNet:
    torch.manual_seed(0)
    return adm_unet.build(config_name).to(device=device, dtype=dtype).eval().requires_grad_(False)


def _inputs(config: adm_unet.ADMConfig, batch: int, side: int, device, dtype, seed: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, config.in_channels, side, side, generator=generator, device=device, dtype=dtype)
    timesteps = torch.randint(adm_unet.NUM_TRAIN_TIMESTEPS, (batch,), generator=generator, device=device).float()
    labels = torch.randint(config.num_classes, (batch,), generator=generator, device=device)
    return {"x": x, "timesteps": timesteps, "labels": labels}


def _step_flops(config: adm_unet.ADMConfig, batch: int, side: int) -> int:
    with torch.device("meta"):
        model = adm_unet.build(config)
    attention_flops = []

    def count_attention(module, args):
        _, channels, height, width = args[0].shape
        attention_flops.append(4 * batch * (height * width) ** 2 * channels)

    for module in model.modules():
        if isinstance(module, adm_unet.AttentionBlock):
            module.register_forward_pre_hook(count_attention)
    inputs = {name: tensor.to("meta") for name, tensor in _inputs(config, batch, side, "cpu", torch.float32, 0).items()}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops() + sum(attention_flops)


def _step_benchmark(config_name: str, side: int, batch: int) -> Benchmark:
    config = adm_unet.CONFIGS[config_name]

    def step(x, timesteps, labels):
        return _model(config_name, str(x.device), x.dtype)(x, timesteps, labels)

    impls = {
        "eager": Impl(lambda case: step, backend="reference"),
        "compile": Impl(lambda case: compile_reference(step), backend="reference"),
        **backend_impls(step),
    }
    case = Case(f"{config_name} {side}x{side} px, CFG batch {batch}", torch.bfloat16, "fwd",
                lambda device, dtype, seed: _inputs(config, batch, side, device, dtype, seed),
                _step_flops(config, batch, side))
    return Benchmark(f"model.adm-{config_name}.step", [case], impls, bound="compute", tolerance=_MODEL_TOLERANCE)


def benchmarks(quick: bool = False, config_names: tuple = ("imagenet256", "imagenet64"),
               side: int | None = None, batch: int = 2) -> list:
    """One step per config (quick: the first only); batch 2 is one image doubled by guidance.
    `side` overrides the configs' image size (the tests run the tiny config small)."""
    names = config_names[:1] if quick else config_names
    return [_step_benchmark(name, side or adm_unet.CONFIGS[name].image_size, batch) for name in names]
