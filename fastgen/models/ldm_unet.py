"""The latent-diffusion UNet of Stable Diffusion 1.5 (Rombach et al., 2022, arXiv:2112.10752).

The network predicts the noise eps in a (B, 4, H, W) latent (H = W = 64 at 512 px) given the
training timestep t and a text context (B, 77, 768) from CLIP ViT-L/14. It is a UNet over
len(block_out_channels) resolution levels, each level halving the resolution on the way down
and doubling it on the way up, with a skip from every down-path layer to the up path:

- Timestep: the sinusoid [cos(t w_i), sin(t w_i)], w_i = 10000^(-i / (C0 / 2)), of C0 =
  block_out_channels[0] channels, then Linear -> SiLU -> Linear to 4 C0 channels; every
  ResBlock receives it through SiLU and its own Linear as a per-channel offset.
- ResBlock(x) = shortcut(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))) + Linear(SiLU(temb))))), with GN a
  32-group GroupNorm and shortcut a 1x1 convolution where the channel count changes.
- SpatialTransformer(x) = x + proj_out(Block(proj_in(GN(x)))) with 1x1 convolutions, GN of eps
  1e-6 and Block a pre-LayerNorm transformer block over the H W tokens:

      h = h + SelfAttention(LN(h))              (q, k, v from the image tokens, Lq = Lkv)
      h = h + CrossAttention(LN(h), context)    (keys and values from the 77 text tokens)
      h = h + W2 (a * GELU(g)),  [a, g] = W1 LN(h)   (GEGLU, inner width 4 C)

  with heads of C / num_attention_heads channels and scale 1/sqrt(head dim).
- Down level: layers_per_block x (ResBlock [+ SpatialTransformer]), then a stride-2 3x3
  convolution (not on the last level). Middle: ResBlock, SpatialTransformer, ResBlock. Up
  level: layers_per_block + 1 x (concatenate the latest skip on channels, ResBlock
  [+ SpatialTransformer]), then nearest 2x upsampling to the next skip's size and a 3x3
  convolution (not on the last level). Out: GroupNorm, SiLU, 3x3 convolution.

Both attentions go through `fastgen.ops.cross_attention`; every GroupNorm (with the SiLU that
follows it in the ResBlocks and the output head) goes through `fastgen.ops.ada_group_norm` with
zero modulation, which fuses normalisation and activation into one pass. Parameter names and
nesting are those of diffusers' `UNet2DConditionModel`, so a diffusers SD 1.5
`unet/diffusion_pytorch_model.safetensors` loads with `from_safetensors`. Supported: the
SD 1.x family (convolutional proj_in / proj_out, one transformer block per SpatialTransformer,
additive timestep conditioning); SD 2.x (linear projections) and SDXL (added conditioning,
several transformer blocks) are refused by `LDMUNetConfig.from_diffusers`.

Sampling: DDIM with classifier-free guidance on SD's scaled-linear schedule (`sample`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastgen import samplers
from fastgen.models.common import (example_random, example_resolution_multiple_of, fused_group_norm, load_safetensors,
                                   per_sample, resolve_config, sinusoidal_embedding)
from fastgen.ops.cross_attention import cross_attention


@dataclasses.dataclass(frozen=True)
class LDMUNetConfig:
    """Field names follow diffusers' `UNet2DConditionModel` config where the meaning is the same."""

    block_out_channels: tuple
    # Per level: whether it has SpatialTransformers (diffusers' CrossAttnDownBlock2D rather than
    # DownBlock2D). The up path mirrors the down path.
    attention_levels: tuple
    # Per level; the head dim is the level's channels / heads (SD 1.5: 8 heads of 40, 80, 160).
    num_attention_heads: tuple
    layers_per_block: int = 2
    cross_attention_dim: int = 768
    in_channels: int = 4
    out_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    # Latent side at the training resolution (64 = 512 px through SD's f8 VAE); the network
    # itself takes any size.
    sample_size: int = 64

    def __post_init__(self):
        levels = len(self.block_out_channels)
        if len(self.attention_levels) != levels or len(self.num_attention_heads) != levels:
            raise ValueError(
                f"attention_levels and num_attention_heads need one entry per level ({levels}); got "
                f"{self.attention_levels} and {self.num_attention_heads}"
            )
        for channels, heads in zip(self.block_out_channels, self.num_attention_heads):
            if channels % heads or channels % self.norm_num_groups:
                raise ValueError(
                    f"level channels {channels} must be divisible by its heads {heads} and by "
                    f"norm_num_groups {self.norm_num_groups}"
                )

    @classmethod
    def from_diffusers(cls, config: dict) -> "LDMUNetConfig":
        """The config of a diffusers UNet2DConditionModel (its config.json as a dict)."""
        supported = {
            "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
            "mid_block_type": "UNetMidBlock2DCrossAttn", "use_linear_projection": False,
            "transformer_layers_per_block": 1, "class_embed_type": None, "addition_embed_type": None,
            "encoder_hid_dim": None, "time_embedding_type": "positional", "time_cond_proj_dim": None,
            "resnet_time_scale_shift": "default", "only_cross_attention": False, "dual_cross_attention": False,
            "downsample_padding": 1, "mid_block_scale_factor": 1, "conv_in_kernel": 3, "conv_out_kernel": 3,
            "num_class_embeds": None, "cross_attention_norm": None, "attention_type": "default",
            "resnet_out_scale_factor": 1.0, "time_embedding_dim": None, "dropout": 0.0,
        }
        for key, value in supported.items():
            if config.get(key, value) != value:
                raise ValueError(f"config[{key!r}] = {config[key]!r} is not supported (only {value!r})")
        down_kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
        up_kinds = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
        down, up = config["down_block_types"], config["up_block_types"]
        if any(kind not in down_kinds for kind in down) or any(kind not in up_kinds for kind in up):
            raise ValueError(f"block types must be among {list(down_kinds)} and {list(up_kinds)}; got {down}, {up}")
        attention_levels = tuple(down_kinds[kind] for kind in down)
        if tuple(up_kinds[kind] for kind in reversed(up)) != attention_levels:
            raise ValueError(f"up_block_types {up} must mirror down_block_types {down}")
        # diffusers' attention_head_dim holds the number of heads for these models (a naming
        # slip it keeps for compatibility); num_attention_heads overrides it when set.
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        levels = len(down)
        return cls(
            block_out_channels=tuple(config["block_out_channels"]),
            attention_levels=attention_levels,
            num_attention_heads=tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * levels,
            **{key: config[key] for key in ("layers_per_block", "cross_attention_dim", "in_channels",
                                            "out_channels", "norm_num_groups", "norm_eps", "sample_size")
               if key in config},
        )

    def to_diffusers(self) -> dict:
        """The matching diffusers UNet2DConditionModel config (the inverse of from_diffusers)."""
        return {
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels)],
            "attention_head_dim": list(self.num_attention_heads),  # diffusers' name for the heads, see above
            **{field.name: getattr(self, field.name) for field in dataclasses.fields(self)
               if field.name not in ("block_out_channels", "attention_levels", "num_attention_heads")},
        }


