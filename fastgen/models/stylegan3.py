"""StyleGAN3, the alias-free generator (Karras et al., 2021, "Alias-Free Generative Adversarial
Networks", arXiv:2106.12423), in its translation- (T) and rotation-equivariant (R) configurations.

Every feature map is read as the samples of a continuous, band-limited signal, and each layer
is built so that its output stays band-limited: nothing it does creates frequencies its own
sampling grid cannot hold, so the image moves with the input features instead of sticking to
the pixel grid.

Mapping: z (B, z_dim) is normalised to unit mean square and goes through `mapping_layers`
leaky-ReLU fully connected layers to w, broadcast to num_ws = num_layers + 2 copies; truncation
pulls the first `truncation_cutoff` of them toward the tracked mean w_avg:
w <- w_avg + psi (w - w_avg).

Input (`SynthesisInput`): C Fourier features sin(2 pi (f_c . q + phi_c)), frequencies f_c drawn
uniformly from the disc |f| <= f_{c,0} (the first layer's cutoff) and phases phi_c from
[-1/2, 1/2), fixed after initialisation, sampled at the pixel centres p of a size x size grid
in units of the input sampling rate s_0 (p = (pixel centre - grid centre) / s_0) and mixed by a
learned C x C matrix. w_0 sets a rigid motion of the continuous image: a learned affine map
gives (r_c, r_s, t_x, t_y), scaled so that r_c^2 + r_s^2 = 1, and the features are evaluated at
q = R (T p - t) with R the rotation [[r_c, -r_s], [r_s, r_c]] and T a user-set 3 x 3 homogeneous
transform (identity by default); substituting q into the sines turns this into new frequencies
f R T_2x2 and phases. Both T and R configurations learn this rotation: it is what the input
layer does in NVlabs' implementation (the configurations differ in the layers). Frequencies that
a user transform pushes above f_{c,0} fade linearly to zero at s_0 / 2.

Layers L_0 .. L_N (N = num_layers; L_N is ToRGB), each
    x <- modulated_conv2d(x, weight, styles = affine(w_i) [* 1/sqrt(fan_in) for ToRGB]),
         demodulated except in ToRGB, the input scaled by magnitude_ema^(-1/2), a "full"
         convolution (padding k - 1) so no sample near the border is lost;
    x <- filtered_lrelu(x + bias): upsample by zero insertion to s_tmp = 2 max(s_in, s_out),
         low-pass at the input cutoff, leaky ReLU (gain sqrt 2, slope 0.2), clamp to +-256,
         low-pass at the output cutoff and downsample to s_out. The nonlinearity creates
         harmonics above the output band; at twice the rate they can be filtered out before
         they alias. ToRGB is linear (gain 1, slope 1; still clamped) and does not resample.
The image is the ToRGB output times output_scale (0.25).

Schedule (i = 0 .. N, N_c = num_critical): e_i = min(i / (N - N_c), 1);
cutoff f_{c,i} = f_{c,0} (f_{c,N} / f_{c,0})^e_i with f_{c,N} = resolution / 2; minimum
stopband f_{t,i} = f_{t,0} (f_{t,N} / f_{t,0})^e_i with f_{t,N} = f_{c,N} last_stopband_rel;
sampling rate s_i = the power of two at or above min(2 f_{t,i}, resolution); transition
half-width f_{h,i} = max(f_{t,i}, s_i / 2) - f_{c,i}; size s_i + 2 margin_size (the last two
layers: the resolution itself, dropping the margin); channels min(channel_base / (2 f_{c,i}),
channel_max), rounded, and img_channels for ToRGB. The last N_c layers are critically sampled
(f_{c,i} = s_i / 2).

Filters (designed per layer, `design_lowpass_filter`): Kaiser-windowed sinc FIR filters of
filter_size x (resampling factor) taps at s_tmp, with cutoff f_c and transition band
[f_c - f_h, f_c + f_h]; with use_radial_filters (R) the downsampling filter of each layer that
is not critically sampled is instead a windowed jinc, the 2-D filter whose pass band is a disc,
so that rotating the input rotates the output.

T vs R: R uses 1 x 1 convolutions (a k x k kernel would favour the grid's axes), twice the
channels and radial downsampling filters.

Module and parameter names are those of NVlabs' stylegan3 `Generator` (mapping.fc0.weight,
synthesis.input.affine.weight, synthesis.L0_36_512.weight, ..., including the buffers: w_avg,
the input's freqs / phases / transform, each layer's magnitude_ema and filters), so the state
dict of a published pickle loads as it is. The mapping network is StyleGAN2's
(`fastgen.models.stylegan2.MappingNetwork`, with StyleGAN3's two layers and w_avg decay 0.998).
In training mode the model tracks its statistics as NVlabs' does with update_emas: w_avg (in
the mapping network) and each layer's magnitude_ema, the running mean square of its input
(decay magnitude_ema_beta), whose rsqrt scales the input. Only unconditional generators
(c_dim = 0, as the published FFHQ / AFHQ / MetFaces models).

Precision: the network computes in the dtype of its parameters, except that styles,
demodulation and the Fourier features' arguments are formed in at least float32 (as NVlabs does
for its float16 layers). The FIR taps are buffers and take the model's dtype too: in float16 their
rounding (2^-11 relative) is below the early layers' stop-band ripple (~1e-3), in bfloat16 it is
not (though the activations' own rounding is as large there); NVlabs keeps them in float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastgen.models.stylegan2 import (
    NOISE_MODES,
    FullyConnectedLayer,
    MappingNetwork,
    StyleGeneratorConfig,
    generator_example_step,
    load_state_file,
    resolve_config,
)
from fastgen.models.stylegan2 import example_resolution  # noqa: F401  (the model contract, fastgen.profile)
from fastgen.ops.filtered_lrelu import filtered_lrelu


@dataclasses.dataclass(frozen=True)
class StyleGAN3Config(StyleGeneratorConfig):
    """Beyond the fields every style-based generator has (output size, mapping network), the
    arguments of NVlabs' stylegan3 SynthesisNetwork / SynthesisLayer, under their names."""

    resolution: int = 1024
    mapping_layers: int = 2
    w_avg_beta: float = 0.998
    channel_base: int = 32768
    channel_max: int = 512
    num_layers: int = 14
    num_critical: int = 2
    first_cutoff: float = 2.0
    first_stopband: float = 2**2.1
    last_stopband_rel: float = 2**0.3
    margin_size: int = 10
    output_scale: float = 0.25
    conv_kernel: int = 3
    filter_size: int = 6
    lrelu_upsampling: int = 2
    use_radial_filters: bool = False
    conv_clamp: Optional[float] = 256.0
    magnitude_ema_beta: float = 0.999

    @property
    def num_ws(self) -> int:
        return self.num_layers + 2


