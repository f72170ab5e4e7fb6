"""The FLUX.1 reference model (fastgen.models.flux): equality with diffusers'
FluxTransformer2DModel (random weights, with and without the guidance embedding, odd token
grids), the latent packing and position ids of diffusers' FluxPipeline, checkpoint loading, the
released configs' parameter counts, and sampling against diffusers' scheduler."""
import dataclasses

import pytest
import torch

from fastgen.models import flux
from model_checks import (assert_backend_matches_reference, assert_released_config_matches_diffusers,
                          example_step_call, seed_global_rng)
from fastgen.ops.ada_norm import GATED_RESIDUAL_ADA_LAYER_NORM, GATED_RESIDUAL_ADA_LAYER_NORM_BACKWARD

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")

TINY = flux.CONFIGS["tiny"]
TINY_WITHOUT_GUIDANCE = dataclasses.replace(TINY, guidance_embeds=False)

# transformer/config.json of black-forest-labs/FLUX.1-dev and FLUX.1-schnell (they differ in
# guidance_embeds only).
PUBLISHED_DIFFUSERS_CONFIGS = {
    name: {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": guidance,
           "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
           "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}
    for name, guidance in (("flux-dev", True), ("flux-schnell", False))
}


def _diffusers_kwargs(config: flux.FluxConfig) -> dict:
    return {"num_layers": config.num_layers, "num_single_layers": config.num_single_layers,
            "attention_head_dim": config.attention_head_dim, "num_attention_heads": config.num_attention_heads,
            "in_channels": config.in_channels, "joint_attention_dim": config.joint_attention_dim,
            "pooled_projection_dim": config.pooled_projection_dim, "guidance_embeds": config.guidance_embeds,
            "axes_dims_rope": config.axes_dims_rope}


def _randomize_zero_initialised(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter random values: a zero bias or unit norm weight would hide a
    mismatch in what multiplies it."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def _pair(generator, config=TINY):
    """(diffusers model, fastgen model) with the same random weights."""
    seed_global_rng(generator)
    reference = diffusers.FluxTransformer2DModel(**_diffusers_kwargs(config)).eval()
    _randomize_zero_initialised(reference, generator)
    model = flux.build(dataclasses.replace(flux.FluxConfig.from_diffusers(dict(reference.config)),
                                           sample_size=config.sample_size))
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference, model


def _inputs(generator, config=TINY, batch=2, height=6, width=10, text_tokens=7):
    latents = torch.randn(batch, config.latent_channels, height, width, generator=generator)
    text = torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator)
    timestep = torch.rand(batch, generator=generator)
    guidance = 1 + 4 * torch.rand(batch, generator=generator) if config.guidance_embeds else None
    return latents, text, pooled, timestep, guidance


def _reference_velocity(reference, image_tokens, text, pooled, timestep, image_ids, text_ids, guidance):
    return reference(hidden_states=image_tokens, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=timestep, img_ids=image_ids, txt_ids=text_ids, guidance=guidance).sample


@pytest.mark.parametrize("config", [TINY, TINY_WITHOUT_GUIDANCE], ids=["guidance", "no-guidance"])
@pytest.mark.parametrize("height, width", [(6, 10), (2, 2), (8, 8)])
def test_matches_diffusers(generator, config, height, width):
    """Odd token grids (3 x 5, 1 x 1) included: RoPE's row and column axes must not be swapped."""
    reference, model = _pair(generator, config)
    latents, text, pooled, timestep, guidance = _inputs(generator, config, batch=3, height=height, width=width)
    tokens = flux.pack_latents(latents)
    positions = flux.image_ids(height, width), flux.text_ids(text.shape[1])
    with torch.no_grad():
        expected = _reference_velocity(reference, tokens, text, pooled, timestep, *positions, guidance)
        out = model(tokens, text, pooled, timestep, *positions, guidance)
    assert out.shape == tokens.shape[:2] + (config.out_channels,)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_positions_matter(generator):
    """The image ids reach the attention: permuting them changes the output (the equality test
    above is then not satisfied by a model that ignores them)."""
    _, model = _pair(generator)
    latents, text, pooled, timestep, guidance = _inputs(generator)
    tokens = flux.pack_latents(latents)
    ids = flux.image_ids(6, 10)
    with torch.no_grad():
        out = model(tokens, text, pooled, timestep, ids, flux.text_ids(7), guidance)
        swapped = model(tokens, text, pooled, timestep, ids[:, [0, 2, 1]], flux.text_ids(7), guidance)
    assert (out - swapped).abs().max() > 1e-3


def test_packing_and_ids_follow_the_pipeline_layout(generator):
    """FluxPipeline's _pack_latents / _prepare_latent_image_ids (diffusers' pipelines need
    transformers, so the layout is spelled out): token i * W/2 + j holds latent pixels
    (2i + dy, 2j + dx) at feature 4 c + 2 dy + dx, and has the id (0, i, j)."""
    latents = torch.randn(2, 3, 6, 10, generator=generator)
    packed = flux.pack_latents(latents)
    assert packed.shape == (2, 15, 12)
    for i, j, c, dy, dx in [(0, 0, 0, 0, 0), (1, 4, 2, 1, 0), (2, 3, 1, 0, 1), (2, 4, 2, 1, 1)]:
        assert packed[:, 5 * i + j, 4 * c + 2 * dy + dx].equal(latents[:, c, 2 * i + dy, 2 * j + dx])
    torch.testing.assert_close(flux.unpack_latents(packed, 6, 10), latents, rtol=0, atol=0)
    ids = flux.image_ids(6, 10)
    assert ids.dtype == torch.float32 and ids.shape == (15, 3)
    assert ids[7].tolist() == [0, 1, 2] and ids[:, 0].eq(0).all()
    assert flux.text_ids(4).eq(0).all() and flux.text_ids(4).shape == (4, 3)


def test_backward_reaches_every_parameter(generator):
    _, model = _pair(generator)
    latents, text, pooled, timestep, guidance = _inputs(generator)
    tokens = flux.pack_latents(latents)
    model(tokens, text, pooled, timestep, flux.image_ids(6, 10), flux.text_ids(7), guidance).square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_triton_backend_matches_the_reference_values_and_gradients(generator, kernel_runs):
    """Every op of the model (qk_norm_rope into the joint q and k, cross_attention, ada_layer_norm,
    gated_residual_ada_layer_norm) on the Triton kernels, under the interpreter here: the output
    and every parameter's gradient. The fused residual and norm2 run once per stream of each of
    the two joint blocks, forward and backward."""
    _, model = _pair(generator)
    latents, text, pooled, timestep, guidance = _inputs(generator, batch=1)
    inputs = (flux.pack_latents(latents), text, pooled, timestep, flux.image_ids(6, 10), flux.text_ids(7), guidance)
    fused = [kernel_runs(op) for op in (GATED_RESIDUAL_ADA_LAYER_NORM, GATED_RESIDUAL_ADA_LAYER_NORM_BACKWARD)]
    assert_backend_matches_reference(model, inputs, "triton")
    assert [len(runs) for runs in fused] == [4, 4]


def test_bad_inputs_raise_value_errors(generator):
    model = flux.build("tiny")
    latents, text, pooled, timestep, guidance = _inputs(generator)
    tokens, ids, text_ids = flux.pack_latents(latents), flux.image_ids(6, 10), flux.text_ids(7)
    with pytest.raises(ValueError, match="image_tokens"):
        model(tokens[..., :5], text, pooled, timestep, ids, text_ids, guidance)
    with pytest.raises(ValueError, match="text must"):
        model(tokens, text[..., :5], pooled, timestep, ids, text_ids, guidance)
    with pytest.raises(ValueError, match="pooled_text"):
        model(tokens, text, pooled[:1], timestep, ids, text_ids, guidance)
    with pytest.raises(ValueError, match="image_ids"):
        model(tokens, text, pooled, timestep, ids[:-1], text_ids, guidance)
    with pytest.raises(ValueError, match="embeds guidance"):
        model(tokens, text, pooled, timestep, ids, text_ids)
    with pytest.raises(ValueError, match="no guidance embedding"):
        flux.build(TINY_WITHOUT_GUIDANCE)(tokens, text, pooled, timestep, ids, text_ids, 3.5)
    with pytest.raises(ValueError, match="even"):
        flux.pack_latents(latents[..., :5])
    with pytest.raises(ValueError, match="unknown FLUX.1 config"):
        flux.build("flux-pro")


def test_safetensors_round_trip(generator, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    _, model = _pair(generator)
    path = tmp_path / "flux-tiny.safetensors"
    safetensors_torch.save_file(model.state_dict(), str(path))
    loaded = flux.from_safetensors(path, "tiny")
    latents, text, pooled, timestep, guidance = _inputs(generator)
    arguments = (flux.pack_latents(latents), text, pooled, timestep, flux.image_ids(6, 10), flux.text_ids(7), guidance)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*arguments), model(*arguments), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(PUBLISHED_DIFFUSERS_CONFIGS))
