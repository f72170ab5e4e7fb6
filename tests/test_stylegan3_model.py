"""The StyleGAN3 generator (fastgen.models.stylegan3): the published layer table and parameter
counts, FIR filter design against scipy and against its own specification, the Fourier input's
motion, the layers' sample alignment, the tiny T and R configs across backends, checkpoints."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fastgen
from conftest import assert_as_accurate_as_the_reference
from fastgen.models import stylegan3
from fastgen.ops.filtered_lrelu import filtered_lrelu
from model_checks import EVERY_BACKEND, seed_global_rng


def _tiny(generator, name="tiny"):
    seed_global_rng(generator)
    model = stylegan3.build(name)
    # Random stand-ins for trained statistics and biases, so no term of the forward is a no-op.
    with torch.no_grad():
        for layer_name in model.synthesis.layer_names:
            layer = getattr(model.synthesis, layer_name)
            layer.magnitude_ema.fill_(0.5 + torch.rand((), generator=generator).item())
            layer.bias.normal_(generator=generator)
        model.mapping.w_avg.normal_(generator=generator)
    return model


def _metabuild(name):
    with torch.device("meta"):
        return stylegan3.build(name)


# The layer table NVlabs' code prints for the published stylegan3-t-ffhq-1024x1024 generator:
# (name, sampling rate, cutoff, half-width, size, channels) of each layer's output.
PUBLISHED_T_1024 = [
    ("L0_36_512", 16, 2, 6, 36, 512),
    ("L1_36_512", 16, 3.1748, 4.8252, 36, 512),
    ("L2_52_512", 32, 5.03968, 10.9603, 52, 512),
    ("L3_52_512", 32, 8, 8, 52, 512),
    ("L4_84_512", 64, 12.6992, 19.3008, 84, 512),
    ("L5_148_512", 128, 20.1587, 43.8413, 148, 512),
    ("L6_148_512", 128, 32, 32, 148, 512),
    ("L7_276_323", 256, 50.7968, 77.2032, 276, 323),
    ("L8_276_203", 256, 80.6349, 47.3651, 276, 203),
    ("L9_532_128", 512, 128, 128, 532, 128),
    ("L10_1044_81", 1024, 203.187, 308.813, 1044, 81),
    ("L11_1044_51", 1024, 322.54, 189.46, 1044, 51),
    ("L12_1044_32", 1024, 512, 118.346, 1044, 32),
    ("L13_1024_32", 1024, 512, 118.346, 1024, 32),
    ("L14_1024_3", 1024, 512, 118.346, 1024, 3),
]


def test_schedule_matches_the_published_t_1024_generator():
    model = _metabuild("stylegan3-t-1024")
    assert model.synthesis.layer_names == [row[0] for row in PUBLISHED_T_1024]
    for band, (name, rate, cutoff, half_width, size, channels) in zip(model.synthesis.bands, PUBLISHED_T_1024):
        assert (band.sampling_rate, band.size, band.channels) == (rate, size, channels), name
        assert band.cutoff == pytest.approx(cutoff, rel=1e-5), name
        assert band.half_width == pytest.approx(half_width, rel=1e-5), name
    inp = model.synthesis.input
    assert (inp.channels, inp.size, inp.sampling_rate, inp.bandwidth) == (512, 36, 16, 2)


@pytest.mark.parametrize("name, millions", [("stylegan3-t-1024", 22.3), ("stylegan3-r-1024", 15.1)])
def test_parameter_counts_match_the_published_models(name, millions):
    """The paper's counts (generator: mapping + synthesis): T 22.3M, R 15.1M."""
    model = _metabuild(name)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)


def test_r_config_uses_1x1_convolutions_and_radial_filters_off_the_critical_layers():
    model = _metabuild("stylegan3-r-1024")
    layers = [getattr(model.synthesis, name) for name in model.synthesis.layer_names]
    assert [layer.weight.shape[-1] for layer in layers] == [1] * len(layers)
    # Radial (2-D) down filters everywhere but the two critically sampled layers and ToRGB.
    radial = [layer.down_filter is not None and layer.down_filter.ndim == 2 for layer in layers]
    assert radial == [True] * 12 + [False] * 3
    assert [layer.weight.shape[1] for layer in layers][:3] == [1024] * 3


