"""Stable Diffusion 3 and 3.5 (Esser et al., 2024, arXiv:2403.03206): the rectified-flow MM-DiT.

The 16-channel latent (B, 16, H, W) of the SD3 VAE (H, W = image side / 8) is cut into 2 x 2
patches by a strided convolution, one token each, and a fixed 2-D sin-cos position embedding
is added: a pos_embed_max_size^2 table cropped around its centre to the token grid (h, w),
rows from (M - h) // 2 and columns from (M - w) // 2 (M = pos_embed_max_size). Table entry
(row i, column j) is [sin(u w), cos(u w), sin(v w), cos(v w)] with u = j / (M / s), v = i / (M / s)
(s = sample_size / patch_size, the training grid) and the C/4 frequencies
w_k = 10000^(-k / (C/4)).

    x = patches + positions                        c = context_embedder(CLIP-L/G + T5 states)
    e = MLP(sinusoid(timestep)) + MLP(pooled CLIP-L/G text)
    num_layers joint blocks on (x, c)              (fastgen.models.mmdit)
    velocity = unpatchify(proj_out(LayerNorm(x) (1 + scale) + shift)),  (scale, shift) from e

timestep is 1000 t, t the flow time (t = 1 noise). The last joint block is context_pre_only (its
text stream only feeds the attention). SD3.5 adds QK-RMSNorm (`qk_norm="rms_norm"`) and, in
SD3.5 Medium (MMDiT-X), a second, image-only self-attention in the blocks listed in
`dual_attention_layers`.

Parameter names and module nesting are those of diffusers' `SD3Transformer2DModel` (the cropped
table is its persistent `pos_embed.pos_embed` buffer), so a diffusers-format state dict loads
with `load_state_dict` (strict) and the forward computes the same function. Two deliberate
differences: in float16 the text stream saturates at the float16 range where diffusers
overflows to inf (the blocks are shared with FLUX.1, which saturates there), and the position
embedding is always the cropped table (diffusers also has an uncropped mode, unused by SD3).
Not supported: ControlNet residuals, skip_layers, IP-Adapter inputs, and the original
(non-diffusers) checkpoint layout.

Sampling (`sample`): Euler on the rectified flow from t = 1 to 0 on
`fastgen.samplers.sd3_timesteps` (static shift 3), with classifier-free guidance against the
embedded empty prompt in one batched call per step.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
from torch import nn

from fastgen import samplers
from fastgen.models.common import (PatchEmbed as ConvPatchEmbed, check_latents, example_random,
                                   example_resolution_multiple_of, load_safetensors, per_sample, resolve_config,
                                   sinusoidal_embedding, unpatchify)
from fastgen.models.mmdit import JointBlock, Modulation, TimestepTextEmbedding, modulate


@dataclasses.dataclass(frozen=True)
class SD3Config:
    """Field names follow diffusers' `SD3Transformer2DModel` config."""

    num_layers: int
    num_attention_heads: int
    pos_embed_max_size: int
    attention_head_dim: int = 64
    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 2048
    dual_attention_layers: tuple = ()
    qk_norm: Optional[str] = None

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config: dict) -> "SD3Config":
        """The config of a diffusers SD3Transformer2DModel (its config.json as a dict)."""
        if config.get("qk_norm") not in (None, "rms_norm"):
            raise ValueError(f"config['qk_norm'] = {config['qk_norm']!r} is not supported (only None, 'rms_norm')")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in config.items() if key in fields}
        values["dual_attention_layers"] = tuple(values.get("dual_attention_layers", ()))
        result = cls(**values)
        if config.get("caption_projection_dim", result.hidden_size) != result.hidden_size:
            raise ValueError(f"config['caption_projection_dim'] must equal the hidden size {result.hidden_size} "
                             f"(the text stream joins the image stream); got {config['caption_projection_dim']}")
        return result


