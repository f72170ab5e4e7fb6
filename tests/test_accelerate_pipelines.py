"""fastgen.accelerate on whole diffusers pipelines, run as a user runs them. FluxPipeline,
StableDiffusion3Pipeline and SanaPipeline, each built tiny and offline (random weights; real text
encoders from small configs, tokenizers from a few-token vocabulary), sample a prompt for two
steps with the same seed before and after acceleration. The images agree to float32 rounding,
fastgen's Triton kernels (under the interpreter here) ran as often as the replaced transformer
and VAE decoder modules call them, the report names those modules, and restore() gives the
images back bit for bit."""
import collections
from dataclasses import dataclass

import pytest
import torch

import fastgen
from fastgen.ops.cross_attention import CROSS_ATTENTION_FORWARD
from fastgen.ops.registry import OPS

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
transformers = pytest.importorskip("transformers", minversion="5",
                                   reason="transformers is not installed (the test extra installs it on Python 3.11+)")

PROMPT = "a red fox"
STEPS = 2
# CLIP's and T5's token budget: "a red fox" is 5 CLIP tokens and 4 T5 tokens; the joint
# sequences of FLUX.1 and SD3 stay within one 16-row tile of the attention kernel.
TEXT_TOKENS = 6
WORDS = ("a", "red", "fox", "on", "the", "moon")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
GATED_RESIDUAL = "gated_residual_ada_layer_norm"
JOINT_ATTENTION = "qk_norm_rope, cross_attention"


@dataclass
class Case:
    pipeline: object
    arguments: dict  # of the pipeline's call, besides the prompt, the steps and the generator
    replaced: list  # (path, op) that the report must list
    calls: dict  # Triton kernel runs per op in one sampling


@pytest.fixture
def triton_calls(kernel_runs):
    """name -> the runs of each op's Triton kernel (conftest's kernel_runs), by the name the op
    is called as."""
    return {op.called_as or op.name: kernel_runs(op)
            for op in [*OPS.values(), CROSS_ATTENTION_FORWARD] if "triton" in op.implementations}


def _seed_weights(generator):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))


def _clip_tokenizer():
    """CLIP's byte-level BPE over single letters, with the merges that make each of WORDS one
    token: "a red fox" is <|startoftext|> a red fox <|endoftext|>."""
    vocabulary = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in LETTERS:
        vocabulary[letter] = len(vocabulary)
        vocabulary[letter + "</w>"] = len(vocabulary)
    merges = []
    for word in WORDS:
        merged, *rest = list(word[:-1]) + [word[-1] + "</w>"]
        for symbol in rest:
            merges.append((merged, symbol))
            merged += symbol
            vocabulary.setdefault(merged, len(vocabulary))
    return transformers.CLIPTokenizer(vocab=vocabulary, merges=merges, model_max_length=TEXT_TOKENS)


def _clip_text_encoder(tokenizer, with_projection: bool):
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=TEXT_TOKENS, projection_dim=12, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    model = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return model(config).eval()


def _t5_tokenizer():
    """T5's unigram model over WORDS: another word is <unk>."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    return transformers.T5Tokenizer(vocab=pieces + [("\u2581" + word, -1.0) for word in WORDS], extra_ids=0)


def _t5_text_encoder(tokenizer, width: int):
    config = transformers.T5Config(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0,
    )
    return transformers.T5EncoderModel(config).eval()


def _autoencoder_kl(latent_channels: int):
    """Two stages (4x4 latents for 8x8 images) and a mid-block attention; shifted and scaled
    latents as FLUX.1's and SD3's VAEs have them."""
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=8, scaling_factor=1.5, shift_factor=0.06,
    ).eval()


def _kl_decoder_replacements() -> list:
    """(path, op) of _autoencoder_kl's decoder, the part of the VAE that text-to-image runs: the
    resnets' and the output head's GroupNorm+SiLU, the mid-block's attention."""
    resnets = [f"vae.decoder.mid_block.resnets.{i}" for i in range(2)]
    resnets += [f"vae.decoder.up_blocks.{i}.resnets.{j}" for i in range(2) for j in range(2)]
    return ([(path, "ada_group_norm") for path in resnets + ["vae.decoder"]]
            + [("vae.decoder.mid_block.attentions.0", "cross_attention")])


# Per decoded image: two group norms in each of the 6 resnets and the output head's; the
# mid-block's attention.
KL_DECODER_CALLS = collections.Counter({"ada_group_norm": 2 * 6 + 1, "cross_attention": 1})


