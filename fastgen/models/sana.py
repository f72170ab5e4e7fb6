"""SANA Linear DiT: the text-to-image transformer of SANA (Xie et al., 2024, arXiv:2410.10629).

The latent (B, C, H, W) from the f32 DC-AE is cut into p x p patches, one token each, with no
position embedding (the 3x3 depthwise convolution in the feed-forward supplies position).
Each block, with the adaLN-single modulation t2i_modulate(x, shift, scale) = x (1 + scale) + shift:

    x = x + gate_msa  * LinearAttention(t2i_modulate(LayerNorm(x), shift_msa, scale_msa))
    x = x + CrossAttention(x, caption, caption_mask)
    x = x + gate_mlp  * GLUMBConv(t2i_modulate(LayerNorm(x), shift_mlp, scale_mlp))

- adaLN-single (PixArt-alpha): one timestep MLP for the whole network gives the embedding
  e (B, C) and silu(e) W -> (B, 6C); every block adds its own learned (6, C) table to it to get
  its six (shift, scale, gate) vectors. The final layer uses e and a (2, C) table.
- Linear self-attention: ReLU kernel attention, O(N D^2), `fastgen.ops.linear_attention`.
- Cross-attention (`fastgen.ops.cross_attention`): softmax attention from the image tokens to the caption tokens (Gemma-2
  hidden states projected by a GELU MLP and RMS-normalised with a learnable per-channel scale
  initialised to 0.01), keys masked by `caption_mask` (True = attend). A caption whose tokens
  are all masked contributes zeros.
- GLUMBConv (Mix-FFN): on the token grid, 1x1 conv to 2 x hidden (SiLU), 3x3 depthwise conv,
  split into value and gate, value * silu(gate), 1x1 conv back to C.

Parameter names and module nesting are those of diffusers' `SanaTransformer2DModel`, so a
diffusers-format SANA state dict loads with `load_state_dict` and the forward computes the same
function. The one deliberate difference: diffusers turns the caption mask into a -10000 bias, so
a fully masked caption there averages the padding tokens; here it contributes zeros (fastgen::cross_attention's
answer for a row without keys). Not supported: qk_norm (SANA 1.5 / Sprint), the
guidance embedding (Sprint), sin-cos position embeddings (interpolation_scale), and checkpoints
in the original (non-diffusers) SANA layout.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastgen import samplers
from fastgen.models.common import (PatchEmbed, ProjectionMLP, RMSNorm, TimestepEmbedder, check_latents, example_random,
                                   example_resolution_multiple_of, gelu_tanh, load_safetensors, per_sample,
                                   resolve_config, unpatchify)
from fastgen.ops.ada_norm import ada_layer_norm
from fastgen.ops.cross_attention import cross_attention
from fastgen.ops.linear_attention import linear_attention


@dataclasses.dataclass(frozen=True)
class SanaConfig:
    """Field names follow diffusers' `SanaTransformer2DModel` config."""

    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    num_cross_attention_heads: int
    cross_attention_head_dim: int
    in_channels: int = 32
    out_channels: int = 32
    patch_size: int = 1
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    attention_bias: bool = False
    norm_eps: float = 1e-6
    # Latent side the model was trained at (32 = 1024 px through the f32 DC-AE). Nothing in the
    # network depends on it (no position embedding); it documents the intended resolution.
    sample_size: int = 32
    # SANA's y_norm_scale_factor: keeps the normalised caption small relative to the image tokens
    # at initialisation.
    caption_norm_init: float = 0.01

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config: dict) -> "SanaConfig":
        """The config of a diffusers SanaTransformer2DModel (its config.json as a dict)."""
        unsupported = {
            "qk_norm": None,
            "guidance_embeds": False,
            "interpolation_scale": None,
            "norm_elementwise_affine": False,
            "timestep_scale": 1.0,
        }
        for key, supported in unsupported.items():
            if config.get(key, supported) != supported:
                raise ValueError(f"config[{key!r}] = {config[key]!r} is not supported (only {supported!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        result = cls(**{key: value for key, value in config.items() if key in fields})
        if config.get("cross_attention_dim", result.hidden_size) != result.hidden_size:
            raise ValueError(
                f"config['cross_attention_dim'] must equal the hidden size {result.hidden_size} "
                f"(captions are projected to it); got {config['cross_attention_dim']}"
            )
        return result


CONFIGS = {
    "sana-600m": SanaConfig(
        num_layers=28,
        num_attention_heads=36,
        attention_head_dim=32,
        num_cross_attention_heads=16,
        cross_attention_head_dim=72,
    ),
    "sana-1600m": SanaConfig(
        num_layers=20,
        num_attention_heads=70,
        attention_head_dim=32,
        num_cross_attention_heads=20,
        cross_attention_head_dim=112,
    ),
    # Patch size 2 so that tests exercise patchify / unpatchify ordering; head dim 16 so that
    # Triton kernels (tl.dot needs >= 16) accept it.
    "tiny": SanaConfig(
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        patch_size=2,
        caption_channels=24,
        sample_size=8,
    ),
}

# SanaPipeline's defaults in diffusers and FlowEuler's in the SANA repository.
DEFAULT_NUM_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 4.5
DEFAULT_FLOW_SHIFT = 3.0
# The network takes timesteps in [0, 1000]; the flow time runs over [0, 1].
TIMESTEP_RANGE = 1000.0
# example_step's captions: SANA's 300 Gemma-2 tokens. Images reach the network through the f32
# DC-AE, so the latent side is the image side / 32.
EXAMPLE_CAPTION_TOKENS = 300
AUTOENCODER_FACTOR = 32


class _TimestepConditioning(nn.Module):
    """Only wraps `timestep_embedder` to reproduce the diffusers nesting `time_embed.emb.*`."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(hidden_size)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep, dtype)


class AdaLayerNormSingle(nn.Module):
    """Returns (the six modulation vectors for every block (B, 6C), the embedding e (B, C))."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.emb = _TimestepConditioning(hidden_size)
        self.linear = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.emb(timestep, dtype)
        return self.linear(F.silu(embedding)), embedding


class _Attention(nn.Module):
    """The q, k, v and output projections, named as in diffusers' `Attention`. Keys and values
    are projected from hidden_size features: captions are projected to it beforehand."""

    def __init__(self, hidden_size: int, heads: int, head_dim: int, bias: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(hidden_size, inner, bias=bias)
        self.to_k = nn.Linear(hidden_size, inner, bias=bias)
        self.to_v = nn.Linear(hidden_size, inner, bias=bias)
        # A list so that the parameters are named `to_out.0.*` as in diffusers (whose slot 1 is
        # a parameter-free dropout).
        self.to_out = nn.ModuleList([nn.Linear(inner, hidden_size)])


class LinearSelfAttention(_Attention):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        heads = (batch, tokens, self.heads, self.head_dim)
        # Views of the projections: the op accepts any strides, so no copies.
        out = linear_attention(
            self.to_q(x).view(heads), self.to_k(x).view(heads), self.to_v(x).view(heads), 1e-15
        )
        out = out.reshape(batch, tokens, -1)
        if out.dtype == torch.float16:
            # The fp32 ratio can exceed the fp16 range; diffusers saturates instead of producing inf.
            out = out.clamp(-65504.0, 65504.0)
        return self.to_out[0](out)


class CrossAttention(_Attention):
    def forward(self, x: torch.Tensor, caption: torch.Tensor, caption_mask: Optional[torch.Tensor]) -> torch.Tensor:
        batch, tokens, _ = x.shape

        def split_heads(projected: torch.Tensor) -> torch.Tensor:
            return projected.view(batch, -1, self.heads, self.head_dim)  # a view: the op takes any strides

        # Rows whose caption is fully masked come out as zeros (the op's contract).
        out = cross_attention(split_heads(self.to_q(x)), split_heads(self.to_k(caption)),
                              split_heads(self.to_v(caption)), key_padding_mask=caption_mask)
        return self.to_out[0](out.reshape(batch, tokens, -1))


class GLUMBConv(nn.Module):
    def __init__(self, channels: int, mlp_ratio: float):
        super().__init__()
        hidden = int(mlp_ratio * channels)
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, kernel_size=1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, kernel_size=3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def forward(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        grid = tokens.transpose(1, 2).unflatten(2, (height, width))
        value, gate = self.conv_depth(F.silu(self.conv_inverted(grid))).chunk(2, dim=1)
        return self.conv_point(value * F.silu(gate)).flatten(2).transpose(1, 2)


class SanaBlock(nn.Module):
    def __init__(self, config: SanaConfig):
        super().__init__()
        hidden = config.hidden_size
        self.norm_eps = config.norm_eps
        self.attn1 = LinearSelfAttention(
            hidden, config.num_attention_heads, config.attention_head_dim, config.attention_bias
        )
        self.attn2 = CrossAttention(
            hidden, config.num_cross_attention_heads, config.cross_attention_head_dim, bias=True
        )
        self.ff = GLUMBConv(hidden, config.mlp_ratio)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden) / hidden**0.5)

    def forward(
        self,
        x: torch.Tensor,
        caption: torch.Tensor,
        caption_mask: Optional[torch.Tensor],
        modulation: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table + modulation.unflatten(1, (6, -1))
        ).unbind(1)
        attended = self.attn1(ada_layer_norm(x, scale_msa, shift_msa, self.norm_eps))
        x = x + gate_msa.unsqueeze(1) * attended
        x = x + self.attn2(x, caption, caption_mask)
        fed = self.ff(ada_layer_norm(x, scale_mlp, shift_mlp, self.norm_eps), *grid)
        return x + gate_mlp.unsqueeze(1) * fed


class SanaTransformer(nn.Module):
    def __init__(self, config: SanaConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.patch_embed = PatchEmbed(config.in_channels, hidden, config.patch_size)
        self.time_embed = AdaLayerNormSingle(hidden)
        self.caption_projection = ProjectionMLP(config.caption_channels, hidden, gelu_tanh)
        self.caption_norm = RMSNorm(hidden, eps=1e-5, initial_scale=config.caption_norm_init)
        self.transformer_blocks = nn.ModuleList(SanaBlock(config) for _ in range(config.num_layers))
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden) / hidden**0.5)
        self.proj_out = nn.Linear(hidden, config.patch_size**2 * config.out_channels)

    def _check_inputs(self, latents, caption, timestep, caption_mask) -> None:
        c = self.config
        check_latents(latents, c.in_channels, c.patch_size)
        batch = latents.shape[0]
        if caption.ndim != 3 or caption.shape[0] != batch or caption.shape[2] != c.caption_channels:
            raise ValueError(f"caption must be ({batch}, L, {c.caption_channels}); got {tuple(caption.shape)}")
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or of shape ({batch},); got {tuple(timestep.shape)}")
        if caption_mask is not None and caption_mask.shape != caption.shape[:2]:
            raise ValueError(f"caption_mask must be {tuple(caption.shape[:2])}; got {tuple(caption_mask.shape)}")

    def forward(
        self,
        latents: torch.Tensor,
        caption: torch.Tensor,
        timestep: Union[torch.Tensor, float],
        caption_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """latents (B, in_channels, H, W); caption (B, L, caption_channels); timestep in [0, 1000],
        a scalar or (B,); caption_mask (B, L), True (or nonzero) = attend. Returns the velocity
        (B, out_channels, H, W)."""
        timestep = per_sample(timestep, latents.shape[0], latents.device)
        self._check_inputs(latents, caption, timestep, caption_mask)
        if caption_mask is not None:
            caption_mask = caption_mask.bool()
        p = self.config.patch_size
        grid = (latents.shape[2] // p, latents.shape[3] // p)

        x = self.patch_embed(latents)
        modulation, embedding = self.time_embed(timestep, x.dtype)
        caption = self.caption_norm(self.caption_projection(caption))
        for block in self.transformer_blocks:
            x = block(x, caption, caption_mask, modulation, grid)

        shift, scale = (self.scale_shift_table + embedding.unsqueeze(1)).unbind(1)
        x = self.proj_out(ada_layer_norm(x, scale, shift, eps=1e-6))
        return unpatchify(x, grid, p, self.config.out_channels)


def build(name_or_config: Union[str, SanaConfig]) -> SanaTransformer:
    """A randomly initialised model. Build under `with torch.device("meta"):` to get the
    structure without allocating, e.g. for the large configs."""
    return SanaTransformer(resolve_config(name_or_config, CONFIGS, SanaConfig, "SANA"))


def example_resolution(model: SanaTransformer, resolution: Optional[int] = None) -> int:
    """The image side example_step uses: `resolution`, by default the config's sample_size x 32."""
    return example_resolution_multiple_of(
        resolution, AUTOENCODER_FACTOR * model.config.sample_size, AUTOENCODER_FACTOR * model.config.patch_size,
        f"the autoencoder factor {AUTOENCODER_FACTOR} times the patch size")


def example_step(
    model: SanaTransformer,
    batch: int = 1,
    resolution: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Callable[[], torch.Tensor]:
    """One denoising call as the sampler makes it: the classifier-free-guidance batch (2 x batch
    latents) against EXAMPLE_CAPTION_TOKENS caption tokens, the unconditional half's caption
    shorter and padded (masked), at timestep 500. `resolution` is the image side in pixels,
    by default the config's sample_size x 32 (1024 px for the released models, whose latents are
    32 x 32; 256 px for tiny); the latent side is resolution / 32. Inputs are made
    once, on the model's device and dtype, from `generator` (a CPU generator: the same values
    whatever the device). Returns the zero-argument call."""
    random, device = example_random(model, batch, generator)
    config, side = model.config, example_resolution(model, resolution) // AUTOENCODER_FACTOR
    latents = random(2 * batch, config.in_channels, side, side)
    caption = random(2 * batch, EXAMPLE_CAPTION_TOKENS, config.caption_channels)
    caption_mask = torch.ones(2 * batch, EXAMPLE_CAPTION_TOKENS, dtype=torch.bool, device=device)
    caption_mask[batch:, EXAMPLE_CAPTION_TOKENS // 3:] = False
    timestep = torch.full((2 * batch,), TIMESTEP_RANGE / 2, device=device)

    def step() -> torch.Tensor:
        return model(latents, caption, timestep, caption_mask)

    return step


def from_safetensors(
    path: str, config: Union[str, SanaConfig], device: Union[str, torch.device] = "cpu"
) -> SanaTransformer:
    """Load a diffusers-layout SANA transformer checkpoint (a single .safetensors file), keeping
    the file's dtype."""
    return load_safetensors(path, lambda: build(config), device)


def sample(
    model: SanaTransformer,
    noise: torch.Tensor,
    caption: torch.Tensor,
    caption_mask: Optional[torch.Tensor] = None,
    *,
    null_caption: Optional[torch.Tensor] = None,
    null_caption_mask: Optional[torch.Tensor] = None,
    num_steps: int = DEFAULT_NUM_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    flow_shift: float = DEFAULT_FLOW_SHIFT,
    method: str = "flow_dpm_solver",
) -> torch.Tensor:
    """Text-to-latent from `noise` (t = 1) to t = 0 with SANA's shifted schedule and
    classifier-free guidance against `null_caption` (the embedded empty prompt) when one is
    given. `method` "flow_dpm_solver" (the default, SANA's published sampler and its diffusers
    pipeline's scheduler): `samplers.flow_dpm_solver`; "euler": `samplers.flow_matching_euler` on
    diffusers' FlowMatchEulerDiscreteScheduler grid (`samplers.sd3_timesteps`). Masks default to
    attending every token."""
    if method not in ("flow_dpm_solver", "euler"):
        raise ValueError(f"method must be 'flow_dpm_solver' or 'euler'; got {method!r}")

    def all_tokens(tokens: torch.Tensor) -> torch.Tensor:
        return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return model(x, cond["caption"], t * TIMESTEP_RANGE, cond["caption_mask"])

    cond = {"caption": caption, "caption_mask": all_tokens(caption) if caption_mask is None else caption_mask}
    uncond = None
    if null_caption is not None:
        uncond = {
            "caption": null_caption,
            "caption_mask": all_tokens(null_caption) if null_caption_mask is None else null_caption_mask,
        }
    guidance = dict(guidance_scale=guidance_scale, cond=cond, uncond=uncond)
    if method == "euler":
        timesteps = samplers.sd3_timesteps(num_steps, flow_shift, int(TIMESTEP_RANGE), device=noise.device)
        return samplers.flow_matching_euler(velocity, noise, timesteps=timesteps, **guidance)
    return samplers.flow_dpm_solver(velocity, noise, num_steps=num_steps, shift=flow_shift,
                                    num_train_timesteps=int(TIMESTEP_RANGE), **guidance)
