"""StyleGAN (v1) generator (Karras et al., 2019, arXiv:1812.04948), as in NVlabs' TensorFlow
release (networks_stylegan.py: G_style, G_mapping, G_synthesis).

- Mapping: z scaled to unit second moment, 8 fully-connected layers with equalized learning
  rate (lr multiplier 0.01) and leaky ReLU; v1 puts He's sqrt(2) in the weights rather than
  after the activation (`stylegan2.MappingNetwork(he_gain_in_weights=True)`). In training mode
  the running mean w_avg is tracked (decay 0.995).
- Synthesis: a learned 4x4 constant (initialised to ones), then two layers per resolution
  4, 8, ..., resolution: each is [3x3 convolution] -> + noise * per-channel strength -> + bias
  -> leaky ReLU (0.2, no gain) -> AdaIN. The first layer of every block after 4x4 upsamples 2x
  and blurs with the normalized separable [1, 2, 1] FIR filter (`upfirdn2d`, 'same' padding).
  A 1x1 toRGB at the end. Convolutions use equalized learning rate with gain sqrt(2)
  (runtime weight factor sqrt(2 / fan_in)), toRGB gain 1.
- AdaIN: instance normalization (mean and biased variance per sample and channel over the
  pixels, eps 1e-8), then x * (1 + y_s) + y_b with (y_s, y_b) an affine map of the layer's w.
  It is `ada_group_norm` with one group per channel.
- Upsampling: below 128 px nearest-neighbour 2x then the 3x3 convolution; from 128 px on
  ("fused_scale"), one stride-2 transposed convolution whose 4x4 kernel is the 3x3 kernel
  convolved with a 2x2 box. As in the original these are not the same function of the stored
  weight: the transposed form equals nearest upsampling followed by a true convolution (the
  flipped kernel), the other a correlation. Loading a converted checkpoint needs both.
- Style mixing (training regularizer, probability 0.9): a second z gives w2; a crossover layer
  c is drawn uniformly from 1 .. num_layers - 1 and layers >= c take w2 instead of w.
- Truncation trick: w' = w_avg + psi (w - w_avg) on the layers before truncation_cutoff (the
  release samples with psi 0.7, cutoff 8).

Layer i (of 2 log2(resolution) - 2) takes w[:, i]: 4x4 input 0, 4x4 conv 1, then block r's
up-conv 2 log2(r) - 4 and conv 2 log2(r) - 3.

Checkpoint layout. The official checkpoint is a TensorFlow pickle; this module uses its own
PyTorch names, one for one with the TF variables (TF dense weights are [in, out]: transpose;
TF conv weights are [k, k, in, out]: permute to [out, in, k, k]):

    G_mapping/Dense{i}/weight, bias            mapping.fc{i}.weight, .bias
    dlatent_avg                                mapping.w_avg
    G_synthesis/4x4/Const/const [1, C, 4, 4]   synthesis.b4.const [C, 4, 4]
    G_synthesis/4x4/Const/{Noise/weight, bias, StyleMod/weight, StyleMod/bias}
                                               synthesis.b4.input.{noise_strength, bias, style.weight, style.bias}
    G_synthesis/4x4/Conv/...                   synthesis.b4.conv1.{weight, noise_strength, bias, style.*}
    G_synthesis/{r}x{r}/Conv0_up/...           synthesis.b{r}.conv0.{weight, noise_strength, bias, style.*}
    G_synthesis/{r}x{r}/Conv1/...              synthesis.b{r}.conv1.{...}
    G_synthesis/noise{i} [1, 1, r, r]          synthesis.b{r}.{input|conv0|conv1}.noise_const [r, r]
    G_synthesis/ToRGB_lod0/weight, bias        synthesis.torgb.weight [3, C, 1, 1], .bias

(The release also holds ToRGB_lod1.. of the lower resolutions, used only while growing
progressively; they are not part of this model.)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.common import resolve_config
from fastgen.models.stylegan2 import (
    FullyConnectedLayer,
    MappingNetwork,
    StyleGeneratorConfig,
    check_synthesis_inputs,
    generator_example_step,
    load_state_file,
    register_fir,
)
from fastgen.models.stylegan2 import example_resolution  # noqa: F401  (the model contract, fastgen.profile)
from fastgen.ops.ada_norm import ada_group_norm
from fastgen.ops.bias_act import bias_act
from fastgen.ops.upfirdn2d import upfirdn2d

BLUR_TAPS = (1.0, 2.0, 1.0)
ADAIN_EPS = 1e-8
# The release's sampling settings (G_style's defaults).
TRUNCATION_PSI = 0.7
TRUNCATION_CUTOFF = 8
LAYER_KINDS = ("const", "conv", "up")


@dataclasses.dataclass(frozen=True)
class StyleGANConfig(StyleGeneratorConfig):
    # Channels at resolution r: min(2 * fmap_base / r, fmap_max) (the release's nf(log2(r) - 1)).
    fmap_base: int = 8192
    fmap_max: int = 512
    style_mixing_prob: float = 0.9
    # fused_scale="auto": the transposed-convolution upsampling from this output resolution on.
    fused_scale_resolution: int = 128

    def channels(self, resolution: int) -> int:
        return min(2 * self.fmap_base // resolution, self.fmap_max)

    @property
    def num_layers(self) -> int:
        return 2 * len(self.block_resolutions)


CONFIGS = {
    # The FFHQ 1024 px release (karras2019stylegan-ffhq-1024x1024): 26.2M generator parameters.
    "ffhq-1024": StyleGANConfig(resolution=1024),
    # 16 px; the 16 px block upsamples with the fused transposed convolution, the 8 px one with
    # nearest neighbour, so both paths run.
    "tiny": StyleGANConfig(resolution=16, z_dim=32, w_dim=32, fmap_base=128, fmap_max=32, mapping_layers=2,
                           fused_scale_resolution=16),
}


def mix_styles(ws: torch.Tensor, ws_mix: torch.Tensor, crossover: int) -> torch.Tensor:
    """Layers before `crossover` from ws, the rest from ws_mix (both (B, num_layers, w_dim))."""
    if ws.shape != ws_mix.shape:
        raise ValueError(f"ws and ws_mix must have the same shape, got {tuple(ws.shape)} and {tuple(ws_mix.shape)}")
    if not isinstance(crossover, int) or not 0 <= crossover <= ws.shape[1]:
        raise ValueError(f"crossover must be an int in [0, {ws.shape[1]}], got {crossover!r}")
    return torch.cat([ws[:, :crossover], ws_mix[:, crossover:]], dim=1)


def _fused_upsample_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The (in, out, 4, 4) conv_transpose2d kernel of the release's fused upscale: the 3x3
    kernel summed over the four 2x2 shifts (the 3x3 kernel convolved with a 2x2 box)."""
    w = F.pad(weight, [1, 1, 1, 1])
    w = w[:, :, 1:, 1:] + w[:, :, :-1, 1:] + w[:, :, 1:, :-1] + w[:, :, :-1, :-1]
    return w.transpose(0, 1)


