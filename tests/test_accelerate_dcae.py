"""fastgen.accelerate / restore on diffusers' AutoencoderDC built from tiny configs with random
weights: shortcuts, channel RMSNorms and multi-scale linear attention through fastgen ops."""
import dataclasses

import pytest
import torch

from fastgen.accelerator import accelerate, restore
# Importing the module registers the DC-AE accelerators.
from fastgen.accelerators.diffusers_dcae import MultiscaleLinearAttentionProcessor
from fastgen.models import dcae
from low_precision import assert_as_accurate_as_eager, float64_copy

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")

TINY = dcae.CONFIGS["tiny"]
# Strided-conv / interpolate resampling and block-free first stages: the blocks at the image
# side then have no shortcut.
TINY_SANA_STYLE = dataclasses.replace(
    TINY, downsample_block_type="conv", upsample_block_type="interpolate",
    encoder_layers_per_block=(0, 1, 2), decoder_layers_per_block=(0, 2, 1),
)
OPS = ("pixel_unshuffle_channel_avg", "channel_dup_pixel_shuffle", "trms2d", "linear_attention")


def _autoencoder(config, generator) -> torch.nn.Module:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = diffusers.AutoencoderDC(**config.to_diffusers())
    with torch.no_grad():  # norms start as the identity; give them weight, bias and statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
            for vector in (p for p in module.parameters(recurse=False) if p.ndim == 1):
                vector.normal_(generator=generator)
    return model.eval()


@pytest.fixture
def autoencoder(generator):
    return _autoencoder(TINY, generator)


def _encode_decode(model, images, latents):
    with torch.no_grad():
        return model.encode(images).latent, model.decode(latents).sample