CONFIGS = {
    "sd15": LDMUNetConfig(
        block_out_channels=(320, 640, 1280, 1280),
        attention_levels=(True, True, True, False),
        num_attention_heads=(8, 8, 8, 8),
    ),
    # Two levels, one with and one without attention; head dims 16 and 32.
    "tiny": LDMUNetConfig(
        block_out_channels=(32, 64),
        attention_levels=(True, False),
        num_attention_heads=(2, 2),
        layers_per_block=1,
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=8,
    ),
}

NUM_TRAIN_TIMESTEPS = 1000
CONTEXT_TOKENS = 77  # CLIP's context length
VAE_SCALE = 8  # pixels per latent position
# StableDiffusionPipeline's defaults.
DEFAULT_NUM_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 7.5


class TimestepEmbedding(nn.Module):
    def __init__(self, channels: int, embedding_channels: int):
        super().__init__()
        self.linear_1 = nn.Linear(channels, embedding_channels)
        self.linear_2 = nn.Linear(embedding_channels, embedding_channels)

    def forward(self, sinusoid: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(sinusoid)))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, embedding_channels: int, config: LDMUNetConfig):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.norm1 = nn.GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(embedding_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, activated_embedding: torch.Tensor) -> torch.Tensor:
        """activated_embedding: SiLU of the timestep embedding, computed once for all blocks."""
        h = self.conv1(fused_group_norm(self.norm1, x, "silu"))
        h = h + self.time_emb_proj(activated_embedding)[:, :, None, None]
        h = self.conv2(fused_group_norm(self.norm2, h, "silu"))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head softmax attention from the tokens to `context` (to themselves when it is None)."""

    def __init__(self, channels: int, heads: int, context_channels: Optional[int] = None):
        super().__init__()
        self.heads = heads
        context_channels = context_channels or channels
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_channels, channels, bias=False)
        self.to_v = nn.Linear(context_channels, channels, bias=False)
        # A list so the parameters are named `to_out.0.*` (diffusers' slot 1 is a dropout).
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        # (B, L, H, D) views of the projections: the op takes any strides, so no copies.
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        return self.to_out[0](cross_attention(q, k, v).flatten(2))


class GEGLU(nn.Module):
    def __init__(self, channels: int, inner_channels: int):
        super().__init__()
        self.proj = nn.Linear(channels, 2 * inner_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, channels: int, mult: int = 4):
        super().__init__()
        # Keys "0" and "2" give diffusers' names ff.net.0.proj / ff.net.2 (its slot 1 is a dropout).
        self.net = nn.ModuleDict({"0": GEGLU(channels, mult * channels), "2": nn.Linear(mult * channels, channels)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net["2"](self.net["0"](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, channels: int, heads: int, context_channels: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = Attention(channels, heads)
        self.norm2 = nn.LayerNorm(channels)
        self.attn2 = Attention(channels, heads, context_channels)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        tokens = tokens + self.attn1(self.norm1(tokens))
        tokens = tokens + self.attn2(self.norm2(tokens), context)
        return tokens + self.ff(self.norm3(tokens))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel with convolutional projections."""

    def __init__(self, channels: int, heads: int, config: LDMUNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, config.cross_attention_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.proj_in(fused_group_norm(self.norm, x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(batch, channels, height, width))


class _Resample(nn.Module):
    """Only wraps `conv` to reproduce diffusers' nesting `downsamplers.0.conv` / `upsamplers.0.conv`."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=1)


class Downsample(_Resample):
    def __init__(self, channels: int):
        super().__init__(channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(_Resample):
    def __init__(self, channels: int):
        super().__init__(channels, stride=1)

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        # To the size of the skip it meets next: 2x, or one less where the down path halved an
        # odd side.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class _Level(nn.Module):
    """ResBlocks, each followed by a SpatialTransformer on attention levels."""

    def __init__(self, resnets: list, channels: int, heads: int, attention: bool, config: LDMUNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(
            SpatialTransformer(channels, heads, config) for _ in resnets) if attention else None

    def _layer(self, index: int, h: torch.Tensor, embedding: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.resnets[index](h, embedding)
        return h if self.attentions is None else self.attentions[index](h, context)


class DownLevel(_Level):
    def __init__(self, in_channels: int, channels: int, heads: int, attention: bool, downsample: bool,
                 config: LDMUNetConfig, embedding_channels: int):
        resnets = [ResnetBlock(in_channels if i == 0 else channels, channels, embedding_channels, config)
                   for i in range(config.layers_per_block)]
        super().__init__(resnets, channels, heads, attention, config)
        self.downsamplers = nn.ModuleList([Downsample(channels)] if downsample else [])

    def forward(self, h, embedding, context, skips: list) -> torch.Tensor:
        """Appends every layer's output to `skips`."""
        for index in range(len(self.resnets)):
            h = self._layer(index, h, embedding, context)
            skips.append(h)
        for downsampler in self.downsamplers:
            h = downsampler(h)
            skips.append(h)
        return h


class UpLevel(_Level):
    def __init__(self, in_channels: int, skip_channels: list, channels: int, heads: int, attention: bool,
                 upsample: bool, config: LDMUNetConfig, embedding_channels: int):
        """skip_channels: the channels of the skips this level takes, in the order it takes them."""
        resnets = [ResnetBlock((in_channels if i == 0 else channels) + skip, channels, embedding_channels, config)
                   for i, skip in enumerate(skip_channels)]
        super().__init__(resnets, channels, heads, attention, config)
        self.upsamplers = nn.ModuleList([Upsample(channels)] if upsample else [])

    def forward(self, h, embedding, context, skips: list) -> torch.Tensor:
        """Takes its skips from the end of `skips`."""
        for index in range(len(self.resnets)):
            h = self._layer(index, torch.cat([h, skips.pop()], dim=1), embedding, context)
        for upsampler in self.upsamplers:
            h = upsampler(h, skips[-1].shape[-2:])
        return h


class MidBlock(nn.Module):
    def __init__(self, channels: int, heads: int, config: LDMUNetConfig, embedding_channels: int):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, embedding_channels, config) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialTransformer(channels, heads, config)])

    def forward(self, h, embedding, context) -> torch.Tensor:
        h = self.resnets[0](h, embedding)
        return self.resnets[1](self.attentions[0](h, context), embedding)


