"""DC-AE: the deep-compression autoencoder of SANA (Chen et al., 2024, arXiv:2410.10733).

An image (B, 3, H, W) is encoded to a latent (B, c, H/f, W/f) with f = 32 or 64 and decoded
back. Both halves are stacks of stages; stage i works at C_i channels and side H / 2^i:

- ResBlock: x + norm(conv3x3(act(conv3x3(x)))) (the second conv has no bias).
- EfficientViTBlock: multi-scale ReLU linear attention (LiteMLA), then GLUMBConv, each residual.
  LiteMLA: a bias-free 1x1 projection to q, k, v (3 I channels, I = heads x D); each extra
  scale aggregates them with a k x k depthwise conv followed by a 1x1 conv grouped per head,
  giving another set of heads; ReLU linear attention (`fastgen.ops.linear_attention`,
  eps 1e-15) runs over all heads of all scales; a 1x1 projection back to C and a norm.
  Channel h*3D + j*D + d of the concatenated scales is element d of q (j = 0), k (1) or v (2)
  of head h: heads are contiguous groups of 3D channels, as in EfficientViT.
  GLUMBConv: 1x1 conv to 2 x 4C (SiLU), 3x3 depthwise, split into value and gate,
  value * silu(gate), bias-free 1x1 conv to C, RMSNorm.
- Residual autoencoding shortcuts (the paper's section 3.2): every resolution change adds a
  parameter-free path to the learned one. Going down by 2, the input's pixel_unshuffle is
  averaged over groups of channels to the output width (`pixel_unshuffle_channel_avg`);
  going up, channels are duplicated and pixel-shuffled (`channel_dup_pixel_shuffle`). The
  encoder's output (C_last -> c channels) and the decoder's input (c -> C_last) use the same
  ops with factor 1: plain channel averaging and duplication. Each shortcut and its residual
  add is one fused op call.
- RMSNorm over channels per pixel, with weight and bias, eps 1e-5: `fastgen.ops.trms2d`.
  BatchNorm2d where a decoder stage asks for "batch_norm" (the in-1.0 models' first stages).

Module names, nesting and attribute names are those of diffusers' `AutoencoderDC`
(models/autoencoders/autoencoder_dc.py), so a diffusers-format state dict loads unchanged, and
each forward here also runs on the diffusers module of the same role: `fastgen.accelerate`
installs them there (fastgen/accelerators/diffusers_dcae.py). For that, norms are called the
way diffusers calls them: RMSNorm on the channel-last view (B, H, W, C) of the map, BatchNorm on
the map itself.

Where this differs from diffusers: diffusers switches to an N x N ("quadratic") form of the
same attention when a map has no more pixels than the head dim; that form computes the same
function, so here the linear form always runs. Not supported: tiled and sliced encode/decode.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.common import decode_step, example_resolution_multiple_of, load_safetensors, resolve_config
from fastgen.ops.linear_attention import linear_attention
from fastgen.ops.rms_norm_2d import trms2d
from fastgen.ops.shortcut import channel_dup_pixel_shuffle, pixel_unshuffle_channel_avg

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "relu": F.relu}
# The resampling kinds, read as diffusers reads them: down, "pixel_unshuffle" (3x3 conv, then
# pixel_unshuffle) or anything else (a stride-2 conv; the SANA model says "conv"); up,
# "interpolate" (nearest upsampling, then the conv) or anything else (the conv, then pixel_shuffle).
PIXEL_UNSHUFFLE, INTERPOLATE = "pixel_unshuffle", "interpolate"
NORM_EPS = 1e-5
ATTENTION_EPS = 1e-15
GLU_EXPAND_RATIO = 4


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    """Field names follow diffusers' `AutoencoderDC` config; per-stage fields are tuples with
    one entry per stage (`from_diffusers` expands diffusers' single-string shorthand)."""

    latent_channels: int
    encoder_block_types: tuple
    decoder_block_types: tuple
    encoder_block_out_channels: tuple
    decoder_block_out_channels: tuple
    encoder_layers_per_block: tuple
    decoder_layers_per_block: tuple
    encoder_qkv_multiscales: tuple
    decoder_qkv_multiscales: tuple
    decoder_norm_types: tuple
    decoder_act_fns: tuple
    downsample_block_type: str = PIXEL_UNSHUFFLE
    upsample_block_type: str = "pixel_shuffle"
    in_channels: int = 3
    attention_head_dim: int = 32
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    # Latents are multiplied by it before diffusion and divided by it before decoding (the
    # pipeline's job: encode and decode here do not apply it).
    scaling_factor: float = 1.0

    def __post_init__(self):
        stages = len(self.encoder_block_out_channels)
        per_stage = [name for name in ("encoder_block_types", "encoder_layers_per_block", "encoder_qkv_multiscales")
                     if len(getattr(self, name)) != stages]
        decoder_stages = len(self.decoder_block_out_channels)
        per_stage += [name for name in ("decoder_block_types", "decoder_layers_per_block", "decoder_qkv_multiscales",
                                        "decoder_norm_types", "decoder_act_fns")
                      if len(getattr(self, name)) != decoder_stages]
        if per_stage:
            raise ValueError(f"DCAEConfig: {', '.join(per_stage)} must have one entry per stage")
        if stages != decoder_stages:
            raise ValueError(f"DCAEConfig: encoder and decoder must have as many stages; got {stages} and "
                             f"{decoder_stages}")
        for name, allowed in (("encoder_block_types", BLOCK_TYPES), ("decoder_block_types", BLOCK_TYPES),
                              ("decoder_norm_types", NORM_TYPES), ("decoder_act_fns", tuple(ACTIVATIONS))):
            unknown = set(getattr(self, name)) - set(allowed)
            if unknown:
                raise ValueError(f"DCAEConfig: {name} may hold {allowed}; got {sorted(unknown)}")
        if self.decoder_conv_act_fn not in ACTIVATIONS:
            raise ValueError(f"DCAEConfig: decoder_conv_act_fn must be one of {tuple(ACTIVATIONS)}; "
                             f"got {self.decoder_conv_act_fn!r}")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    def to_diffusers(self) -> dict:
        """Keyword arguments of diffusers' AutoencoderDC building this configuration."""
        return dataclasses.asdict(self)

    @classmethod
    def from_diffusers(cls, config: dict) -> "DCAEConfig":
        """The config of a diffusers AutoencoderDC (its config.json as a dict); a field it
        leaves out takes diffusers' default."""
        defaults = {
            "encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock",
            "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
            "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
            "encoder_layers_per_block": (2, 2, 2, 3, 3, 3), "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
            "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
            "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
            "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "latent_channels": 32,
        }
        merged = {**defaults, **config}
        stages = len(merged["encoder_block_out_channels"])
        fields = {}
        for field in dataclasses.fields(cls):
            if field.name not in merged:
                continue
            value = merged[field.name]
            if isinstance(value, str) and field.type == "tuple":
                value = (value,) * stages
            elif isinstance(value, (list, tuple)):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            fields[field.name] = value
        return cls(**fields)


_RES, _VIT = BLOCK_TYPES
_SANA_STAGES = (_RES, _RES, _RES, _VIT, _VIT, _VIT)
_IN_STAGES = (_RES, _RES, _RES, _VIT, _VIT, _VIT, _VIT)

CONFIGS = {
    # mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers: SANA's autoencoder.
    "f32c32": DCAEConfig(
        latent_channels=32,
        encoder_block_types=_SANA_STAGES,
        decoder_block_types=_SANA_STAGES,
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_norm_types=("rms_norm",) * 6,
        decoder_act_fns=("silu",) * 6,
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        scaling_factor=0.41407,
    ),
    # mit-han-lab/dc-ae-f64c128-in-1.0-diffusers (ImageNet). Its first stage has no blocks: the
    # encoder enters and the decoder leaves through a resampling block without shortcut.
    "f64c128": DCAEConfig(
        latent_channels=128,
        encoder_block_types=_IN_STAGES,
        decoder_block_types=_IN_STAGES,
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024, 2048),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024, 2048),
        encoder_layers_per_block=(0, 4, 8, 2, 2, 2, 2),
        decoder_layers_per_block=(0, 5, 10, 2, 2, 2, 2),
        encoder_qkv_multiscales=((),) * 7,
        decoder_qkv_multiscales=((),) * 7,
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * 4,
        decoder_act_fns=("relu",) * 3 + ("silu",) * 4,
    ),
    # f4c8: every block kind, both resampling kinds (pixel_unshuffle / pixel_shuffle here, the
    # SANA kinds through dataclasses.replace in the tests), BatchNorm and RMSNorm decoder stages.
    # Head dim 16 so that the Triton kernels' tl.dot tiles are filled.
    "tiny": DCAEConfig(
        latent_channels=8,
        encoder_block_types=(_RES, _VIT, _VIT),
        decoder_block_types=(_RES, _VIT, _VIT),
        encoder_block_out_channels=(16, 32, 64),
        decoder_block_out_channels=(16, 32, 64),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (5,), (5,)),
        decoder_qkv_multiscales=((), (5,), ()),
        decoder_norm_types=("batch_norm", "rms_norm", "rms_norm"),
        decoder_act_fns=("relu", "silu", "silu"),
        attention_head_dim=16,
    ),
}

