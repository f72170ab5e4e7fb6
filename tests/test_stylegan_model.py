"""The StyleGAN (v1) generator (fastgen.models.stylegan): the AdaIN layer and both upsampling
paths against direct float64 formulas, which w each layer gets, style mixing and truncation,
the tiny generator across backends, checkpoint loading, the published parameter count, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastgen
from conftest import assert_as_accurate_as_the_reference
from fastgen.models import stylegan, stylegan2
from fastgen.ops.registry import OPS
from model_checks import NOT_EMULATED, seed_global_rng

TINY = stylegan.CONFIGS["tiny"]
BLUR = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=torch.float64) / 16


def _randomize(module, generator):
    """Nonzero noise strengths and biases (they start at zero), so that those paths count, and a
    trained-looking constant input: the initial all-ones one leaves only the noise to vary
    over the 4x4 pixels, an ill-conditioned instance norm whose gradients are rounding noise."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith(("noise_strength", "bias", "const")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module


@pytest.fixture
def tiny(generator):
    seed_global_rng(generator)
    return _randomize(stylegan.build("tiny"), generator)


def _layer(generator, kind, fused_scale=False):
    seed_global_rng(generator)
    return _randomize(stylegan.StyledLayer(kind, 4, 5, 6, 10, fused_scale=fused_scale).double(), generator)


def test_styled_layer_matches_the_adain_formula(generator):
    layer = _layer(generator, "conv")
    x = torch.randn(2, 4, 10, 10, generator=generator, dtype=torch.float64) * 3 + 2
    w = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    with fastgen.use_backend("reference"):
        out = layer(x, w, noise_mode="const")
    y = F.conv2d(x, layer.weight * (2 / (4 * 9)) ** 0.5, padding=1)
    y = y + layer.noise_const * layer.noise_strength.reshape(1, -1, 1, 1) + layer.bias.reshape(1, -1, 1, 1)
    y = torch.where(y > 0, y, 0.2 * y)
    normalized = (y - y.mean(dim=[2, 3], keepdim=True)) / (y.var(dim=[2, 3], unbiased=False, keepdim=True)
                                                           + 1e-8).sqrt()
    style = w @ layer.style.weight.t() / 6**0.5 + layer.style.bias
    expected = normalized * (1 + style[:, :5, None, None]) + style[:, 5:, None, None]
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fused_scale", [False, True])
def test_upsampling_conv_paths(generator, fused_scale):
    """Nearest-neighbour 2x, the 3x3 'same' convolution (a correlation, or a true convolution
    for the release's fused transposed form), then the [1, 2, 1] blur."""
    layer = _layer(generator, "up", fused_scale=fused_scale)
    x = torch.randn(2, 4, 5, 6, generator=generator, dtype=torch.float64)
    with fastgen.use_backend("reference"):
        out = layer.convolve(x)
    weight = layer.weight * layer.weight_gain
    y = F.conv2d(x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3),
                 weight.flip([2, 3]) if fused_scale else weight, padding=1)
    expected = F.conv2d(F.pad(y, [1, 1, 1, 1]), BLUR.expand(5, 1, 3, 3), groups=5)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_each_layer_gets_its_own_w(generator, tiny):
    ws = torch.randn(2, TINY.num_layers, TINY.w_dim, generator=generator)
    seen = {}
    for name, module in tiny.synthesis.named_modules():
        if name.endswith(".style"):
            module.register_forward_hook(lambda m, inputs, out, name=name: seen.__setitem__(name, inputs[0]))
    tiny.synthesis(ws, noise_mode="none")
    order = ["b4.input", "b4.conv1", "b8.conv0", "b8.conv1", "b16.conv0", "b16.conv1"]
    assert set(seen) == {f"{layer}.style" for layer in order}
    for index, layer in enumerate(order):
        torch.testing.assert_close(seen[f"{layer}.style"], ws[:, index], rtol=0, atol=0, msg=layer)


def test_style_mixing(generator, tiny):
    ws = torch.randn(3, 6, 8, generator=generator)
    other = torch.randn(3, 6, 8, generator=generator)
    mixed = stylegan.mix_styles(ws, other, 2)
    assert torch.equal(mixed[:, :2], ws[:, :2]) and torch.equal(mixed[:, 2:], other[:, 2:])
    with pytest.raises(ValueError, match=r"crossover must be an int in \[0, 6\]"):
        stylegan.mix_styles(ws, other, 7)

    z = torch.randn(3, TINY.z_dim, generator=generator)
    tiny.eval()
    plain = tiny.styles(z)
    assert torch.equal(tiny.styles(z, mixing_prob=0.0), plain)
    crossovers = set()
    for _ in range(12):
        styles = tiny.styles(z, mixing_prob=1.0)
        changed = [not torch.equal(styles[:, i], plain[:, i]) for i in range(TINY.num_layers)]
        crossover = changed.index(True)
        # The layers before the crossover keep w; from it on, one other w for every layer.
        assert 1 <= crossover < TINY.num_layers and all(changed[crossover:])
        assert all(torch.equal(styles[:, i], styles[:, crossover]) for i in range(crossover, TINY.num_layers))
        crossovers.add(crossover)
    assert len(crossovers) > 1
    tiny.train()  # the release mixes in training with probability 0.9
    assert sum(not torch.equal(tiny.styles(z), tiny.mapping(z)) for _ in range(10)) >= 5
    with pytest.raises(ValueError, match="mixing_prob must be in"):
        tiny.styles(z, mixing_prob=1.5)


