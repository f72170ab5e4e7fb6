"""DC-AE decode (and encode) of the SANA autoencoder f32c32 (issue: DC-AE).

The decode of one 2048 px image (a 64 x 64 x 32 latent) is the benchmark's canonical step:
after SANA's 20 denoising steps at 2048 px it is a large share of generation time. 1024 px is
SANA's default size; the full run adds the encoder at both sizes. The eager baseline is the
model with every fastgen op on its reference (`use_backend("reference")`: pixel_unshuffle +
mean + add, repeat_interleave + pixel_shuffle + add, diffusers' RMSNorm and linear-attention
formulations); torch.compile compiles that; one row per fast backend runs the same model with
that backend's kernels. The model as users run it is timed beside them: diffusers'
AutoencoderDC with the same weights ("diffusers") and the same after `fastgen.accelerate` under
the Triton backend ("diffusers-accelerated"); those rows skip when diffusers is not installed.
Weights are random (seeded, shared by every impl), bfloat16.

Work is the FLOP count of the convolutions and matmuls (torch's FlopCounterMode on a
meta-device run) plus linear attention's 4 N D^2 per head (state and readout), so
fraction_of_ceiling is against the bf16 matmul rate.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastgen.models import dcae

from .harness import Benchmark, Case, Impl, backend_impls, compile_reference, diffusers_twin

# bfloat16 rounding through some forty blocks, each implementation in its own order; a wrong
# kernel is off by O(1).
_MODEL_TOLERANCE = (0.1, 0.1)


@functools.lru_cache(maxsize=2)
def _model(config_name: str, device: str, dtype: torch.dtype) -> dcae.DCAE:
    torch.manual_seed(0)
    model = dcae.build(config_name).to(device=device, dtype=dtype).eval()
    return model.requires_grad_(False)


@functools.lru_cache(maxsize=2)
def _diffusers_autoencoder(config_name: str, device: str, dtype: torch.dtype, accelerated: bool):
    """diffusers' AutoencoderDC sharing `_model`'s weight tensors."""
    import diffusers

    autoencoder = diffusers_twin(diffusers.AutoencoderDC, _model(config_name, device, dtype))
    if accelerated:
        from fastgen.accelerator import accelerate

        accelerate(autoencoder)
    return autoencoder


def _flops(config_name: str, direction: str, batch: int, resolution: int) -> int:
    """FLOPs of one encode or decode: convolutions and matmuls counted on meta, plus the
    linear attention's (the op is opaque to the counter), read off each attention's input."""
    with torch.device("meta"):
        model = dcae.build(config_name)
    attention_flops = []

    def count(module, args):
        x = args[0]
        pixels = x.shape[0] * x.shape[2] * x.shape[3]
        heads = module.to_out.in_features // module.attention_head_dim
        attention_flops.append(4 * pixels * heads * module.attention_head_dim**2)

    hooks = [m.register_forward_pre_hook(count) for m in model.modules()
             if isinstance(m, dcae.MultiscaleLinearAttention)]
    x = torch.empty(_input_shape(model.config, direction, batch, resolution), device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        getattr(model, direction)(x)
    for hook in hooks:
        hook.remove()
    return counter.get_total_flops() + sum(attention_flops)


def _input_shape(config: dcae.DCAEConfig, direction: str, batch: int, resolution: int) -> tuple:
    """The latent of a `resolution` px image for decode, the image for encode."""
    if direction == "decode":
        side = resolution // config.spatial_compression
        return batch, config.latent_channels, side, side
    return batch, config.in_channels, resolution, resolution


def _inputs(config: dcae.DCAEConfig, direction: str, batch: int, resolution: int, device, dtype, seed: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = _input_shape(config, direction, batch, resolution)
    return {"x": torch.randn(shape, generator=generator, device=device, dtype=dtype)}


def _call(config_name: str, direction: str):
    def run(x: torch.Tensor) -> torch.Tensor:
        model = _model(config_name, str(x.device), x.dtype)
        with torch.no_grad():
            return getattr(model, direction)(x)

    return run


def _diffusers_call(config_name: str, direction: str, accelerated: bool):
    def run(x: torch.Tensor) -> torch.Tensor:
        autoencoder = _diffusers_autoencoder(config_name, str(x.device), x.dtype, accelerated)
        with torch.no_grad():
            return autoencoder.decode(x).sample if direction == "decode" else autoencoder.encode(x).latent

    return run


def benchmarks(quick: bool = False, config_name: str = "f32c32", resolutions: tuple = (2048, 1024),
               batch: int = 1) -> list:
    """quick: the decode at the first resolution only."""
    config = dcae.CONFIGS[config_name]
    dtype = torch.bfloat16
    plan = [("decode", resolutions[0])] if quick else [
        (direction, resolution) for direction in ("decode", "encode") for resolution in resolutions]
    benches = []
    for direction, resolution in plan:
        call = _call(config_name, direction)
        case = Case(f"{config_name} {resolution}px B{batch}", dtype, "fwd",
                    functools.partial(_inputs, config, direction, batch, resolution),
                    _flops(config_name, direction, batch, resolution))
        impls = {
            "eager": Impl(lambda case, call=call: call, backend="reference"),
            "compile": Impl(lambda case, call=call: compile_reference(call), backend="reference"),
            **backend_impls(call),
            "diffusers": Impl(lambda case, d=direction: _diffusers_call(config_name, d, False)),
            "diffusers-accelerated": Impl(lambda case, d=direction: _diffusers_call(config_name, d, True),
                                          backend="triton"),
        }
        benches.append(Benchmark(f"model.dcae-{config_name}.{direction}{resolution}", [case], impls,
                                 bound="compute", tolerance=_MODEL_TOLERANCE))
    return benches
