"""The KL-regularised autoencoder of latent diffusion (Rombach et al., 2022, arXiv:2112.10752):
the VAE of Stable Diffusion 1.x / 2.x, SDXL and FLUX.1.

An image x (B, 3, H, W) in [-1, 1] is encoded to a diagonal Gaussian posterior
q(z | x) = N(mean, diag(exp(logvar))) over latents z (B, c, H/f, W/f), f = 2^(L - 1) for L
levels (f = 8 and c = 4 for SD and SDXL, c = 16 for FLUX.1), and a latent is decoded back to an
image. With C_i = block_out_channels[i] and GN a GroupNorm of norm_num_groups groups, eps 1e-6:

- ResnetBlock(x) = shortcut(x) + conv2(SiLU(GN(conv1(SiLU(GN(x)))))), 3x3 convolutions, shortcut
  a 1x1 convolution where the channel count changes (the identity otherwise).
- Attention(x) = x + W_o softmax(Q K^T / sqrt(C)) V + b_o, with Q, K, V = GN(x) W_{q,k,v} + b_{q,k,v}
  over the H W tokens of C channels: a single head of all C channels.
- Encoder: conv_in (3x3, to C_0); per level i, layers_per_block ResnetBlocks to C_i, then (not on
  the last level) a zero row and column appended at the bottom and right and a 3x3 stride-2
  convolution (a side s becomes floor(s / 2)); the middle: ResnetBlock, Attention, ResnetBlock;
  SiLU(GN), conv_out (3x3, to 2c channels: the moments [mean, logvar]); quant_conv (1x1,
  2c -> 2c) where use_quant_conv.
- Decoder: post_quant_conv (1x1, c -> c) where use_post_quant_conv; conv_in (3x3, to C_last);
  the middle as in the encoder; per level from the deepest, layers_per_block + 1 ResnetBlocks,
  then (not on the last level) nearest 2x upsampling and a 3x3 convolution; SiLU(GN), conv_out
  (3x3, to 3 channels). Any latent side decodes (to f times it); the encoder takes any image
  side of at least f.
- Posterior (`DiagonalGaussian`): logvar clamped to [-30, 20]; mode = mean;
  sample = mean + exp(logvar / 2) * eps with eps ~ N(0, I).
- Diffusion latents: the diffusion model works on latents = (z - shift_factor) * scaling_factor,
  where shift_factor is about the mean of z over the training images (FLUX.1's only; 0 for SD
  and SDXL) and scaling_factor about the inverse of its standard deviation, so that the
  latents have about unit variance; a generated latent decodes as
  z = latents / scaling_factor + shift_factor (`to_scaled_latents`, `from_scaled_latents`;
  encode and decode do not apply them).

Tiled encode and decode (`tiled_encode`, `tiled_decode`) bound the memory of large images. Tiles
of T latents (f T pixels) start every S = floor(T (1 - overlap)) latents along each axis (the
last ones are cut short by the border) and each runs through the encoder or decoder alone. In
row-major order, the first E output rows of a tile are blended with the last E rows of the tile
above (as that tile was blended itself), b_y <- (1 - y / E) a_(-E + y) + (y / E) b_y for
y = 0 .. E - 1, then its first E columns with the tile on its left in the same way; E is the
overlap T - S in output positions (f (T - S) pixels when decoding), capped by the smaller tile.
Each tile then gives its first S output positions along each axis (f S pixels when decoding).
An input no larger than T (decode) or f T (encode) on both sides runs in one piece. This is
diffusers' tiling with tile_latent_min_size = T, tile_sample_min_size = f T and
tile_overlap_factor = overlap wherever T * overlap is a whole number (with its default tile,
64 or 128 latents); where it is not, diffusers' crops and strides disagree and its output does
not have the image's size, while here tiles always meet.

Kernels: every GroupNorm, with the SiLU after it in the ResnetBlocks and the output heads and
alone before the attention, is one `fastgen.ops.ada_group_norm` call with zero modulation. The
attention's head has C_last = 512 channels in every published config, beyond
`fastgen.ops.cross_attention`'s head-dim limit (MAX_HEAD_DIM, 256), so it runs on torch's
`scaled_dot_product_attention`. A head cannot be split into narrower heads (the softmax
normalises dot products over all its C channels), and a flash kernel at D = 512 either holds
a (rows, 512) float32 output accumulator across the key loop (128 KiB for 64 rows, half an
H100's register file for one block) or tiles the output over D and recomputes the scores once
per tile (4 tiles: 4x the score work); whether either beats SDPA at 64^2 to 256^2 tokens is a
GPU measurement, and until one shows it the attention stays on SDPA.

Parameter names and nesting are those of diffusers' `AutoencoderKL`, so a diffusers VAE
checkpoint (a single .safetensors file) loads with `from_safetensors`. Supported: the
DownEncoderBlock2D / UpDecoderBlock2D architecture with SiLU and the middle attention, which SD,
SDXL and FLUX.1 use; `AutoencoderKLConfig.from_diffusers` refuses other options.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.common import (decode_step, example_resolution_multiple_of, fused_group_norm, load_safetensors,
                                   resolve_config)

NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
TILE_OVERLAP = 0.25  # diffusers' tile_overlap_factor


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Field names follow diffusers' `AutoencoderKL` config."""

    block_out_channels: tuple = (128, 256, 512, 512)
    latent_channels: int = 4
    layers_per_block: int = 2
    in_channels: int = 3
    out_channels: int = 3
    norm_num_groups: int = 32
    # The image side the autoencoder was trained at; tiled encode and decode default to tiles of
    # this side.
    sample_size: int = 512
    # latents = (z - shift_factor) * scaling_factor (module docstring).
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def __post_init__(self):
        uneven = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if uneven:
            raise ValueError(f"block_out_channels {self.block_out_channels} must be divisible by norm_num_groups "
                             f"{self.norm_num_groups}")
        if self.sample_size % self.spatial_compression:
            raise ValueError(f"sample_size {self.sample_size} must be a multiple of the spatial compression "
                             f"{self.spatial_compression}")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> "AutoencoderKLConfig":
        """The config of a diffusers AutoencoderKL (its config.json as a dict); a field it leaves
        out takes diffusers' default."""
        supported = {"act_fn": "silu", "latents_mean": None, "latents_std": None, "mid_block_add_attention": True}
        for key, value in supported.items():
            if config.get(key, value) != value:
                raise ValueError(f"config[{key!r}] = {config[key]!r} is not supported (only {value!r})")
        channels = tuple(config.get("block_out_channels", (64,)))
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            kinds = tuple(config.get(key, (kind,)))
            if kinds != (kind,) * len(channels):
                raise ValueError(f"config[{key!r}] must be {kind!r} once per level ({len(channels)}); got {kinds}")
        defaults = {"layers_per_block": 1, "norm_num_groups": 32, "sample_size": 32, "latent_channels": 4}
        fields = {field.name for field in dataclasses.fields(cls)} - {"block_out_channels", "shift_factor"}
        return cls(
            block_out_channels=channels,
            shift_factor=config.get("shift_factor") or 0.0,  # diffusers writes None for no shift
            **{**defaults, **{key: value for key, value in config.items() if key in fields}},
        )

    def to_diffusers(self) -> dict:
        """Keyword arguments of diffusers' AutoencoderKL building this configuration."""
        levels = len(self.block_out_channels)
        return {**dataclasses.asdict(self), "down_block_types": ("DownEncoderBlock2D",) * levels,
                "up_block_types": ("UpDecoderBlock2D",) * levels}