class StyledLayer(nn.Module):
    """[conv | upsampling conv + blur | nothing (const input)] -> noise -> bias -> lrelu -> AdaIN."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, w_dim: int, resolution: int,
                 fused_scale: bool = False):
        super().__init__()
        if kind not in LAYER_KINDS:
            raise ValueError(f"kind must be one of {', '.join(LAYER_KINDS)}, got {kind!r}")
        self.kind, self.resolution, self.fused_scale = kind, resolution, fused_scale
        if kind != "const":
            self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
            self.weight_gain = math.sqrt(2 / (in_channels * 9))
        if kind == "up":
            register_fir(self, BLUR_TAPS)
        self.noise_strength = nn.Parameter(torch.zeros(out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.style = FullyConnectedLayer(w_dim, 2 * out_channels)
        self.register_buffer("noise_const", torch.randn(resolution, resolution))

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "const":
            return x
        w = self.weight.to(x.dtype) * self.weight_gain
        if self.kind == "conv":
            return F.conv2d(x, w, padding=1)
        if self.fused_scale:
            x = F.conv_transpose2d(x, _fused_upsample_kernel(w), stride=2, padding=1)
        else:
            x = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, padding=1)
        return upfirdn2d(x, self.resample_filter, padding=1)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        x = self.convolve(x)
        strength = self.noise_strength.to(x.dtype).reshape(1, -1, 1, 1)
        if noise_mode == "random":
            x = x + torch.randn(x.shape[0], 1, *x.shape[2:], device=x.device, dtype=x.dtype) * strength
        elif noise_mode == "const":
            x = x + self.noise_const.to(x.dtype) * strength
        x = bias_act(x, self.bias.to(x.dtype), act="lrelu", gain=1.0)
        scale, shift = self.style(w.to(x.dtype)).unflatten(1, (2, -1)).unbind(1)
        return ada_group_norm(x, scale, shift, num_groups=x.shape[1], eps=ADAIN_EPS)


class SynthesisBlock(nn.Module):
    def __init__(self, config: StyleGANConfig, resolution: int):
        super().__init__()
        channels, w_dim = config.channels(resolution), config.w_dim
        if resolution == 4:
            self.const = nn.Parameter(torch.ones(channels, 4, 4))
            self.input = StyledLayer("const", 0, channels, w_dim, resolution)
        else:
            self.conv0 = StyledLayer("up", config.channels(resolution // 2), channels, w_dim, resolution,
                                     fused_scale=resolution >= config.fused_scale_resolution)
        self.conv1 = StyledLayer("conv", channels, channels, w_dim, resolution)

    def forward(self, x: Optional[torch.Tensor], ws: torch.Tensor, noise_mode: str) -> torch.Tensor:
        if x is None:
            x = self.input(self.const.to(ws.dtype).expand(ws.shape[0], -1, -1, -1), ws[:, 0], noise_mode)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode)
        return self.conv1(x, ws[:, 1], noise_mode)


class ToRGB(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.to(x.dtype) * self.weight_gain, self.bias.to(x.dtype))


class SynthesisNetwork(nn.Module):
    def __init__(self, config: StyleGANConfig):
        super().__init__()
        self.config = config
        for resolution in config.block_resolutions:
            self.add_module(f"b{resolution}", SynthesisBlock(config, resolution))
        self.torgb = ToRGB(config.channels(config.resolution), config.img_channels)

    def forward(self, ws: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        """ws (B, num_layers, w_dim) -> image (B, img_channels, resolution, resolution)."""
        c = self.config
        check_synthesis_inputs(ws, c.num_layers, c.w_dim, noise_mode)
        ws = ws.to(self.b4.const.dtype)
        x = None
        for index, resolution in enumerate(c.block_resolutions):
            x = getattr(self, f"b{resolution}")(x, ws[:, 2 * index: 2 * index + 2], noise_mode)
        return self.torgb(x)


class Generator(nn.Module):
    def __init__(self, config: StyleGANConfig):
        super().__init__()
        self.config = config
        self.num_ws = config.num_layers
        self.mapping = MappingNetwork(config.z_dim, config.w_dim, config.num_layers, config.mapping_layers,
                                      config.mapping_lr_multiplier, config.w_avg_beta, he_gain_in_weights=True)
        self.synthesis = SynthesisNetwork(config)

    def styles(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: Optional[int] = None,
               mixing_prob: Optional[float] = None) -> torch.Tensor:
        """ws (B, num_layers, w_dim): mapping (w_avg tracked in training mode), style mixing
        with probability mixing_prob (None: the config's in training mode, else 0), truncation."""
        ws = self.mapping(z)
        if mixing_prob is None:
            mixing_prob = self.config.style_mixing_prob if self.training else 0.0
        if not 0 <= mixing_prob <= 1:
            raise ValueError(f"mixing_prob must be in [0, 1], got {mixing_prob!r}")
        if mixing_prob > 0 and torch.rand(()).item() < mixing_prob:
            ws_mix = self.mapping(torch.randn_like(z), update_w_avg=False)
            ws = mix_styles(ws, ws_mix, int(torch.randint(1, self.num_ws, ()).item()))
        return self.mapping.truncate(ws, truncation_psi, truncation_cutoff)

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: Optional[int] = None,
                noise_mode: str = "random", mixing_prob: Optional[float] = None) -> torch.Tensor:
        """z (B, z_dim) -> images (B, img_channels, resolution, resolution)."""
        return self.synthesis(self.styles(z, truncation_psi, truncation_cutoff, mixing_prob), noise_mode)


def build(name_or_config: Union[str, StyleGANConfig]) -> Generator:
    """A randomly initialised generator (build under `with torch.device("meta"):` to only get
    the structure)."""
    return Generator(resolve_config(name_or_config, CONFIGS, StyleGANConfig, "StyleGAN"))


def from_safetensors(path, name_or_config: Union[str, StyleGANConfig], device: Union[str, torch.device] = "cpu",
                     prefix: str = "") -> Generator:
    """Load a generator saved under this module's parameter names (module docstring: the
    table maps the TensorFlow release's variables onto them). The blur filter is a constant,
    not a stored tensor (a `resample_filter` entry is checked against [1, 2, 1] and dropped)."""
    config = resolve_config(name_or_config, CONFIGS, StyleGANConfig, "StyleGAN")
    return load_state_file(path, lambda: Generator(config), device, prefix, filter_taps=BLUR_TAPS)


def example_step(model: Generator, batch: int = 1, resolution: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Callable[[], torch.Tensor]:
    """Generator forward from z at the config's resolution, without style mixing
    (`stylegan2.generator_example_step`)."""
    return generator_example_step(model, Generator, batch, resolution, generator, mixing_prob=0.0)
