"""VAR's multi-scale VQVAE (Tian et al., 2024, "Visual Autoregressive Modeling", arXiv:2404.02905).

A VQGAN-style convolutional encoder maps a square (B, 3, d h, d h) image in [-1, 1] to a
latent f (B, Cvae, h, h) (d = 2^(len(ch_mult) - 1) = 16 for var-256; then a 3x3 `quant_conv`);
the residual quantizer turns f into one token map per scale s with side p_s (patch_nums, the
last equal to h); the decoder maps f_hat (after `post_quant_conv`) back to an image.

Residual quantization, scale by scale from coarse to fine, with e the codebook (V, Cvae):

    r_1 = f,  f_hat_0 = 0
    z_s   = area-downsample(r_s) to p_s x p_s     (a mean over each cell; none at the last scale)
    idx_s = argmin_k ||z_s[i, j] - e_k||^2        per position (fastgen's vq_nearest)
    h_s   = phi_s(bicubic-upsample(e[idx_s]) to h x w)   (no resampling at the last scale)
    f_hat_s = f_hat_{s-1} + h_s,   r_{s+1} = r_s - h_s

phi is a 3x3 convolution blended with its input, phi(x) = (1 - q) x + q conv(x) with q =
quant_resi (0.5). VAR shares a few phis across the scales ("partially shared", 4 of them): scale
s of S uses the phi whose tick t_j = linspace(1/(3n), 1 - 1/(3n), n)[j] (n = 4; 1/(2n) margins
otherwise) is nearest to s / (S - 1), ties to the lower j, evaluated in float64 with numpy's
linspace arithmetic (var-256's scale 2 sits on a tie in exact arithmetic that rounding breaks
towards phi 1), so that VAR's checkpoints pair each scale with the phi it was trained with.

The training forward (VAR's `VectorQuantizer2.forward`) decodes the straight-through f_hat
(value f_hat_S, gradient straight to f) and returns the loss

    loss = (1 / S) sum_s [ beta * mean((sg(f_hat_s) - f)^2) + mean((f_hat_s - sg(f))^2) ]

(sg = stop-gradient): the commitment term trains the encoder, the other the codebook and the
phis. The search has no gradient: the residuals r_s are computed from sg(f).

The quantizer runs in the model's dtype (VAR runs its VQVAE in float32); the loss in float32
or wider.
The encoder and decoder are those of VAR's `basic_vae.py`: ResnetBlocks (GroupNorm 32, eps 1e-6,
SiLU, 3x3 convs, a 1x1 shortcut where the width changes), single-head self-attention blocks with
one fused qkv 1x1 conv at the lowest resolution and in the middle, stride-2 3x3 convolutions
after a (0, 1, 0, 1) zero pad to downsample, nearest 2x then a 3x3 conv to upsample.
Module and parameter names are VAR's, so `vae_ch160v4096z32.pth` (converted to safetensors:
`save_file(torch.load(pth))`) loads as it is. Not supported: VAR's non-shared and fully shared phi variants
(share_quant_resi 0 and 1), quant_resi = 0, and quantizing to other patch_nums than the config's.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.common import example_resolution_fixed, load_safetensors, resolve_config
from fastgen.ops.vq import vq_nearest


@dataclasses.dataclass(frozen=True)
class VarVQVAEConfig:
    """Field names follow VAR's `VQVAE` constructor (vocab_size, z_channels = Cvae, ch, ...)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    beta: float = 0.25
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    # VAR's using_znorm: search by cosine similarity (l2-normalized latents and codes).
    using_znorm: bool = False

    def __post_init__(self):
        if self.share_quant_resi < 2:
            raise ValueError(f"share_quant_resi must be >= 2 (VAR's partially shared phi); "
                             f"got {self.share_quant_resi}")
        if abs(self.quant_resi) <= 1e-6:
            raise ValueError(f"quant_resi must be nonzero (VAR replaces phi by the identity at 0); got {self.quant_resi}")
        if list(self.patch_nums) != sorted(set(self.patch_nums)) or self.patch_nums[0] < 1:
            raise ValueError(f"patch_nums must be strictly increasing positive sides; got {self.patch_nums}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def resolution(self) -> int:
        """The image side whose latent side is the last patch_num."""
        return self.patch_nums[-1] * self.downsample


CONFIGS = {
    # VAR's released VQVAE, vae_ch160v4096z32.pth (models/__init__.py: build_vae_var).
    "var-256": VarVQVAEConfig(),
    # 5 scales on a 6 x 6 latent (12 px images): area downsampling with uneven cells (6 -> 4, 5 -> ...)
    # and 4 phis for 5 scales, so one is shared.
    "tiny": VarVQVAEConfig(vocab_size=64, z_channels=16, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                           patch_nums=(1, 2, 3, 4, 6)),
}

EXAMPLE_BATCH = 1


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """x + proj_out(softmax(q k^T / sqrt(C)) v) over the h*w positions, one head of width C."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # (B, 3, 1, HW, C): q, k, v as one-head sequences of positions.
        q, k, v = self.qkv(self.norm(x)).view(batch, 3, 1, channels, height * width).transpose(-1, -2).unbind(1)
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(attended.transpose(-1, -2).reshape(batch, channels, height, width))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution of the encoder or decoder: `block` ResnetBlocks, an AttnBlock after each at
    the lowest resolution (`attn`), and the resampling to the next level."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, with_attention: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * blocks
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.attn = nn.ModuleList(AttnBlock(out_channels) for _ in range(blocks if with_attention else 0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Middle(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, config: VarVQVAEConfig):
        super().__init__()
        widths = [config.ch * m for m in (1, *config.ch_mult)]
        last = len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for level in range(last + 1):
            stage = _Level(widths[level], widths[level + 1], config.num_res_blocks, level == last)
            if level != last:
                stage.downsample = Downsample2x(widths[level + 1])
            self.down.append(stage)
        self.mid = _Middle(widths[-1])
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """`up[level]` mirrors the encoder's `down[level]` (VAR stores them in that order and runs
    them from the lowest resolution up), with one more ResnetBlock per level."""

    def __init__(self, config: VarVQVAEConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        last = len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = _Middle(widths[-1])
        stages = []
        for level in range(last + 1):
            in_channels = widths[min(level + 1, last)]
            stage = _Level(in_channels, widths[level], config.num_res_blocks + 1, level == last)
            if level != 0:
                stage.upsample = Upsample2x(widths[level])
            stages.append(stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = _group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            h = stage(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """phi(x) = (1 - q) x + q conv3x3(x)."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, 3, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(1 - self.resi_ratio) + super().forward(x).mul(self.resi_ratio)