CONFIGS = {
    # stable-diffusion-v1-5's vae.
    "sd15-vae": AutoencoderKLConfig(),
    # SDXL's vae: the SD architecture, retrained, with its own latent scale.
    "sdxl-vae": AutoencoderKLConfig(sample_size=1024, scaling_factor=0.13025),
    # FLUX.1's autoencoder: 16 latent channels, no 1x1 quant convolutions, shifted latents.
    "flux-vae": AutoencoderKLConfig(latent_channels=16, sample_size=1024, scaling_factor=0.3611,
                                    shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
    # f4 over three levels, one channel change (a shortcut convolution) in each half; default
    # tiles of 8 latents.
    "tiny": AutoencoderKLConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                                sample_size=32),
}


@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """The posterior N(mean, diag(exp(logvar))) of the latents; logvar is already clamped."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        """From the encoder's (B, 2c, h, w) output: mean the first c channels, logvar the rest."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """mean + std * eps, eps drawn from `generator` on its own device (a CPU generator gives
        the same latents whatever the model's device)."""
        device = self.mean.device if generator is None else generator.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, NORM_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, NORM_EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(fused_group_norm(self.norm1, x, "silu"))
        h = self.conv2(fused_group_norm(self.norm2, h, "silu"))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over the pixels of a GroupNorm-ed map, with its residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # A list so the parameters are named `to_out.0.*` (diffusers' slot 1 is a dropout).
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = fused_group_norm(self.group_norm, x).flatten(2).transpose(1, 2)
        # (B, 1, HW, C): one head; torch's attention because the head is wider than the fastgen
        # op takes (module docstring).
        q, k, v = (projection(tokens).unsqueeze(1) for projection in (self.to_q, self.to_k, self.to_v))
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.to_out[0](attended).transpose(1, 2).reshape(batch, channels, height, width)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels, groups)])
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Padding on the bottom and right only: the taps of output (i, j) start at pixel (2i, 2j).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """ResnetBlocks, then an optional resampling; diffusers' DownEncoderBlock2D (`downsamplers`)
    or UpDecoderBlock2D (`upsamplers`)."""

    def __init__(self, in_channels: int, channels: int, layers: int, groups: int, resample: Optional[str]):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_channels if i == 0 else channels, channels, groups)
                                     for i in range(layers))
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(channels)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(channels)])
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(channels[max(i - 1, 0)], width, config.layers_per_block, groups, "down" if i < last else None)
            for i, width in enumerate(channels))
        self.mid_block = MidBlock(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], NORM_EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        return self.conv_out(fused_group_norm(self.conv_norm_out, self.mid_block(h), "silu"))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        channels, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups)
        self.up_blocks = nn.ModuleList(
            Level(channels[max(i - 1, 0)], width, config.layers_per_block + 1, groups, "up" if i < last else None)
            for i, width in enumerate(channels))
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], NORM_EPS)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(fused_group_norm(self.conv_norm_out, h, "silu"))


