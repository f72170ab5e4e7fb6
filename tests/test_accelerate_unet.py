"""fastgen.accelerate / restore on diffusers' UNet2DConditionModel and on single diffusers
Attention modules using every feature AttnProcessor2_0 / AttnProcessor implement, all built
from configs with random weights."""
import pytest
import torch

import fastgen
from fastgen.accelerator import accelerate, restore
from fastgen.accelerators.diffusers_attention import SoftmaxAttentionProcessor
from fastgen.ops import cross_attention as cross_attention_module
from low_precision import assert_as_accurate_as_eager, float64_copy, to_float64

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0  # noqa: E402

# The attention modules of the tiny UNet below: one transformer block on the first down level,
# the middle, and two on the last up level.
TRANSFORMERS = ["down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
                "mid_block.attentions.0"]
ATTENTION_PATHS = [f"{t}.transformer_blocks.0.{a}" for t in TRANSFORMERS for a in ("attn1", "attn2")]


def _seed_global_rng(generator):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))


@pytest.fixture
def unet(generator):
    _seed_global_rng(generator)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, attention_head_dim=2,
        norm_num_groups=8, sample_size=8,
    ).eval()


def _unet_inputs(generator, dtype=torch.float32, masked=False):
    latents = torch.randn(2, 4, 8, 6, generator=generator).to(dtype)
    context = torch.randn(2, 7, 24, generator=generator).to(dtype)
    kwargs = {}
    if masked:  # ragged prompts: the second keeps its first 4 tokens
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 4:] = 0
        kwargs["encoder_attention_mask"] = mask
    return latents, torch.tensor([3.0, 700.0]), context, kwargs


def _run_unet(model, inputs):
    latents, timestep, context, kwargs = inputs
    with torch.no_grad():
        return model(latents, timestep, context, **kwargs).sample


def _processors(model):
    return {name: type(m.processor).__name__ for name, m in model.named_modules() if isinstance(m, Attention)}


@pytest.fixture
def op_calls(monkeypatch):
    """The (q, k, v, key_padding_mask, scale) of every fastgen cross_attention call."""
    calls = []
    op = cross_attention_module.cross_attention

    def recording(q, k, v, key_padding_mask=None, scale=None):
        calls.append((q, k, v, key_padding_mask, scale))
        return op(q, k, v, key_padding_mask, scale)

    monkeypatch.setattr(cross_attention_module, "cross_attention", recording)
    return calls


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "caption mask"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_unet_equal_outputs_report_and_restore(unet, generator, backend, masked, op_calls):
    inputs = _unet_inputs(generator, masked=masked)
    before = _run_unet(unet, inputs)
    originals = _processors(unet)
    assert set(originals.values()) == {"AttnProcessor2_0"}

    report = accelerate(unet, backend=backend)
    attention_rows = [(r.path, r.original, r.replacement, r.op) for r in report.replaced if r.op == "cross_attention"]
    assert sorted(attention_rows) == sorted(
        (path, "AttnProcessor2_0", "SoftmaxAttentionProcessor", "cross_attention") for path in ATTENTION_PATHS)
    assert [r for r in report.left if r.module == "Attention"] == []
    assert (f"replaced {ATTENTION_PATHS[0]}: AttnProcessor2_0 -> SoftmaxAttentionProcessor [cross_attention]"
            in str(report))

    torch.testing.assert_close(_run_unet(unet, inputs), before)
    assert len(op_calls) == len(ATTENTION_PATHS)
    masks = [call[3] for call in op_calls]
    if masked:  # the caption mask reaches the cross-attentions as a key padding mask; none on self-attention
        expected = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
        assert all(torch.equal(m, expected) for m in masks[1::2])
        assert all(m is None for m in masks[0::2])
    else:
        assert masks == [None] * len(op_calls)

    assert restore(unet) >= len(ATTENTION_PATHS)
    assert _processors(unet) == originals
    assert torch.equal(_run_unet(unet, inputs), before)