def _rotation_variant(config: StyleGAN3Config) -> StyleGAN3Config:
    """The R configuration of a T one (NVlabs' train.py --cfg=stylegan3-r)."""
    return dataclasses.replace(config, conv_kernel=1, channel_base=2 * config.channel_base,
                               channel_max=2 * config.channel_max, use_radial_filters=True)


# Small enough for the Triton interpreter (few channel planes), large enough that the sampling
# rate changes across layers (16 -> 32: upsampling by 4 inside a layer) and the last two layers
# are critical. Its R variant keeps the channel counts: doubling them is about capacity.
_TINY = StyleGAN3Config(resolution=32, z_dim=16, w_dim=16, channel_base=64, channel_max=4, num_layers=4,
                        margin_size=2)
_T_1024 = StyleGAN3Config()

CONFIGS = {
    "stylegan3-t-1024": _T_1024,
    "stylegan3-r-1024": _rotation_variant(_T_1024),
    "tiny": _TINY,
    "tiny-r": dataclasses.replace(_rotation_variant(_TINY), channel_base=_TINY.channel_base,
                                  channel_max=_TINY.channel_max),
}


# ---------------------------------------------------------------------------------------------
# Filter design


def kaiser_window(numtaps: int, beta: float) -> torch.Tensor:
    """w[n] = I0(beta sqrt(1 - (2n / (numtaps - 1) - 1)^2)) / I0(beta), n < numtaps, float64."""
    position = torch.linspace(-1.0, 1.0, numtaps, dtype=torch.float64)
    return torch.special.i0(beta * torch.sqrt((1 - position.square()).clamp_min(0))) / torch.special.i0(
        torch.tensor(beta, dtype=torch.float64))


