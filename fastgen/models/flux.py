"""FLUX.1 (Black Forest Labs, 2024): the rectified-flow MM-DiT of FLUX.1 [dev] and [schnell].

Latents. The 16-channel latent (B, 16, H, W) of the FLUX.1 VAE (`fastgen.models.autoencoder_kl`,
config flux-vae; H, W = image side / 8) is packed into tokens of 2 x 2 latent pixels,
(B, H/2 W/2, 64), each token's channels ordered (channel, row in the patch, column in the
patch) (`pack_latents`, `unpack_latents`). Image token (i, j) has the position id (0, i, j),
every text token (0, 0, 0) (`image_ids`, `text_ids`).

Network, with C = 3072 (24 heads of 128) in the released configs:

    x = x_embedder(image tokens)                    c = context_embedder(T5 text states)
    e = MLP(sinusoid(1000 t)) [+ MLP(sinusoid(1000 g))] + MLP(pooled CLIP text)
    19 joint (double-stream) blocks on (x, c)       (fastgen.models.mmdit: QK-RMSNorm, RoPE)
    38 single-stream blocks on s = [c; x]:
        (shift, scale, gate) from e;  h = LayerNorm(s) (1 + scale) + shift
        s = s + gate proj_out([Attention(h); GELU(proj_mlp(h))])   (attention and MLP in parallel)
    velocity = proj_out(LayerNorm(x) (1 + scale) + shift),  (scale, shift) from e

t is the flow time in [0, 1] (t = 1 noise) and g the distilled guidance scale, an input of
[dev] only (`guidance_embeds`); [schnell] has no guidance embedding.

RoPE: the head's 128 channels split into three axes of 16, 56 and 56 channels, one per position
id component; in axis a, channel pair i of a token at position p turns by p theta^(-2i/d_a),
theta = 10000, pairs interleaved (channels 2i, 2i+1). The tables cover the text tokens then the
image tokens, in the order the two streams are concatenated.

Parameter names and module nesting are those of diffusers' `FluxTransformer2DModel`, so a
diffusers-format state dict loads with `load_state_dict` (strict) and the forward computes the
same function. Not supported: patch_size other than 1 (the released models pack 2 x 2 outside
the network), ControlNet residuals and IP-Adapter inputs, and the original (non-diffusers)
checkpoint layout.

Sampling (`sample`): Euler on the rectified flow from t = 1 to 0, on
`fastgen.samplers.flux_timesteps`: the [dev] pipeline's grid shifted by the image's token count,
[schnell]'s unshifted.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
from torch import nn

from fastgen import samplers
from fastgen.models.common import (example_random, example_resolution_multiple_of, gelu_tanh, load_safetensors,
                                   per_sample, resolve_config)
from fastgen.models.mmdit import (JointAttention, JointBlock, Modulation, TimestepTextEmbedding, clip_to_float16,
                                  modulate, rope_angles)


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Field names follow diffusers' `FluxTransformer2DModel` config, except sample_size."""

    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    in_channels: int = 64
    out_channels: int = 64
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple = (16, 56, 56)
    # The latent side example_step uses (128: 1024 px through the 8x VAE). Not a diffusers field:
    # RoPE positions make the network resolution-agnostic.
    sample_size: int = 128

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latent: each token packs 2 x 2 latent pixels."""
        return self.in_channels // 4

    @classmethod
    def from_diffusers(cls, config: dict) -> "FluxConfig":
        """The config of a diffusers FluxTransformer2DModel (its config.json as a dict)."""
        if config.get("patch_size", 1) != 1:
            raise ValueError(f"config['patch_size'] = {config['patch_size']!r} is not supported (only 1)")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in config.items() if key in fields}
        if values.get("out_channels") is None:
            values["out_channels"] = values.get("in_channels", cls.in_channels)
        if "axes_dims_rope" in values:
            values["axes_dims_rope"] = tuple(values["axes_dims_rope"])
        result = cls(**values)
        if sum(result.axes_dims_rope) != result.attention_head_dim:
            raise ValueError(f"axes_dims_rope {result.axes_dims_rope} must add up to attention_head_dim "
                             f"{result.attention_head_dim}")
        return result


CONFIGS = {
    "flux-dev": FluxConfig(guidance_embeds=True),
    "flux-schnell": FluxConfig(guidance_embeds=False),
    # Head dim 16 (axes 4 + 6 + 6) so that Triton kernels (tl.dot needs >= 16) accept it; the
    # guidance embedding so that tests exercise it (dataclasses.replace drops it for schnell's).
    "tiny": FluxConfig(num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                       in_channels=16, out_channels=16, joint_attention_dim=24, pooled_projection_dim=12,
                       guidance_embeds=True, axes_dims_rope=(4, 6, 6), sample_size=8),
}

ROPE_THETA = 10000.0
# The network embeds 1000 t and 1000 g.
TIMESTEP_RANGE = 1000.0
# FluxPipeline's defaults for [dev]; [schnell] is distilled to 4 steps without guidance.
DEFAULT_NUM_STEPS = 28
DEFAULT_GUIDANCE = 3.5
SCHNELL_NUM_STEPS = 4
# example_step's text: [dev]'s 512 T5 tokens. Images reach the network through the 8x VAE and
# the 2 x 2 packing.
EXAMPLE_TEXT_TOKENS = 512
AUTOENCODER_FACTOR = 8
PACKING = 2


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents, H and W even, -> (B, H/2 W/2, 4 C) tokens of 2 x 2 pixels, row-major
    over the packed grid, channels ordered (c, row in the patch, column in the patch)."""
    batch, channels, height, width = latents.shape
    if height % PACKING or width % PACKING:
        raise ValueError(f"latent height and width must be even (2 x 2 packing); got {tuple(latents.shape)}")
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // 2) * (width // 2), 4 * channels)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of pack_latents: (B, H/2 W/2, 4 C) -> (B, C, H, W)."""
    batch, count, features = tokens.shape
    if height % PACKING or width % PACKING or count != (height // 2) * (width // 2) or features % 4:
        raise ValueError(f"tokens {tuple(tokens.shape)} are not the packing of a {height} x {width} latent")
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, features // 4, height, width)


def image_ids(height: int, width: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Position ids (H/2 W/2, 3) of the packed tokens of an H x W latent: (0, row, column), float32."""
    rows, columns = torch.meshgrid(torch.arange(height // 2, device=device), torch.arange(width // 2, device=device),
                                   indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float()


def text_ids(tokens: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Position ids (tokens, 3) of the text tokens: all zero, float32."""
    return torch.zeros(tokens, 3, device=device)


class SingleStreamBlock(nn.Module):
    """FLUX.1's single-stream block (module docstring): attention and MLP in parallel on one
    modulated sequence, one output projection over both."""

    def __init__(self, config: FluxConfig, mlp_ratio: float = 4.0):
        super().__init__()
        dim = config.hidden_size
        mlp_hidden = int(dim * mlp_ratio)
        self.norm = Modulation(dim, 3)
        self.proj_mlp = nn.Linear(dim, mlp_hidden)
        self.attn = JointAttention(dim, config.num_attention_heads, config.attention_head_dim, qk_norm=True,
                                   context=False, image_out=False)
        self.proj_out = nn.Linear(dim + mlp_hidden, dim)

    def forward(self, tokens: torch.Tensor, embedding: torch.Tensor, rope) -> torch.Tensor:
        shift, scale, gate = self.norm(embedding)
        normed = modulate(tokens, shift, scale)
        attended = self.attn(normed, rope=rope)[0]
        both = torch.cat([attended, gelu_tanh(self.proj_mlp(normed))], dim=2)
        return clip_to_float16(tokens + gate.unsqueeze(1) * self.proj_out(both))


class FluxTransformer(nn.Module):
    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.time_text_embed = TimestepTextEmbedding(dim, config.pooled_projection_dim, config.guidance_embeds)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            JointBlock(dim, config.num_attention_heads, config.attention_head_dim, qk_norm=True)
            for _ in range(config.num_layers))
        self.single_transformer_blocks = nn.ModuleList(SingleStreamBlock(config)
                                                       for _ in range(config.num_single_layers))
        self.norm_out = Modulation(dim, 2)
        self.proj_out = nn.Linear(dim, config.out_channels)

    def _check_inputs(self, image_tokens, text, pooled_text, timestep, image_ids, text_ids, guidance) -> None:
        c = self.config
        if image_tokens.ndim != 3 or image_tokens.shape[2] != c.in_channels:
            raise ValueError(f"image_tokens must be (B, N, {c.in_channels}); got {tuple(image_tokens.shape)}")
        batch, count = image_tokens.shape[:2]
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != c.joint_attention_dim:
            raise ValueError(f"text must be ({batch}, L, {c.joint_attention_dim}); got {tuple(text.shape)}")
        if pooled_text.shape != (batch, c.pooled_projection_dim):
            raise ValueError(f"pooled_text must be ({batch}, {c.pooled_projection_dim}); "
                             f"got {tuple(pooled_text.shape)}")
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be a scalar or of shape ({batch},); got {tuple(timestep.shape)}")
        if image_ids.shape != (count, 3) or text_ids.shape != (text.shape[1], 3):
            raise ValueError(f"image_ids and text_ids must be ({count}, 3) and ({text.shape[1]}, 3); got "
                             f"{tuple(image_ids.shape)} and {tuple(text_ids.shape)}")
        if c.guidance_embeds and (guidance is None or guidance.shape != (batch,)):
            raise ValueError(f"this model embeds guidance: give a scalar or ({batch},) guidance")
        if not c.guidance_embeds and guidance is not None:
            raise ValueError("this model has no guidance embedding (guidance_embeds=False): give guidance=None")

    def forward(
        self,
        image_tokens: torch.Tensor,
        text: torch.Tensor,
        pooled_text: torch.Tensor,
        timestep: Union[torch.Tensor, float],
        image_ids: torch.Tensor,
        text_ids: torch.Tensor,
        guidance: Union[torch.Tensor, float, None] = None,
    ) -> torch.Tensor:
        """image_tokens (B, N, in_channels): packed latents (pack_latents); text (B, L,
        joint_attention_dim): T5 states; pooled_text (B, pooled_projection_dim): pooled CLIP;
        timestep: the flow time in [0, 1], a scalar or (B,); image_ids (N, 3), text_ids (L, 3)
        (`image_ids`, `text_ids`); guidance: the distilled guidance scale, a scalar or (B,),
        for a model with guidance_embeds only. Returns the velocity (B, N, out_channels)."""
        batch, device = image_tokens.shape[0], image_tokens.device
        timestep = per_sample(timestep, batch, device)
        guidance = None if guidance is None else per_sample(guidance, batch, device)
        self._check_inputs(image_tokens, text, pooled_text, timestep, image_ids, text_ids, guidance)

        x = self.x_embedder(image_tokens)
        # Times are rounded to the activations' dtype before scaling, as diffusers does.
        timestep = timestep.to(x.dtype) * TIMESTEP_RANGE
        if guidance is not None:
            guidance = guidance.to(x.dtype) * TIMESTEP_RANGE
        embedding = self.time_text_embed(timestep, pooled_text, guidance)
        context = self.context_embedder(text)
        rope = rope_angles(torch.cat([text_ids, image_ids]), self.config.axes_dims_rope, ROPE_THETA)

        for block in self.transformer_blocks:
            x, context = block(x, context, embedding, rope)
        # The single-stream blocks see one sequence; concatenating once for all of them is the
        # same as concatenating and splitting around each.
        tokens = torch.cat([context, x], dim=1)
        for block in self.single_transformer_blocks:
            tokens = block(tokens, embedding, rope)
        x = tokens[:, context.shape[1]:]

        scale, shift = self.norm_out(embedding)
        return self.proj_out(modulate(x, shift, scale))


def build(name_or_config: Union[str, FluxConfig]) -> FluxTransformer:
    """A randomly initialised model. Build under `with torch.device("meta"):` to get the
    structure without allocating, e.g. for the released configs (12B parameters)."""
    return FluxTransformer(resolve_config(name_or_config, CONFIGS, FluxConfig, "FLUX.1"))


def example_resolution(model: FluxTransformer, resolution: Optional[int] = None) -> int:
    """The image side example_step uses: `resolution`, by default the config's sample_size x 8."""
    return example_resolution_multiple_of(
        resolution, AUTOENCODER_FACTOR * model.config.sample_size, AUTOENCODER_FACTOR * PACKING,
        f"the autoencoder factor {AUTOENCODER_FACTOR} times the {PACKING} x {PACKING} packing")


def example_step(
    model: FluxTransformer,
    batch: int = 1,
    resolution: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Callable[[], torch.Tensor]:
    """One denoising call as the sampler makes it: `batch` packed latents against
    EXAMPLE_TEXT_TOKENS text tokens at t = 0.5, with guidance 3.5 for a model that embeds it
    (FLUX.1 distils guidance into the network, so there is no guidance batch). `resolution` is
    the image side in pixels, by default the config's sample_size x 8 (1024 px for the released
    configs: 4096 image tokens; 64 px for tiny). Inputs are made once, on the model's device and
    dtype, from `generator` (a CPU generator: the same values whatever the device). Returns the
    zero-argument call."""
    random, device = example_random(model, batch, generator)
    config, side = model.config, example_resolution(model, resolution) // AUTOENCODER_FACTOR
    image_tokens = pack_latents(random(batch, config.latent_channels, side, side))
    text = random(batch, EXAMPLE_TEXT_TOKENS, config.joint_attention_dim)
    pooled_text = random(batch, config.pooled_projection_dim)
    timestep = torch.full((batch,), 0.5, device=device)
    guidance = torch.full((batch,), DEFAULT_GUIDANCE, device=device) if config.guidance_embeds else None
    positions = image_ids(side, side, device), text_ids(EXAMPLE_TEXT_TOKENS, device)

    def step() -> torch.Tensor:
        return model(image_tokens, text, pooled_text, timestep, *positions, guidance)

    return step


def from_safetensors(
    path: str, config: Union[str, FluxConfig], device: Union[str, torch.device] = "cpu"
) -> FluxTransformer:
    """Load a diffusers-layout FLUX.1 transformer checkpoint (a single .safetensors file),
    keeping the file's dtype."""
    return load_safetensors(path, lambda: build(config), device)


def sample(
    model: FluxTransformer,
    noise: torch.Tensor,
    text: torch.Tensor,
    pooled_text: torch.Tensor,
    *,
    num_steps: Optional[int] = None,
    guidance: Optional[float] = None,
    resolution_shift: Optional[bool] = None,
) -> torch.Tensor:
    """Text-to-latent: Euler on the rectified flow from `noise` (B, in_channels / 4, H, W) at
    t = 1 to the latent at t = 0, returned unpacked like `noise`.

    Defaults follow the released models' pipelines, told apart by the guidance embedding: [dev]
    takes 28 steps with guidance 3.5 on the schedule shifted by the image's token count
    (`resolution_shift`); [schnell] 4 steps, no guidance, no shift. The guidance value is a
    network input (distilled guidance): one model call per step, whatever its value."""
    config = model.config
    if num_steps is None:
        num_steps = DEFAULT_NUM_STEPS if config.guidance_embeds else SCHNELL_NUM_STEPS
    if resolution_shift is None:
        resolution_shift = config.guidance_embeds
    if guidance is None and config.guidance_embeds:
        guidance = DEFAULT_GUIDANCE
    batch, _, height, width = noise.shape
    tokens = (height // PACKING) * (width // PACKING)
    positions = image_ids(height, width, noise.device), text_ids(text.shape[1], noise.device)
    guidance_input = None if guidance is None else torch.full((batch,), float(guidance), device=noise.device)

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return model(x, cond["text"], cond["pooled_text"], t, *positions, guidance_input)

    timesteps = samplers.flux_timesteps(num_steps, tokens if resolution_shift else None, device=noise.device)
    packed = samplers.flow_matching_euler(velocity, pack_latents(noise), timesteps=timesteps,
                                          cond={"text": text, "pooled_text": pooled_text})
    return unpack_latents(packed, height, width)