def test_truncation_uses_w_avg(generator, tiny):
    tiny.eval()
    tiny.mapping.w_avg.normal_(generator=generator)
    z = torch.randn(2, TINY.z_dim, generator=generator)
    ws = tiny.styles(z)
    truncated = tiny.styles(z, truncation_psi=0.0, truncation_cutoff=4)
    assert torch.equal(truncated[:, :4], tiny.mapping.w_avg.expand(2, 4, -1))
    assert torch.equal(truncated[:, 4:], ws[:, 4:])
    torch.testing.assert_close(tiny(z, stylegan.TRUNCATION_PSI, noise_mode="const"),
                               tiny.synthesis(tiny.mapping.w_avg.lerp(ws, stylegan.TRUNCATION_PSI), "const"))


# Leaky ReLU's derivative jumps from 1 to 0.2 at 0. Float32 rounding (under 1e-5 here) moves
# an input that close to the kink to its other side, which changes the gradient by a finite
# amount on every path through that element: at seed 1628168539684466319 an input 2.2e-7 from
# 0 put the constant input's gradient 1.6e-3 off on the Triton path, with all kernels within
# float32 rounding of float64. Gradients are compared only away from the kink.
KINK_MARGIN = 1e-4


def _draw_clear_of_kinks(model, generator, monkeypatch, attempts=50):
    """Redraws the model's randomized parameters (the first layer's input does not depend on
    z) and a latent batch until every leaky ReLU input, in float64, is more than KINK_MARGIN
    from 0; returns the float64 copy of the model and the batch."""
    nearest = []

    def recording_bias_act(x, b=None, act="linear", **kwargs):
        if act == "lrelu":
            pre_activation = x if b is None else fastgen.bias_act(x, b, dim=kwargs.get("dim", 1))
            nearest.append(pre_activation.detach().abs().min().item())
        return fastgen.bias_act(x, b, act=act, **kwargs)

    device = next(model.parameters()).device
    with monkeypatch.context() as patch:
        patch.setattr(stylegan, "bias_act", recording_bias_act)
        patch.setattr(stylegan2, "bias_act", recording_bias_act)
        for _ in range(attempts):
            exact_model = copy.deepcopy(_randomize(model, generator)).double()
            z = torch.randn(2, TINY.z_dim, generator=generator, dtype=torch.float64).to(device)
            nearest.clear()
            with fastgen.use_backend("reference"), torch.no_grad():
                exact_model(z, noise_mode="const")
            assert nearest, "no leaky ReLU was recorded: the model no longer calls bias_act by this name"
            if min(nearest) > KINK_MARGIN:
                return exact_model, z
    raise AssertionError(f"{attempts} draws all put a leaky ReLU input within {KINK_MARGIN} of 0")


@pytest.mark.parametrize("device, backend", NOT_EMULATED)
def test_every_backend_matches_the_reference(generator, tiny, backend, device, monkeypatch):
    if not any(backend in OPS[name].implementations for name in ("ada_group_norm", "upfirdn2d", "bias_act")):
        pytest.skip(f"ada_group_norm, upfirdn2d and bias_act have no {backend!r} implementation")
    try:
        with fastgen.use_backend(backend):
            ones = torch.ones(1, 1, device=device)
            fastgen.ada_group_norm(torch.ones(1, 1, 2, device=device), ones, ones, 1)
    except fastgen.BackendUnavailable as reason:
        pytest.skip(f"backend {backend!r} cannot run here: {reason}")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # TF32 convolutions: 1e-3 errors
    model = tiny.to(device).eval()
    exact_model, exact_z = _draw_clear_of_kinks(model, generator, monkeypatch)
    z = exact_z.float()

    def run(model, z):
        model.zero_grad()
        out = model(z, noise_mode="const")
        out.square().mean().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    with fastgen.use_backend("reference"):
        expected, expected_grads = run(model, z)
        _, exact_grads = run(exact_model, exact_z)
    with fastgen.use_backend(backend):
        out, grads = run(model, z)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # Gradients: no less accurate than the float32 reference, both against float64. Some are
    # ill-conditioned in float32 (AdaIN over a nearly constant channel): at seed
    # 572994247363547659 the float32 reference is 3% off on one channel's bias gradient while
    # the kernels agree with float64 to 1e-6, so comparing the two float32 results fails.
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert_as_accurate_as_the_reference(grad, expected_grads[name], exact_grads[name], name)


