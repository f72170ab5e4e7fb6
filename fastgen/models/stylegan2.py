"""StyleGAN2 (Karras et al., 2020, arXiv:1912.04958): generator and residual discriminator,
with the parameter names of NVlabs' stylegan2-ada-pytorch / stylegan3 so their state dicts load.

Generator: z (B, z_dim) -> mapping network -> w broadcast to num_ws layers -> synthesis -> image.

- Mapping (`MappingNetwork`): z is scaled to unit second moment, then `num_layers`
  fully-connected layers with leaky ReLU. Every layer uses the equalized learning rate: the
  stored weight is N(0, 1) / lr_multiplier and is multiplied at run time by
  lr_multiplier / sqrt(fan_in) (the bias by lr_multiplier), so an optimizer's step changes
  every layer's function at the same rate whatever its fan-in. In training mode the network
  tracks w_avg, the running mean of w (decay w_avg_beta); the truncation trick pulls the first
  `truncation_cutoff` layers' w towards it: w' = w_avg + psi (w - w_avg).
- Synthesis: a learned 4x4 constant, then per resolution r = 8, 16, ..., resolution a block of
  two 3x3 modulated convolutions (the first upsamples 2x), each followed by noise, bias and
  leaky ReLU * sqrt(2) (`bias_act`), and a 1x1 toRGB whose output is added to the running
  image after the image is FIR-upsampled 2x (the "skip" architecture).
- Modulated convolution with weight demodulation: per sample b, the affine map of its w gives
  styles s[b, i] (one per input channel, bias initialised to 1), and
      w'[b, o, i, ky, kx] = W[o, i, ky, kx] * s[b, i]
      w''[b, o, i, ky, kx] = w'[b, o, i, ky, kx] / sqrt(sum_{i, ky, kx} w'[b, o, i, ky, kx]^2 + 1e-8)
  so every output channel has unit expected variance again. The B per-sample convolutions run
  as ONE grouped convolution: the batch folds into the channel axis (1, B*I, H, W) with B
  groups and the B weight sets stacked to (B*O, I, k, k). toRGB modulates without
  demodulating.
- Upsampling convolution: the layer computes conv_k(FIR(zero-insert(x))), the 2x zero-inserted
  input low-pass filtered by the separable [1, 3, 3, 1] filter (gain 4 keeps the mean) and then
  convolved (a true convolution, not a correlation, as the original). Both are linear and
  shift-invariant on the upsampled grid, so they commute: it runs as a stride-2 transposed
  convolution (the convolution of the zero-inserted input, without computing on the zeros)
  followed by `upfirdn2d` with the filter, padded to give exactly 2H x 2W.
- Noise: per layer, a single-channel image times a learned scalar strength, added after the
  convolution. noise_mode "random" draws it per call, "const" uses the layer's stored
  noise_const buffer (reproducible outputs), "none" leaves it out.

Discriminator ("resnet" architecture): fromrgb (1x1) at full resolution, then per resolution
a block conv3x3 -> conv3x3 with 2x downsampling, plus a 1x1 downsampling skip, the two summed
with gain sqrt(1/2) each; downsampling is `upfirdn2d` with the [1, 3, 3, 1] filter followed by
a stride-2 convolution (for the 1x1 skip the filter itself downsamples). The 4x4 epilogue
appends the minibatch standard deviation (per group of `mbstd_group_size` samples, the stddev
of every feature over the group, averaged over channels and pixels: one extra channel), then
conv3x3, a fully-connected layer and the output logit. All layers use equalized learning rate
(runtime weight gain 1 / sqrt(fan_in)) and `bias_act` (lrelu gain sqrt(2), optional clamp).

Training: `r1_step` runs one discriminator step with the non-saturating logistic loss and R1
regularization, gamma / 2 * ||d D(x) / d x||^2 on real images, whose parameter gradient is a
second derivative: it differentiates through `upfirdn2d` and `bias_act` twice. Its fakes can
come from style-mixed ws (`style_mixed_ws`, the mixing regularization of StyleGAN2's training).

Differences from stylegan2-ada-pytorch: no class conditioning (c_dim = 0, as FFHQ), no mixed
precision bookkeeping (run the whole model in one dtype; float16 demodulation overflow
guarding is not done, use bfloat16), the grouped ("fused") modulated convolution is used in
training too, and the [1, 3, 3, 1] filter is kept 1-D (separable) and not stored: the
checkpoints' `resample_filter` buffers (4x4 outer products) are checked and dropped on load.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.common import example_resolution_fixed, load_safetensors, resolve_config
from fastgen.ops.bias_act import bias_act
from fastgen.ops.upfirdn2d import upfirdn2d

RESAMPLE_TAPS = (1.0, 3.0, 3.0, 1.0)
NOISE_MODES = ("random", "const", "none")
NETWORKS = ("generator", "discriminator")
SQRT_HALF = math.sqrt(0.5)


@dataclasses.dataclass(frozen=True)
class StyleGeneratorConfig:
    """What every style-based generator's config holds: output size and mapping network."""

    resolution: int
    z_dim: int = 512
    w_dim: int = 512
    img_channels: int = 3
    mapping_layers: int = 8
    mapping_lr_multiplier: float = 0.01
    w_avg_beta: float = 0.995

    def __post_init__(self):
        if self.resolution < 4 or self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two >= 4, got {self.resolution}")

    @property
    def block_resolutions(self) -> list:
        return [2**i for i in range(2, int(math.log2(self.resolution)) + 1)]


