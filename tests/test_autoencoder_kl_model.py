"""The AutoencoderKL reference model (fastgen.models.autoencoder_kl): equality with diffusers'
AutoencoderKL (encode, decode, sampling, tiled encode and decode), the published configs, the
fused GroupNorms, backends, checkpoint loading, the scaled latents, the example step, the decode
benchmark and input errors."""
import dataclasses

import pytest
import torch

import fastgen
from fastgen.models import autoencoder_kl, common
from fastgen.ops.cross_attention import MAX_HEAD_DIM
from model_checks import NOT_EMULATED, assert_backend_matches_reference, seed_global_rng

TINY = autoencoder_kl.CONFIGS["tiny"]
# FLUX.1's kind: 16 latent channels, no quant convolutions, shifted latents.
TINY_FLUX_STYLE = dataclasses.replace(TINY, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                                      use_quant_conv=False, use_post_quant_conv=False)
FACTOR = TINY.spatial_compression

_BLOCKS = 4
# vae/config.json of the published checkpoints (as on huggingface.co), without the bookkeeping
# keys (_class_name, _diffusers_version, _name_or_path).
PUBLISHED_DIFFUSERS_CONFIGS = {
    "sd15-vae": {  # runwayml/stable-diffusion-v1-5 (scaling_factor: diffusers' default)
        "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * _BLOCKS, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * _BLOCKS,
    },
    "sdxl-vae": {  # stabilityai/stable-diffusion-xl-base-1.0
        "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * _BLOCKS, "force_upcast": True, "in_channels": 3,
        "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
        "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * _BLOCKS,
    },
    "flux-vae": {  # black-forest-labs/FLUX.1-dev
        "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * _BLOCKS, "force_upcast": True, "in_channels": 3,
        "latent_channels": 16, "latents_mean": None, "latents_std": None, "layers_per_block": 2,
        "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
        "scaling_factor": 0.3611, "shift_factor": 0.1159, "up_block_types": ["UpDecoderBlock2D"] * _BLOCKS,
        "use_post_quant_conv": False, "use_quant_conv": False,
    },
}
# Parameters of the published SD / SDXL VAE and of FLUX.1's (without the two 1x1 convolutions,
# with 16-channel latents).
PUBLISHED_PARAMETERS = {"sd15-vae": 83_653_863, "sdxl-vae": 83_653_863, "flux-vae": 83_819_683}


def _randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """GroupNorms start as the identity (weight 1, bias 0): draw them so that a swapped weight
    and bias, or a skipped norm, changes the output."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.5)


def _diffusers_pair(generator, config=TINY):
    """diffusers' AutoencoderKL with fresh random weights and fastgen's model holding them."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    seed_global_rng(generator)
    reference = diffusers.AutoencoderKL(**config.to_diffusers()).eval()
    _randomize_norms(reference, generator)
    model = autoencoder_kl.build(autoencoder_kl.AutoencoderKLConfig.from_diffusers(dict(reference.config))).eval()
    assert model.config == config
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference, model


@pytest.fixture
def tiny_model(generator):
    seed_global_rng(generator)
    model = autoencoder_kl.build("tiny").eval()
    _randomize_norms(model, generator)
    return model


def _images(generator, batch=2, height=16, width=16, config=TINY):
    return torch.randn(batch, config.in_channels, height, width, generator=generator)


def _latents(generator, batch=2, height=4, width=4, config=TINY):
    return torch.randn(batch, config.latent_channels, height, width, generator=generator)


