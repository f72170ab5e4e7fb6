"""ADM's noisy-image classifier: the classifier of "Diffusion Models Beat GANs on Image Synthesis"
(Dhariwal & Nichol, 2021, arXiv:2105.05233; guided-diffusion's EncoderUNetModel with
pool="attention"), whose gradient guides the ADM UNet's sampling (`adm_unet.sample` with
`classifier=`).

It maps a noisy image x_t and its timestep t to class logits log p(y | x_t) + const:

    e = MLP(sinusoidal(t))                          (width 4 x model_channels, no class embedding)
    h = middle(encoder(x_t, e), e)                  (the ADM UNet's encoder half and middle block:
                                                     `adm_unet.EncoderNetwork`, AdaGN ResBlocks,
                                                     the legacy attention head order)
    h = silu(GroupNorm32(h))                        (C channels on an S x S map)
    logits = AttentionPool(h)

The attention pool (CLIP's, as guided-diffusion adapts it) reads one query out of the S^2 + 1
tokens [mean of the S^2 positions; the S^2 positions], to which a learned positional embedding
P (C x (S^2 + 1)) is added:

    [q; k; v] = W_qkv tokens + b_qkv                (q, k, v first, then heads of
                                                     num_head_channels: the new QKV order)
    a_h = softmax(q_h[0] k_h^T / sqrt(d)) v_h       (the mean token's query, every head h)
    logits = W_c [a_1 ... a_H] + b_c                (C -> num_classes)

Only the mean token's output is returned, so only its query is computed. P fixes the map size:
the classifier takes image_size x image_size images only. Parameter names and nesting are
guided-diffusion's (`time_embed.*`, `input_blocks.*`, `middle_block.*`, `out.0.*` the norm,
`out.2.positional_embedding`, `out.2.qkv_proj.*`, `out.2.c_proj.*`), so the released
64x64 / 128x128 / 256x256 classifier state dicts, saved as safetensors, load as they are.
Not supported: the other pools (adaptive, spatial), use_scale_shift_norm=False,
resblock_updown=False and the 512x512 classifier's half-width first level.
"""
from __future__ import annotations

import dataclasses
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.adm_unet import EncoderGeometry, EncoderNetwork, GroupNorm32
from fastgen.models.common import load_safetensors, per_sample, resolve_config
from fastgen.ops.cross_attention import cross_attention


@dataclasses.dataclass(frozen=True)
class ADMClassifierConfig(EncoderGeometry):
    """Field names follow guided-diffusion's `EncoderUNetModel` arguments; its script flags:
    classifier_width is model_channels, classifier_depth is num_res_blocks."""

    num_classes: int = 1000
    in_channels: int = 3

    @property
    def pooled_side(self) -> int:
        """The side S of the map the attention pool reads."""
        return self.image_size // self.downsampling


CONFIGS = {
    # The released classifiers: width 128, attention at 32, 16 and 8 px, heads of 64 channels;
    # guided-diffusion's create_classifier picks channel_mult by image size.
    "imagenet64": ADMClassifierConfig(image_size=64, model_channels=128, num_res_blocks=4, channel_mult=(1, 2, 3, 4)),
    "imagenet128": ADMClassifierConfig(
        image_size=128, model_channels=128, num_res_blocks=2, channel_mult=(1, 1, 2, 3, 4)),
    "imagenet256": ADMClassifierConfig(
        image_size=256, model_channels=128, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4)),
    # Channels multiples of 32 (GroupNorm32); heads of 16 channels so Triton's tl.dot takes them.
    "tiny": ADMClassifierConfig(
        image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
        attention_resolutions=(8,), num_head_channels=16, num_classes=10,
    ),
}


class AttentionPool(nn.Module):
    """The attention pool of the module docstring over a (B, C, side, side) map -> (B, out)."""

    def __init__(self, side: int, channels: int, head_channels: int, out_features: int):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"attention pool channels {channels} must be a multiple of num_head_channels "
                             f"{head_channels}")
        self.heads = channels // head_channels
        self.positional_embedding = nn.Parameter(torch.randn(channels, side * side + 1) / channels ** 0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, kernel_size=1)
        self.c_proj = nn.Conv1d(channels, out_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = x.flatten(2)
        tokens = torch.cat([positions.mean(dim=2, keepdim=True), positions], dim=2)
        tokens = (tokens + self.positional_embedding.to(x.dtype)).transpose(1, 2)  # (B, S^2 + 1, C)
        channels = tokens.shape[-1]
        # The 1x1 convolutions as matmuls on tokens; rows [0, C) of W_qkv are q, [C, 3C) k and v.
        weight, bias = self.qkv_proj.weight[..., 0], self.qkv_proj.bias
        q = F.linear(tokens[:, :1], weight[:channels], bias[:channels]).unflatten(-1, (self.heads, -1))
        k, v = F.linear(tokens, weight[channels:], bias[channels:]).unflatten(-1, (2, self.heads, -1)).unbind(2)
        pooled = cross_attention(q, k, v).flatten(2)[:, 0]  # (B, C)
        return F.linear(pooled, self.c_proj.weight[..., 0], self.c_proj.bias)


class ADMClassifier(EncoderNetwork):
    def __init__(self, config: ADMClassifierConfig):
        super().__init__(config, dropout=0.0, new_attention_order=False)
        c, ch = config, self.skip_channels[-1]
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(),
                                 AttentionPool(c.pooled_side, ch, c.num_head_channels, c.num_classes))

    def forward(self, x: torch.Tensor, timesteps: Union[torch.Tensor, float]) -> torch.Tensor:
        """x (B, in_channels, image_size, image_size) noisy images; timesteps in [0, 1000), a
        scalar or (B,). Returns the (B, num_classes) logits."""
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1:] != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"x must be a (B, {c.in_channels}, {c.image_size}, {c.image_size}) tensor (the "
                             f"positional embedding fixes the size); got {tuple(x.shape)}")
        timesteps = per_sample(timesteps, x.shape[0], x.device)
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be a scalar or of shape ({x.shape[0]},); got {tuple(timesteps.shape)}")
        emb = self._embedding(timesteps)
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        h = self.middle_block(h, emb)
        norm, _, pool = self.out
        return pool(F.silu(norm(h)))


def build(name_or_config: Union[str, ADMClassifierConfig]) -> ADMClassifier:
    """A randomly initialised classifier (build under `with torch.device("meta"):` for the
    structure alone). guided-diffusion zero-initialises some output convolutions; here every
    layer is random so that tests exercise every path."""
    return ADMClassifier(resolve_config(name_or_config, CONFIGS, ADMClassifierConfig, "ADM classifier"))


def from_safetensors(path: str, config: Union[str, ADMClassifierConfig],
                     device: Union[str, torch.device] = "cpu") -> ADMClassifier:
    """Load a guided-diffusion classifier state dict saved as one .safetensors file (for the
    released .pt files: `safetensors.torch.save_file(torch.load(pt_path), path)`). Every key
    must match; the model takes the file's tensors and dtype as they are, in eval mode."""
    return load_safetensors(path, lambda: build(config), device)