# example_step's canonical latent side: SANA's 2048 px images give f32c32 latents of 64 x 64 x 32.
EXAMPLE_LATENT_SIDE = 64


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension of a channel-last view (B, H, W, C) of a feature map, the
    way diffusers' DC-AE calls it; computed by trms2d on the map itself (a free view)."""

    def __init__(self, channels: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cast the affine parameters so that autocast runs (diffusers promotes instead).
        weight, bias = (p.to(x.dtype) for p in (self.weight, self.bias))
        return trms2d(x.movedim(-1, 1), weight, bias, self.eps).movedim(1, -1)


def _norm(norm_type: str, channels: int) -> nn.Module:
    return RMSNorm(channels) if norm_type == "rms_norm" else nn.BatchNorm2d(channels, eps=NORM_EPS)


def _apply_norm(norm: nn.Module, norm_type: str, x: torch.Tensor) -> torch.Tensor:
    """`norm` of an NCHW map, called as diffusers calls a norm of that type."""
    if norm_type == "rms_norm":
        return norm(x.movedim(1, -1)).movedim(-1, 1)
    return norm(x)


class ResBlock(nn.Module):
    def __init__(self, channels: int, norm_type: str, act_fn: str):
        super().__init__()
        self.norm_type = norm_type
        self.act_fn = act_fn
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = _norm(norm_type, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + _apply_norm(self.norm, self.norm_type, self.conv2(ACTIVATIONS[self.act_fn](self.conv1(x))))


class MultiscaleAggregation(nn.Module):
    """One extra scale of LiteMLA: k x k depthwise conv, then a 1x1 conv grouped per head."""

    def __init__(self, channels: int, heads: int, kernel_size: int):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                                 bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=3 * heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


class MultiscaleLinearAttention(nn.Module):
    """LiteMLA (module docstring), with its residual. diffusers: SanaMultiscaleLinearAttention."""

    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple, norm_type: str):
        super().__init__()
        heads = channels // head_dim
        inner = heads * head_dim
        self.attention_head_dim = head_dim
        self.norm_type = norm_type
        self.eps = ATTENTION_EPS
        # Always true in DC-AE; kept because this forward also serves diffusers' module, whose
        # constructor makes it optional.
        self.residual_connection = True
        self.to_q = nn.Linear(channels, inner, bias=False)
        self.to_k = nn.Linear(channels, inner, bias=False)
        self.to_v = nn.Linear(channels, inner, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleAggregation(3 * inner, heads, k) for k in kernel_sizes)
        self.to_out = nn.Linear(inner * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = _norm(norm_type, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        # One GEMM for q, k and v, on the channel-last view: its output is already the
        # (pixel, channel) layout the heads are cut from.
        qkv_weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        qkv = F.linear(x.movedim(1, -1), qkv_weight)
        scales = [qkv] + [aggregate(qkv.movedim(-1, 1)).movedim(1, -1) for aggregate in self.to_qkv_multiscale]
        heads = torch.cat(scales, dim=-1).reshape(batch, height * width, -1, 3, self.attention_head_dim)
        q, k, v = heads.unbind(3)  # strided views: the op reads them in place
        attended = linear_attention(q, k, v, self.eps).view(batch, height, width, -1)
        out = _apply_norm(self.norm_out, self.norm_type, self.to_out(attended).movedim(-1, 1))
        return out + x if self.residual_connection else out


class GLUMBConv(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        hidden = GLU_EXPAND_RATIO * channels
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.conv_depth(F.silu(self.conv_inverted(x))).chunk(2, dim=1)
        return x + _apply_norm(self.norm, "rms_norm", self.conv_point(value * F.silu(gate)))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, head_dim: int, kernel_sizes: tuple, norm_type: str):
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, kernel_sizes, norm_type)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


def _block(block_type: str, channels: int, head_dim: int, kernel_sizes: tuple, norm_type: str,
           act_fn: str) -> nn.Module:
    if block_type == "ResBlock":
        return ResBlock(channels, norm_type, act_fn)
    return EfficientViTBlock(channels, head_dim, kernel_sizes, norm_type)


class DownBlock(nn.Module):
    """Halves the side: a 3x3 conv (stride 2, or stride 1 then pixel_unshuffle) plus, with
    `shortcut`, the averaged pixel_unshuffle of the input. diffusers: DCDownBlock2d."""

    def __init__(self, in_channels: int, out_channels: int, pixel_unshuffle: bool, shortcut: bool):
        super().__init__()
        self.factor = 2
        self.downsample = pixel_unshuffle
        self.shortcut = shortcut
        conv_channels = out_channels // self.factor**2 if pixel_unshuffle else out_channels
        self.conv = nn.Conv2d(in_channels, conv_channels, 3, stride=1 if pixel_unshuffle else 2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv(x)
        if self.downsample:
            branch = F.pixel_unshuffle(branch, self.factor)
        if not self.shortcut:
            return branch
        return pixel_unshuffle_channel_avg(x, self.factor, branch.shape[1], residual=branch)


class UpBlock(nn.Module):
    """Doubles the side: a 3x3 conv then pixel_shuffle, or nearest upsampling then the conv;
    plus, with `shortcut`, the duplicated and pixel-shuffled input. diffusers: DCUpBlock2d."""

    def __init__(self, in_channels: int, out_channels: int, interpolate: bool, shortcut: bool):
        super().__init__()
        self.factor = 2
        self.interpolate = interpolate
        self.interpolation_mode = "nearest"
        self.shortcut = shortcut
        conv_channels = out_channels if interpolate else out_channels * self.factor**2
        self.conv = nn.Conv2d(in_channels, conv_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            branch = self.conv(F.interpolate(x, scale_factor=self.factor, mode=self.interpolation_mode))
        else:
            branch = F.pixel_shuffle(self.conv(x), self.factor)
        if not self.shortcut:
            return branch
        return channel_dup_pixel_shuffle(x, self.factor, branch.shape[1], residual=branch)


def _first_width(widths: tuple, layers: tuple) -> int:
    """The width the image side of the network works at: stage 0's, or stage 1's when stage 0
    has no blocks (the resampling block at the image then changes the side)."""
    return widths[0] if layers[0] > 0 else widths[1]


class Encoder(nn.Module):
    def __init__(self, config: DCAEConfig):
        super().__init__()
        widths, layers = config.encoder_block_out_channels, config.encoder_layers_per_block
        pixel_unshuffle = config.downsample_block_type == PIXEL_UNSHUFFLE
        if layers[0] > 0:
            self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        else:
            self.conv_in = DownBlock(config.in_channels, widths[1], pixel_unshuffle, shortcut=False)
        stages = []
        for i, (width, depth) in enumerate(zip(widths, layers)):
            blocks = [_block(config.encoder_block_types[i], width, config.attention_head_dim,
                             config.encoder_qkv_multiscales[i], "rms_norm", "silu") for _ in range(depth)]
            if i < len(widths) - 1 and depth > 0:
                blocks.append(DownBlock(width, widths[i + 1], pixel_unshuffle, shortcut=True))
            stages.append(nn.Sequential(*blocks))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(widths[-1], config.latent_channels, 3, padding=1)
        self.out_shortcut = config.encoder_out_shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down_blocks:
            h = stage(h)
        latent = self.conv_out(h)
        if not self.out_shortcut:
            return latent
        return pixel_unshuffle_channel_avg(h, 1, latent.shape[1], residual=latent)


class Decoder(nn.Module):
    def __init__(self, config: DCAEConfig):
        super().__init__()
        widths, layers = config.decoder_block_out_channels, config.decoder_layers_per_block
        interpolate = config.upsample_block_type == INTERPOLATE
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1)
        self.in_shortcut = config.decoder_in_shortcut
        stages = []
        for i, (width, depth) in enumerate(zip(widths, layers)):
            blocks = []
            if i < len(widths) - 1 and depth > 0:
                blocks.append(UpBlock(widths[i + 1], width, interpolate, shortcut=True))
            blocks += [_block(config.decoder_block_types[i], width, config.attention_head_dim,
                              config.decoder_qkv_multiscales[i], config.decoder_norm_types[i],
                              config.decoder_act_fns[i]) for _ in range(depth)]
            stages.append(nn.Sequential(*blocks))
        self.up_blocks = nn.ModuleList(stages)  # indexed by stage; run from the deepest
        width = _first_width(widths, layers)
        self.norm_out = RMSNorm(width)
        self.conv_act = nn.ReLU() if config.decoder_conv_act_fn == "relu" else nn.SiLU()
        if layers[0] > 0:
            self.conv_out = nn.Conv2d(width, config.in_channels, 3, padding=1)
        else:
            self.conv_out = UpBlock(width, config.in_channels, interpolate, shortcut=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        if self.in_shortcut:
            h = channel_dup_pixel_shuffle(z, 1, h.shape[1], residual=h)
        for stage in reversed(self.up_blocks):
            h = stage(h)
        return self.conv_out(self.conv_act(_apply_norm(self.norm_out, "rms_norm", h)))


class DCAE(nn.Module):
    """encode: (B, in_channels, H, W) -> (B, latent_channels, H/f, W/f); decode: the reverse;
    forward: decode(encode(x)). H and W must be multiples of f = config.spatial_compression."""

    def __init__(self, config: DCAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def _check(self, name: str, x: torch.Tensor, channels: int, multiple: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must be (B, {channels}, H, W); got {tuple(x.shape)}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(f"{name} height and width must be multiples of {multiple}; got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check("x", x, self.config.in_channels, self.config.spatial_compression)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check("z", z, self.config.latent_channels, 1)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def build(name_or_config: Union[str, DCAEConfig]) -> DCAE:
    """A randomly initialised model (training mode, as nn.Module starts; call .eval() for
    inference, which the BatchNorm stages need). Build under `with torch.device("meta"):` to
    get the structure without allocating."""
    return DCAE(resolve_config(name_or_config, CONFIGS, DCAEConfig, "DC-AE"))


def from_safetensors(
    path: str, config: Union[str, DCAEConfig], device: Union[str, torch.device] = "cpu"
) -> DCAE:
    """Load a diffusers-layout AutoencoderDC checkpoint (a single .safetensors file, e.g. the
    diffusion_pytorch_model.safetensors of mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers).

    The file's dtype is kept. Returned in eval mode."""
    return load_safetensors(path, lambda: build(config), device)


def example_resolution(model: DCAE, resolution: Optional[int] = None) -> int:
    """The image side example_step decodes to: `resolution`, by default that of latents of
    EXAMPLE_LATENT_SIDE."""
    factor = model.config.spatial_compression
    return example_resolution_multiple_of(resolution, EXAMPLE_LATENT_SIDE * factor, factor, "the spatial compression")


def example_step(
    model: DCAE,
    batch: int = 1,
    resolution: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Callable[[], torch.Tensor]:
    """One decode, without autograd, of `batch` random latents for images of side `resolution`
    pixels (default: latents of EXAMPLE_LATENT_SIDE, i.e. 2048 px for f32c32, 4096 px for
    f64c128, 256 px for tiny). The latents are made once, on the model's device and dtype, from
    `generator` (a CPU generator: the same values whatever the device). Returns the
    zero-argument call."""
    return decode_step(model, batch, example_resolution(model, resolution), generator)