def _blend_into(previous: torch.Tensor, tile: torch.Tensor, extent: int, dim: int) -> None:
    """tile's first E = `extent` rows (dim -2) or columns (dim -1), E capped by both tiles'
    lengths, become (1 - y / E) previous_(-E + y) + (y / E) tile_y; in place."""
    extent = min(previous.shape[dim], tile.shape[dim], extent)
    if extent == 0:
        return
    # The weights rounded from float64 to the tile's dtype, as diffusers' Python-float weights are.
    ramp = torch.arange(extent, dtype=torch.float64, device=tile.device) / extent
    ramp = ramp[:, None] if dim == -2 else ramp
    head = tile.narrow(dim, 0, extent)
    tail = previous.narrow(dim, previous.shape[dim] - extent, extent)
    head.copy_(tail * (1 - ramp).to(tile.dtype) + head * ramp.to(tile.dtype))


def _run_tiled(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, stride: int,
               out_stride: int, out_overlap: int) -> torch.Tensor:
    """`run` over tiles of `tile` positions of x starting every `stride`, blended over
    `out_overlap` output positions and cut to `out_stride` each (module docstring)."""
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return run(x)
    above = {}  # column -> the blended tile of the previous row in that column
    rows = []
    for top in range(0, height, stride):
        pieces, left = [], None
        for column, start in enumerate(range(0, width, stride)):
            out = run(x[..., top:top + tile, start:start + tile])
            if column in above:
                _blend_into(above[column], out, out_overlap, -2)
            if left is not None:
                _blend_into(left, out, out_overlap, -1)
            above[column] = left = out
            pieces.append(out[..., :out_stride, :out_stride])
        rows.append(torch.cat(pieces, dim=-1))
    return torch.cat(rows, dim=-2)