@pytest.mark.parametrize("config", [TINY, TINY_FLUX_STYLE], ids=["tiny", "tiny-flux-style"])
def test_matches_diffusers(generator, config):
    """encode's mean and logvar, decode, and the forward with a sampled posterior, at even and
    odd sides (the encoder floors odd sides; the decoder takes any latent side)."""
    reference, model = _diffusers_pair(generator, config)
    with torch.no_grad():
        for height, width in ((16, 24), (21, 13)):
            images = _images(generator, height=height, width=width, config=config)
            posterior, expected = model.encode(images), reference.encode(images).latent_dist
            assert posterior.mean.shape == (2, config.latent_channels, height // FACTOR, width // FACTOR)
            torch.testing.assert_close(posterior.mean, expected.mean)
            torch.testing.assert_close(posterior.logvar, expected.logvar)
        for height, width in ((4, 6), (5, 3)):
            latents = _latents(generator, height=height, width=width, config=config)
            torch.testing.assert_close(model.decode(latents), reference.decode(latents).sample)
        images = _images(generator, config=config)
        seed = int(torch.randint(2**62, (), generator=generator))
        torch.testing.assert_close(
            model(images, sample_posterior=True, generator=torch.Generator().manual_seed(seed)),
            reference(images, sample_posterior=True, generator=torch.Generator().manual_seed(seed)).sample)
        torch.testing.assert_close(model(images), reference(images).sample)


def test_posterior_clamps_logvar_and_samples_as_diffusers(generator):
    """Moments far outside logvar's range [-30, 20]: the clamp, the standard deviation and a
    sample from the same generator state agree with diffusers' DiagonalGaussianDistribution."""
    vae = pytest.importorskip("diffusers.models.autoencoders.vae",
                              reason="diffusers is not installed (it is in the test extra)")
    moments = torch.randn(2, 8, 3, 5, generator=generator) * 40
    posterior = autoencoder_kl.DiagonalGaussian.from_moments(moments)
    expected = vae.DiagonalGaussianDistribution(moments)
    assert posterior.logvar.min() == -30 and posterior.logvar.max() == 20
    torch.testing.assert_close(posterior.mean, expected.mean, rtol=0, atol=0)
    torch.testing.assert_close(posterior.logvar, expected.logvar, rtol=0, atol=0)
    torch.testing.assert_close(posterior.std, expected.std)
    assert posterior.mode() is posterior.mean
    seed = int(torch.randint(2**62, (), generator=generator))
    torch.testing.assert_close(posterior.sample(torch.Generator().manual_seed(seed)),
                               expected.sample(torch.Generator().manual_seed(seed)))


def test_flux_style_config_has_no_quant_convolutions():
    with torch.device("meta"):
        names = autoencoder_kl.build(TINY_FLUX_STYLE).state_dict()
    assert not any(name.startswith(("quant_conv", "post_quant_conv")) for name in names)
    assert names["encoder.conv_out.weight"].shape[0] == 2 * 16 and names["decoder.conv_in.weight"].shape[1] == 16


def _diffusers_tiling(reference, tile_latent_size):
    reference.enable_tiling()
    reference.tile_latent_min_size = tile_latent_size
    reference.tile_sample_min_size = FACTOR * tile_latent_size


@pytest.mark.parametrize("config", [TINY, TINY_FLUX_STYLE], ids=["tiny", "tiny-flux-style"])
def test_tiled_decode_matches_diffusers_tiling(generator, config):
    """Tiles of 4 latents every 3 over an 11 x 9 latent: rows and columns of tiles cut short by
    the border, blended over 4 pixels, against diffusers' enable_tiling() with the same tiles.
    Tiling changes the image (each tile is decoded without its surroundings), so this would
    fail for a decode in one piece."""
    reference, model = _diffusers_pair(generator, config)
    _diffusers_tiling(reference, 4)
    latents = _latents(generator, batch=1, height=11, width=9, config=config)
    with torch.no_grad():
        tiled = model.tiled_decode(latents, tile_latent_size=4)
        torch.testing.assert_close(tiled, reference.decode(latents).sample)
        assert not torch.allclose(tiled, model.decode(latents), rtol=1e-3, atol=1e-3)
        # No larger than a tile: one piece, as diffusers does it.
        small = latents[..., :4, :3]
        torch.testing.assert_close(model.tiled_decode(small, tile_latent_size=4), model.decode(small))


def test_tiled_encode_matches_diffusers_tiling(generator):
    """Tiles of 16 pixels every 12 over a 44 x 36 image (a 11 x 9 latent)."""
    reference, model = _diffusers_pair(generator)
    _diffusers_tiling(reference, 4)
    images = _images(generator, batch=1, height=44, width=36)
    with torch.no_grad():
        posterior, expected = model.tiled_encode(images, tile_latent_size=4), reference.encode(images).latent_dist
    assert posterior.mean.shape == (1, TINY.latent_channels, 11, 9)
    torch.testing.assert_close(posterior.mean, expected.mean)
    torch.testing.assert_close(posterior.logvar, expected.logvar)


def test_tiles_without_overlap_are_decoded_alone_and_placed(generator, tiny_model):
    """With overlap 0 no blending happens: the image is the decoded tiles side by side."""
    latents = _latents(generator, batch=1, height=5, width=7)
    with torch.no_grad():
        tiled = tiny_model.tiled_decode(latents, tile_latent_size=3, overlap=0.0)
        rows = [torch.cat([tiny_model.decode(latents[..., top:top + 3, left:left + 3]) for left in (0, 3, 6)], -1)
                for top in (0, 3)]
    torch.testing.assert_close(tiled, torch.cat(rows, -2), rtol=0, atol=0)


@pytest.mark.parametrize("tile_latent_size", [5, 6, 7])
def test_tiles_meet_for_any_tile_size(generator, tiny_model, tile_latent_size):
    """Where tile * overlap is not a whole number diffusers' crop and stride disagree; here the
    tiles still meet: the image has f times the latent's size, and where the image is one
    tile's decode (away from the seams, inside the first tile) it equals that decode."""
    latents = _latents(generator, batch=1, height=13, width=10)
    with torch.no_grad():
        tiled = tiny_model.tiled_decode(latents, tile_latent_size=tile_latent_size)
        first = tiny_model.decode(latents[..., :tile_latent_size, :tile_latent_size])
    assert tiled.shape == (1, TINY.out_channels, 13 * FACTOR, 10 * FACTOR)
    stride = int(tile_latent_size * 0.75) * FACTOR
    torch.testing.assert_close(tiled[..., :stride, :stride], first[..., :stride, :stride], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [{"tile_latent_size": 0}, {"tile_latent_size": 2.0}, {"overlap": 1.0},
                                 {"overlap": -0.1}, {"tile_latent_size": 1, "overlap": 0.5}])
def test_bad_tiles_raise_value_errors(generator, tiny_model, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        tiny_model.tiled_decode(_latents(generator), **bad)


def test_every_group_norm_is_one_fused_op_call(generator, tiny_model, monkeypatch):
    """Every GroupNorm, with the SiLU after it where there is one, is an ada_group_norm call
    with zero modulation: the ResnetBlocks' norms and the output heads' with SiLU, the
    attention's alone."""
    calls = []

    def recording(x, scale, shift, num_groups, weight, bias, eps, act):
        calls.append((x.shape[1], act))
        assert not scale.any() and not shift.any() and scale.shape == shift.shape == x.shape[:2]
        assert num_groups == TINY.norm_num_groups and eps == 1e-6 and weight is not None and bias is not None
        return fastgen.ada_group_norm(x, scale, shift, num_groups, weight, bias, eps, act)

    monkeypatch.setattr(common, "ada_group_norm", recording)
    with torch.no_grad():
        tiny_model.encode(_images(generator))
        # Encoder: 3 levels of 1 ResnetBlock, 2 middle ResnetBlocks (2 norms each), the
        # attention's norm, the output head.
        assert calls == [(16, "silu")] * 2 + [(16, "silu"), (32, "silu")] + [(32, "silu")] * 2 + \
            [(32, "silu")] * 2 + [(32, None)] + [(32, "silu")] * 2 + [(32, "silu")]
        calls.clear()
        tiny_model.decode(_latents(generator))
    # Decoder: the middle, 3 levels of 2 ResnetBlocks, the output head.
    assert len(calls) == 2 * 2 + 1 + 3 * 2 * 2 + 1
    assert [act for _, act in calls].count(None) == 1 and calls[-1] == (16, "silu")


def test_attention_runs_on_torch_because_the_head_is_wider_than_the_op_takes():
    """The module docstring's reason for torch's attention: when the op takes 512-wide heads,
    this fails, and the model should move to it."""
    heads = {name: config.block_out_channels[-1] for name, config in autoencoder_kl.CONFIGS.items() if name != "tiny"}
    assert all(width > MAX_HEAD_DIM for width in heads.values()), (heads, MAX_HEAD_DIM)


@pytest.mark.parametrize("device, backend", NOT_EMULATED)
def test_every_backend_matches_the_reference(generator, tiny_model, backend, device):
    images = _images(generator, batch=1, height=12, width=8).to(device)
    grads = assert_backend_matches_reference(tiny_model.to(device), [images], backend, grad_rtol=1e-3)
    assert len(grads) == len(list(tiny_model.parameters()))
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name


def test_traces_as_one_graph(generator, tiny_model):
    images = _images(generator)
    compiled = torch.compile(tiny_model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), tiny_model(images))


def test_scaled_latents_shift_then_scale(generator):
    with torch.device("meta"):
        flux = autoencoder_kl.build("flux-vae")
    z = torch.randn(2, 16, 3, 5, generator=generator)
    latents = flux.to_scaled_latents(z)
    torch.testing.assert_close(latents, (z - 0.1159) * 0.3611)
    torch.testing.assert_close(flux.from_scaled_latents(latents), z)
    with torch.device("meta"):
        sd = autoencoder_kl.build("sd15-vae")
    torch.testing.assert_close(sd.from_scaled_latents(z[:, :4]), z[:, :4] / 0.18215)


def test_safetensors_round_trip(generator, tmp_path):
    """A diffusers checkpoint file loads (strict) and gives diffusers' output; our own state
    dict saved in bfloat16 comes back in bfloat16, bit for bit."""
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    reference, _ = _diffusers_pair(generator)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    loaded = autoencoder_kl.from_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", "tiny")
    assert not loaded.training
    latents = _latents(generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(latents), reference.decode(latents).sample)
    path = tmp_path / "tiny-bf16.safetensors"
    safetensors_torch.save_file(loaded.to(torch.bfloat16).state_dict(), str(path))
    again = autoencoder_kl.from_safetensors(path, TINY)
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


@pytest.mark.parametrize("name", sorted(PUBLISHED_DIFFUSERS_CONFIGS))
def test_published_configs_match_with_diffusers_layout_and_size(name):
    config = autoencoder_kl.CONFIGS[name]
    assert autoencoder_kl.AutoencoderKLConfig.from_diffusers(PUBLISHED_DIFFUSERS_CONFIGS[name]) == config
    with torch.device("meta"):
        model = autoencoder_kl.build(name)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(**PUBLISHED_DIFFUSERS_CONFIGS[name])
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    assert shapes == {name: tensor.shape for name, tensor in reference.state_dict().items()}


@pytest.mark.parametrize("name", sorted(autoencoder_kl.CONFIGS))
def test_diffusers_config_round_trip(name):
    config = autoencoder_kl.CONFIGS[name]
    assert autoencoder_kl.AutoencoderKLConfig.from_diffusers(config.to_diffusers()) == config


@pytest.mark.parametrize("key, value", [("act_fn", "relu"), ("mid_block_add_attention", False),
                                        ("latents_mean", [0.0] * 4), ("down_block_types", ["DownBlock2D"] * 4)])
def test_unsupported_diffusers_options_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        autoencoder_kl.AutoencoderKLConfig.from_diffusers(dict(PUBLISHED_DIFFUSERS_CONFIGS["sd15-vae"], **{key: value}))


def test_bad_inputs_raise(generator, tiny_model):
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        tiny_model.encode(_images(generator)[:, :2])
    with pytest.raises(ValueError, match=r"z must be \(B, 4, H, W\)"):
        tiny_model.decode(_latents(generator)[0])
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        tiny_model.tiled_decode([[0.0]])
    with pytest.raises(ValueError, match="unknown AutoencoderKL config"):
        autoencoder_kl.build("sd9-vae")
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        autoencoder_kl.AutoencoderKLConfig(block_out_channels=(16, 20), norm_num_groups=8)


def test_example_step_decodes_a_latent_of_the_given_size(generator, tiny_model):
    step = autoencoder_kl.example_step(tiny_model, batch=3, resolution=8, generator=generator)
    out = step()
    assert out.shape == (3, TINY.out_channels, 8, 8)
    assert not out.requires_grad
    torch.testing.assert_close(step(), out, rtol=0, atol=0)  # inputs are made once
    for bad in ({"batch": 0}, {"resolution": 10}, {"resolution": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            autoencoder_kl.example_step(tiny_model, **bad)


@pytest.mark.parametrize("name, side", [("sd15-vae", 512), ("flux-vae", 1024)])
def test_example_step_default_is_the_decode_at_the_training_size(name, side):
    with torch.device("meta"):
        model = autoencoder_kl.build(name)
        out = autoencoder_kl.example_step(model, batch=2)()
    assert out.shape == (2, 3, side, side)


def test_decode_benchmark_flops():
    """SD's VAE decoder costs about 1.25 T multiply-adds at 512 px (2.5 TFLOP). Everything but
    the attention grows with the pixels (16x from 512 to 2048 px); the attention's Q K^T and
    P V products, 4 N^2 C FLOPs over N = 64^2 pixels of C = 512 channels at 512 px, grow with
    their square (256x), so the counts differ from a 16x growth by 240 of those terms exactly
    when the attention is counted. Quick mode keeps the 1024 px case."""
    from fastgen.bench import models_autoencoder_kl

    work = {b.name: b.cases[0].work for b in models_autoencoder_kl.benchmarks()}
    assert list(work) == ["model.sd15-vae.decode512", "model.sd15-vae.decode1024", "model.sd15-vae.decode2048"]
    assert 2.4e12 < work["model.sd15-vae.decode512"] < 2.6e12
    attention = 4 * 4096**2 * 512
    assert work["model.sd15-vae.decode2048"] - 16 * work["model.sd15-vae.decode512"] == 240 * attention
    assert [b.name for b in models_autoencoder_kl.benchmarks(quick=True)] == ["model.sd15-vae.decode1024"]


def test_tiny_benchmark_diffusers_peer_agrees_on_cpu(tmp_path):
    """The benchmark's diffusers peer runs the same weights as fastgen's model (the Triton rows
    are left out here: the interpreter makes them slow)."""
    pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    from fastgen.bench import harness, models_autoencoder_kl

    def one_call(prepare, reps, warmup):  # timings mean nothing on CPU: one call, a nominal 1 ms
        prepare()()
        return [1.0]

    benches = models_autoencoder_kl.benchmarks(config_name="tiny", resolutions=(16, 32))
    rows, _, _ = harness.run(benches, quick=True, out_dir=tmp_path, device="cpu", impls=["diffusers"],
                             timer=one_call)
    assert {(row["name"], row["impl"]): row["status"] for row in rows} == {
        (f"model.tiny.decode{side}", impl): "ok" for side in (16, 32) for impl in ("eager", "diffusers")}