def _inputs(generator, side=16, dtype=torch.float32):
    images = torch.randn(2, 3, side, side, generator=generator).to(dtype)
    latents = torch.randn(2, TINY.latent_channels, side // 4, side // 4, generator=generator).to(dtype)
    return images, latents


def _instance_overrides(model):
    """What accelerate may install on instances: forwards and attention processors."""
    return [(name, "forward" in vars(module), type(getattr(module, "processor", None)).__name__)
            for name, module in model.named_modules()]


@pytest.mark.parametrize("config", [TINY, TINY_SANA_STYLE], ids=["tiny", "tiny-sana-style"])
def test_equal_outputs_and_restore(generator, config):
    autoencoder = _autoencoder(config, generator)
    images, latents = _inputs(generator, side=32)  # 32 px: every attention map has more pixels than D
    before = _encode_decode(autoencoder, images, latents)
    untouched = _instance_overrides(autoencoder)

    report = accelerate(autoencoder, backend="reference")
    assert {r.op for r in report.replaced} == set(OPS)
    torch.testing.assert_close(_encode_decode(autoencoder, images, latents), before)

    assert restore(autoencoder) == len(report.replaced)
    assert _instance_overrides(autoencoder) == untouched
    for got, expected in zip(_encode_decode(autoencoder, images, latents), before):
        assert torch.equal(got, expected)


def test_report_lists_every_part_and_what_was_left(autoencoder):
    report = accelerate(autoencoder)
    replaced = {(r.path, r.op) for r in report.replaced}
    shortcuts = {("encoder", "pixel_unshuffle_channel_avg"), ("encoder.down_blocks.0.1", "pixel_unshuffle_channel_avg"),
                 ("encoder.down_blocks.1.1", "pixel_unshuffle_channel_avg"), ("decoder", "channel_dup_pixel_shuffle"),
                 ("decoder.up_blocks.0.0", "channel_dup_pixel_shuffle"),
                 ("decoder.up_blocks.1.0", "channel_dup_pixel_shuffle")}
    attentions = ["encoder.down_blocks.1.0.attn", "encoder.down_blocks.2.0.attn", "decoder.up_blocks.1.1.attn",
                  "decoder.up_blocks.2.0.attn"]
    norms = {(path, "trms2d") for path in attentions} | {(path[:-len("attn")] + "conv_out", "trms2d")
                                                         for path in attentions}
    norms |= {("encoder.down_blocks.0.0", "trms2d"), ("decoder", "trms2d")}
    assert replaced == shortcuts | norms | {(path, "linear_attention") for path in attentions}
    # The decoder's first stage is a BatchNorm ResBlock.
    assert [(r.path, r.reason) for r in report.left] == [
        ("decoder.up_blocks.0.1", "norm_type='batch_norm': only RMSNorm has a fastgen op")]
    assert isinstance(autoencoder.decoder.up_blocks[2][0].attn.processor, MultiscaleLinearAttentionProcessor)


def test_blocks_without_shortcut_are_left_with_the_reason(generator):
    autoencoder = _autoencoder(TINY_SANA_STYLE, generator)
    left = {r.path: r.reason for r in accelerate(autoencoder).left}
    assert left["encoder.conv_in"] == left["decoder.conv_out"] == "shortcut=False: no shortcut to fuse"


def test_accelerated_model_calls_the_ops(autoencoder, generator, monkeypatch):
    calls = []
    for name in OPS:
        op = getattr(dcae, name)
        monkeypatch.setattr(dcae, name, lambda *args, _op=op, _name=name, **kwargs: calls.append(_name) or
                            _op(*args, **kwargs))
    images, latents = _inputs(generator)
    _encode_decode(autoencoder, images, latents)
    assert calls == []
    accelerate(autoencoder)
    _encode_decode(autoencoder, images, latents)
    assert {name: calls.count(name) for name in OPS} == {
        "pixel_unshuffle_channel_avg": 3, "channel_dup_pixel_shuffle": 3, "trms2d": 10, "linear_attention": 4}


def test_triton_backend_under_the_interpreter(autoencoder, generator):
    images, latents = _inputs(generator)  # 16 px: the deepest attention maps have 16 pixels
    before = _encode_decode(autoencoder, images, latents)
    accelerate(autoencoder, backend="triton")
    torch.testing.assert_close(_encode_decode(autoencoder, images, latents), before, rtol=1e-4, atol=1e-4)


def test_bfloat16_is_as_accurate_as_diffusers(autoencoder, generator):
    """diffusers rounds each RMSNorm to bfloat16 before its affine, trms2d once after it: on the
    input each norm meets in the accelerated bfloat16 model, its output is as accurate as
    diffusers' RMSNorm on that input, both against the float64 norm. Compared norm by norm, not
    at the model's outputs: there two correct bfloat16 evaluations can differ by far more than
    either's rounding (in one drawn model, accelerating the norms alone, each the more accurate,
    left the latent off by 0.24 where eager's was off by 0.06: its ReLU linear attention turned
    a 0.01 change of its input into 1.1 of its output)."""
    images, latents = _inputs(generator, dtype=torch.bfloat16)
    autoencoder.to(torch.bfloat16)
    report = accelerate(autoencoder)
    met = []
    for module in autoencoder.modules():
        if type(module).__name__ == "RMSNorm":
            module.register_forward_hook(lambda norm, inputs, output: met.append((norm, inputs[0], output)))
    _encode_decode(autoencoder, images, latents)
    # Every norm the report replaced runs, and each norm that runs was replaced.
    assert len({id(norm) for norm, _, _ in met}) == len([r for r in report.replaced if r.op == "trms2d"]) >= 6
    assert all("forward" in vars(norm) for norm, _, _ in met)
    with torch.no_grad():
        for norm, x, got in met:
            eager = type(norm).forward(norm, x)  # diffusers' own forward, past the installed one
            exact = type(norm).forward(float64_copy(norm), x.double())
            assert_as_accurate_as_eager(got, eager, exact)


def test_ops_filter_leaves_the_rest_with_the_reason(autoencoder):
    report = accelerate(autoencoder, ops=["trms2d"])
    assert {r.op for r in report.replaced} == {"trms2d"}
    reasons = {r.reason for r in report.left}
    assert {f"op {op} was not selected (ops=...)" for op in OPS if op != "trms2d"} <= reasons


def test_sana_transformer_is_not_touched(generator):
    """SANA's transformer also has GLUMBConv blocks (without a norm): no DC-AE rows for them."""
    transformer = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
        patch_size=2, sample_size=8,
    )
    report = accelerate(transformer, ops=OPS)
    assert not [row.path for row in report.replaced + report.left if row.path.endswith(".ff")]


def test_accelerated_decoder_compiles_as_one_graph(autoencoder, generator):
    """The installed forwards and the processor trace with fullgraph=True (no graph breaks)."""
    images, latents = _inputs(generator)
    before = _encode_decode(autoencoder, images, latents)
    accelerate(autoencoder)
    compiled = torch.compile(_encode_decode, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(autoencoder, images, latents), before)