@dataclasses.dataclass(frozen=True)
class StyleGAN2Config(StyleGeneratorConfig):
    # Channels at resolution r: min(channel_base // r, channel_max), for G and D alike.
    channel_base: int = 32768
    channel_max: int = 512
    # Clamp of every conv output (+-256 in StyleGAN2-ADA's mixed-precision configs), None = off.
    conv_clamp: Optional[float] = None
    mbstd_group_size: int = 4
    mbstd_channels: int = 1
    r1_gamma: float = 10.0

    def channels(self, resolution: int) -> int:
        return min(self.channel_base // resolution, self.channel_max)


CONFIGS = {
    # Config F of the StyleGAN2 paper at 1024 px (FFHQ): 30,370,060 G (mapping included) and
    # 29,012,513 D parameters, as stylegan2-ada-pytorch's network summaries count them.
    "ffhq-1024": StyleGAN2Config(resolution=1024),
    # stylegan2-ada-pytorch's "paper256" setup (FFHQ 256): half the channels per resolution.
    "ffhq-256": StyleGAN2Config(resolution=256, channel_base=16384, conv_clamp=256.0, mbstd_group_size=8,
                                r1_gamma=1.0),
    # Every code path at interpreter-friendly sizes: 16 px, 16 to 32 channels, clamping on.
    "tiny": StyleGAN2Config(resolution=16, z_dim=32, w_dim=32, channel_base=256, channel_max=32, mapping_layers=2,
                            conv_clamp=64.0, mbstd_group_size=2, r1_gamma=1.0),
}


def fir_taps(taps, device=None) -> torch.Tensor:
    """A 1-D FIR filter normalized to sum 1 (so the separable 2-D filter sums to 1 too)."""
    f = torch.tensor(taps, dtype=torch.float32, device=device)
    return f / f.sum()


def register_fir(module: nn.Module, taps) -> None:
    """The module's resampling filter, as a buffer outside the state dict: it is a constant,
    and load functions re-create it with `reset_fir_filters` after loading onto the meta device."""
    module.register_buffer("resample_filter", fir_taps(taps), persistent=False)
    module.fir_taps = tuple(taps)


def reset_fir_filters(model: nn.Module, device) -> None:
    for module in model.modules():
        if hasattr(module, "fir_taps"):
            module.resample_filter = fir_taps(module.fir_taps, device)


def upsample_padding(taps: int, factor: int = 2) -> list:
    """Padding of a `factor`x upfirdn2d upsampling that keeps the image centred and gives
    exactly factor * H outputs: the filter's (taps - 1) extra samples split as evenly as the
    zero insertion (which puts the zeros after each pixel) allows."""
    before, after = (taps + factor - 1) // 2, (taps - factor) // 2
    return [before, after, before, after]


def fir_upsample(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """2x upsampling by zero insertion and the FIR filter f, gain 4 restoring the mean."""
    return upfirdn2d(x, f, up=2, padding=upsample_padding(f.shape[0]), gain=4)


def normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the features of each sample."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


class FullyConnectedLayer(nn.Module):
    """y = act(x (weight * weight_gain * lr_multiplier / sqrt(in))^T + bias * lr_multiplier) * act_gain.

    Equalized learning rate: the stored weight is N(0, 1) / lr_multiplier. `weight_gain` is an
    extra constant factor on the weight (StyleGAN v1 puts He's sqrt(2) there rather than
    after the activation: pass weight_gain=sqrt(2), act_gain=1); `act_gain` None is
    `bias_act`'s default for the activation."""

    def __init__(self, in_features: int, out_features: int, activation: str = "linear", lr_multiplier: float = 1.0,
                 bias_init: float = 0.0, weight_gain: float = 1.0, act_gain: Optional[float] = None):
        super().__init__()
        self.activation = activation
        self.act_gain = act_gain
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = weight_gain * lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias.to(x.dtype) * self.bias_gain
        if self.activation == "linear" and self.act_gain is None:
            return torch.addmm(b, x, w.t())  # the bias add rides along with the GEMM
        return bias_act(x.matmul(w.t()), b, act=self.activation, gain=self.act_gain)


class MappingNetwork(nn.Module):
    """z -> w: 2nd-moment normalization, `num_layers` FC layers with leaky ReLU (equalized
    learning rate with lr_multiplier), w_avg tracking and truncation. Reusable by every
    StyleGAN generation: num_ws None returns (B, w_dim), else w broadcast to (B, num_ws, w_dim).

    he_gain_in_weights: StyleGAN v1's layers scale the weights by sqrt(2) and apply a plain leaky
    ReLU; StyleGAN2 / 3 apply leaky ReLU * sqrt(2). (They differ where the bias is nonzero.)"""

    def __init__(self, z_dim: int, w_dim: int, num_ws: Optional[int], num_layers: int = 8,
                 lr_multiplier: float = 0.01, w_avg_beta: float = 0.995, he_gain_in_weights: bool = False):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.z_dim, self.w_dim, self.num_ws = z_dim, w_dim, num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        gains = dict(weight_gain=math.sqrt(2), act_gain=1.0) if he_gain_in_weights else {}
        for index in range(num_layers):
            layer = FullyConnectedLayer(z_dim if index == 0 else w_dim, w_dim, activation="lrelu",
                                        lr_multiplier=lr_multiplier, **gains)
            self.add_module(f"fc{index}", layer)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: Optional[int] = None,
                update_w_avg: Optional[bool] = None) -> torch.Tensor:
        """update_w_avg: None = in training mode."""
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.z_dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a (B, {self.z_dim}) tensor, got {shape}")
        x = normalize_2nd_moment(z.to(self.fc0.weight.dtype))
        for index in range(self.num_layers):
            x = getattr(self, f"fc{index}")(x)
        if update_w_avg is None:
            update_w_avg = self.training
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).expand(-1, self.num_ws, -1)
        return self.truncate(x, truncation_psi, truncation_cutoff)

    def truncate(self, ws: torch.Tensor, psi: float = 1.0, cutoff: Optional[int] = None) -> torch.Tensor:
        """w_avg + psi (w - w_avg) on the layers before `cutoff` (all layers if None)."""
        if psi == 1:
            return ws
        if ws.dim() == 2 or cutoff is None:
            return self.w_avg.to(ws.dtype).lerp(ws, psi)
        head = self.w_avg.to(ws.dtype).lerp(ws[:, :cutoff], psi)
        return torch.cat([head, ws[:, cutoff:]], dim=1)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, *, demodulate: bool = True,
                     up: int = 1, resample_filter: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The per-sample convolution of x (B, I, H, W) with weight (O, I, k, k) scaled by styles
    (B, I) and demodulated (module docstring), as one grouped convolution. up=1: 'same'
    correlation (padding k // 2); up=2: true convolution of the 2x zero-inserted input, then
    the FIR filter, output (B, O, 2H, 2W)."""
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"x must be (B, I, H, W) and weight (O, I, k, k) with the same I, got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if styles.shape != x.shape[:2]:
        raise ValueError(f"styles must be (B, I) = {tuple(x.shape[:2])}, got {tuple(styles.shape)}")
    if up > 1 and resample_filter is None:
        raise ValueError(f"up={up} needs the resample_filter")
    batch, in_channels = x.shape[:2]
    out_channels, _, kh, kw = weight.shape
    w = weight.to(x.dtype).unsqueeze(0) * styles.to(x.dtype).reshape(batch, 1, in_channels, 1, 1)
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4], keepdim=True) + 1e-8).rsqrt()
    x = x.reshape(1, batch * in_channels, *x.shape[2:])
    if up == 1:
        y = F.conv2d(x, w.reshape(batch * out_channels, in_channels, kh, kw), padding=kh // 2, groups=batch)
    else:
        # conv_transpose2d's weight is (in, out / groups, k, k) per group.
        w = w.transpose(1, 2).reshape(batch * in_channels, out_channels, kh, kw)
        y = F.conv_transpose2d(x, w, stride=up, groups=batch)
        y = upfirdn2d(y, resample_filter, padding=_transposed_conv_fir_padding(kh, resample_filter.shape[0], up),
                      gain=up * up)
    return y.reshape(batch, out_channels, *y.shape[2:])


def _transposed_conv_fir_padding(kernel: int, taps: int, up: int) -> list:
    """Padding of the FIR pass after a stride-`up` transposed convolution, so that the pair
    equals zero insertion + FIR (padded as `upsample_padding`) + a 'same' k x k convolution.
    The direct form pads the upsampled image by k//2 more on each side; the transposed
    convolution's output already extends k - 1 samples before it and k - up after it."""
    before, after = upsample_padding(taps, up)[:2]
    before, after = before + kernel // 2 - (kernel - 1), after + kernel // 2 - (kernel - up)
    return [before, after, before, after]


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution (optionally upsampling 2x), noise, bias, lrelu * sqrt(2) * gain."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: int = 1,
                 conv_clamp: Optional[float] = None, kernel_size: int = 3):
        super().__init__()
        self.resolution, self.up, self.conv_clamp = resolution, up, conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        if up > 1:
            register_fir(self, RESAMPLE_TAPS)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        styles = self.affine(w)
        x = modulated_conv2d(x, self.weight, styles, up=self.up,
                             resample_filter=self.resample_filter if self.up > 1 else None)
        if noise_mode == "random":
            noise = torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            x = x + noise * self.noise_strength.to(x.dtype)
        elif noise_mode == "const":
            x = x + self.noise_const.to(x.dtype) * self.noise_strength.to(x.dtype)
        return bias_act(x, self.bias.to(x.dtype), act="lrelu", clamp=self.conv_clamp)


