"""The DC-AE reference model (fastgen.models.dcae): equality with diffusers' AutoencoderDC, the
published configs, backends, checkpoint loading, the benchmark step and input errors."""
import dataclasses

import pytest
import torch

import fastgen
from fastgen.models import dcae
from model_checks import EVERY_BACKEND, seed_global_rng

TINY = dcae.CONFIGS["tiny"]
# The SANA model's kinds of resampling (strided conv down, nearest + conv up) and a first stage
# without blocks (the in-1.0 models' layout), which the plain tiny config does not have.
TINY_SANA_STYLE = dataclasses.replace(
    TINY, downsample_block_type="conv", upsample_block_type="interpolate",
    encoder_layers_per_block=(0, 1, 2), decoder_layers_per_block=(0, 2, 1),
)


def _randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Norms start as the identity (weight 1, bias 0, unit running variance): draw them so that a
    swapped weight and bias, or a skipped norm, changes the output."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("norm.weight", "norm_out.weight", "running_var")):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith(("norm.bias", "norm_out.bias", "running_mean")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)


@pytest.fixture
def tiny_model(generator):
    seed_global_rng(generator)
    model = dcae.build("tiny").eval()
    _randomize_norms(model, generator)
    return model


def _images(generator, batch=2, side=16, dtype=torch.float32):
    return torch.randn(batch, TINY.in_channels, side, side, generator=generator, dtype=dtype)