class AutoencoderKL(nn.Module):
    """encode: (B, in_channels, H, W) images -> DiagonalGaussian over (B, latent_channels,
    floor(H / f), floor(W / f)) latents (each halving floors); decode: (B, latent_channels, h, w)
    -> (B, out_channels, f h, f w); forward: decode of the posterior's mode or of a sample."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None

    @staticmethod
    def _check(name: str, x: torch.Tensor, channels: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must be (B, {channels}, H, W); got {tuple(x.shape)}")

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def _image(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check("x", x, self.config.in_channels)
        return DiagonalGaussian.from_moments(self._moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check("z", z, self.config.latent_channels)
        return self._image(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())

    def _tiles(self, tile_latent_size: Optional[int], overlap: float) -> tuple:
        """(T, S): the tile side and the tile stride in latents."""
        tile = self.config.sample_size // self.config.spatial_compression if tile_latent_size is None \
            else tile_latent_size
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
            raise ValueError(f"tile_latent_size must be a positive int; got {tile_latent_size!r}")
        stride = int(tile * (1 - overlap)) if isinstance(overlap, (int, float)) else 0
        if not 0 <= overlap < 1 or stride < 1:
            raise ValueError(f"overlap must be in [0, 1) and leave a stride of at least one latent in tiles of "
                             f"tile_latent_size {tile}; got {overlap!r}")
        return tile, stride

    def tiled_encode(self, x: torch.Tensor, tile_latent_size: Optional[int] = None,
                     overlap: float = TILE_OVERLAP) -> DiagonalGaussian:
        """encode, tile by tile (module docstring): tiles of f T pixels, T = tile_latent_size
        (default sample_size / f)."""
        self._check("x", x, self.config.in_channels)
        tile, stride = self._tiles(tile_latent_size, overlap)
        factor = self.config.spatial_compression
        return DiagonalGaussian.from_moments(
            _run_tiled(self._moments, x, factor * tile, factor * stride, stride, tile - stride))

    def tiled_decode(self, z: torch.Tensor, tile_latent_size: Optional[int] = None,
                     overlap: float = TILE_OVERLAP) -> torch.Tensor:
        """decode, tile by tile (module docstring): tiles of T = tile_latent_size latents
        (default sample_size / f)."""
        self._check("z", z, self.config.latent_channels)
        tile, stride = self._tiles(tile_latent_size, overlap)
        factor = self.config.spatial_compression
        return _run_tiled(self._image, z, tile, stride, factor * stride, factor * (tile - stride))

    def to_scaled_latents(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents: (z - shift_factor) * scaling_factor."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_scaled_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The autoencoder's latents z = latents / scaling_factor + shift_factor, for decode."""
        return latents / self.config.scaling_factor + self.config.shift_factor


def build(name_or_config: Union[str, AutoencoderKLConfig]) -> AutoencoderKL:
    """A randomly initialised model. Build under `with torch.device("meta"):` to get the
    structure without allocating."""
    return AutoencoderKL(resolve_config(name_or_config, CONFIGS, AutoencoderKLConfig, "AutoencoderKL"))


def from_safetensors(
    path: str, config: Union[str, AutoencoderKLConfig], device: Union[str, torch.device] = "cpu"
) -> AutoencoderKL:
    """Load a diffusers-layout AutoencoderKL checkpoint (a single .safetensors file, e.g. the
    vae of stable-diffusion-v1-5 with config "sd15-vae"). The file's dtype is kept. Returned in
    eval mode."""
    return load_safetensors(path, lambda: build(config), device)


def example_resolution(model: AutoencoderKL, resolution: Optional[int] = None) -> int:
    """The image side example_step decodes to: `resolution`, by default the config's sample_size."""
    factor = model.config.spatial_compression
    return example_resolution_multiple_of(resolution, model.config.sample_size, factor, "the spatial compression")


def example_step(
    model: AutoencoderKL,
    batch: int = 1,
    resolution: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Callable[[], torch.Tensor]:
    """One decode, without autograd, of `batch` random latents for images of side `resolution`
    pixels (default the config's sample_size: 512 px for sd15-vae, 1024 px for sdxl-vae and
    flux-vae, 32 px for tiny). The latents are made once, on the model's device and dtype, from
    `generator` (a CPU generator: the same values whatever the device). Returns the
    zero-argument call."""
    return decode_step(model, batch, example_resolution(model, resolution), generator)