class ToRGBLayer(nn.Module):
    """1x1 modulated convolution without demodulation, plus bias."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, conv_clamp: Optional[float] = None):
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return bias_act(x, self.bias.to(x.dtype), clamp=self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution: [const | up-conv0], conv1, toRGB added to the FIR-upsampled image.
    Uses num_conv + 1 consecutive ws; the next block's first w is this block's toRGB w."""

    def __init__(self, in_channels: int, out_channels: int, config: StyleGAN2Config, resolution: int):
        super().__init__()
        self.in_channels, self.resolution = in_channels, resolution
        w_dim, clamp = config.w_dim, config.conv_clamp
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=2, conv_clamp=clamp)
            register_fir(self, RESAMPLE_TAPS)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, conv_clamp=clamp)
        self.torgb = ToRGBLayer(out_channels, config.img_channels, w_dim, conv_clamp=clamp)
        self.num_conv = 1 if in_channels == 0 else 2

    def forward(self, x, img, ws: torch.Tensor, noise_mode: str):
        if self.in_channels == 0:
            x = self.const.to(ws.dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode)
        x = self.conv1(x, ws[:, self.num_conv - 1], noise_mode)
        rgb = self.torgb(x, ws[:, self.num_conv])
        img = rgb if img is None else fir_upsample(img, self.resample_filter) + rgb
        return x, img


