"""The single-scale vector quantizer of VQGAN-style tokenizers (taming-transformers' VQGAN,
and the l2-normalized codebooks of ViT-VQGAN / LlamaGen), backed by `fastgen.ops.vq_quantize`.

A latent z (B, D, H, W) is quantized position by position against the codebook e (K, D):

    idx[b, h, w] = argmin_k ||z[b, :, h, w] - e_k||^2
    z_q          = z + sg(e[idx] - z)                  (value e[idx], gradient straight to z)
    codebook term  = mean((e[idx] - sg(z))^2)          (trains the codebook)
    commitment term = mean((sg(e[idx]) - z)^2)         (trains the encoder)

with sg the stop-gradient and the means over all B*H*W*D elements. The weight beta goes on
the commitment term (loss = codebook + beta * commitment, VQ-VAE's form) or, with `legacy`,
on the codebook term (loss = commitment + beta * codebook: what taming-transformers'
VectorQuantizer and diffusers' VectorQuantizer compute by default, a historical slip kept for
checkpoint compatibility). Both forms have the value (1 + beta) * mse; the legacy gradients
are beta times those of the standard form with weight 1 / beta, which is how the legacy form
runs through the fused op (beta = 0 has no such form and is refused).

l2-normalized codebooks (LlamaGen's codebook_l2_norm): z and every code are scaled to unit
length before the search, so the l2 nearest code is the one of highest cosine similarity, and
z_q and the loss are those of the normalized vectors (gradients flow through the
normalization to z and the codebook). LlamaGen's optional entropy loss (weight 0 in its
released tokenizers) is not computed.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.common import example_resolution_multiple_of, resolve_config
from fastgen.ops.vq import vq_quantize


@dataclasses.dataclass(frozen=True)
class VQGANQuantizerConfig:
    codebook_size: int
    embed_dim: int
    beta: float = 0.25
    l2_normalized: bool = False
    legacy: bool = False
    # The tokenizer's downsampling factor: the latent side is image side / downsample.
    downsample: int = 16

    def __post_init__(self):
        if self.legacy and self.beta == 0:
            raise ValueError("beta must be nonzero with legacy=True (see fastgen.models.vqgan)")


CONFIGS = {
    # taming-transformers vqgan_imagenet_f16_16384: n_embed 16384, embed_dim 256, the legacy loss.
    "vqgan-16384x256": VQGANQuantizerConfig(codebook_size=16384, embed_dim=256, legacy=True),
    # LlamaGen VQ-16: codebook_size 16384, codebook_embed_dim 8, codebook_l2_norm, beta on commitment.
    "l2norm-16384x8": VQGANQuantizerConfig(codebook_size=16384, embed_dim=8, l2_normalized=True),
    "tiny": VQGANQuantizerConfig(codebook_size=96, embed_dim=16, legacy=True, downsample=4),
}

EXAMPLE_RESOLUTION = 256


def straight_through_quantize(z: torch.Tensor, codebook: torch.Tensor, beta: float, legacy: bool):
    """(z_q, idx, loss, counts) of rows z (N, D) against codebook (K, D), the loss in the standard
    or the legacy weighting (module docstring) and float32 or wider."""
    if not legacy:
        return vq_quantize(z, codebook, beta)
    if beta == 0:
        raise ValueError("beta must be nonzero with legacy=True (the legacy loss runs as beta * loss(1 / beta))")
    z_q, idx, loss, counts = vq_quantize(z, codebook, 1.0 / beta)
    return z_q, idx, beta * loss, counts


class VectorQuantizer(nn.Module):
    def __init__(self, config: VQGANQuantizerConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.codebook_size, config.embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / config.codebook_size, 1.0 / config.codebook_size)

    def codebook(self) -> torch.Tensor:
        weight = self.embedding.weight
        return F.normalize(weight, dim=1) if self.config.l2_normalized else weight

    def forward(self, z: torch.Tensor):
        """z (B, D, H, W) -> (z_q (B, D, H, W), loss (float32 scalar), idx (B, H, W) int64)."""
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"z must be (B, {self.config.embed_dim}, H, W); got {tuple(z.shape)}")
        if self.config.l2_normalized:
            z = F.normalize(z, dim=1)
        batch, dim, height, width = z.shape
        rows = z.permute(0, 2, 3, 1).reshape(-1, dim)
        z_q, idx, loss, _ = straight_through_quantize(rows, self.codebook(), self.config.beta, self.config.legacy)
        return z_q.view(batch, height, width, dim).permute(0, 3, 1, 2), loss, idx.view(batch, height, width)

    def indices_to_latents(self, idx: torch.Tensor) -> torch.Tensor:
        """The quantized latent (B, D, H, W) of code indices (B, H, W)."""
        if idx.ndim != 3 or idx.dtype != torch.int64:
            raise ValueError(f"idx must be int64 (B, H, W); got {idx.dtype} {tuple(idx.shape)}")
        return F.embedding(idx, self.codebook()).permute(0, 3, 1, 2)


def build(name_or_config: Union[str, VQGANQuantizerConfig]) -> VectorQuantizer:
    return VectorQuantizer(resolve_config(name_or_config, CONFIGS, VQGANQuantizerConfig, "VQGAN quantizer"))


def from_safetensors(
    path: str, config: Union[str, VQGANQuantizerConfig], prefix: str = "quantize.",
    device: Union[str, torch.device] = "cpu",
) -> VectorQuantizer:
    """The quantizer out of a whole tokenizer's .safetensors checkpoint: the tensor
    `{prefix}embedding.weight` (taming-transformers and LlamaGen both call the module
    `quantize`); the other tensors (encoder, decoder) are not read. In eval mode."""
    from safetensors import safe_open

    key = f"{prefix}embedding.weight"
    with safe_open(str(path), framework="pt", device=str(device)) as checkpoint:
        if key not in checkpoint.keys():
            raise ValueError(f"{path} has no tensor {key!r} (check prefix={prefix!r})")
        state = {"embedding.weight": checkpoint.get_tensor(key)}
    with torch.device("meta"):
        model = build(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()  # as every model's loader (fastgen.models.common.load_safetensors)


def example_resolution(model: VectorQuantizer, resolution: Optional[int] = None) -> int:
    """The image side whose latent example_step quantizes: `resolution`, by default
    EXAMPLE_RESOLUTION."""
    return example_resolution_multiple_of(resolution, EXAMPLE_RESOLUTION, model.config.downsample,
                                          "the tokenizer's downsampling")


def example_step(
    model: VectorQuantizer,
    batch: int = 1,
    resolution: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Callable[[], tuple]:
    """Quantize the latent of a random image batch: (batch, D, s, s) with s = resolution /
    downsample (256 px by default: 16 x 16 for the f16 tokenizers), made once on the model's
    device and dtype. Returns the zero-argument call."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int; got {batch!r}")
    config = model.config
    resolution = example_resolution(model, resolution)
    side = resolution // config.downsample
    weight = model.embedding.weight
    z = torch.randn(batch, config.embed_dim, side, side, generator=generator).to(device=weight.device,
                                                                                 dtype=weight.dtype)

    @torch.no_grad()
    def step() -> tuple:
        return model(z)

    return step