class LDMUNet(nn.Module):
    def __init__(self, config: LDMUNetConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        embedding_channels = 4 * channels[0]
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], embedding_channels)

        skip_channels = [channels[0]]  # the skips the down path leaves, in order
        self.down_blocks = nn.ModuleList()
        previous = channels[0]
        for level, (width, heads, attention) in enumerate(
                zip(channels, config.num_attention_heads, config.attention_levels)):
            self.down_blocks.append(DownLevel(previous, width, heads, attention, level != last, config,
                                              embedding_channels))
            skip_channels += [width] * (config.layers_per_block + (level != last))
            previous = width

        self.mid_block = MidBlock(channels[-1], config.num_attention_heads[-1], config, embedding_channels)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(channels))):
            taken = [skip_channels.pop() for _ in range(config.layers_per_block + 1)]
            self.up_blocks.append(UpLevel(previous, taken, channels[level], config.num_attention_heads[level],
                                          config.attention_levels[level], level != 0, config, embedding_channels))
            previous = channels[level]

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def _check_inputs(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> None:
        c = self.config
        if sample.ndim != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(f"sample must be (B, {c.in_channels}, H, W); got {tuple(sample.shape)}")
        batch = sample.shape[0]
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != c.cross_attention_dim:
            raise ValueError(f"context must be ({batch}, L, {c.cross_attention_dim}); got {tuple(context.shape)}")
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or of shape ({batch},); got {tuple(timestep.shape)}")

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float], context: torch.Tensor) -> torch.Tensor:
        """sample (B, in_channels, H, W) latents; timestep the training timestep in [0, 1000), a
        scalar or (B,); context (B, L, cross_attention_dim) text-encoder states. Returns the
        predicted noise (B, out_channels, H, W)."""
        timestep = per_sample(timestep, sample.shape[0], sample.device)
        self._check_inputs(sample, timestep, context)
        sinusoid = sinusoidal_embedding(timestep, self.config.block_out_channels[0]).to(sample.dtype)
        embedding = F.silu(self.time_embedding(sinusoid))

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, embedding, context, skips)
        h = self.mid_block(h, embedding, context)
        for block in self.up_blocks:
            h = block(h, embedding, context, skips)
        return self.conv_out(fused_group_norm(self.conv_norm_out, h, "silu"))