def check_synthesis_inputs(ws: torch.Tensor, num_ws: int, w_dim: int, noise_mode: str) -> None:
    if not isinstance(ws, torch.Tensor) or ws.dim() != 3 or ws.shape[1:] != (num_ws, w_dim):
        shape = tuple(ws.shape) if isinstance(ws, torch.Tensor) else type(ws).__name__
        raise ValueError(f"ws must be (B, {num_ws}, {w_dim}), got {shape}")
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise_mode must be one of {', '.join(NOISE_MODES)}, got {noise_mode!r}")


class SynthesisNetwork(nn.Module):
    def __init__(self, config: StyleGAN2Config):
        super().__init__()
        self.config = config
        self.num_ws = 0
        for resolution in config.block_resolutions:
            in_channels = config.channels(resolution // 2) if resolution > 4 else 0
            block = SynthesisBlock(in_channels, config.channels(resolution), config, resolution)
            self.add_module(f"b{resolution}", block)
            self.num_ws += block.num_conv
        self.num_ws += 1  # the last toRGB

    def forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        """ws (B, num_ws, w_dim) -> image (B, img_channels, resolution, resolution)."""
        check_synthesis_inputs(ws, self.num_ws, self.config.w_dim, noise_mode)
        ws = ws.to(self.b4.const.dtype)
        x = img = None
        first = 0
        for resolution in self.config.block_resolutions:
            block = getattr(self, f"b{resolution}")
            x, img = block(x, img, ws[:, first: first + block.num_conv + 1], noise_mode)
            first += block.num_conv
        return img


class Generator(nn.Module):
    def __init__(self, config: StyleGAN2Config):
        super().__init__()
        self.config = config
        self.synthesis = SynthesisNetwork(config)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(config.z_dim, config.w_dim, self.num_ws, config.mapping_layers,
                                      config.mapping_lr_multiplier, config.w_avg_beta)

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: Optional[int] = None,
                noise_mode: str = "random") -> torch.Tensor:
        """z (B, z_dim) -> images (B, img_channels, resolution, resolution), roughly in [-1, 1]."""
        ws = self.mapping(z, truncation_psi, truncation_cutoff)
        return self.synthesis(ws, noise_mode)