def test_released_configs_build_on_meta_with_diffusers_parameter_count(name):
    count = assert_released_config_matches_diffusers(flux, diffusers.FluxTransformer2DModel,
                                                     PUBLISHED_DIFFUSERS_CONFIGS[name], name)
    assert count / 1e9 == pytest.approx(11.9, rel=0.01)


def test_unsupported_diffusers_options_are_refused():
    with pytest.raises(ValueError, match="patch_size"):
        flux.FluxConfig.from_diffusers(dict(PUBLISHED_DIFFUSERS_CONFIGS["flux-dev"], patch_size=2))
    with pytest.raises(ValueError, match="axes_dims_rope"):
        flux.FluxConfig.from_diffusers(dict(PUBLISHED_DIFFUSERS_CONFIGS["flux-dev"], axes_dims_rope=[16, 56, 48]))


def _diffusers_sample(reference, scheduler, noise, text, pooled, guidance, num_steps, mu):
    """FluxPipeline's denoising loop: the pipeline's sigmas, its calls and scheduler steps."""
    import numpy as np

    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    height, width = noise.shape[2:]
    x = flux.pack_latents(noise)
    positions = flux.image_ids(height, width), flux.text_ids(text.shape[1])
    guidance = None if guidance is None else torch.full((noise.shape[0],), guidance)
    for t in scheduler.timesteps:
        velocity = _reference_velocity(reference, x, text, pooled, t.expand(x.shape[0]) / 1000, *positions, guidance)
        x = scheduler.step(velocity, t, x).prev_sample
    return flux.unpack_latents(x, height, width)


