"""The SD3 / SD3.5 reference model (fastgen.models.sd3): equality with diffusers'
SD3Transformer2DModel (random weights; plain, QK-RMSNorm and dual-attention blocks; odd and
off-centre token grids), the position table, checkpoint loading, the released configs'
parameter counts, and guided sampling against diffusers' scheduler."""
import dataclasses

import pytest
import torch

from fastgen.models import sd3
from model_checks import (assert_backend_matches_reference, assert_released_config_matches_diffusers,
                          example_step_call, seed_global_rng)
from fastgen.ops.ada_norm import GATED_RESIDUAL_ADA_LAYER_NORM, GATED_RESIDUAL_ADA_LAYER_NORM_BACKWARD

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")

TINY = sd3.CONFIGS["tiny"]
VARIANTS = {
    "sd3": TINY,
    "qk-norm": dataclasses.replace(TINY, qk_norm="rms_norm"),
    # Dual attention in the first block only, as SD3.5 Medium has it in its first 13 of 24.
    "dual-attention": dataclasses.replace(TINY, qk_norm="rms_norm", dual_attention_layers=(0,)),
}

# transformer/config.json of stabilityai/stable-diffusion-3-medium-diffusers,
# stable-diffusion-3.5-medium and stable-diffusion-3.5-large.
_COMMON = {"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "in_channels": 16,
           "joint_attention_dim": 4096, "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048,
           "sample_size": 128}
PUBLISHED_DIFFUSERS_CONFIGS = {
    "sd3-medium": dict(_COMMON, caption_projection_dim=1536, num_attention_heads=24, num_layers=24,
                       pos_embed_max_size=192),
    "sd3.5-medium": dict(_COMMON, caption_projection_dim=1536, num_attention_heads=24, num_layers=24,
                         pos_embed_max_size=384, dual_attention_layers=list(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": dict(_COMMON, caption_projection_dim=2432, num_attention_heads=38, num_layers=38,
                        pos_embed_max_size=192, qk_norm="rms_norm"),
}


def _diffusers_kwargs(config: sd3.SD3Config) -> dict:
    kwargs = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    return dict(kwargs, caption_projection_dim=config.hidden_size)


def _pair(generator, config=TINY):
    """(diffusers model, fastgen model) with the same random weights, every one of them random
    (a zero bias or unit norm weight would hide a mismatch in what multiplies it)."""
    seed_global_rng(generator)
    reference = diffusers.SD3Transformer2DModel(**_diffusers_kwargs(config)).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model = sd3.build(sd3.SD3Config.from_diffusers(dict(reference.config)))
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference, model


def _inputs(generator, config=TINY, batch=2, height=10, width=6, text_tokens=7):
    latents = torch.randn(batch, config.in_channels, height, width, generator=generator)
    text = torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator)
    timestep = torch.rand(batch, generator=generator) * sd3.TIMESTEP_RANGE
    return latents, text, pooled, timestep