# ---------------------------------------------------------------------------------------------
# Filter design


def _frequency_response(taps: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor, fs: float) -> torch.Tensor:
    """H(fx, fy) of a centred, symmetric filter (real: its phase is zero); 1-D taps: fy unused."""
    n = taps.shape[0]
    x = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) / fs
    if taps.ndim == 1:
        return (taps.double() * torch.cos(2 * math.pi * fx[:, None] * x)).sum(1)
    phase = 2 * math.pi * (fx[:, None, None] * x[None, None, :] + fy[:, None, None] * x[None, :, None])
    return (taps.double() * torch.cos(phase)).sum((1, 2))


def _layer_filters(name):
    """(filter, band it passes, sampling rate it runs at) for every filter of a config's layers."""
    model = stylegan3.build(stylegan3.CONFIGS[name])
    bands = model.synthesis.bands
    for i, layer_name in enumerate(model.synthesis.layer_names):
        layer = getattr(model.synthesis, layer_name)
        previous, current = bands[max(i - 1, 0)], bands[i]
        fs = max(previous.sampling_rate, current.sampling_rate) * 2
        for taps, band in ((layer.up_filter, previous), (layer.down_filter, current)):
            if taps is not None:
                yield taps, band, fs


def test_filters_match_scipy_firwin_and_nvlabs_jinc_design(generator):
    scipy_signal = pytest.importorskip("scipy.signal", reason="scipy is not installed (it is in the test extra)")
    scipy_special = pytest.importorskip("scipy.special")
    import numpy as np

    for _ in range(6):
        numtaps = int(torch.randint(2, 30, (), generator=generator))
        fs = float(torch.randint(8, 2048, (), generator=generator))
        cutoff = float(torch.empty(()).uniform_(0.05, 0.45, generator=generator)) * fs
        width = float(torch.empty(()).uniform_(0.02, 0.5, generator=generator)) * fs
        expected = scipy_signal.firwin(numtaps=numtaps, cutoff=cutoff, width=width, fs=fs)
        got = stylegan3.design_lowpass_filter(numtaps, cutoff, width, fs)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)

        # NVlabs' radial design with scipy's Bessel function and Kaiser rule; the odd centre
        # tap takes the jinc's limit.
        x = (np.arange(numtaps) - (numtaps - 1) / 2) / fs
        r = np.hypot(*np.meshgrid(x, x))
        with np.errstate(divide="ignore", invalid="ignore"):
            jinc = np.where(r > 0, scipy_special.j1(2 * math.pi * cutoff * r) / (math.pi * r), cutoff)
        window = np.kaiser(numtaps, scipy_signal.kaiser_beta(scipy_signal.kaiser_atten(numtaps, width / (fs / 2))))
        expected = jinc * np.outer(window, window)
        got = stylegan3.design_lowpass_filter(numtaps, cutoff, width, fs, radial=True)
        np.testing.assert_allclose(got.numpy(), expected / expected.sum(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["stylegan3-t-1024", "tiny"])
def test_separable_filters_pass_the_band_and_stop_beyond_it(name):
    """Unit DC gain; |H - 1| in the pass band [0, f_c - f_h] and |H| in the stop band
    [f_c + f_h, fs / 2] within twice the ripple delta = 10^(-A / 20) that Kaiser's rule promises
    for the attenuation A it designs for."""
    checked = 0
    for taps, band, fs in _layer_filters(name):
        if taps.ndim == 2:
            continue
        assert taps.dtype == torch.float32
        assert taps.sum().item() == pytest.approx(1.0, abs=1e-6)
        torch.testing.assert_close(taps, taps.flip(0), rtol=0, atol=0)
        attenuation = 2.285 * (taps.numel() - 1) * math.pi * (2 * band.half_width / (fs / 2)) + 7.95
        ripple = 2 * 10 ** (-attenuation / 20)
        passband = torch.linspace(0, max(band.cutoff - band.half_width, 0.0), 64, dtype=torch.float64)
        stopband = torch.linspace(band.cutoff + band.half_width, fs / 2, 64, dtype=torch.float64)
        assert (_frequency_response(taps, passband, None, fs) - 1).abs().max() <= ripple
        assert _frequency_response(taps, stopband, None, fs).abs().max() <= ripple
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("name", ["stylegan3-r-1024", "tiny-r"])
def test_radial_filters_are_symmetric_and_their_response_is_rotation_invariant(name):
    radial = [(taps, band, fs) for taps, band, fs in _layer_filters(name) if taps.ndim == 2]
    assert radial
    for taps, band, fs in radial:
        assert taps.sum().item() == pytest.approx(1.0, abs=1e-6)
        for symmetry in (taps.t(), taps.flip(0), taps.flip(1)):
            torch.testing.assert_close(symmetry, taps, rtol=0, atol=0)
        rho = torch.linspace(0, fs / 2, 65, dtype=torch.float64)
        along_axis = _frequency_response(taps, rho, torch.zeros_like(rho), fs)
        along_diagonal = _frequency_response(taps, rho / math.sqrt(2), rho / math.sqrt(2), fs)
        # The separable Kaiser window is not quite radial: a few percent.
        assert (along_axis - along_diagonal).abs().max() < 0.03
        stop = rho >= band.cutoff + band.half_width
        assert along_axis[stop].abs().max() < 0.02 and along_diagonal[stop].abs().max() < 0.02


def test_one_tap_is_the_identity_and_bad_sizes_raise():
    assert stylegan3.design_lowpass_filter(1, 2.0, 4.0, 16.0) is None
    with pytest.raises(ValueError, match="numtaps must be >= 1"):
        stylegan3.design_lowpass_filter(0, 2.0, 4.0, 16.0)


# ---------------------------------------------------------------------------------------------
# Fourier input


def _input_with_motion(model, rotation, translation, generator):
    """The input layer's output under the motion (r_c, r_s, t_x, t_y), whatever w is."""
    inp = model.synthesis.input
    w = torch.randn(2, model.config.w_dim, generator=generator, dtype=inp.weight.dtype)
    with torch.no_grad():
        inp.affine.weight.zero_()
        inp.affine.bias.copy_(torch.tensor([*rotation, *translation], dtype=torch.float64))
        return inp(w)


@pytest.mark.parametrize("shift", [(1, 0), (0, 2), (-3, 1)])
def test_fourier_features_translate_with_the_affine_translation(generator, shift):
    """t = k / s_0 moves the image by k pixels: features(p) becomes features(p - t)."""
    model = _tiny(generator)
    rate = model.synthesis.input.sampling_rate
    still = _input_with_motion(model, (1.0, 0.0), (0.0, 0.0), generator)
    # Any length of (r_c, r_s) is normalised away, translation included.
    moved = _input_with_motion(model, (2.0, 0.0), (2 * shift[0] / rate, 2 * shift[1] / rate), generator)
    dx, dy = shift
    size = still.shape[-1]
    rows, cols = slice(max(dy, 0), size + min(dy, 0)), slice(max(dx, 0), size + min(dx, 0))
    source_rows = slice(max(-dy, 0), size + min(-dy, 0))
    source_cols = slice(max(-dx, 0), size + min(-dx, 0))
    torch.testing.assert_close(moved[..., rows, cols], still[..., source_rows, source_cols], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(moved, still, atol=1e-2)


def test_fourier_features_rotate_with_the_affine_rotation(generator):
    """(r_c, r_s) = (0, 1): features(p) becomes features(R p), R p = (-p_y, p_x): a quarter turn
    of the centred grid onto itself."""
    model = _tiny(generator)
    still = _input_with_motion(model, (1.0, 0.0), (0.0, 0.0), generator)
    turned = _input_with_motion(model, (0.0, 1.0), (0.0, 0.0), generator)
    torch.testing.assert_close(turned, torch.rot90(still, 1, dims=(2, 3)), rtol=1e-4, atol=1e-5)


def test_fourier_features_follow_the_rigid_motion_formula(generator):
    """Any angle and translation, in float64: out(p) = W / sqrt(C) sin(2 pi (f . q + phi)) with
    q = R (p - t), at the pixel centres p = (index + 1/2 - size/2) / s_0."""
    model = _tiny(generator).double()
    inp = model.synthesis.input
    angle = float(torch.rand((), generator=generator)) * 2 * math.pi
    t = torch.randn(2, generator=generator, dtype=torch.float64) / inp.sampling_rate
    got = _input_with_motion(model, (math.cos(angle), math.sin(angle)), tuple(t.tolist()), generator)
    centres = (torch.arange(inp.size, dtype=torch.float64) + 0.5 - inp.size / 2) / inp.sampling_rate
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                            dtype=torch.float64)
    q = (torch.stack([x, y], -1) - t) @ rotation.t()
    features = torch.sin(2 * math.pi * (q @ inp.freqs.t() + inp.phases))  # in band: amplitude 1
    expected = (features @ inp.weight.t() / math.sqrt(inp.channels)).permute(2, 0, 1)
    torch.testing.assert_close(got, expected.expand_as(got), rtol=1e-9, atol=1e-9)


def test_fourier_frequencies_lie_in_the_band(generator):
    model = _tiny(generator)
    inp = model.synthesis.input
    radii = inp.freqs.norm(dim=1)
    assert radii.max() <= inp.bandwidth
    assert inp.phases.min() >= -0.5 and inp.phases.max() < 0.5


# ---------------------------------------------------------------------------------------------
# Layers


def _modulated_conv2d_float64(x, weight, styles, demodulate, padding, input_gain):
    """One sample at a time, the styles on the input and the demodulation on the output."""
    outputs = []
    for b in range(x.shape[0]):
        style = styles[b, None, :, None, None]
        y = F.conv2d(x[b:b + 1] * style * input_gain, weight, padding=padding)
        if demodulate:
            y = y / (weight * style).square().sum((1, 2, 3)).add(1e-8).sqrt()[None, :, None, None]
        outputs.append(y)
    return torch.cat(outputs)


@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv2d_matches_a_per_sample_formulation(generator, demodulate):
    x = torch.randn(3, 5, 7, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(4, 5, 3, 3, generator=generator, dtype=torch.float64)
    styles = torch.randn(3, 5, generator=generator, dtype=torch.float64) + 1
    gain = torch.tensor(0.7, dtype=torch.float64)
    got = stylegan3.modulated_conv2d(x, weight, styles, demodulate, 2, gain)
    expected = _modulated_conv2d_float64(x, weight, styles, demodulate, 2, gain)
    # The kernels are formed in float32.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "tiny-r", "stylegan3-t-1024"])
def test_layers_resample_a_sinusoid_onto_the_output_grid(generator, name):
    """Sample alignment: with the nonlinearity made linear (gain 1, slope 1, no clamp), a layer's
    resampling maps the samples of sin(2 pi f x + phi) on its input grid (centred pixel samples
    at s_in, grown by the convolution) to H_up(f) H_down(f) times the same sinusoid sampled on
    the output grid, away from the borders. An off-by-one padding shifts the phase."""
    model = stylegan3.build(name)
    bands = model.synthesis.bands
    checked = 0
    for i, layer_name in enumerate(model.synthesis.layer_names[:-1]):
        layer = getattr(model.synthesis, layer_name)
        previous, current = bands[max(i - 1, 0)], bands[i]
        if current.size > 64:  # the full config's first layers are enough (and cheap)
            break
        fs = max(previous.sampling_rate, current.sampling_rate) * 2
        # Low enough that the input's spectral images (s_in - f, ...) sit deep in the stop bands.
        frequency = min(previous.cutoff, current.cutoff) * float(0.1 + 0.4 * torch.rand((), generator=generator))
        phase = float(torch.rand((), generator=generator))

        def sampled(size, rate):
            positions = (torch.arange(size, dtype=torch.float64) + 0.5 - size / 2) / rate
            row = torch.sin(2 * math.pi * (frequency * positions + phase))
            return row.expand(size, size)[None, None]  # varies along x only

        grown = previous.size + layer.conv_kernel - 1
        x = sampled(grown, previous.sampling_rate)
        with fastgen.use_backend("reference"):
            y = filtered_lrelu(x, layer.up_filter.double(), layer.down_filter.double(), None, up=layer.up_factor,
                               down=layer.down_factor, padding=layer.padding, gain=1.0, slope=1.0)
        assert y.shape[-2:] == (current.size, current.size)
        f = torch.tensor([frequency], dtype=torch.float64)
        gain = _frequency_response(layer.up_filter, f, 0 * f, fs) * _frequency_response(layer.down_filter, f, 0 * f, fs)
        expected = gain * sampled(current.size, current.sampling_rate)
        border = current.size // 4
        inner = (..., slice(border, -border), slice(border, -border))
        # A quarter-sample misalignment is off by ~1e-2.
        torch.testing.assert_close(y[inner], expected[inner], rtol=0, atol=5e-4)
        checked += 1
    assert checked >= 2


# ---------------------------------------------------------------------------------------------
# The generator


def _nvlabs_synthesis(model, ws):
    """The synthesis layers as NVlabs' code computes them: per-sample kernels with the styles
    pre-normalised by the RMS of the whole batch, a loop of plain convolutions, and filtered
    leaky ReLU as its reference composition (bias; upfirdn2d up with gain up^2; lrelu, gain and
    clamp; upfirdn2d down). Only the filters, factors and padding are read off the layers."""
    x = model.synthesis.input(ws[:, 0])
    for index, name in enumerate(model.synthesis.layer_names):
        layer, w = getattr(model.synthesis, name), ws[:, index + 1]
        weight, styles, k = layer.weight, layer.affine(w), layer.conv_kernel
        if layer.is_torgb:
            styles = styles / math.sqrt(layer.in_channels * k * k)
        else:
            weight = weight * weight.square().mean([1, 2, 3], keepdim=True).rsqrt()
            styles = styles * styles.square().mean().rsqrt()
        kernels = weight[None] * styles[:, None, :, None, None]
        if not layer.is_torgb:
            kernels = kernels * (kernels.square().sum([2, 3, 4]) + 1e-8).rsqrt()[:, :, None, None, None]
        kernels = kernels * layer.magnitude_ema.rsqrt()
        x = torch.cat([F.conv2d(x[b:b + 1], kernels[b], padding=k - 1) for b in range(x.shape[0])])
        x = fastgen.bias_act(x, layer.bias)
        x = fastgen.upfirdn2d(x, layer.up_filter, up=layer.up_factor, padding=layer.padding,
                              gain=layer.up_factor**2)
        slope, gain = (1.0, 1.0) if layer.is_torgb else (0.2, math.sqrt(2))
        x = fastgen.bias_act(x, act="lrelu", alpha=slope, gain=gain, clamp=256.0)
        x = fastgen.upfirdn2d(x, layer.down_filter, down=layer.down_factor)
    return x * 0.25


@pytest.mark.parametrize("name", ["tiny", "tiny-r"])
def test_synthesis_matches_nvlabs_formulation_in_float64(generator, name):
    model = _tiny(generator, name).eval().double()
    ws = torch.randn(3, model.config.num_ws, model.config.w_dim, generator=generator, dtype=torch.float64)
    with fastgen.use_backend("reference"):
        images = model.synthesis(ws)
        expected = _nvlabs_synthesis(model, ws)
    # The styles' normalisation differs (per sample here, per batch there) only through the
    # 1e-8 inside the demodulation.
    torch.testing.assert_close(images, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["tiny", "tiny-r"])
def test_tiny_generator_gives_images(generator, name):
    model = _tiny(generator, name).eval()
    z = torch.randn(2, model.config.z_dim, generator=generator)
    images = model(z)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert torch.isfinite(images).all()
    assert not torch.allclose(images[0], images[1])


def _images_and_grads(model, z):
    model.zero_grad()
    images = model(z)
    (images * torch.linspace(-1, 1, images.numel()).to(images).view_as(images)).sum().backward()
    return images.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["tiny", "tiny-r"])
@pytest.mark.parametrize("device, backend", EVERY_BACKEND)
def test_fast_backends_match_the_reference(generator, name, device, backend):
    """Every fastgen op the generator calls (filtered_lrelu, bias_act in the mapping) on the
    backend's kernels against their references, forward and parameter gradients."""
    model = _tiny(generator, name).eval().to(device)
    z = torch.randn(1, model.config.z_dim, generator=generator).to(device)
    with fastgen.use_backend("reference"):
        expected, expected_grads = _images_and_grads(model, z)
    try:
        with fastgen.use_backend(backend):
            images, grads = _images_and_grads(model, z)
    except fastgen.BackendUnavailable as reason:
        pytest.skip(f"the {backend} backend cannot run here: {reason}")
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-5)
    with fastgen.use_backend("reference"):
        _, exact_grads = _images_and_grads(copy.deepcopy(model).double(), z.double())
    for parameter_name, grad in grads.items():
        assert_as_accurate_as_the_reference(grad, expected_grads[parameter_name], exact_grads[parameter_name],
                                            parameter_name)