def test_unet_with_the_classic_processor(unet, generator):
    unet.set_attn_processor(AttnProcessor())
    inputs = _unet_inputs(generator, masked=True)
    before = _run_unet(unet, inputs)
    report = accelerate(unet, ops=["cross_attention"])
    assert {r.original for r in report.replaced} == {"AttnProcessor"}
    assert len(report.replaced) == len(ATTENTION_PATHS)
    torch.testing.assert_close(_run_unet(unet, inputs), before)


def test_unet_bfloat16_is_as_accurate_as_diffusers(unet, generator):
    inputs = _unet_inputs(generator, torch.bfloat16, masked=True)
    exact = _run_unet(float64_copy(unet), to_float64(inputs))
    unet.to(torch.bfloat16)
    eager = _run_unet(unet, inputs)
    accelerate(unet, backend="triton")
    assert_as_accurate_as_eager(_run_unet(unet, inputs), eager, exact)


def test_unet_left_alone_with_unsupported_processor(unet):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    unet.set_attn_processor(SlicedAttnProcessor(slice_size=1))
    report = accelerate(unet, ops=["cross_attention"])
    assert report.replaced == []
    attention_left = [r for r in report.left if r.module == "Attention"]
    assert sorted(r.path for r in attention_left) == sorted(ATTENTION_PATHS)
    assert {r.reason for r in attention_left} == {"attention processor SlicedAttnProcessor has no fastgen replacement yet"}
    assert "left     down_blocks.0" in str(report)


def _full_featured_attention(processor, cross: bool):
    """A self/cross-attention over a (B, C, H, W) map with every option the processors apply."""
    return Attention(
        query_dim=32, cross_attention_dim=12 if cross else None, heads=2, dim_head=16, bias=True, norm_num_groups=4, spatial_norm_dim=3,
        cross_attention_norm="layer_norm", qk_norm="layer_norm", residual_connection=True,
        rescale_output_factor=1.7, processor=processor,
    ).eval()


@pytest.mark.parametrize("processor", [AttnProcessor2_0, AttnProcessor])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_every_processor_feature_is_reproduced(generator, processor, cross, op_calls):
    _seed_global_rng(generator)
    attention = _full_featured_attention(processor(), cross)
    image = torch.randn(2, 32, 5, 3, generator=generator)
    zq = torch.randn(2, 3, 2, 2, generator=generator)  # the spatial norm's conditioning map
    context = torch.randn(2, 6, 12, generator=generator) if cross else None
    with torch.no_grad():
        before = attention(image, context, temb=zq)
        accelerate(attention, backend="triton")
        after = attention(image, context, temb=zq)
    torch.testing.assert_close(after, before)
    (q, k, v, mask, scale), = op_calls
    assert k.shape == (2, 6 if cross else 15, 2, 16)
    # AttnProcessor2_0 ignores attn.scale (as the SDPA it calls does); AttnProcessor applies it.
    assert scale == (attention.scale if processor is AttnProcessor else None)


def test_module_scale_of_the_classic_processor(generator):
    _seed_global_rng(generator)
    attention = Attention(query_dim=16, heads=2, dim_head=8, scale_qk=False, processor=AttnProcessor())
    tokens = torch.randn(2, 9, 16, generator=generator)
    with torch.no_grad():
        before = attention(tokens)
        accelerate(attention)
        torch.testing.assert_close(attention(tokens), before)


