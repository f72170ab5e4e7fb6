"""The SANA Linear DiT reference model (fastgen.models.sana): tiny config end to end, checkpoint
loading, the published configs, and equality with diffusers' SanaTransformer2DModel."""

import pytest
import torch

import fastgen
from fastgen.models import sana
from model_checks import EVERY_BACKEND, assert_backend_matches_reference, seed_global_rng

TINY = sana.CONFIGS["tiny"]


@pytest.fixture
def tiny_model(generator):
    seed_global_rng(generator)
    return sana.build("tiny")


def _inputs(generator, batch=2, height=8, width=6, caption_tokens=7, dtype=torch.float32):
    latents = torch.randn(batch, TINY.in_channels, height, width, generator=generator, dtype=dtype)
    caption = torch.randn(batch, caption_tokens, TINY.caption_channels, generator=generator, dtype=dtype)
    timestep = torch.rand(batch, generator=generator) * sana.TIMESTEP_RANGE
    # Random masks with at least one attended token per caption.
    mask = torch.rand(batch, caption_tokens, generator=generator) < 0.6
    mask[:, 0] = True
    return latents, caption, timestep, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_forward_keeps_shape_and_dtype(generator, tiny_model, dtype):
    latents, caption, timestep, mask = _inputs(generator, dtype=dtype)
    out = tiny_model.to(dtype)(latents, caption, timestep, mask)
    assert out.shape == latents.shape
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


def test_scalar_timestep_is_broadcast(generator, tiny_model):
    latents, caption, _, mask = _inputs(generator)
    per_sample = torch.full((latents.shape[0],), 250.0)
    torch.testing.assert_close(
        tiny_model(latents, caption, 250.0, mask), tiny_model(latents, caption, per_sample, mask)
    )


def test_backward_reaches_every_parameter(generator, tiny_model):
    latents, caption, timestep, mask = _inputs(generator)
    latents.requires_grad_(True)
    tiny_model(latents, caption, timestep, mask).square().mean().backward()
    for name, parameter in tiny_model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert torch.isfinite(latents.grad).all()


def test_masked_caption_tokens_do_not_matter(generator, tiny_model):
    latents, caption, timestep, mask = _inputs(generator)
    mask[:, -1] = False
    changed = torch.where(mask[..., None], caption, torch.randn(caption.shape, generator=generator))
    reference = tiny_model(latents, caption, timestep, mask)
    torch.testing.assert_close(tiny_model(latents, changed, timestep, mask), reference, rtol=0, atol=0)
    # The same change matters once those tokens are attended: the check above is not vacuous.
    unmasked = tiny_model(latents, caption, timestep, None)
    assert not torch.allclose(tiny_model(latents, changed, timestep, None), unmasked)


def test_fully_masked_caption_gives_finite_output_and_grads(generator, tiny_model):
    latents, caption, timestep, mask = _inputs(generator)
    mask[0] = False
    caption.requires_grad_(True)
    out = tiny_model(latents, caption, timestep, mask)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(caption.grad).all()
    # No caption token reaches the fully masked sample.
    assert caption.grad[0].abs().max() == 0