class Conv2dLayer(nn.Module):
    """Equalized-lr 'same' convolution, optionally FIR-downsampling 2x, then bias_act."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, activation: str = "lrelu",
                 down: int = 1, bias: bool = True, conv_clamp: Optional[float] = None):
        super().__init__()
        self.activation, self.down, self.conv_clamp = activation, down, conv_clamp
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        if down > 1:
            register_fir(self, RESAMPLE_TAPS)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        kernel = w.shape[-1]
        if self.down == 1:
            x = F.conv2d(x, w, padding=kernel // 2)
        else:
            # Equal to: 'same' convolution of the low-passed image, then keep every other pixel.
            # The filter's and the convolution's paddings merge into one FIR pass; a 1x1
            # convolution commutes with the decimation, so the FIR pass decimates before it.
            taps = self.resample_filter.shape[0]
            before = kernel // 2 + (taps - self.down + 1) // 2
            after = kernel // 2 + (taps - self.down) // 2
            padding = [before, after, before, after]
            if kernel == 1:
                x = F.conv2d(upfirdn2d(x, self.resample_filter, down=self.down, padding=padding), w)
            else:
                x = F.conv2d(upfirdn2d(x, self.resample_filter, padding=padding), w, stride=self.down)
        clamp = None if self.conv_clamp is None else self.conv_clamp * gain
        b = None if self.bias is None else self.bias.to(x.dtype)
        act_gain = gain * (math.sqrt(2) if self.activation == "lrelu" else 1.0)
        return bias_act(x, b, act=self.activation, gain=act_gain, clamp=clamp)


class DiscriminatorBlock(nn.Module):
    """Residual block: (fromrgb at the first block), conv0, down-conv1, 1x1 down-skip; the sum
    of both paths scaled by sqrt(1/2) keeps the variance."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, config: StyleGAN2Config):
        super().__init__()
        clamp = config.conv_clamp
        self.in_channels = in_channels
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(config.img_channels, tmp_channels, 1, conv_clamp=clamp)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, conv_clamp=clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, down=2, conv_clamp=clamp)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, activation="linear", down=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 0:
            x = self.fromrgb(x)
        skip = self.skip(x, gain=SQRT_HALF)
        return skip + self.conv1(self.conv0(x), gain=SQRT_HALF)