def build(name_or_config: Union[str, LDMUNetConfig]) -> LDMUNet:
    """A randomly initialised model. Build under `with torch.device("meta"):` to get the
    structure without allocating."""
    return LDMUNet(resolve_config(name_or_config, CONFIGS, LDMUNetConfig, "LDM UNet"))


def from_safetensors(
    path: str, config: Union[str, LDMUNetConfig] = "sd15", device: Union[str, torch.device] = "cpu"
) -> LDMUNet:
    """Load a diffusers-layout UNet checkpoint (e.g. SD 1.5's unet/diffusion_pytorch_model.safetensors).

    The file's dtype is kept."""
    return load_safetensors(path, lambda: build(config), device)


def sample(
    model: LDMUNet,
    noise: torch.Tensor,
    context: torch.Tensor,
    *,
    null_context: Optional[torch.Tensor] = None,
    num_steps: int = DEFAULT_NUM_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    method: str = "ddim",
) -> torch.Tensor:
    """Text-to-latent as Stable Diffusion's pipeline runs it, with classifier-free guidance
    against `null_context` (the encoded empty prompt) when one is given. Returns the latent; SD's
    VAE (`autoencoder_kl`, config "sd15-vae") decodes it after `from_scaled_latents`, a division
    by 0.18215.

    `method` "ddim": DDIM on num_steps training timesteps spaced evenly and shifted by 1
    (diffusers' steps_offset), the last step landing on abar_0 (set_alpha_to_one=False); eta > 0
    adds DDIM's stochastic term, drawn from `generator`. "dpm_solver": DPM-Solver++(2M)
    (`samplers.dpm_solver`, as diffusers' DPMSolverMultistepScheduler from SD's scheduler
    config: "linspace" timesteps, ending at sigma = 0); eta and generator do not apply."""
    if method not in ("ddim", "dpm_solver"):
        raise ValueError(f"method must be 'ddim' or 'dpm_solver'; got {method!r}")
    abar = samplers.alphas_cumprod(samplers.beta_schedule("scaled_linear", NUM_TRAIN_TIMESTEPS))
    guidance = dict(cond=context, uncond=null_context, guidance_scale=guidance_scale)
    if method == "dpm_solver":
        return samplers.dpm_solver(model, noise, abar, num_steps=num_steps, **guidance)
    return samplers.ddim(
        lambda x, t, cond: model(x, t, cond),
        noise,
        abar,
        timesteps=samplers.spaced_timesteps(num_steps, NUM_TRAIN_TIMESTEPS, offset=1),
        eta=eta,
        final_alpha_cumprod=float(abar[0]),
        generator=generator,
        **guidance,
    )