def test_linear_attention_op_gets_views_of_the_projections(generator, tiny_model, monkeypatch):
    calls = []

    def recording_op(q, k, v, eps):
        calls.append((q, k, v, eps))
        return fastgen.linear_attention(q, k, v, eps)

    monkeypatch.setattr(sana, "linear_attention", recording_op)
    latents, caption, timestep, mask = _inputs(generator)
    tiny_model(latents, caption, timestep, mask)
    assert len(calls) == TINY.num_layers
    tokens = (latents.shape[2] // TINY.patch_size) * (latents.shape[3] // TINY.patch_size)
    for q, k, v, eps in calls:
        for tensor in (q, k, v):
            assert tensor.shape == (latents.shape[0], tokens, TINY.num_attention_heads, TINY.attention_head_dim)
            assert tensor._base is not None, "expected a view of the projection output, not a copy"
        assert eps == 1e-15


@pytest.mark.parametrize("device, backend", EVERY_BACKEND)
def test_every_backend_matches_the_reference(generator, tiny_model, backend, device):
    inputs = [tensor.to(device) for tensor in _inputs(generator)]
    assert_backend_matches_reference(tiny_model.to(device), inputs, backend)


def test_traces_as_one_graph(generator, tiny_model):
    """No graph breaks: the op lookup in the attention forward and every fastgen op trace."""
    latents, caption, timestep, mask = _inputs(generator)
    compiled = torch.compile(tiny_model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(
        compiled(latents, caption, timestep, mask), tiny_model(latents, caption, timestep, mask)
    )


def test_bad_inputs_raise_value_errors(generator, tiny_model):
    latents, caption, timestep, mask = _inputs(generator)
    with pytest.raises(ValueError, match="latents"):
        tiny_model(latents[:, :3], caption, timestep, mask)
    with pytest.raises(ValueError, match="patch_size"):
        tiny_model(latents[..., :5], caption, timestep, mask)
    with pytest.raises(ValueError, match="caption must"):
        tiny_model(latents, caption[..., :5], timestep, mask)
    with pytest.raises(ValueError, match="timestep"):
        tiny_model(latents, caption, timestep[:1], mask)
    with pytest.raises(ValueError, match="caption_mask"):
        tiny_model(latents, caption, timestep, mask[:, :3])
    with pytest.raises(ValueError, match="unknown SANA config"):
        sana.build("sana-9000m")


def test_safetensors_round_trip(generator, tiny_model, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    path = tmp_path / "sana-tiny.safetensors"
    safetensors_torch.save_file(tiny_model.state_dict(), str(path))
    loaded = sana.from_safetensors(path, "tiny")
    for name, tensor in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    latents, caption, timestep, mask = _inputs(generator)
    torch.testing.assert_close(
        loaded(latents, caption, timestep, mask), tiny_model(latents, caption, timestep, mask), rtol=0, atol=0
    )
    # Loaded weights are ordinary trainable parameters.
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in loaded.parameters())


def test_safetensors_keeps_the_checkpoint_dtype(tiny_model, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    path = tmp_path / "sana-tiny-bf16.safetensors"
    safetensors_torch.save_file(tiny_model.to(torch.bfloat16).state_dict(), str(path))
    assert {p.dtype for p in sana.from_safetensors(path, TINY).parameters()} == {torch.bfloat16}


# transformer/config.json of Efficient-Large-Model/Sana_600M_1024px_diffusers (as published on
# huggingface.co, via community copies such as frutiemax/twistedreality-sana-600m-512px) and of
# Efficient-Large-Model/Sana_1600M_1024px_MultiLing_diffusers.
PUBLISHED_DIFFUSERS_CONFIGS = {
    "sana-600m": {
        "_class_name": "SanaTransformer2DModel", "attention_bias": False, "attention_head_dim": 32,
        "caption_channels": 2304, "cross_attention_dim": 1152, "cross_attention_head_dim": 72,
        "dropout": 0.0, "in_channels": 32, "interpolation_scale": None, "mlp_ratio": 2.5,
        "norm_elementwise_affine": False, "norm_eps": 1e-06, "num_attention_heads": 36,
        "num_cross_attention_heads": 16, "num_layers": 28, "out_channels": 32, "patch_size": 1,
        "sample_size": 32,
    },
    "sana-1600m": {
        "_class_name": "SanaTransformer2DModel", "attention_bias": False, "attention_head_dim": 32,
        "caption_channels": 2304, "cross_attention_dim": 2240, "cross_attention_head_dim": 112,
        "dropout": 0.0, "in_channels": 32, "interpolation_scale": None, "mlp_ratio": 2.5,
        "norm_elementwise_affine": False, "norm_eps": 1e-06, "num_attention_heads": 70,
        "num_cross_attention_heads": 20, "num_layers": 20, "out_channels": 32, "patch_size": 1,
        "sample_size": 32,
    },
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_DIFFUSERS_CONFIGS))
def test_configs_match_the_published_ones(name):
    assert sana.SanaConfig.from_diffusers(PUBLISHED_DIFFUSERS_CONFIGS[name]) == sana.CONFIGS[name]


def test_unsupported_diffusers_options_are_refused():
    config = dict(PUBLISHED_DIFFUSERS_CONFIGS["sana-600m"], qk_norm="rms_norm_across_heads")
    with pytest.raises(ValueError, match="qk_norm"):
        sana.SanaConfig.from_diffusers(config)


@pytest.mark.parametrize(
    "name, hidden, billions", [("sana-600m", 1152, 0.59), ("sana-1600m", 2240, 1.60)]
)
def test_large_configs_build_on_meta(name, hidden, billions):
    with torch.device("meta"):
        model = sana.build(name)
    assert model.config.hidden_size == hidden
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.02)


def test_matches_diffusers(generator):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    seed_global_rng(generator)
    reference = diffusers.SanaTransformer2DModel(
        in_channels=TINY.in_channels,
        out_channels=TINY.out_channels,
        num_attention_heads=TINY.num_attention_heads,
        attention_head_dim=TINY.attention_head_dim,
        num_layers=TINY.num_layers,
        num_cross_attention_heads=TINY.num_cross_attention_heads,
        cross_attention_head_dim=TINY.cross_attention_head_dim,
        cross_attention_dim=TINY.hidden_size,
        caption_channels=TINY.caption_channels,
        patch_size=TINY.patch_size,
        sample_size=TINY.sample_size,
    ).eval()
    model = sana.build(sana.SanaConfig.from_diffusers(dict(reference.config)))
    model.load_state_dict(reference.state_dict(), strict=True)

    latents, caption, timestep, mask = _inputs(generator, batch=3)
    with torch.no_grad():
        for caption_mask in (None, mask):
            expected = reference(
                latents,
                caption,
                timestep,
                encoder_attention_mask=None if caption_mask is None else caption_mask.long(),
            ).sample
            torch.testing.assert_close(model(latents, caption, timestep, caption_mask), expected)


def test_two_step_sample_with_guidance_is_one_batched_call_per_step(generator, tiny_model):
    latents, caption, _, mask = _inputs(generator)
    null_caption = torch.randn(caption.shape, generator=generator)
    null_mask = torch.zeros_like(mask)
    null_mask[:, :2] = True
    scale = 4.5

    batch_sizes = []
    hook = tiny_model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        sampled = sana.sample(
            tiny_model, latents, caption, mask,
            null_caption=null_caption, null_caption_mask=null_mask, num_steps=2, guidance_scale=scale, method="euler",
        )
    finally:
        hook.remove()
    assert batch_sizes == [2 * latents.shape[0]] * 2

    # The same two Euler steps with separate conditional and unconditional calls, on the grid of
    # diffusers' FlowMatchEulerDiscreteScheduler(shift=3): 1, then the smallest training time
    # 1 / 1000 shifted twice, then 0.
    once = 3 * 0.001 / (1 + 2 * 0.001)
    times = [1.0, 3 * once / (1 + 2 * once), 0.0]
    x = latents
    for t, t_next in zip(times[:-1], times[1:]):
        timestep = torch.full((x.shape[0],), t * sana.TIMESTEP_RANGE)
        conditional = tiny_model(x, caption, timestep, mask)
        unconditional = tiny_model(x, null_caption, timestep, null_mask)
        x = x + (t_next - t) * (unconditional + scale * (conditional - unconditional))
    torch.testing.assert_close(sampled, x)


def test_default_sampler_is_sanas_flow_dpm_solver_pipeline(generator, tiny_model):
    """SanaPipeline's denoising loop by hand: DPMSolverMultistepScheduler(use_flow_sigmas=True,
    flow_shift=3, prediction_type="flow_prediction"), the network at its integer timesteps,
    guidance mixing the conditional and unconditional velocities."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    latents, caption, _, mask = _inputs(generator)
    null_caption = torch.randn(caption.shape, generator=generator)
    null_mask = torch.ones_like(mask)
    scale, steps = 4.5, 3
    sampled = sana.sample(tiny_model, latents, caption, mask, null_caption=null_caption, null_caption_mask=null_mask,
                          num_steps=steps, guidance_scale=scale)
    scheduler = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0,
                                                      prediction_type="flow_prediction")
    scheduler.set_timesteps(steps)
    x = latents
    for t in scheduler.timesteps:
        timestep = t.expand(x.shape[0]).float()
        conditional = tiny_model(x, caption, timestep, mask)
        unconditional = tiny_model(x, null_caption, timestep, null_mask)
        x = scheduler.step(unconditional + scale * (conditional - unconditional), t, x).prev_sample
    torch.testing.assert_close(sampled, x, rtol=1e-5, atol=1e-5 * x.abs().max().item())
    with pytest.raises(ValueError, match="method must be 'flow_dpm_solver' or 'euler'; got 'heun'"):
        sana.sample(tiny_model, latents, caption, mask, num_steps=1, method="heun")