def kaiser_beta(numtaps: int, width: float) -> float:
    """Kaiser's empirical design rule: the window parameter that reaches the stopband
    attenuation A = 2.285 (numtaps - 1) pi width + 7.95 dB a filter of `numtaps` taps can
    afford across a transition band `width` wide (a fraction of the Nyquist frequency)."""
    attenuation = 2.285 * (numtaps - 1) * math.pi * width + 7.95
    if attenuation > 50:
        return 0.1102 * (attenuation - 8.7)
    if attenuation > 21:
        return 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21)
    return 0.0


def _tap_positions(numtaps: int, fs: float) -> torch.Tensor:
    """Tap positions in units of 1 / fs, centred: the filter is symmetric about its middle."""
    return (torch.arange(numtaps, dtype=torch.float64) - (numtaps - 1) / 2) / fs


def design_lowpass_filter(numtaps: int, cutoff: float, width: float, fs: float,
                          radial: bool = False) -> Optional[torch.Tensor]:
    """A linear-phase FIR low-pass filter of `numtaps` taps for signals sampled at `fs`, with its
    -6 dB point at `cutoff` and a transition band `width` wide centred there (frequencies in the
    same units as fs), normalised to unit DC gain (taps sum to 1); float32.

    Separable (1-D taps; the 2-D filter is their outer product): the ideal low-pass response
    h(x) = 2 cutoff sinc(2 cutoff x) sampled at the tap positions x and multiplied by a Kaiser
    window sized by Kaiser's rule for the transition width (what scipy.signal.firwin designs).
    Radial (2-D taps): the ideal response of a disc of radius `cutoff`,
    h(r) = cutoff J1(2 pi cutoff r) / r (the jinc; its limit at r = 0 is pi cutoff^2), sampled
    at r = |(x, y)| and windowed by the outer product of the same Kaiser window.
    numtaps = 1 is the identity and returns None (filtered_lrelu's identity filter)."""
    if numtaps < 1:
        raise ValueError(f"numtaps must be >= 1, got {numtaps}")
    if numtaps == 1:
        return None
    window = kaiser_window(numtaps, kaiser_beta(numtaps, width / (fs / 2)))
    x = _tap_positions(numtaps, fs)
    if radial:
        r = torch.hypot(x[:, None], x[None, :])
        bessel = torch.special.bessel_j1(2 * math.pi * cutoff * r)
        taps = torch.where(r > 0, cutoff * bessel / r.clamp_min(1e-300), math.pi * cutoff**2)
        taps = taps * torch.outer(window, window)
    else:
        taps = 2 * cutoff * torch.sinc(2 * cutoff * x) * window
    return (taps / taps.sum()).float()


# ---------------------------------------------------------------------------------------------
# The per-layer band schedule


@dataclasses.dataclass(frozen=True)
class Band:
    """What layer i produces (index 0 is also the Fourier input): its cutoff f_c, minimum stopband
    f_t, sampling rate s, transition half-width f_h, spatial size and channels."""

    cutoff: float
    stopband: float
    sampling_rate: int
    half_width: float
    size: int
    channels: int


def _check_config(config: StyleGAN3Config) -> None:
    if not 0 <= config.num_critical < config.num_layers:
        raise ValueError(f"num_critical must be in [0, num_layers = {config.num_layers}), got {config.num_critical}")
    if config.lrelu_upsampling < 1 or config.filter_size < 1 or config.conv_kernel < 1:
        raise ValueError("lrelu_upsampling, filter_size and conv_kernel must be >= 1, got "
                         f"{config.lrelu_upsampling}, {config.filter_size}, {config.conv_kernel}")


def band_schedule(config: StyleGAN3Config) -> list:
    """The num_layers + 1 `Band`s of the geometric schedule in the module docstring."""
    _check_config(config)
    n, resolution = config.num_layers, config.resolution
    last_cutoff = resolution / 2
    last_stopband = last_cutoff * config.last_stopband_rel
    bands = []
    for i in range(n + 1):
        exponent = min(i / (n - config.num_critical), 1.0)
        cutoff = config.first_cutoff * (last_cutoff / config.first_cutoff) ** exponent
        stopband = config.first_stopband * (last_stopband / config.first_stopband) ** exponent
        sampling_rate = 2 ** math.ceil(math.log2(min(stopband * 2, resolution)))
        last_two = i >= n - 1
        bands.append(Band(
            cutoff=cutoff,
            stopband=stopband,
            sampling_rate=sampling_rate,
            half_width=max(stopband, sampling_rate / 2) - cutoff,
            size=resolution if last_two else sampling_rate + 2 * config.margin_size,
            channels=config.img_channels if i == n else round(min(config.channel_base / 2 / cutoff,
                                                                  config.channel_max)),
        ))
    return bands