def example_resolution(model: LDMUNet, resolution: Optional[int] = None) -> int:
    """The image side example_step uses: `resolution`, by default the model's sample_size times
    the VAE's factor."""
    return example_resolution_multiple_of(resolution, VAE_SCALE * model.config.sample_size, VAE_SCALE,
                                          "the VAE's factor")


def example_step(model: LDMUNet, batch: int = 1, resolution: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Callable[[], torch.Tensor]:
    """One denoising call as the sampler makes it: the classifier-free-guidance batch (2 x batch
    latents) against CONTEXT_TOKENS context tokens at timestep 500. `resolution` is the image
    side in pixels (default 512, the model's sample_size times the VAE's 8: 64 x 64 x 4
    latents). Inputs are made once, on the model's device and dtype, from `generator` (a CPU
    generator: the same values whatever the device). Returns the zero-argument call."""
    random, device = example_random(model, batch, generator)
    config, side = model.config, example_resolution(model, resolution) // VAE_SCALE
    latents = random(2 * batch, config.in_channels, side, side)
    context = random(2 * batch, CONTEXT_TOKENS, config.cross_attention_dim)
    timestep = torch.full((2 * batch,), NUM_TRAIN_TIMESTEPS / 2, device=device)

    def step() -> torch.Tensor:
        return model(latents, timestep, context)

    return step