@pytest.mark.parametrize("config", [TINY, TINY_SANA_STYLE], ids=["tiny", "tiny-sana-style"])
def test_matches_diffusers(generator, config):
    """The same weights give the same encode and decode as diffusers' AutoencoderDC. At 16 px
    the deepest maps have 16 pixels, no more than the head dim: diffusers then runs its N x N
    form of the attention, which must agree with the linear form used here."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    seed_global_rng(generator)
    reference = diffusers.AutoencoderDC(**config.to_diffusers()).eval()
    _randomize_norms(reference, generator)
    model = dcae.build(dcae.DCAEConfig.from_diffusers(dict(reference.config))).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad():
        for side in (32, 16):
            images = _images(generator, side=side)
            torch.testing.assert_close(model.encode(images), reference.encode(images).latent)
            latents = torch.randn(2, config.latent_channels, side // 4, side // 4, generator=generator)
            torch.testing.assert_close(model.decode(latents), reference.decode(latents).sample)


def _reconstruction_step(model, images):
    model.zero_grad()
    out = model(images)
    out.square().mean().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_training_step_reaches_every_parameter(generator, tiny_model):
    images = _images(generator)
    _, grads = _reconstruction_step(tiny_model.train(), images)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


@pytest.mark.parametrize("device, backend", EVERY_BACKEND)
def test_every_backend_matches_the_reference(generator, tiny_model, backend, device):
    images = _images(generator, batch=1).to(device)
    model = tiny_model.to(device)
    try:
        with fastgen.use_backend(backend):
            out, grads = _reconstruction_step(model, images)
    except fastgen.BackendUnavailable as reason:
        pytest.skip(f"backend {backend!r} cannot run here: {reason}")
    with fastgen.use_backend("reference"):
        expected, expected_grads = _reconstruction_step(model, images)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_every_kernel_covered_part_goes_through_its_op(generator, tiny_model, monkeypatch):
    """Each shortcut and its residual add is one op call, every RMSNorm a trms2d call, and
    the attention hands the op views of the fused projection (no copies)."""
    calls = {}

    def recording(name, op):
        def record(*args, **kwargs):
            calls.setdefault(name, []).append(args)
            return op(*args, **kwargs)
        return record

    for name in ("pixel_unshuffle_channel_avg", "channel_dup_pixel_shuffle", "linear_attention", "trms2d"):
        monkeypatch.setattr(dcae, name, recording(name, getattr(dcae, name)))
    tiny_model(_images(generator))
    # Two down blocks and the encoder's output; two up blocks and the decoder's input.
    assert [args[1:3] for args in calls["pixel_unshuffle_channel_avg"]] == [(2, 32), (2, 64), (1, TINY.latent_channels)]
    assert [args[1:3] for args in calls["channel_dup_pixel_shuffle"]] == [(1, 64), (2, 32), (2, 16)]
    # Encoder: 2 EfficientViT blocks (attention + GLUMBConv norms) and 1 RMS ResBlock; decoder:
    # 2 EfficientViT blocks and norm_out (its ResBlock stage uses BatchNorm).
    assert len(calls["trms2d"]) == 2 * 2 + 1 + 2 * 2 + 1
    # Heads = channels / 16 per scale: encoder stages 1 and 2 (2 scales each), then the decoder
    # from its deepest stage (64 channels, 1 scale) to stage 1 (32 channels, 2 scales).
    assert [args[0].shape[2] for args in calls["linear_attention"]] == [4, 8, 4, 4]
    for q, k, v, eps in calls["linear_attention"]:
        assert all(t._base is not None for t in (q, k, v)), "expected views of the projection, not copies"
        assert eps == 1e-15


def test_traces_as_one_graph(generator, tiny_model):
    images = _images(generator)
    compiled = torch.compile(tiny_model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), tiny_model(images))


def test_example_step_decodes_a_latent_of_the_given_size(generator, tiny_model):
    step = dcae.example_step(tiny_model, batch=3, resolution=8, generator=generator)
    out = step()
    assert out.shape == (3, TINY.in_channels, 8, 8)
    assert not out.requires_grad
    torch.testing.assert_close(step(), out, rtol=0, atol=0)  # inputs are made once


def test_example_step_default_is_the_sana_decode_at_2048_px():
    with torch.device("meta"):
        model = dcae.build("f32c32")
    with torch.device("meta"):
        out = dcae.example_step(model, batch=2)()
    assert out.shape == (2, 3, 2048, 2048)


def test_bad_inputs_raise(generator, tiny_model):
    images = _images(generator)
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        tiny_model.encode(images[:, :2])
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny_model.encode(images[..., :14])
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        tiny_model.decode(images.numpy())
    with pytest.raises(ValueError, match=r"z must be \(B, 8, H, W\)"):
        tiny_model.decode(images)
    with pytest.raises(ValueError, match="unknown DC-AE config"):
        dcae.build("f16c4")
    with pytest.raises(ValueError, match="decoder_norm_types must have one entry per stage"):
        dataclasses.replace(TINY, decoder_norm_types=("rms_norm",))
    with pytest.raises(ValueError, match="encoder_block_types may hold"):
        dataclasses.replace(TINY, encoder_block_types=("ResBlock", "ConvNeXt", "ResBlock"))
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 4"):
        dcae.example_step(tiny_model, resolution=10)
    with pytest.raises(ValueError, match="batch must be a positive int"):
        dcae.example_step(tiny_model, batch=0)


def test_safetensors_round_trip(generator, tiny_model, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    path = tmp_path / "dcae-tiny.safetensors"
    safetensors_torch.save_file(tiny_model.state_dict(), str(path))
    loaded = dcae.from_safetensors(path, "tiny")
    assert not loaded.training  # BatchNorm stages must use the loaded running statistics
    for name, tensor in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    images = _images(generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), tiny_model(images), rtol=0, atol=0)


def test_safetensors_keeps_the_checkpoint_dtype(tiny_model, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    path = tmp_path / "dcae-tiny-bf16.safetensors"
    safetensors_torch.save_file(tiny_model.to(torch.bfloat16).state_dict(), str(path))
    assert {p.dtype for p in dcae.from_safetensors(path, TINY).parameters()} == {torch.bfloat16}


_SANA_STAGES = ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3
_IN_STAGES = ["ResBlock"] * 3 + ["EfficientViTBlock"] * 4
# config.json of the diffusers checkpoints, as diffusers' scripts/convert_dcae_to_diffusers.py
# writes them (the fields it sets; the rest are AutoencoderDC's defaults).
PUBLISHED_DIFFUSERS_CONFIGS = {
    "f32c32": {  # mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers
        "_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
        "encoder_block_types": _SANA_STAGES, "decoder_block_types": _SANA_STAGES,
        "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
        "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
        "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
        "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
        "downsample_block_type": "conv", "upsample_block_type": "interpolate",
        "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "scaling_factor": 0.41407,
    },
    "f64c128": {  # mit-han-lab/dc-ae-f64c128-in-1.0-diffusers
        "_class_name": "AutoencoderDC", "in_channels": 3, "latent_channels": 128, "attention_head_dim": 32,
        "encoder_block_types": _IN_STAGES, "decoder_block_types": _IN_STAGES,
        "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024, 2048],
        "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024, 2048],
        "encoder_layers_per_block": [0, 4, 8, 2, 2, 2, 2], "decoder_layers_per_block": [0, 5, 10, 2, 2, 2, 2],
        "encoder_qkv_multiscales": [[]] * 7, "decoder_qkv_multiscales": [[]] * 7,
        "decoder_norm_types": ["batch_norm"] * 3 + ["rms_norm"] * 4,
        "decoder_act_fns": ["relu"] * 3 + ["silu"] * 4,
    },
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_DIFFUSERS_CONFIGS))
def test_configs_match_the_published_ones(name):
    assert dcae.DCAEConfig.from_diffusers(PUBLISHED_DIFFUSERS_CONFIGS[name]) == dcae.CONFIGS[name]


@pytest.mark.parametrize("name, parameters", [("f32c32", 312_250_275), ("f64c128", 676_896_140)])
def test_parameter_counts_and_names_match_diffusers(name, parameters):
    """Built on meta from the published configs: the same parameter count (312.25 M for the SANA
    autoencoder, 676.90 M for f64c128) and the same state-dict keys and shapes."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    published = {key: value for key, value in PUBLISHED_DIFFUSERS_CONFIGS[name].items() if key != "_class_name"}
    with torch.device("meta"):
        model = dcae.build(name)
        reference = diffusers.AutoencoderDC(**published)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert sum(p.numel() for p in reference.parameters()) == parameters
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