def test_safetensors_round_trip(generator, tiny, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    state = {f"G_ema.{key}": value for key, value in tiny.state_dict().items()}
    for key in ("mapping.fc0.weight", "mapping.w_avg", "synthesis.b4.const", "synthesis.b4.input.style.weight",
                "synthesis.b8.conv0.noise_strength", "synthesis.b16.conv1.noise_const", "synthesis.torgb.weight"):
        assert f"G_ema.{key}" in state
    state["D.unrelated"] = torch.zeros(1)
    path = tmp_path / "stylegan.safetensors"
    safetensors_torch.save_file(state, str(path))
    loaded = stylegan.from_safetensors(path, "tiny", prefix="G_ema.")
    z = torch.randn(2, TINY.z_dim, generator=generator)
    tiny.eval()
    torch.testing.assert_close(loaded.eval()(z, noise_mode="const"), tiny(z, noise_mode="const"), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        stylegan.from_safetensors(path, "tiny")


def test_parameter_count_of_ffhq_1024():
    """The release's generator: 26.2M parameters (StyleGAN paper, and its 1024 px FFHQ pickle)."""
    with torch.device("meta"):
        model = stylegan.build("ffhq-1024")
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 1) == 26.2
    assert count == 26_212_019
    assert sum(p.numel() for p in model.mapping.parameters()) == 8 * (512 * 512 + 512)
    # 512 channels up to 32 px, halving from there to 16 at 1024 px; fused upsampling from 128 px.
    assert model.synthesis.b1024.conv1.weight.shape == (16, 16, 3, 3)
    assert model.synthesis.b64.conv0.weight.shape == (256, 512, 3, 3)
    assert not model.synthesis.b64.conv0.fused_scale and model.synthesis.b128.conv0.fused_scale


def test_example_step_and_errors(generator, tiny):
    step = stylegan.example_step(tiny, batch=2, generator=generator)
    out = step()
    assert out.shape == (2, 3, 16, 16) and not out.requires_grad
    torch.testing.assert_close(step(), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"resolution must be 16 \(the one size this generator makes\); got"):
        stylegan.example_step(tiny, resolution=1024)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        stylegan.example_step(tiny, batch=0)
    with pytest.raises(TypeError, match="stylegan.Generator"):
        stylegan.example_step(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"z must be a \(B, 32\) tensor"):
        tiny(torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"ws must be \(B, 6, 32\)"):
        tiny.synthesis(torch.randn(2, 18, 32))
    with pytest.raises(ValueError, match="noise_mode must be one of"):
        tiny(torch.randn(2, 32), noise_mode="per-layer")
    with pytest.raises(ValueError, match="unknown StyleGAN config"):
        stylegan.build("ffhq-512")
    with pytest.raises(ValueError, match="kind must be one of"):
        stylegan.StyledLayer("down", 4, 4, 4, 8)


def test_mapping_puts_he_gain_in_the_weights(generator, tiny):
    """v1's mapping layers: lrelu(sqrt(2) * lr / sqrt(fan_in) * W x + lr * b), no gain after
    the activation (StyleGAN2's would be sqrt(2) * lrelu(lr / sqrt(fan_in) * W x + lr * b))."""
    z = torch.randn(3, TINY.z_dim, generator=generator, dtype=torch.float64)
    mapping = tiny.mapping.double().eval()
    with torch.no_grad():
        for index in range(TINY.mapping_layers):
            getattr(mapping, f"fc{index}").bias.normal_(generator=generator)
    x = z / z.square().mean(dim=1, keepdim=True).add(1e-8).sqrt()
    lr = TINY.mapping_lr_multiplier
    for index in range(TINY.mapping_layers):
        layer = getattr(mapping, f"fc{index}")
        x = F.leaky_relu(x @ layer.weight.t() * (2**0.5 * lr / x.shape[1] ** 0.5) + lr * layer.bias, 0.2)
    with fastgen.use_backend("reference"):
        torch.testing.assert_close(mapping(z), x[:, None].expand(-1, TINY.num_layers, -1))


def test_traces_as_one_graph(generator, tiny):
    z = torch.randn(2, TINY.z_dim, generator=generator)
    compiled = torch.compile(tiny.eval(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z, noise_mode="const"), tiny(z, noise_mode="const"))