def test_masks_that_are_not_key_padding_run_the_original_processor(generator, op_calls):
    _seed_global_rng(generator)
    attention = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    tokens, context = torch.randn(2, 9, 16, generator=generator), torch.randn(2, 6, 12, generator=generator)
    soft_bias = torch.randn(2, 1, 6, generator=generator)  # a real-valued bias, not a mask
    per_query = torch.where(torch.rand(2, 9, 6, generator=generator) < 0.5, -10000.0, 0.0)
    per_query[..., 0] = 0.0
    key_mask = torch.zeros(2, 1, 6)
    key_mask[0, :, 3:] = -10000.0
    with torch.no_grad():
        expected = [attention(tokens, context, bias) for bias in (soft_bias, per_query, key_mask)]
        accelerate(attention)
        got = [attention(tokens, context, bias) for bias in (soft_bias, per_query, key_mask)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert len(op_calls) == 1  # only the key mask went to the op
    assert torch.equal(op_calls[0][3], torch.tensor([[True] * 3 + [False] * 3, [True] * 6]))


def test_bool_masks_are_taken_as_they_are(generator, op_calls):
    _seed_global_rng(generator)
    attention = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    tokens, context = torch.randn(2, 9, 16, generator=generator), torch.randn(2, 6, 12, generator=generator)
    keep = torch.tensor([[True, True, False, True, False, False], [True] * 6])
    with torch.no_grad():
        before = attention(tokens, context, keep[:, None, :])
        accelerate(attention)
        torch.testing.assert_close(attention(tokens, context, keep[:, None, :]), before)
    assert torch.equal(op_calls[0][3], keep)


def test_head_dims_above_the_limit_are_left_alone():
    attention = Attention(query_dim=32, heads=1, dim_head=512)
    report = accelerate(attention)
    assert report.replaced == []
    assert report.left[0].reason == "head dim 512 is above fastgen::cross_attention's limit of 256"
    assert type(attention.processor).__name__ == "AttnProcessor2_0"


def test_accelerated_attention_traces_as_one_graph(generator):
    """With a key mask too: under torch.compile the bias is not inspected (no graph break)."""
    _seed_global_rng(generator)
    attention = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    tokens, context = torch.randn(2, 9, 16, generator=generator), torch.randn(2, 6, 12, generator=generator)
    key_mask = torch.zeros(2, 1, 6)
    key_mask[1, :, 4:] = -10000.0
    with torch.no_grad():
        before = attention(tokens, context, key_mask)
        accelerate(attention)
        assert isinstance(attention.processor, SoftmaxAttentionProcessor)
        compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
        with fastgen.use_backend("triton"):
            torch.testing.assert_close(compiled(tokens, context, key_mask), before)


def test_autoencoder_kl_mid_block_attention(generator):
    """AutoencoderKL's mid-block attention runs on (B, C, H, W) maps with group_norm and a
    residual connection: processor features the UNet does not use (rescale_output_factor is
    covered by test_every_processor_feature_is_reproduced)."""
    _seed_global_rng(generator)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        latent_channels=4, norm_num_groups=8, sample_size=8,
    ).eval()
    attention = vae.encoder.mid_block.attentions[0]
    assert attention.group_norm is not None and attention.residual_connection
    image = torch.randn(2, 3, 8, 6, generator=generator)
    with torch.no_grad():
        before = vae(image).sample
        report = accelerate(vae, ops=["cross_attention"])
        assert sorted(r.path for r in report.replaced) == ["decoder.mid_block.attentions.0",
                                                          "encoder.mid_block.attentions.0"]
        torch.testing.assert_close(vae(image).sample, before)


def test_a_mask_is_checked_once_while_it_is_unchanged():
    """The bias check syncs with the device, so it runs once per mask tensor, not per layer:
    a write that bypasses the version counter goes unseen (the verdict is cached); an in-place
    write through torch is seen; inference tensors are checked every time."""
    from fastgen.accelerators.diffusers_attention import _BiasVerdict

    verdict = _BiasVerdict()
    bias = torch.tensor([[[0.0, 0.0, -10000.0]]])
    assert verdict(bias)
    bias.data[0, 0, 0] = 0.5
    assert verdict(bias)  # cached
    bias.add_(0.0)
    assert not verdict(bias)  # version changed: checked again
    assert verdict(torch.tensor([[[0.0, -10000.0]]]))  # another tensor
    with torch.inference_mode():
        frozen = torch.tensor([[[0.0, -10000.0]]])
        assert verdict(frozen)
        frozen[0, 0, 0] = 0.5
        assert not verdict(frozen)