# ---------------------------------------------------------------------------------------------
# Modules


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class SynthesisInput(nn.Module):
    """The Fourier-feature input (module docstring). Buffers: `freqs` (C, 2) as (x, y) cycles per
    unit, `phases` (C,) in cycles, `transform` the user's 3 x 3 inverse image transform."""

    def __init__(self, w_dim: int, band: Band):
        super().__init__()
        self.channels, self.size = band.channels, band.size
        self.sampling_rate, self.bandwidth = band.sampling_rate, band.cutoff
        angle = 2 * math.pi * torch.rand(self.channels)
        radius = band.cutoff * torch.rand(self.channels).sqrt()  # sqrt: uniform density over the disc
        self.weight = nn.Parameter(torch.randn(self.channels, self.channels))
        self.affine = FullyConnectedLayer(w_dim, 4)
        with torch.no_grad():  # at initialisation the motion is the identity, r = (1, 0) and t = 0, for any w
            self.affine.weight.zero_()
            self.affine.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        self.register_buffer("transform", torch.eye(3))
        self.register_buffer("freqs", torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1))
        self.register_buffer("phases", torch.rand(self.channels) - 0.5)

    def motion(self, w: torch.Tensor) -> torch.Tensor:
        """(B, 3, 3): the homogeneous map from output pixel positions p to feature positions q."""
        params = _at_least_float32(self.affine(w))
        rc, rs, tx, ty = (params / params[:, :2].norm(dim=1, keepdim=True)).unbind(1)
        zeros, ones = torch.zeros_like(rc), torch.ones_like(rc)
        rotation = torch.stack([rc, -rs, zeros, rs, rc, zeros, zeros, zeros, ones], 1).view(-1, 3, 3)
        translation = torch.stack([ones, zeros, -tx, zeros, ones, -ty, zeros, zeros, ones], 1).view(-1, 3, 3)
        return rotation @ translation @ self.transform.to(params.dtype)

    def grid(self, device, dtype) -> torch.Tensor:
        """(size, size, 2) pixel-centre positions (x, y) in units of 1 / sampling_rate."""
        centres = (torch.arange(self.size, dtype=dtype, device=device) + 0.5 - self.size / 2)
        centres = centres / self.sampling_rate
        y, x = torch.meshgrid(centres, centres, indexing="ij")
        return torch.stack([x, y], dim=-1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        motion = self.motion(w)
        # sin(2 pi (f . (A p + a) + phi)) = sin(2 pi ((f A) . p + (phi + f . a))), (B, C, ...)
        base = self.freqs.to(motion.dtype)
        freqs = base @ motion[:, :2, :2]
        phases = self.phases.to(motion.dtype) + (base @ motion[:, :2, 2:]).squeeze(2)
        amplitudes = (1 - (freqs.norm(dim=2) - self.bandwidth) / (self.sampling_rate / 2 - self.bandwidth)).clamp(0, 1)
        arguments = torch.einsum("hwk,bck->bhwc", self.grid(w.device, freqs.dtype), freqs) + phases[:, None, None, :]
        features = torch.sin(2 * math.pi * arguments) * amplitudes[:, None, None, :]
        mixed = features.to(self.weight.dtype) @ (self.weight / math.sqrt(self.channels)).t()
        return mixed.permute(0, 3, 1, 2)


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool,
                     padding: int, input_gain: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The convolution of sample b with its own kernel
        w_b[o, i] = weight[o, i] s[b, i] g,
    and with demodulation w_b[o, i] / sqrt(sum_{i, ky, kx} (weight[o, i] s[b, i])^2 + 1e-8), so each
    output channel has unit gain for unit-variance inputs; g is the layer's input_gain.

    Before demodulating, weight is scaled to unit RMS per output channel and s to unit RMS per
    sample: demodulation cancels both factors (up to the 1e-8), and they keep the sum of
    squares in range. (NVlabs scales s by the RMS of the whole batch instead; this keeps each
    sample independent of the others.) The kernels are formed in float32 (or float64) and the B
    convolutions run as one grouped convolution in x's dtype."""
    batch, in_channels = x.shape[:2]
    out_channels, _, kh, kw = weight.shape
    w = _at_least_float32(weight)
    s = _at_least_float32(styles)
    if demodulate:
        w = w * w.square().mean(dim=(1, 2, 3), keepdim=True).rsqrt()
        s = s * s.square().mean(dim=1, keepdim=True).rsqrt()
    kernels = w.unsqueeze(0) * s[:, None, :, None, None]  # (B, O, I, kh, kw)
    if demodulate:
        kernels = kernels * (kernels.square().sum(dim=(2, 3, 4)) + 1e-8).rsqrt()[:, :, None, None, None]
    if input_gain is not None:
        kernels = kernels * _at_least_float32(input_gain)
    y = F.conv2d(x.reshape(1, batch * in_channels, *x.shape[2:]),
                 kernels.reshape(batch * out_channels, in_channels, kh, kw).to(x.dtype),
                 padding=padding, groups=batch)
    return y.view(batch, out_channels, *y.shape[2:])


class SynthesisLayer(nn.Module):
    """Layer i: modulated convolution and filtered leaky ReLU from band `previous` to band
    `current` (module docstring). Its resampling factors, filters and padding follow from the
    two bands."""

    def __init__(self, config: StyleGAN3Config, previous: Band, current: Band, is_torgb: bool,
                 is_critically_sampled: bool):
        super().__init__()
        self.is_torgb = is_torgb
        self.in_channels, self.out_channels = previous.channels, current.channels
        self.in_size, self.out_size = previous.size, current.size
        self.conv_kernel = 1 if is_torgb else config.conv_kernel
        self.conv_clamp = config.conv_clamp
        self.magnitude_ema_beta = config.magnitude_ema_beta
        self.gain, self.slope = (1.0, 1.0) if is_torgb else (math.sqrt(2), 0.2)
        tmp_sampling_rate = max(previous.sampling_rate, current.sampling_rate) * (
            1 if is_torgb else config.lrelu_upsampling)
        self.up_factor = tmp_sampling_rate // previous.sampling_rate
        self.down_factor = tmp_sampling_rate // current.sampling_rate

        self.affine = FullyConnectedLayer(config.w_dim, self.in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(self.out_channels, self.in_channels, self.conv_kernel,
                                               self.conv_kernel))
        self.bias = nn.Parameter(torch.zeros(self.out_channels))
        # The running mean square of the layer's input; its rsqrt normalises the input.
        self.register_buffer("magnitude_ema", torch.ones([]))

        def taps(factor: int) -> int:
            return config.filter_size * factor if factor > 1 and not is_torgb else 1

        up_taps, down_taps = taps(self.up_factor), taps(self.down_factor)
        self.register_buffer("up_filter", design_lowpass_filter(
            up_taps, previous.cutoff, 2 * previous.half_width, tmp_sampling_rate))
        self.register_buffer("down_filter", design_lowpass_filter(
            down_taps, current.cutoff, 2 * current.half_width, tmp_sampling_rate,
            radial=config.use_radial_filters and not is_critically_sampled))

        # Pad so that the output has out_size samples: the convolution grew the input by k - 1,
        # each filter shrinks it by taps - 1. Zero insertion puts each input sample first in its
        # group of `up` slots, while a pixel's centre is the middle of the group: the extra up / 2
        # on the low side (the paper's Appendix C.3) aligns the centres of the input and output grids.
        total = ((current.size - 1) * self.down_factor + 1
                 - (previous.size + self.conv_kernel - 1) * self.up_factor + up_taps + down_taps - 2)
        low = (total + self.up_factor) // 2
        self.padding = [low, total - low, low, total - low]

    def _apply(self, fn, recurse=True):
        """The FIR filters follow device moves and float64 casts but stay float32 under casts
        to 16-bit types: bfloat16 taps miss the designed stopband attenuation (NVlabs keeps them
        float32 too; filtered_lrelu takes filters of any floating dtype)."""
        filters = {name: getattr(self, name) for name in ("up_filter", "down_filter")}
        super()._apply(fn, recurse)
        for name, original in filters.items():
            cast = getattr(self, name)
            if original is not None and cast.element_size() < 4:
                setattr(self, name, original.to(device=cast.device))
        return self

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                magnitude = x.detach().float().square().mean()
                self.magnitude_ema.copy_(magnitude.lerp(self.magnitude_ema.float(), self.magnitude_ema_beta))
        styles = self.affine(w)
        if self.is_torgb:
            styles = styles / math.sqrt(self.in_channels * self.conv_kernel**2)
        x = modulated_conv2d(x, self.weight, styles, demodulate=not self.is_torgb, padding=self.conv_kernel - 1,
                             input_gain=self.magnitude_ema.rsqrt())
        return filtered_lrelu(x, self.up_filter, self.down_filter, self.bias.to(x.dtype), up=self.up_factor,
                              down=self.down_factor, padding=self.padding, gain=self.gain, slope=self.slope,
                              clamp=self.conv_clamp)


class SynthesisNetwork(nn.Module):
    def __init__(self, config: StyleGAN3Config):
        super().__init__()
        self.config = config
        self.bands = band_schedule(config)
        self.input = SynthesisInput(config.w_dim, self.bands[0])
        self.layer_names = []
        n = config.num_layers
        for i, band in enumerate(self.bands):
            name = f"L{i}_{band.size}_{band.channels}"
            setattr(self, name, SynthesisLayer(config, self.bands[max(i - 1, 0)], band, is_torgb=i == n,
                                               is_critically_sampled=i >= n - config.num_critical))
            self.layer_names.append(name)

    def forward(self, ws: torch.Tensor) -> torch.Tensor:
        """ws (B, num_ws, w_dim) -> image (B, img_channels, resolution, resolution)."""
        c = self.config
        if ws.ndim != 3 or ws.shape[1:] != (c.num_ws, c.w_dim):
            raise ValueError(f"ws must be (B, {c.num_ws}, {c.w_dim}); got {tuple(ws.shape)}")
        ws = ws.unbind(1)
        x = self.input(ws[0])
        for name, w in zip(self.layer_names, ws[1:]):
            x = getattr(self, name)(x, w)
        return x * c.output_scale


class Generator(nn.Module):
    def __init__(self, config: StyleGAN3Config):
        super().__init__()
        self.config = config
        self.synthesis = SynthesisNetwork(config)
        self.mapping = MappingNetwork(config.z_dim, config.w_dim, config.num_ws, config.mapping_layers,
                                      config.mapping_lr_multiplier, config.w_avg_beta)

    def forward(self, z: torch.Tensor, truncation_psi: float = 1.0, truncation_cutoff: Optional[int] = None,
                noise_mode: str = "const") -> torch.Tensor:
        """z (B, z_dim) -> images (B, img_channels, resolution, resolution), roughly in [-1, 1].
        With truncation_psi < 1 the first truncation_cutoff (default: all) of the num_ws
        latents move toward w_avg. StyleGAN3 has no noise inputs: noise_mode is accepted, and
        ignored, so that code driving StyleGAN2 generators drives this one too (as in NVlabs')."""
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {', '.join(NOISE_MODES)}, got {noise_mode!r}")
        if isinstance(z, torch.Tensor) and not z.is_floating_point():
            raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")
        return self.synthesis(self.mapping(z, truncation_psi, truncation_cutoff))


def build(name_or_config: Union[str, StyleGAN3Config]) -> Generator:
    """A randomly initialised generator. Build under `with torch.device("meta"):` to get the
    structure without allocating (filters, frequencies and phases are then meta tensors too)."""
    return Generator(resolve_config(name_or_config, CONFIGS, StyleGAN3Config, "StyleGAN3"))


def from_safetensors(path, config: Union[str, StyleGAN3Config], device: Union[str, torch.device] = "cpu",
                     prefix: str = "") -> Generator:
    """Load a generator from a .safetensors file holding the state dict of NVlabs' stylegan3
    Generator (e.g. converted from a published pickle: mapping.*, synthesis.input.*,
    synthesis.L{i}_{size}_{channels}.*, buffers included); `prefix` picks one network of a file
    holding several ("G_ema."). Built on the meta device, so the file's tensors (and dtype) are
    used as they are."""
    config = resolve_config(config, CONFIGS, StyleGAN3Config, "StyleGAN3")
    return load_state_file(path, lambda: Generator(config), device, prefix)


def example_step(model: Generator, batch: int = 1, resolution: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Callable[[], torch.Tensor]:
    """One generator forward, without gradients, from latents z drawn once from `generator` (a
    CPU generator) and moved to the model's device and dtype; the resolution is the config's
    (`stylegan2.generator_example_step`)."""
    return generator_example_step(model, Generator, batch, resolution, generator)