def _linspace_like_numpy(start: float, stop: float, count: int) -> List[float]:
    step = (stop - start) / (count - 1)
    return [start + i * step for i in range(count - 1)] + [stop]


def shared_phi_choice(num_phis: int, num_scales: int) -> List[int]:
    """Which of `num_phis` partially shared phis each of `num_scales` scales uses (VAR's ticks)."""
    margin = 1 / 3 / num_phis if num_phis == 4 else 1 / 2 / num_phis
    ticks = _linspace_like_numpy(margin, 1 - margin, num_phis)
    ratios = [s / (num_scales - 1) for s in range(num_scales)] if num_scales > 1 else [0.0]
    return [min(range(num_phis), key=lambda j: (abs(ticks[j] - ratio), j)) for ratio in ratios]


class PhiPartiallyShared(nn.Module):
    def __init__(self, config: VarVQVAEConfig):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(config.z_channels, config.quant_resi) for _ in range(config.share_quant_resi))
        self.choice = shared_phi_choice(config.share_quant_resi, len(config.patch_nums))

    def forward(self, h: torch.Tensor, scale: int) -> torch.Tensor:
        return self.qresi_ls[self.choice[scale]](h)


class MultiScaleQuantizer(nn.Module):
    """VAR's `VectorQuantizer2`: the residual quantization of the module docstring."""

    def __init__(self, config: VarVQVAEConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.z_channels)
        self.quant_resi = PhiPartiallyShared(config)

    def _check_latent(self, f: torch.Tensor) -> None:
        side, channels = self.config.patch_nums[-1], self.config.z_channels
        if f.ndim != 4 or f.shape[1] != channels or f.shape[2:] != (side, side):
            raise ValueError(f"latent must be (B, {channels}, {side}, {side}) (the last patch_num); "
                             f"got {tuple(f.shape)}")

    def to_scale(self, latent: torch.Tensor, scale: int) -> torch.Tensor:
        """A (B, Cvae, h, h) latent area-downsampled to scale s's p_s x p_s (the mean over each
        cell; the latent itself at the last scale)."""
        side = self.config.patch_nums[scale]
        return latent if side == latent.shape[-1] else F.interpolate(latent, size=(side, side), mode="area")

    def scale_contribution(self, idx: torch.Tensor, scale: int, batch: int) -> torch.Tensor:
        """h_s: the codes idx (B * p_s * p_s,) of scale s as a map, upsampled to the latent side
        and passed through that scale's phi."""
        side, full = self.config.patch_nums[scale], self.config.patch_nums[-1]
        h = self.embedding(idx).view(batch, side, side, -1).permute(0, 3, 1, 2)
        if side != full:
            h = F.interpolate(h, size=(full, full), mode="bicubic")
        return self.quant_resi(h.contiguous(), scale)

    def quantize(self, f: torch.Tensor, with_loss: bool):
        """(per-scale indices, each (B, p_s^2), f_hat, loss or None); f_hat keeps the graph to
        the codebook and the phis (its value is f_hat_S)."""
        self._check_latent(f)
        patch_nums, metric = self.config.patch_nums, "cosine" if self.config.using_znorm else "l2"
        batch, channels = f.shape[:2]
        f_fixed = f.detach()
        codebook = self.embedding.weight.detach()
        loss_dtype = torch.promote_types(f.dtype, torch.float32)
        rest, f_hat, loss, indices = f_fixed, torch.zeros_like(f_fixed), 0.0, []
        for scale, p in enumerate(patch_nums):
            z = self.to_scale(rest, scale)
            idx = vq_nearest(z.permute(0, 2, 3, 1).reshape(-1, channels), codebook, metric)
            h = self.scale_contribution(idx, scale, batch)
            f_hat = f_hat + h
            rest = rest - h.detach()
            indices.append(idx.view(batch, p * p))
            if with_loss:
                loss = loss + (self.config.beta * F.mse_loss(f_hat.detach().to(loss_dtype), f.to(loss_dtype))
                               + F.mse_loss(f_hat.to(loss_dtype), f_fixed.to(loss_dtype)))
        return indices, f_hat, (loss / len(patch_nums) if with_loss else None)

    def _check_indices(self, indices: Sequence[torch.Tensor]) -> None:
        patch_nums = self.config.patch_nums
        if len(indices) != len(patch_nums):
            raise ValueError(f"indices must hold one tensor per scale ({len(patch_nums)}); got {len(indices)}")
        batch = indices[0].shape[0]
        for scale, (idx, p) in enumerate(zip(indices, patch_nums)):
            if idx.shape != (batch, p * p) or idx.dtype != torch.int64:
                raise ValueError(f"indices[{scale}] must be int64 of shape ({batch}, {p * p}); "
                                 f"got {idx.dtype} {tuple(idx.shape)}")

    def indices_to_f_hat(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """f_hat_S from the per-scale indices [(B, p_s^2) for each scale]."""
        self._check_indices(indices)
        batch = indices[0].shape[0]
        return sum(self.scale_contribution(idx.reshape(-1), scale, batch) for scale, idx in enumerate(indices))

    def teacher_forcing_input(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """The VAR transformer's input for scales 1..S-1 from the token maps of all scales (VAR's
        idxBl_to_var_input): f_hat_s (the sum of h_1..h_s) downsampled to p_{s+1}, for s = 1..S-1,
        as rows of Cvae features in raster order, (B, sum_{s>1} p_s^2, Cvae). The last scale's
        tokens are not used (nothing follows them)."""
        self._check_indices(indices)
        batch, f_hat, inputs = indices[0].shape[0], 0, []
        for scale, idx in enumerate(indices[:-1]):
            f_hat = f_hat + self.scale_contribution(idx.reshape(-1), scale, batch)
            inputs.append(self.to_scale(f_hat, scale + 1).flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)


class VarVQVAE(nn.Module):
    def __init__(self, config: VarVQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = MultiScaleQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 3, padding=1)

    def latent(self, images: torch.Tensor) -> torch.Tensor:
        """f = quant_conv(encoder(images)), the latent before quantization."""
        c = self.config
        if images.ndim != 4 or images.shape[1] != c.in_channels or images.shape[2:] != (c.resolution, c.resolution):
            raise ValueError(f"images must be (B, {c.in_channels}, {c.resolution}, {c.resolution}) (the last "
                             f"patch_num {c.patch_nums[-1]} times the downsampling {c.downsample}); "
                             f"got {tuple(images.shape)}")
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def img_to_idx(self, images: torch.Tensor) -> List[torch.Tensor]:
        """The token maps of images (B, 3, H, W) in [-1, 1]: per scale an int64 (B, p_s^2), rows in
        raster order (VAR's img_to_idxBl)."""
        return self.quantize.quantize(self.latent(images), with_loss=False)[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The quantized latent f_hat (B, Cvae, h, w) of images."""
        return self.quantize.quantize(self.latent(images), with_loss=False)[1]

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from a quantized latent (VAR's fhat_to_img)."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def idx_to_img(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images from all scales' token maps (VAR's idxBl_to_img with same_shape, last_one)."""
        return self.decode(self.quantize.indices_to_f_hat(indices))

    def forward(self, images: torch.Tensor):
        """The training forward: (reconstruction, unclamped; the vq loss, a float32 scalar; the
        per-scale indices, as img_to_idx gives them)."""
        f = self.latent(images)
        indices, f_hat, loss = self.quantize.quantize(f, with_loss=True)
        # Value f_hat, gradient straight through to the encoder.
        straight_through = f + (f_hat - f).detach()
        return self.decoder(self.post_quant_conv(straight_through)), loss, indices


def build(name_or_config: Union[str, VarVQVAEConfig]) -> VarVQVAE:
    """A randomly initialised model. Build under `with torch.device("meta"):` for structure only."""
    return VarVQVAE(resolve_config(name_or_config, CONFIGS, VarVQVAEConfig, "VAR VQVAE"))


# VAR's checkpoint also holds the quantizer's codebook-usage statistics, used only for logging.
_TRAINING_ONLY_KEYS = ("quantize.ema_vocab_hit_SV",)


def from_safetensors(
    path: str, config: Union[str, VarVQVAEConfig] = "var-256", device: Union[str, torch.device] = "cpu"
) -> VarVQVAE:
    """Load VAR's VQVAE state dict (its own key names: encoder.*, decoder.*, quant_conv.*,
    post_quant_conv.*, quantize.embedding.weight, quantize.quant_resi.qresi_ls.*) from a
    .safetensors file; the tensors keep the file's dtype."""
    def without_training_statistics(state: dict) -> dict:
        return {key: value for key, value in state.items() if key not in _TRAINING_ONLY_KEYS}

    return load_safetensors(path, lambda: build(config), device, without_training_statistics)


def example_resolution(model: VarVQVAE, resolution: Optional[int] = None) -> int:
    """The config's resolution, the only one the multi-scale quantizer takes."""
    config = model.config
    return example_resolution_fixed(resolution, config.resolution, f"patch_nums end at {config.patch_nums[-1]}")


def example_step(
    model: VarVQVAE,
    batch: int = EXAMPLE_BATCH,
    resolution: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Callable[[], List[torch.Tensor]]:
    """One tokenization: img_to_idx of a random image batch (made once, on the model's device
    and dtype, from `generator`) at the config's resolution (256 px for var-256), the only one it
    quantizes. Returns the zero-argument call."""
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int; got {batch!r}")
    config = model.config
    resolution = example_resolution(model, resolution)
    parameter = next(model.parameters())
    images = torch.rand(batch, config.in_channels, resolution, resolution, generator=generator) * 2 - 1
    images = images.to(device=parameter.device, dtype=parameter.dtype)

    def step() -> List[torch.Tensor]:
        return model.img_to_idx(images)

    return step