def _flux(generator) -> Case:
    _seed_weights(generator)
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    pipeline = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=_autoencoder_kl(latent_channels=2),
        text_encoder=_clip_text_encoder(clip_tokenizer, with_projection=False), tokenizer=clip_tokenizer,
        text_encoder_2=_t5_text_encoder(t5_tokenizer, width=24), tokenizer_2=t5_tokenizer,
        transformer=diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ).eval(),
    )
    attentions = ["transformer.transformer_blocks.0.attn", "transformer.single_transformer_blocks.0.attn"]
    # Per step: the joint block's attention (qk_norm_rope on each stream) and the single block's;
    # the joint block's gated residual and norm2 on each stream.
    calls = KL_DECODER_CALLS + collections.Counter(qk_norm_rope=STEPS * (2 + 1), cross_attention=STEPS * 2,
                                                   gated_residual_ada_layer_norm=STEPS * 2)
    return Case(pipeline, dict(height=8, width=8, guidance_scale=3.5, max_sequence_length=TEXT_TOKENS),
                [(path, JOINT_ATTENTION) for path in attentions] + _kl_decoder_replacements()
                + [("transformer.transformer_blocks.0", GATED_RESIDUAL)], dict(calls))


def _sd3(generator) -> Case:
    _seed_weights(generator)
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    pipeline = diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_autoencoder_kl(latent_channels=4),
        text_encoder=_clip_text_encoder(clip_tokenizer, with_projection=True), tokenizer=clip_tokenizer,
        text_encoder_2=_clip_text_encoder(clip_tokenizer, with_projection=True), tokenizer_2=clip_tokenizer,
        text_encoder_3=_t5_text_encoder(t5_tokenizer, width=40), tokenizer_3=t5_tokenizer,
        # The two CLIP encoders' hidden states (16 wide each), zero-padded to T5's width, precede
        # T5's tokens; their projections (12 each) make the pooled projection.
        transformer=diffusers.SD3Transformer2DModel(
            sample_size=4, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=40, caption_projection_dim=32, pooled_projection_dim=24, out_channels=4,
            pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,),
        ).eval(),
    )
    attentions = ["transformer.transformer_blocks.0.attn", "transformer.transformer_blocks.0.attn2",
                  "transformer.transformer_blocks.1.attn"]
    # Classifier-free guidance runs both halves as one batch: per step, the two joint attentions
    # (qk_norm_rope on each stream) and the dual-attention layer's image-only one; the gated
    # residual and norm2 of both streams in the first block, of the image in the last (its text
    # stream ends at the attention).
    calls = KL_DECODER_CALLS + collections.Counter(qk_norm_rope=STEPS * (2 * 2 + 1), cross_attention=STEPS * 3,
                                                   gated_residual_ada_layer_norm=STEPS * (2 + 1))
    return Case(pipeline, dict(height=8, width=8, guidance_scale=5.0, max_sequence_length=TEXT_TOKENS),
                [(path, JOINT_ATTENTION) for path in attentions] + _kl_decoder_replacements()
                + [(f"transformer.transformer_blocks.{i}", GATED_RESIDUAL) for i in range(2)], dict(calls))


def _gemma_tokenizer():
    """Gemma's BPE over single letters and the word separator, <bos> first."""
    vocabulary = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for letter in LETTERS:
        vocabulary[letter] = len(vocabulary)
    return transformers.GemmaTokenizer(vocab=vocabulary, merges=[], add_bos_token=True)


def _autoencoder_dc():
    """SANA's DC-AE kinds in four stages (4x4 latents for 32x32 images, the smallest SANA
    samples): three ResBlock stages, then an EfficientViT one with multi-scale linear attention;
    strided-conv down- and interpolating upsampling with the channel-averaging and -duplicating
    shortcuts."""
    block_types = ("ResBlock",) * 3 + ("EfficientViTBlock",)
    multiscales = ((),) * 3 + ((5,),)
    return diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=16,
        encoder_block_types=block_types, decoder_block_types=block_types,
        encoder_block_out_channels=(8, 8, 16, 32), decoder_block_out_channels=(8, 8, 16, 32),
        encoder_layers_per_block=(1,) * 4, decoder_layers_per_block=(1,) * 4,
        encoder_qkv_multiscales=multiscales, decoder_qkv_multiscales=multiscales,
        downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=0.4,
    ).eval()


