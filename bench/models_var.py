"""VAR's multi-scale VQVAE tokenizing a 256 px batch (issue: codebook search + VAR VQVAE).

Two benchmarks, at batch 16 (and 1 and 64 outside quick mode), in float32 as VAR runs its
VQVAE (in bfloat16 the codes' distances tie within rounding so often that two correct runs pick
differently everywhere):
- `model.<config>.img_to_idx`: image -> the 10 scales' token maps (encoder, quant_conv and the
  residual quantizer: 680 tokens per image searched against 4096 x 32 codes).
- `model.<config>.quantizer`: the residual quantizer alone on a (B, 32, 16, 16) latent.

Impls: `eager` runs the model with the codebook search on its reference (VAR's addmm_ +
argmin); `compile` is torch.compile of that call with the search inlined as plain torch (so
inductor sees VAR's code, not an opaque op); one row per fast backend (`triton`, `cuda`) runs
the fastgen search under it. Weights are random (seeded, nn.Embedding's N(0, 1) codes), the
images uniform in [-1, 1].

What is checked: each call returns, per image, the mean squared residual ||f - f_hat||^2 left
after the last scale. Every scale's codes shape it, so a wrong search shows up at once, while
a legitimate pick between two codes at near-equal distance (which two correct searches, or
two compilations of the encoder, can make differently) changes it only slightly: hence the
loose model tolerance. Work is the FLOP count of the convolutions and matmuls (torch's
FlopCounterMode on a meta-device run) plus the search's cross term 2 N K D.
"""
from __future__ import annotations

import contextlib
import functools
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastgen.models import var_vqvae
from fastgen.ops import vq

from .harness import Benchmark, Case, Impl, backend_impls, compile_reference

_BATCHES = (1, 16, 64)
_QUICK_BATCH = 16
# A near-tie pick moves one image's residual energy by far less than this; a wrong code
# (or a wrong scale) by far more.
_MODEL_TOLERANCE = (2e-2, 1e-4)


@functools.lru_cache(maxsize=2)
def _model(config_name: str, device: str, dtype: torch.dtype) -> var_vqvae.VarVQVAE:
    torch.manual_seed(0)
    model = var_vqvae.build(config_name).to(device=device, dtype=dtype).eval()
    return model.requires_grad_(False)


def _residual_energy(model: var_vqvae.VarVQVAE, f: torch.Tensor) -> torch.Tensor:
    _, f_hat, _ = model.quantize.quantize(f, with_loss=False)
    return (f - f_hat).float().square().mean((1, 2, 3))


def _inline_search(z, codebook, metric="l2"):
    return vq.vq_nearest_reference(z, codebook, metric)[0]


@contextlib.contextmanager
def _search_inlined():
    with mock.patch.object(var_vqvae, "vq_nearest", _inline_search):
        yield


def _compiled(call):
    compiled = compile_reference(call)

    def run(**inputs):
        with _search_inlined():
            return compiled(**inputs)

    return run


def _impls(call) -> dict:
    return {
        "eager": Impl(lambda case: call, backend="reference"),
        "compile": Impl(lambda case: _compiled(call), backend="reference"),
        **backend_impls(call),
    }


def _search_flops(config: var_vqvae.VarVQVAEConfig, batch: int) -> int:
    tokens = batch * sum(p * p for p in config.patch_nums)
    return 2 * tokens * config.vocab_size * config.z_channels


def _encoder_flops(config: var_vqvae.VarVQVAEConfig, batch: int) -> int:
    with torch.device("meta"):
        model = var_vqvae.build(config)
        images = torch.empty(batch, config.in_channels, config.resolution, config.resolution)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.latent(images)
    return counter.get_total_flops()


def benchmarks(quick: bool = False, config_name: str = "var-256", batches: tuple = _BATCHES) -> list:
    config = var_vqvae.CONFIGS[config_name]
    batches = (_QUICK_BATCH,) if quick else batches
    side = config.patch_nums[-1]

    def tokenize(images):
        model = _model(config_name, str(images.device), images.dtype)
        return _residual_energy(model, model.latent(images))

    def quantize(f):
        return _residual_energy(_model(config_name, str(f.device), f.dtype), f)

    def case(batch: int, label: str, name: str, shape: tuple, sample, work: int) -> Case:
        def make_inputs(device, dtype, seed):
            generator = torch.Generator(device=device).manual_seed(seed)
            return {name: sample(shape, generator=generator, device=device).to(dtype)}

        return Case(f"{config_name} B{batch} {config.resolution}px{label}", torch.float32, "fwd", make_inputs, work)

    def uniform_images(shape, **options):
        return torch.rand(shape, **options) * 2 - 1

    image_cases = [case(b, "", "images", (b, config.in_channels, config.resolution, config.resolution),
                        uniform_images, _encoder_flops(config, b) + _search_flops(config, b)) for b in batches]
    latent_cases = [case(b, f" latent {side}x{side}", "f", (b, config.z_channels, side, side), torch.randn,
                         _search_flops(config, b)) for b in batches]
    return [
        Benchmark(f"model.{config_name}.img_to_idx", image_cases, _impls(tokenize), bound="compute",
                  tolerance=_MODEL_TOLERANCE),
        Benchmark(f"model.{config_name}.quantizer", latent_cases, _impls(quantize), bound="compute",
                  tolerance=_MODEL_TOLERANCE),
    ]