def minibatch_stddev(x: torch.Tensor, group_size: int, num_channels: int = 1) -> torch.Tensor:
    """x with num_channels more channels: for each group of samples (sample n is in group
    n mod (B / G), G = min(group_size, B)) and each of num_channels channel groups, the standard
    deviation over the group's samples of every feature, averaged over the channel group and
    the pixels, broadcast to every pixel of every sample in the group."""
    batch, channels, height, width = x.shape
    group = min(group_size, batch)
    if batch % group:
        raise ValueError(f"the batch ({batch}) must be a multiple of the minibatch-stddev group size {group}")
    y = x.reshape(group, -1, num_channels, channels // num_channels, height, width)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()
    y = y.mean(dim=[2, 3, 4]).reshape(-1, num_channels, 1, 1)
    return torch.cat([x, y.repeat(group, 1, height, width)], dim=1)


class DiscriminatorEpilogue(nn.Module):
    def __init__(self, channels: int, config: StyleGAN2Config, resolution: int = 4):
        super().__init__()
        self.group_size, self.mbstd_channels = config.mbstd_group_size, config.mbstd_channels
        self.conv = Conv2dLayer(channels + config.mbstd_channels, channels, 3, conv_clamp=config.conv_clamp)
        self.fc = FullyConnectedLayer(channels * resolution**2, channels, activation="lrelu")
        self.out = FullyConnectedLayer(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(minibatch_stddev(x, self.group_size, self.mbstd_channels))
        return self.out(self.fc(x.flatten(1)))


class Discriminator(nn.Module):
    def __init__(self, config: StyleGAN2Config):
        super().__init__()
        self.config = config
        for resolution in reversed(config.block_resolutions[1:]):
            in_channels = config.channels(resolution) if resolution < config.resolution else 0
            block = DiscriminatorBlock(in_channels, config.channels(resolution), config.channels(resolution // 2),
                                       config)
            self.add_module(f"b{resolution}", block)
        self.b4 = DiscriminatorEpilogue(config.channels(4), config)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """img (B, img_channels, resolution, resolution) -> logits (B, 1)."""
        c = self.config
        expected = (c.img_channels, c.resolution, c.resolution)
        if not isinstance(img, torch.Tensor) or img.dim() != 4 or tuple(img.shape[1:]) != expected:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"img must be (B, {', '.join(map(str, expected))}), got {shape}")
        x = img.to(self.b4.out.weight.dtype)
        for resolution in reversed(c.block_resolutions[1:]):
            x = getattr(self, f"b{resolution}")(x)
        return self.b4(x)


def build(name_or_config: Union[str, StyleGAN2Config], network: str = "generator") -> nn.Module:
    """A randomly initialised Generator (or Discriminator). Build under `with torch.device("meta"):`
    to get the structure without allocating."""
    config = resolve_config(name_or_config, CONFIGS, StyleGAN2Config, "StyleGAN2")
    if network not in NETWORKS:
        raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {network!r}")
    return Generator(config) if network == "generator" else Discriminator(config)


def load_state_file(path, build_model: Callable[[], nn.Module], device, prefix: str = "",
                    filter_taps=RESAMPLE_TAPS) -> nn.Module:
    """`common.load_safetensors` of one network of a style-based GAN.

    prefix selects one network of a file holding several ("G_ema.", "D."). Keys named
    `resample_filter` (the original code stores its fixed filter in every resampling layer,
    as a 2-D outer product) are checked against `filter_taps` and dropped; the model's own
    filters are then made on `device`."""
    expected = fir_taps(filter_taps)

    def adapt(state: dict) -> dict:
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        for key in [key for key in state if key.rsplit(".", 1)[-1] == "resample_filter"]:
            stored = state.pop(key).float().cpu()
            if stored.dim() == 2:
                stored = stored.sum(dim=1)  # the row sums of f f^T are f (f sums to 1)
            if stored.shape != expected.shape or not torch.allclose(stored, expected, atol=1e-6):
                raise ValueError(f"{key}: only the filter {list(filter_taps)} is supported, got {stored.tolist()}")
        return state

    model = load_safetensors(path, build_model, device, adapt)
    reset_fir_filters(model, device)
    return model


def from_safetensors(path, name_or_config: Union[str, StyleGAN2Config], device: Union[str, torch.device] = "cpu",
                     network: str = "generator", prefix: str = "") -> nn.Module:
    """Load a Generator (keys mapping.fc0.weight, mapping.w_avg, synthesis.b4.const,
    synthesis.b8.conv0.affine.weight, synthesis.b8.conv0.noise_const, ...) or a Discriminator
    (b1024.fromrgb.weight, b1024.skip.weight, ..., b4.conv.weight, b4.fc.weight, b4.out.bias)
    from a .safetensors file with the state dict of NVlabs' stylegan2-ada-pytorch / stylegan3
    networks (e.g. converted from their pickles)."""
    config = resolve_config(name_or_config, CONFIGS, StyleGAN2Config, "StyleGAN2")
    return load_state_file(path, lambda: build(config, network), device, prefix)


STYLE_MIXING_PROB = 0.9  # stylegan2-ada-pytorch's training default


def _normal(shape, generator: Optional[torch.Generator], device) -> torch.Tensor:
    """N(0, 1) samples drawn on `generator`'s device (the global RNG of `device` for None), on `device`."""
    return torch.randn(shape, generator=generator, device=device if generator is None else generator.device).to(device)


def style_mixed_ws(G: Generator, z: torch.Tensor, style_mixing_prob: float = STYLE_MIXING_PROB,
                   generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, int]:
    """The ws StyleGAN2 trains on (mixing regularization, as stylegan2-ada-pytorch's StyleGAN2Loss
    generates them): ws = mapping(z) on every layer, and with probability style_mixing_prob the
    layers from one cutoff c on take the w of a second latent z2 ~ N(0, I) instead, c drawn
    uniformly from [1, num_ws) once for the whole batch. The first mapping updates w_avg in
    training mode as a plain call does, the second never does.

    With style_mixing_prob > 0, three draws from `generator` (the global RNG for None), in this
    order whatever the outcome: c, u ~ U[0, 1) (mixing iff u < style_mixing_prob) and z2; none at
    0. Returns ws (B, num_ws, w_dim) and c (num_ws where not mixed)."""
    if isinstance(style_mixing_prob, bool) or not isinstance(style_mixing_prob, (int, float)) \
            or not 0 <= style_mixing_prob <= 1:
        raise ValueError(f"style_mixing_prob must be a number in [0, 1], got {style_mixing_prob!r}")
    ws = G.mapping(z)
    num_ws = ws.shape[1]
    if style_mixing_prob == 0:
        return ws, num_ws
    device = z.device if generator is None else generator.device
    cutoff = int(torch.randint(1, num_ws, (), generator=generator, device=device))
    mixing = float(torch.rand((), generator=generator, device=device)) < style_mixing_prob
    second_z = _normal(z.shape, generator, z.device)
    if not mixing:
        return ws, num_ws
    second_ws = G.mapping(second_z, update_w_avg=False)
    return torch.cat([ws[:, :cutoff], second_ws[:, cutoff:]], dim=1), cutoff


def _r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Per-sample ||d D(x) / d x||^2, kept differentiable (create_graph) for the parameters' gradient."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.square().sum(dim=[1, 2, 3])


def r1_step(G: Generator, D: Discriminator, real: torch.Tensor, *, gamma: Optional[float] = None,
            z: Optional[torch.Tensor] = None, optimizer: Optional[torch.optim.Optimizer] = None,
            noise_mode: str = "random", style_mixing_prob: float = 0.0,
            generator: Optional[torch.Generator] = None) -> dict:
    """One discriminator step: loss = mean_b[softplus(D(G(z))) + softplus(-D(real))
    + gamma / 2 * ||grad_x D(real)||^2], backpropagated into D's parameters (G is only
    sampled), then `optimizer.step()` if given (the caller zeroes gradients). gamma defaults to
    the config's r1_gamma; z (B, z_dim) defaults to fresh normal latents from `generator`.
    (StyleGAN2 applies R1 lazily every 16 steps with 16 x gamma; the schedule is the caller's.)
    The fakes are synthesized from `style_mixed_ws(G, z, style_mixing_prob, generator)`:
    StyleGAN2 trains with style_mixing_prob = STYLE_MIXING_PROB (0.9); at the default 0 they
    are G(z).

    Returns the detached batch means: loss_fake, loss_real, r1_penalty (||grad||^2) and loss."""
    gamma = D.config.r1_gamma if gamma is None else gamma
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or gamma < 0:
        raise ValueError(f"gamma must be a number >= 0, got {gamma!r}")
    if z is None:
        z = _normal((real.shape[0], G.config.z_dim), generator, real.device)
    with torch.no_grad():
        fake = G.synthesis(style_mixed_ws(G, z, style_mixing_prob, generator)[0], noise_mode)
    with torch.enable_grad():  # a training step, whatever the caller's grad mode
        loss_fake = F.softplus(D(fake)).squeeze(1)
        real = real.detach().requires_grad_(True)
        real_logits = D(real).squeeze(1)
        loss_real = F.softplus(-real_logits)
        penalty = _r1_penalty(real_logits, real) if gamma > 0 else torch.zeros_like(loss_real)
        loss = (loss_fake + loss_real + penalty * (gamma / 2)).mean()
        loss.backward()
    if optimizer is not None:
        optimizer.step()
    return {"loss_fake": loss_fake.mean().detach(), "loss_real": loss_real.mean().detach(),
            "r1_penalty": penalty.mean().detach(), "loss": loss.detach()}


def example_resolution(model: nn.Module, resolution: Optional[int] = None) -> int:
    """A GAN generator makes images at its one resolution (StyleGAN 1, 2 and 3 alike)."""
    return example_resolution_fixed(resolution, model.config.resolution, "the one size this generator makes")


def generator_example_step(model: nn.Module, generator_type: type, batch, resolution, generator,
                           **forward_kwargs) -> Callable[[], torch.Tensor]:
    """example_step of a style-based generator: forward from z made once (on the model's device
    and dtype, from the CPU `generator`), without gradients, with constant noise so that
    repeated calls and backends compare equal."""
    if not isinstance(model, generator_type):
        raise TypeError(f"model must be a {generator_type.__module__}.{generator_type.__name__}, "
                        f"got {type(model).__name__}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    example_resolution(model, resolution)
    parameter = model.mapping.fc0.weight
    z = torch.randn(batch, model.config.z_dim, generator=generator).to(parameter.device, parameter.dtype)

    def step() -> torch.Tensor:
        with torch.no_grad():
            return model(z, noise_mode="const", **forward_kwargs)

    return step


def example_step(model: Generator, batch: int = 1, resolution: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Callable[[], torch.Tensor]:
    """Generator forward from z at the config's resolution (`generator_example_step`)."""
    return generator_example_step(model, Generator, batch, resolution, generator)