def _dc_decoder_replacements() -> list:
    """(path, op) of _autoencoder_dc's decoder: the input and the upsampling shortcuts, the
    channel RMSNorms, the EfficientViT stage's linear attention."""
    entries = [("vae.decoder", "channel_dup_pixel_shuffle"), ("vae.decoder", "trms2d")]
    for stage in range(3):
        entries += [(f"vae.decoder.up_blocks.{stage}.0", "channel_dup_pixel_shuffle"),
                    (f"vae.decoder.up_blocks.{stage}.1", "trms2d")]
    attention_stage = "vae.decoder.up_blocks.3.0"
    return entries + [(f"{attention_stage}.attn", "trms2d"), (f"{attention_stage}.attn", "linear_attention"),
                      (f"{attention_stage}.conv_out", "trms2d")]


# Per decoded image: the input shortcut and three upsampling ones; the output head's RMSNorm,
# one in each ResBlock stage and two in the EfficientViT one; its linear attention.
DC_DECODER_CALLS = collections.Counter({"channel_dup_pixel_shuffle": 1 + 3, "trms2d": 1 + 3 + 2, "linear_attention": 1})


def _sana(generator) -> Case:
    _seed_weights(generator)
    tokenizer = _gemma_tokenizer()
    text_encoder = transformers.Gemma2Model(transformers.Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=12, pad_token_id=0,
    )).eval()
    pipeline = diffusers.SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=_autoencoder_dc(),
        scheduler=diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                        flow_shift=3.0),
        transformer=diffusers.SanaTransformer2DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
            patch_size=1, sample_size=4,
        ).eval(),
    )
    replaced = []
    for block in ("transformer.transformer_blocks.0", "transformer.transformer_blocks.1"):
        replaced += [(block, "ada_layer_norm"), (f"{block}.attn1", "linear_attention"),
                     (f"{block}.attn2", "cross_attention")]
    replaced += [("transformer.norm_out", "ada_layer_norm")] + _dc_decoder_replacements()
    # Per step: each block's two modulated norms, self- and cross-attention; the output head's norm.
    calls = DC_DECODER_CALLS + collections.Counter(ada_layer_norm=STEPS * (2 * 2 + 1), linear_attention=STEPS * 2,
                                                   cross_attention=STEPS * 2)
    # "a red fox" is 10 tokens with <bos>, the empty negative prompt 1: both captions are padded
    # to 12, so the cross-attention masks keys in both halves of the guided batch.
    arguments = dict(height=32, width=32, guidance_scale=4.5, max_sequence_length=12, complex_human_instruction=None,
                     use_resolution_binning=False)
    return Case(pipeline, arguments, replaced, dict(calls))


CASES = {"flux": _flux, "sd3": _sd3, "sana": _sana}


def _sample(case: Case, seed: int) -> torch.Tensor:
    with torch.no_grad():
        return case.pipeline(PROMPT, num_inference_steps=STEPS, output_type="pt",
                             generator=torch.Generator().manual_seed(seed), **case.arguments).images


@pytest.mark.parametrize("name", CASES)
def test_accelerated_pipeline_samples_the_same_images(name, generator, triton_calls):
    case = CASES[name](generator)
    case.pipeline.set_progress_bar_config(disable=True)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    expected = _sample(case, seed)

    report = fastgen.accelerate(case.pipeline, backend="triton")
    assert set(case.replaced) <= {(r.path, r.op) for r in report.replaced}, report
    for path in {path for path, _ in case.replaced}:
        assert f"replaced {path}:" in str(report)
    actual = _sample(case, seed)
    assert {op: len(triton_calls[op]) for op in case.calls} == case.calls
    # Images in [0, 1]: float32 rounding moves them by under 7e-7 (measured over seeds); one
    # kernel's output off by 0.1% moves them by 6e-6 or more.
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-6)

    assert fastgen.restore(case.pipeline) == len(report.replaced)
    for runs in triton_calls.values():
        runs.clear()
    assert torch.equal(_sample(case, seed), expected)
    assert not any(triton_calls.values())


def test_a_module_two_components_share_is_accelerated_once(generator):
    _seed_weights(generator)
    vae = _autoencoder_kl(latent_channels=4)

    class Pipeline:  # what accelerate reads of a diffusers pipeline: its components
        components = {"vae": vae, "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(), "vae_for_previews": vae}

    pipeline = Pipeline()
    report = fastgen.accelerate(pipeline)
    assert report.left == [], report
    assert set(_kl_decoder_replacements()) <= {(r.path, r.op) for r in report.replaced}
    assert all(r.path.startswith("vae.") for r in report.replaced)
    assert fastgen.restore(pipeline) == len(report.replaced)
    assert not any("forward" in vars(module) for module in vae.modules())
    assert {type(module.processor).__name__ for module in vae.modules() if hasattr(module, "processor")} == {
        "AttnProcessor2_0"}