def _reference_velocity(reference, latents, text, pooled, timestep):
    return reference(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=timestep).sample


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("height, width", [(10, 6), (2, 2), (24, 24)])
def test_matches_diffusers(generator, variant, height, width):
    """Token grids 5 x 3 (odd, crop off the table's centre), 1 x 1 and 12 x 12 (the whole table)."""
    reference, model = _pair(generator, VARIANTS[variant])
    latents, text, pooled, timestep = _inputs(generator, batch=3, height=height, width=width)
    with torch.no_grad():
        expected = _reference_velocity(reference, latents, text, pooled, timestep)
        out = model(latents, text, pooled, timestep)
    assert out.shape == latents.shape
    # float32 rounding through the blocks scales with the output's largest values (up to 13 at
    # 12 x 12 tokens), not with each element: 1e-5 absolute failed the sd3 variant on 4 of 13
    # seeds (1.5e-5 at most); relative to the largest |expected|, the worst of them took 0.11.
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize("dim, max_size, base_size", [(32, 12, 4), (96, 40, 16), (256, 192, 64)])
def test_position_table_matches_diffusers(dim, max_size, base_size):
    """The table a fresh model builds (the equality test above loads diffusers' buffer)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    expected = get_2d_sincos_pos_embed(dim, max_size, base_size=base_size, output_type="pt").float()
    torch.testing.assert_close(sd3.position_table(dim, max_size, base_size), expected, rtol=0, atol=1e-6)


def test_fresh_model_has_the_position_buffer_diffusers_saves(generator):
    seed_global_rng(generator)
    reference = diffusers.SD3Transformer2DModel(**_diffusers_kwargs(TINY))
    torch.testing.assert_close(sd3.build("tiny").pos_embed.pos_embed, reference.pos_embed.pos_embed, rtol=0, atol=1e-6)


def test_backward_reaches_every_parameter_the_output_depends_on(generator):
    """All but the last block's text queries: that block's text outputs are dropped (diffusers
    keeps their projection, so checkpoints hold it)."""
    _, model = _pair(generator, VARIANTS["dual-attention"])
    model(*_inputs(generator)).square().mean().backward()
    unused = {f"transformer_blocks.{TINY.num_layers - 1}.attn.{name}"
              for name in ("add_q_proj.weight", "add_q_proj.bias", "norm_added_q.weight")}
    without_gradient = {name for name, parameter in model.named_parameters()
                        if parameter.grad is None or parameter.grad.abs().sum() == 0}
    assert without_gradient == unused


@pytest.mark.parametrize("variant", ["qk-norm", "dual-attention"])
def test_triton_backend_matches_the_reference_values_and_gradients(generator, variant, kernel_runs):
    """Every op of the model on the Triton kernels, under the interpreter here: the output and
    every gradient. Each joint block's attention residual and norm2 run fused, forward and
    backward: both streams in the first block, the image stream in the last (context_pre_only)."""
    _, model = _pair(generator, VARIANTS[variant])
    fused = [kernel_runs(op) for op in (GATED_RESIDUAL_ADA_LAYER_NORM, GATED_RESIDUAL_ADA_LAYER_NORM_BACKWARD)]
    assert_backend_matches_reference(model, _inputs(generator, batch=1), "triton")
    assert [len(runs) for runs in fused] == [3, 3]


def test_bad_inputs_raise_value_errors(generator):
    model = sd3.build("tiny")
    latents, text, pooled, timestep = _inputs(generator)
    with pytest.raises(ValueError, match="latents must"):
        model(latents[:, :3], text, pooled, timestep)
    with pytest.raises(ValueError, match="patch_size"):
        model(latents[..., :5], text, pooled, timestep)
    with pytest.raises(ValueError, match="at most 24"):
        model(torch.zeros(2, 4, 26, 6), text, pooled, timestep)
    with pytest.raises(ValueError, match="text must"):
        model(latents, text[..., :5], pooled, timestep)
    with pytest.raises(ValueError, match="pooled_text"):
        model(latents, text, pooled[:1], timestep)
    with pytest.raises(ValueError, match="timestep"):
        model(latents, text, pooled, timestep[:1])
    with pytest.raises(ValueError, match="unknown SD3 config"):
        sd3.build("sd4")


def test_safetensors_round_trip(generator, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    _, model = _pair(generator, VARIANTS["dual-attention"])
    path = tmp_path / "sd3-tiny.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    loaded = sd3.from_safetensors(path, VARIANTS["dual-attention"])
    inputs = _inputs(generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs), model(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(PUBLISHED_DIFFUSERS_CONFIGS))
def test_released_configs_build_on_meta_with_diffusers_parameter_count(name):
    assert_released_config_matches_diffusers(sd3, diffusers.SD3Transformer2DModel, PUBLISHED_DIFFUSERS_CONFIGS[name],
                                             name)


def test_unsupported_diffusers_options_are_refused():
    with pytest.raises(ValueError, match="qk_norm"):
        sd3.SD3Config.from_diffusers(dict(PUBLISHED_DIFFUSERS_CONFIGS["sd3-medium"], qk_norm="layer_norm"))
    with pytest.raises(ValueError, match="caption_projection_dim"):
        sd3.SD3Config.from_diffusers(dict(PUBLISHED_DIFFUSERS_CONFIGS["sd3-medium"], caption_projection_dim=1152))


def test_guided_sample_matches_the_diffusers_pipeline_loop(generator):
    """StableDiffusion3Pipeline's loop: the scheduler with shift 3, the [uncond; cond] batch
    through the transformer at 1000 t, guidance 7, scheduler steps; here one call of twice the
    batch per step."""
    reference, model = _pair(generator, VARIANTS["dual-attention"])
    noise, text, pooled, _ = _inputs(generator)
    null_text = torch.randn(text.shape, generator=generator)
    null_pooled = torch.randn(pooled.shape, generator=generator)
    scale, num_steps = 7.0, 3

    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_steps)
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            both = _reference_velocity(reference, torch.cat([x, x]), torch.cat([null_text, text]),
                                       torch.cat([null_pooled, pooled]), t.expand(2 * x.shape[0]))
            unconditional, conditional = both.chunk(2)
            x = scheduler.step(unconditional + scale * (conditional - unconditional), t, x).prev_sample

        batch_sizes = []
        hook = model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
        try:
            sampled = sd3.sample(model, noise, text, pooled, null_text=null_text, null_pooled_text=null_pooled,
                                 num_steps=num_steps, guidance_scale=scale)
        finally:
            hook.remove()
    assert batch_sizes == [2 * noise.shape[0]] * num_steps
    # The guided velocity (1 + s) v_c - s v_u carries each half's float32 rounding (the 1e-5 of
    # the single-call test) up to 2 s + 1 times.
    torch.testing.assert_close(sampled, x, rtol=1e-5, atol=(2 * scale + 1) * 1e-5)


def test_example_step_is_one_guidance_batch_denoising_call(generator):
    model, (latents, text, pooled, timestep) = example_step_call(sd3, 2, generator)
    assert latents.shape == (4, 4, 8, 8), "2 x batch latents, 64 px / 8 for tiny by default"
    assert text.shape == (4, sd3.EXAMPLE_TEXT_TOKENS, 24) and pooled.shape == (4, 12)
    assert latents.dtype == text.dtype == torch.float64
    assert torch.equal(timestep, torch.full((4,), 500.0))
    assert sd3.example_step(model, resolution=48)().shape[-1] == 6
    for bad in ({"batch": 0}, {"resolution": 40}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sd3.example_step(model, **bad)