@pytest.mark.parametrize("config", [TINY, TINY_WITHOUT_GUIDANCE], ids=["dev", "schnell"])
def test_sample_matches_the_diffusers_pipeline_loop(generator, config):
    """[dev]: 3 steps with distilled guidance 3.5 on the resolution-shifted schedule, one call of
    the batch per step; [schnell]: the unshifted schedule without guidance."""
    reference, model = _pair(generator, config)
    noise, text, pooled, _, _ = _inputs(generator, config)
    if config.guidance_embeds:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)
        # FluxPipeline's calculate_shift for the 15 image tokens: mu linear in the token count.
        mu, guidance = 0.5 + (1.15 - 0.5) / (4096 - 256) * (15 - 256), flux.DEFAULT_GUIDANCE
    else:
        scheduler, mu, guidance = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0), None, None

    batch_sizes = []
    hook = model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            sampled = flux.sample(model, noise, text, pooled, num_steps=3)
            expected = _diffusers_sample(reference, scheduler, noise, text, pooled, guidance, 3, mu)
    finally:
        hook.remove()
    assert batch_sizes == [noise.shape[0]] * 3
    assert sampled.shape == noise.shape
    torch.testing.assert_close(sampled, expected, rtol=1e-5, atol=1e-5)


def test_example_step_is_one_denoising_call_with_distilled_guidance(generator):
    model, (tokens, text, pooled, timestep, image_ids, text_ids, guidance) = example_step_call(flux, 3, generator)
    assert tokens.shape == (3, 16, 16), "64 px / 8 = 8 x 8 latents packed into 4 x 4 tokens"
    assert text.shape == (3, flux.EXAMPLE_TEXT_TOKENS, 24) and tokens.dtype == text.dtype == torch.float64
    assert image_ids.shape == (16, 3) and text_ids.shape == (flux.EXAMPLE_TEXT_TOKENS, 3)
    assert torch.equal(timestep, torch.full((3,), 0.5)) and torch.equal(guidance, torch.full((3,), 3.5))
    assert flux.example_step(flux.build(TINY_WITHOUT_GUIDANCE))().shape == (1, 16, 16)
    assert flux.example_step(model, resolution=128)().shape[1] == 64
    for bad in ({"batch": 0}, {"resolution": 72}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            flux.example_step(model, **bad)