CONFIGS = {
    "sd3-medium": SD3Config(num_layers=24, num_attention_heads=24, pos_embed_max_size=192),
    "sd3.5-medium": SD3Config(num_layers=24, num_attention_heads=24, pos_embed_max_size=384,
                              dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": SD3Config(num_layers=38, num_attention_heads=38, pos_embed_max_size=192, qk_norm="rms_norm"),
    # Head dim 16 so that Triton kernels (tl.dot needs >= 16) accept it. A table of 12 x 12
    # positions cropped around the 4 x 4 training grid, so tests see crops off its centre.
    "tiny": SD3Config(num_layers=2, num_attention_heads=2, attention_head_dim=16, pos_embed_max_size=12,
                      sample_size=8, in_channels=4, out_channels=4, joint_attention_dim=24, pooled_projection_dim=12),
}

# StableDiffusion3Pipeline's defaults.
DEFAULT_NUM_STEPS = 28
DEFAULT_GUIDANCE_SCALE = 7.0
DEFAULT_SHIFT = 3.0
# The network takes timesteps in [0, 1000]; the flow time runs over [0, 1].
TIMESTEP_RANGE = 1000.0
# example_step's text: 77 CLIP tokens and the pipeline's 256 T5 tokens. Images reach the network
# through the 8x VAE.
EXAMPLE_TEXT_TOKENS = 77 + 256
AUTOENCODER_FACTOR = 8


def position_table(dim: int, max_size: int, base_size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The (max_size^2, dim) sin-cos table of the module docstring, row-major over the
    max_size x max_size grid, computed in float64 and returned as float32."""
    coordinates = torch.arange(max_size, dtype=torch.float32, device=device) / (max_size / base_size)

    def sin_cos(positions: torch.Tensor) -> torch.Tensor:
        cos_sin = sinusoidal_embedding(positions, dim // 2, dtype=torch.float64)
        return torch.cat(cos_sin.chunk(2, dim=-1)[::-1], dim=-1)

    rows, columns = torch.meshgrid(coordinates, coordinates, indexing="ij")
    return torch.cat([sin_cos(columns.reshape(-1)), sin_cos(rows.reshape(-1))], dim=-1).float()


class PatchEmbed(ConvPatchEmbed):
    """The patch tokens plus the cropped position table (module docstring)."""

    def __init__(self, config: SD3Config):
        super().__init__(config.in_channels, config.hidden_size, config.patch_size)
        self.max_size = config.pos_embed_max_size
        table = position_table(config.hidden_size, self.max_size, config.sample_size // config.patch_size)
        self.register_buffer("pos_embed", table[None])

    def forward(self, latents: torch.Tensor, grid: tuple) -> torch.Tensor:
        height, width = grid
        top, left = (self.max_size - height) // 2, (self.max_size - width) // 2
        table = self.pos_embed.view(self.max_size, self.max_size, -1)[top:top + height, left:left + width]
        tokens = super().forward(latents)
        return (tokens + table.reshape(1, height * width, -1)).to(tokens.dtype)


class SD3Transformer(nn.Module):
    def __init__(self, config: SD3Config):
        super().__init__()
        self.config = config
        dim, last = config.hidden_size, config.num_layers - 1
        self.pos_embed = PatchEmbed(config)
        self.time_text_embed = TimestepTextEmbedding(dim, config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            JointBlock(dim, config.num_attention_heads, config.attention_head_dim, qk_norm=config.qk_norm is not None,
                       context_pre_only=index == last, dual_attention=index in config.dual_attention_layers)
            for index in range(config.num_layers))
        self.norm_out = Modulation(dim, 2)
        self.proj_out = nn.Linear(dim, config.patch_size ** 2 * config.out_channels)

    def _check_inputs(self, latents, text, pooled_text, timestep) -> None:
        c, p = self.config, self.config.patch_size
        check_latents(latents, c.in_channels, p)
        if max(latents.shape[2:]) > p * c.pos_embed_max_size:
            raise ValueError(f"latents height and width must be at most {p * c.pos_embed_max_size} (patch_size x "
                             f"pos_embed_max_size); got {tuple(latents.shape)}")
        batch = latents.shape[0]
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != c.joint_attention_dim:
            raise ValueError(f"text must be ({batch}, L, {c.joint_attention_dim}); got {tuple(text.shape)}")
        if pooled_text.shape != (batch, c.pooled_projection_dim):
            raise ValueError(f"pooled_text must be ({batch}, {c.pooled_projection_dim}); "
                             f"got {tuple(pooled_text.shape)}")
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or of shape ({batch},); got {tuple(timestep.shape)}")

    def forward(self, latents: torch.Tensor, text: torch.Tensor, pooled_text: torch.Tensor,
                timestep: Union[torch.Tensor, float]) -> torch.Tensor:
        """latents (B, in_channels, H, W); text (B, L, joint_attention_dim): CLIP-L/G and T5
        states; pooled_text (B, pooled_projection_dim); timestep in [0, 1000], a scalar or (B,).
        Returns the velocity (B, out_channels, H, W)."""
        timestep = per_sample(timestep, latents.shape[0], latents.device)
        self._check_inputs(latents, text, pooled_text, timestep)
        p = self.config.patch_size
        grid = (latents.shape[2] // p, latents.shape[3] // p)

        x = self.pos_embed(latents, grid)
        embedding = self.time_text_embed(timestep, pooled_text)
        context = self.context_embedder(text)
        for block in self.transformer_blocks:
            x, context = block(x, context, embedding)

        scale, shift = self.norm_out(embedding)
        return unpatchify(self.proj_out(modulate(x, shift, scale)), grid, p, self.config.out_channels)


def build(name_or_config: Union[str, SD3Config]) -> SD3Transformer:
    """A randomly initialised model. Build under `with torch.device("meta"):` to get the
    structure without allocating, e.g. for the released configs."""
    return SD3Transformer(resolve_config(name_or_config, CONFIGS, SD3Config, "SD3"))


def example_resolution(model: SD3Transformer, resolution: Optional[int] = None) -> int:
    """The image side example_step uses: `resolution`, by default the config's sample_size x 8."""
    return example_resolution_multiple_of(
        resolution, AUTOENCODER_FACTOR * model.config.sample_size, AUTOENCODER_FACTOR * model.config.patch_size,
        f"the autoencoder factor {AUTOENCODER_FACTOR} times the patch size")


def example_step(
    model: SD3Transformer,
    batch: int = 1,
    resolution: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Callable[[], torch.Tensor]:
    """One denoising call as the sampler makes it: the classifier-free-guidance batch (2 x batch
    latents) against EXAMPLE_TEXT_TOKENS text tokens at timestep 500. `resolution` is the image
    side in pixels, by default the config's sample_size x 8 (1024 px for the released configs,
    whose latents are 128 x 128; 64 px for tiny). Inputs are made once, on the model's device
    and dtype, from `generator` (a CPU generator: the same values whatever the device). Returns
    the zero-argument call."""
    random, device = example_random(model, batch, generator)
    config, side = model.config, example_resolution(model, resolution) // AUTOENCODER_FACTOR
    latents = random(2 * batch, config.in_channels, side, side)
    text = random(2 * batch, EXAMPLE_TEXT_TOKENS, config.joint_attention_dim)
    pooled_text = random(2 * batch, config.pooled_projection_dim)
    timestep = torch.full((2 * batch,), TIMESTEP_RANGE / 2, device=device)

    def step() -> torch.Tensor:
        return model(latents, text, pooled_text, timestep)

    return step


def from_safetensors(
    path: str, config: Union[str, SD3Config], device: Union[str, torch.device] = "cpu"
) -> SD3Transformer:
    """Load a diffusers-layout SD3 transformer checkpoint (a single .safetensors file), keeping
    the file's dtype."""
    return load_safetensors(path, lambda: build(config), device)


def sample(
    model: SD3Transformer,
    noise: torch.Tensor,
    text: torch.Tensor,
    pooled_text: torch.Tensor,
    *,
    null_text: Optional[torch.Tensor] = None,
    null_pooled_text: Optional[torch.Tensor] = None,
    num_steps: int = DEFAULT_NUM_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    shift: float = DEFAULT_SHIFT,
) -> torch.Tensor:
    """Text-to-latent: Euler on the rectified flow from `noise` (t = 1) to t = 0 on SD3's shifted
    schedule, with classifier-free guidance against (`null_text`, `null_pooled_text`), the
    embedded empty prompt, when given (both halves in one call per step)."""
    if (null_text is None) != (null_pooled_text is None):
        raise ValueError("give both null_text and null_pooled_text, or neither")

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return model(x, cond["text"], cond["pooled_text"], t * TIMESTEP_RANGE)

    uncond = None if null_text is None else {"text": null_text, "pooled_text": null_pooled_text}
    return samplers.flow_matching_euler(
        velocity,
        noise,
        timesteps=samplers.sd3_timesteps(num_steps, shift, device=noise.device),
        guidance_scale=guidance_scale,
        cond={"text": text, "pooled_text": pooled_text},
        uncond=uncond,
    )
