"""VAR's multi-scale VQVAE tokenizing a 256 px batch (issue: codebook search + VAR VQVAE), and
VAR-d16 generating a batch with it (issue: VAR, whole).

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

`model.<var config>.generate`: class-conditional generation of 16 images at 256 px, all 10
scales with the KV cache, guidance and VAR's FID sampling recipe (cfg 1.5, top-k 900, top-p
0.96, one seed for every impl), decoded by the VQVAE; eager, torch.compile of the same call,
and one row per fast backend. It runs in float32 so that the impls draw the same tokens: every
draw compares a uniform number with the cumulative probabilities, and bfloat16's rounding of
the logits moves those boundaries enough to change some of the 10,880 draws, after which the
images differ (a float32 run changes a draw with a chance of about 1%, then reported as a
mismatch). Weights are random (seeded); the labels are the case's input. Work: the transformer's
matmuls on the 2 x 16 guidance batch (12 C^2 per token per block, the head's C V), attention
against the cache (4 C per query-key pair per block) and the VQVAE decoder's FLOPs.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from fastgen.models import var, var_vqvae
from fastgen.ops import vq

from .harness import Benchmark, Case, Impl, backend_impls, compile_reference

_BATCHES = (1, 16, 64)
_QUICK_BATCH = 16
# A near-tie pick moves one image's residual energy by far less than this; a wrong code
# (or a wrong scale) by far more.
_MODEL_TOLERANCE = (2e-2, 1e-4)
# The VAR generating with each tokenizer config, and its batch.
_GENERATORS = {"var-256": "var-d16", "tiny": "tiny"}
_GENERATION_BATCH = 16


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


@functools.lru_cache(maxsize=2)
def _generator(var_config: str, device: str, dtype: torch.dtype) -> var.VAR:
    torch.manual_seed(0)
    return var.build(var_config).to(device=device, dtype=dtype).eval().requires_grad_(False)


def _generation_flops(var_config: str, batch: int) -> int:
    config = var.CONFIGS[var_config]
    width, guided = config.embed_dim, 2 * batch
    matmuls = 2 * guided * config.num_tokens * (12 * width ** 2 * config.depth + width * config.tokenizer.vocab_size)
    begin, attention = 0, 0
    for end in config.scale_ends:
        attention += 4 * guided * (end - begin) * end * width * config.depth
        begin = end
    with torch.device("meta"):
        vqvae = var_vqvae.build(config.tokenizer)
        side = config.patch_nums[-1]
        f_hat = torch.empty(batch, config.tokenizer.z_channels, side, side)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vqvae.decode(f_hat)
    return matmuls + attention + counter.get_total_flops()


def _generate_images(model: var.VAR, vqvae: var_vqvae.VarVQVAE, labels: torch.Tensor) -> torch.Tensor:
    return var.generate(model, vqvae, labels, cfg=var.DEFAULT_CFG, top_k=var.DEFAULT_TOP_K, top_p=var.DEFAULT_TOP_P,
                        seed=0)


def generation_benchmark(vqvae_config: str, batch: int = _GENERATION_BATCH) -> Benchmark:
    """Generation of `batch` images by the VAR of the tokenizer config `vqvae_config` (module docstring)."""
    var_config = _GENERATORS[vqvae_config]
    config = var.CONFIGS[var_config]

    def generate_with(run: Callable) -> Callable:
        # The models are looked up outside `run`, so that torch.compile traces the generation
        # only, not the cached model lookup (whose lru_cache dynamo ignores, with a warning).
        def generate(labels):
            device = str(labels.device)
            return run(_generator(var_config, device, torch.float32), _model(vqvae_config, device, torch.float32),
                       labels)

        return generate

    eager = generate_with(_generate_images)
    impls = {
        "eager": Impl(lambda case: eager, backend="reference"),
        "compile": Impl(lambda case: generate_with(compile_reference(_generate_images)), backend="reference"),
        **backend_impls(eager),
    }

    def make_inputs(device, dtype, seed):
        generator = torch.Generator().manual_seed(seed)
        return {"labels": torch.randint(config.num_classes, (batch,), generator=generator).to(device)}

    resolution = config.tokenizer.resolution
    case = Case(f"{var_config} B{batch} {resolution}px, {len(config.patch_nums)} scales, cfg {var.DEFAULT_CFG}",
                torch.float32, "fwd", make_inputs, _generation_flops(var_config, batch))
    return Benchmark(f"model.{var_config}.generate", [case], impls, bound="compute")


def benchmarks(quick: bool = False, config_name: str = "var-256", batches: tuple = _BATCHES,
               generation_batch: int = _GENERATION_BATCH) -> list:
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
        generation_benchmark(config_name, generation_batch),
    ]