def test_backward_reaches_every_parameter(generator):
    model = _tiny(generator).eval()
    _, grads = _images_and_grads(model, torch.randn(2, model.config.z_dim, generator=generator))
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_truncation_to_w_avg_ignores_z(generator):
    model = _tiny(generator).eval()
    z = torch.randn(2, model.config.z_dim, generator=generator)
    truncated = model(z, truncation_psi=0.0)
    torch.testing.assert_close(truncated[0], truncated[1])
    # Only the first layers truncated: the later latents still depend on z.
    partly = model(z, truncation_psi=0.0, truncation_cutoff=3)
    assert not torch.allclose(partly[0], partly[1])


def test_training_mode_tracks_magnitudes_and_eval_mode_does_not(generator):
    model = _tiny(generator)
    z = torch.randn(2, model.config.z_dim, generator=generator)
    layer = getattr(model.synthesis, model.synthesis.layer_names[0])
    before = layer.magnitude_ema.clone()
    model.eval()(z)
    assert torch.equal(layer.magnitude_ema, before)
    with torch.no_grad():
        features = model.synthesis.input(model.mapping(z)[:, 0])
    model.train()(z)
    expected = features.square().mean().lerp(before, model.config.magnitude_ema_beta)
    torch.testing.assert_close(layer.magnitude_ema, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_keeps_float32_filters(generator, dtype):
    model = _tiny(generator).eval()
    filters = {name: b.clone() for name, b in model.named_buffers() if name.endswith("_filter")}
    model = model.to(dtype)
    for name, buffer in model.named_buffers():
        if name in filters:
            assert buffer.dtype == torch.float32 and torch.equal(buffer, filters[name]), name
    assert filters and all(p.dtype == dtype for p in model.parameters())
    images = model(torch.randn(2, model.config.z_dim, generator=generator).to(dtype), noise_mode="const")
    assert images.dtype == dtype and torch.isfinite(images).all()


def test_example_step(generator):
    model = _tiny(generator).eval()
    step = stylegan3.example_step(model, batch=3, generator=generator)
    images = step()
    assert images.shape == (3, 3, 32, 32) and not images.requires_grad
    torch.testing.assert_close(step(), images)
    with pytest.raises(ValueError, match="resolution"):
        stylegan3.example_step(model, resolution=64)
    with pytest.raises(TypeError, match="stylegan3.Generator"):
        stylegan3.example_step(torch.nn.Linear(2, 2))


def test_bad_inputs_raise(generator):
    model = _tiny(generator).eval()
    with pytest.raises(ValueError, match=r"z must be a \(B, 16\)"):
        model(torch.randn(2, 15))
    with pytest.raises(TypeError, match="z must be a floating-point tensor"):
        model(torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"ws must be \(B, 6, 16\)"):
        model.synthesis(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="unknown StyleGAN3 config"):
        stylegan3.build("stylegan3-t-512")
    with pytest.raises(ValueError, match="num_critical"):
        stylegan3.build(stylegan3.StyleGAN3Config(num_layers=4, num_critical=4))
    with pytest.raises(ValueError, match="resolution must be a power of two"):
        stylegan3.StyleGAN3Config(resolution=48)


def test_safetensors_round_trip_with_nvlabs_key_names(generator, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    model = _tiny(generator, "tiny-r").eval()
    state = model.state_dict()
    for key in ("mapping.fc0.weight", "mapping.fc1.bias", "mapping.w_avg", "synthesis.input.weight",
                "synthesis.input.affine.weight", "synthesis.input.freqs", "synthesis.input.phases",
                "synthesis.input.transform", "synthesis.L0_20_4.affine.weight", "synthesis.L0_20_4.weight",
                "synthesis.L0_20_4.bias", "synthesis.L0_20_4.magnitude_ema", "synthesis.L0_20_4.up_filter",
                "synthesis.L0_20_4.down_filter", "synthesis.L4_32_3.weight"):
        assert key in state, key
    # ToRGB resamples nothing: no filters stored, as in NVlabs' (None buffers).
    assert "synthesis.L4_32_3.up_filter" not in state
    path = tmp_path / "stylegan3-tiny-r.safetensors"
    safetensors_torch.save_file(state, str(path))
    loaded = stylegan3.from_safetensors(path, "tiny-r").eval()
    for name, tensor in state.items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    z = torch.randn(2, model.config.z_dim, generator=generator)
    torch.testing.assert_close(loaded(z), model(z), rtol=0, atol=0)
    # One network of a file holding several.
    prefixed = tmp_path / "stylegan3-tiny-r-networks.safetensors"
    safetensors_torch.save_file({**{f"G_ema.{k}": v for k, v in state.items()}, "D.b4.out.bias": torch.zeros(1)},
                                str(prefixed))
    torch.testing.assert_close(stylegan3.from_safetensors(prefixed, "tiny-r", prefix="G_ema.").eval()(z), model(z),
                               rtol=0, atol=0)
    # A checkpoint of the other variant does not load silently.
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        stylegan3.from_safetensors(path, "tiny")


def test_benchmarks_declare_the_1024_generators_and_run_tiny(tmp_path):
    from fastgen.bench import harness, models_stylegan3

    full = models_stylegan3.benchmarks(quick=False)
    assert [bench.name for bench in full] == ["model.stylegan3-t-1024.forward", "model.stylegan3-r-1024.forward"]
    assert all(set(bench.impls) == {"eager", "compile", "triton", "cuda"} for bench in full)
    # The modulated convolutions alone: 2 x (multiply-adds) per image, about 0.57 TFLOP for T.
    assert 0.5e12 < full[0].cases[0].work / 4 < 0.65e12

    def one_call(prepare, reps, warmup):
        prepare()()
        return [1.0]

    # The Triton rows are covered by test_triton_backend_matches_the_reference; eager here.
    tiny = models_stylegan3.benchmarks(config_names=("tiny",), batch=1, dtype=torch.float32)
    rows, _, paths = harness.run(tiny, quick=True, out_dir=tmp_path, device="cpu", impls=["eager"],
                                 timer=one_call)
    assert [(row["name"], row["impl"], row["status"]) for row in rows] == [("model.tiny.forward", "eager", "ok")]
    assert paths["json"].exists()


def test_example_step_compiles_as_one_graph(generator):
    """No graph breaks (fullgraph): Dynamo captures the generator, every fastgen op through its
    fake implementation (aot_eager: no code generation, which would take minutes on CPU)."""
    model = _tiny(generator, "tiny-r").eval()
    step = stylegan3.example_step(model, batch=2, generator=generator)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(), step())
    finally:
        torch._dynamo.reset()
