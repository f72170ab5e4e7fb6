"""The LDM / SD 1.5 UNet reference model (fastgen.models.ldm_unet): the tiny config against
diffusers' UNet2DConditionModel with the same weights, every backend against the reference,
checkpoint loading, the SD 1.5 layout and size, DDIM sampling against diffusers' scheduler."""

import pytest
import torch

import fastgen
from fastgen.models import ldm_unet
from model_checks import NOT_EMULATED, assert_backend_matches_reference, seed_global_rng

TINY = ldm_unet.CONFIGS["tiny"]

# unet/config.json of runwayml/stable-diffusion-v1-5 (as published on huggingface.co), without the
# bookkeeping keys (_class_name, _diffusers_version).
SD15_DIFFUSERS_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD15_PARAMETERS = 859_520_964  # the published SD 1.5 UNet


@pytest.fixture
def tiny_model(generator):
    seed_global_rng(generator)
    return ldm_unet.build("tiny")


def _inputs(generator, batch=2, height=8, width=6, context_tokens=7, dtype=torch.float32):
    latents = torch.randn(batch, TINY.in_channels, height, width, generator=generator, dtype=dtype)
    timestep = torch.randint(ldm_unet.NUM_TRAIN_TIMESTEPS, (batch,), generator=generator).float()
    context = torch.randn(batch, context_tokens, TINY.cross_attention_dim, generator=generator, dtype=dtype)
    return latents, timestep, context


def _tiny_diffusers_unet(diffusers):
    return diffusers.UNet2DConditionModel(
        block_out_channels=TINY.block_out_channels,
        layers_per_block=TINY.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY.cross_attention_dim,
        attention_head_dim=TINY.num_attention_heads[0],
        norm_num_groups=TINY.norm_num_groups,
        sample_size=TINY.sample_size,
    ).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_forward_keeps_shape_and_dtype(generator, tiny_model, dtype):
    latents, timestep, context = _inputs(generator, dtype=dtype)
    out = tiny_model.to(dtype)(latents, timestep, context)
    assert out.shape == latents.shape
    assert out.dtype == dtype
    assert torch.isfinite(out).all()


def test_scalar_timestep_is_broadcast(generator, tiny_model):
    latents, _, context = _inputs(generator)
    per_sample = torch.full((latents.shape[0],), 321.0)
    torch.testing.assert_close(tiny_model(latents, 321.0, context), tiny_model(latents, per_sample, context))


def test_backward_reaches_every_parameter(generator, tiny_model):
    latents, timestep, context = _inputs(generator)
    context.requires_grad_(True)
    tiny_model(latents, timestep, context).square().mean().backward()
    for name, parameter in tiny_model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert context.grad.abs().sum() > 0


@pytest.mark.parametrize("device, backend", NOT_EMULATED)
def test_every_backend_matches_the_reference(generator, tiny_model, backend, device):
    # An odd latent side: the up path must upsample to the skip's size, not simply 2x.
    inputs = [tensor.to(device) for tensor in _inputs(generator, height=7, width=6)]
    assert_backend_matches_reference(tiny_model.to(device), inputs, backend)


def test_attention_goes_through_the_op_with_views(generator, tiny_model, monkeypatch):
    calls = []

    def recording_op(q, k, v):
        calls.append((q, k, v))
        return fastgen.cross_attention(q, k, v)

    monkeypatch.setattr(ldm_unet, "cross_attention", recording_op)
    latents, timestep, context = _inputs(generator)
    tiny_model(latents, timestep, context)
    # tiny: one transformer on the first down level, the middle, two on the last up level; each
    # with a self-attention and a cross-attention.
    assert len(calls) == 2 * (1 + 1 + 2)
    self_attention, cross = calls[0], calls[1]
    assert self_attention[0].shape == self_attention[1].shape == (2, 8 * 6, 2, 16)
    assert cross[1].shape == (2, context.shape[1], 2, 16)
    for q, k, v in calls:
        assert all(t._base is not None for t in (q, k, v)), "expected views of the projections, not copies"


def test_traces_as_one_graph(generator, tiny_model):
    latents, timestep, context = _inputs(generator)
    compiled = torch.compile(tiny_model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(latents, timestep, context), tiny_model(latents, timestep, context))


def test_bad_inputs_raise_value_errors(generator, tiny_model):
    latents, timestep, context = _inputs(generator)
    with pytest.raises(ValueError, match=r"sample must be \(B, 4, H, W\)"):
        tiny_model(latents[:, :3], timestep, context)
    with pytest.raises(ValueError, match="context must be"):
        tiny_model(latents, timestep, context[..., :5])
    with pytest.raises(ValueError, match="context must be"):
        tiny_model(latents, timestep, context[:1])
    with pytest.raises(ValueError, match="timestep must be"):
        tiny_model(latents, timestep[:1], context)
    with pytest.raises(ValueError, match="unknown LDM UNet config"):
        ldm_unet.build("sd9")
    with pytest.raises(ValueError, match="divisible by its heads 3"):
        ldm_unet.LDMUNetConfig(block_out_channels=(32,), attention_levels=(True,), num_attention_heads=(3,))
    with pytest.raises(ValueError, match="one entry per level"):
        ldm_unet.LDMUNetConfig(block_out_channels=(32, 64), attention_levels=(True,), num_attention_heads=(2, 2))


def test_example_step_runs_the_guidance_batch(tiny_model, generator):
    step = ldm_unet.example_step(tiny_model, batch=2, resolution=48, generator=generator)
    out = step()
    assert out.shape == (4, TINY.in_channels, 6, 6)
    torch.testing.assert_close(step(), out)  # inputs are made once
    for bad in ({"batch": 0}, {"resolution": 50}, {"resolution": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ldm_unet.example_step(tiny_model, **bad)


def test_sd15_config_matches_the_published_one():
    assert ldm_unet.LDMUNetConfig.from_diffusers(SD15_DIFFUSERS_CONFIG) == ldm_unet.CONFIGS["sd15"]


@pytest.mark.parametrize("key, value", [("use_linear_projection", True), ("addition_embed_type", "text_time"),
                                        ("transformer_layers_per_block", 2)])
def test_unsupported_diffusers_options_are_refused(key, value):
    with pytest.raises(ValueError, match=key):
        ldm_unet.LDMUNetConfig.from_diffusers(dict(SD15_DIFFUSERS_CONFIG, **{key: value}))


def test_up_blocks_must_mirror_the_down_blocks():
    config = dict(SD15_DIFFUSERS_CONFIG, up_block_types=["CrossAttnUpBlock2D"] * 4)
    with pytest.raises(ValueError, match="must mirror"):
        ldm_unet.LDMUNetConfig.from_diffusers(config)


def test_sd15_has_the_published_size_and_diffusers_layout():
    with torch.device("meta"):
        model = ldm_unet.build("sd15")
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == SD15_PARAMETERS
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**SD15_DIFFUSERS_CONFIG)
    # The checkpoint's keys and shapes: a diffusers SD 1.5 file loads with strict=True.
    assert {k: t.shape for k, t in model.state_dict().items()} == {k: t.shape for k, t in reference.state_dict().items()}


def test_matches_diffusers(generator):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    seed_global_rng(generator)
    reference = _tiny_diffusers_unet(diffusers)
    config = ldm_unet.LDMUNetConfig.from_diffusers(dict(reference.config))
    assert config == TINY
    model = ldm_unet.build(config)
    model.load_state_dict(reference.state_dict(), strict=True)
    with torch.no_grad(), fastgen.use_backend("reference"):
        for height, width in ((8, 6), (7, 5)):  # odd sides take the sized upsampling path
            latents, timestep, context = _inputs(generator, batch=3, height=height, width=width)
            torch.testing.assert_close(model(latents, timestep, context),
                                       reference(latents, timestep, context).sample)


def test_loads_a_diffusers_checkpoint_file(generator, tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    seed_global_rng(generator)
    reference = _tiny_diffusers_unet(diffusers)
    reference.save_pretrained(tmp_path, safe_serialization=True)  # unet/diffusion_pytorch_model.safetensors
    loaded = ldm_unet.from_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", "tiny")
    latents, timestep, context = _inputs(generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded(latents, timestep, context), reference(latents, timestep, context).sample)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in loaded.parameters())
    # Round trip of our own state dict, in the checkpoint's dtype.
    path = tmp_path / "tiny-bf16.safetensors"
    safetensors_torch.save_file(loaded.to(torch.bfloat16).state_dict(), str(path))
    again = ldm_unet.from_safetensors(path, TINY)
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def _guided_by_scheduler(scheduler, steps, model, latents, context, null_context, scale):
    """A diffusers scheduler stepped by hand over `steps` steps from `latents`, with separate
    conditional and unconditional calls and classifier-free guidance of `scale`."""
    scheduler.set_timesteps(steps)
    x = latents
    with torch.no_grad():
        for t in scheduler.timesteps:
            unconditional, conditional = model(x, t, null_context), model(x, t, context)
            x = scheduler.step(unconditional + scale * (conditional - unconditional), t, x).prev_sample
    return x


def test_ddim_sample_with_guidance_matches_diffusers_scheduler(generator, tiny_model):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    latents, _, context = _inputs(generator)
    null_context = torch.randn(context.shape, generator=generator)
    scale, steps = 7.5, 3

    batch_sizes = []
    hook = tiny_model.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            sampled = ldm_unet.sample(tiny_model, latents, context, null_context=null_context, num_steps=steps,
                                      guidance_scale=scale)
    finally:
        hook.remove()
    assert batch_sizes == [2 * latents.shape[0]] * steps  # one call per step on the guidance batch

    # Stable Diffusion's scheduler config (scheduler/scheduler_config.json of SD 1.5).
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    x = _guided_by_scheduler(scheduler, steps, tiny_model, latents, context, null_context, scale)
    torch.testing.assert_close(sampled, x, rtol=1e-4, atol=1e-4)


def test_dpm_solver_sample_with_guidance_matches_diffusers_scheduler(generator, tiny_model):
    """DPMSolverMultistepScheduler from SD 1.5's scheduler config (its default DPM-Solver++(2M),
    "linspace" timesteps), stepped by hand with separate conditional and unconditional calls."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    latents, _, context = _inputs(generator)
    null_context = torch.randn(context.shape, generator=generator)
    scale, steps = 7.5, 4
    with torch.no_grad():
        sampled = ldm_unet.sample(tiny_model, latents, context, null_context=null_context, num_steps=steps,
                                  guidance_scale=scale, method="dpm_solver")
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                      steps_offset=1)
    x = _guided_by_scheduler(scheduler, steps, tiny_model, latents, context, null_context, scale)
    torch.testing.assert_close(sampled, x, rtol=1e-5, atol=1e-5 * x.abs().max().item())
    with pytest.raises(ValueError, match="method must be 'ddim' or 'dpm_solver'; got 'ddpm'"):
        ldm_unet.sample(tiny_model, latents, context, method="ddpm")


@pytest.mark.parametrize("name", sorted(ldm_unet.CONFIGS))
def test_diffusers_config_round_trip(name):
    config = ldm_unet.CONFIGS[name]
    assert ldm_unet.LDMUNetConfig.from_diffusers(config.to_diffusers()) == config


def test_sd15_step_flops():
    """SD 1.5's UNet costs about 0.8 TFLOP per 512 px image (about 400 G multiply-adds), so the
    guidance batch of 2 is about 1.6 TFLOP; the attention products (added by hand: the FLOP
    counter does not see inside the fastgen op) are 4 B Lq Lkv C over every attention call."""
    from fastgen.bench import models_ldm_unet

    step = models_ldm_unet.benchmarks(quick=True)[0]
    self_attention = 2 * 4 * 2 * (4096 * 4096 * 320 * 2 + 1024 * 1024 * 640 * 2 + 256 * 256 * 1280 * 2)
    assert 1.4e12 < step.cases[0].work < 1.8e12
    assert step.cases[0].work > self_attention  # the hand-added attention term is in


def test_tiny_benchmark_diffusers_peer_agrees_on_cpu(tmp_path):
    """The model benchmark's diffusers peer runs the same weights as fastgen's model (the Triton
    rows are left out here: the interpreter makes them take minutes)."""
    pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    from fastgen.bench import harness, models_ldm_unet

    def one_call(prepare, reps, warmup):  # timings mean nothing on CPU: one call, a nominal 1 ms
        prepare()()
        return [1.0]

    benches = models_ldm_unet.benchmarks(config_name="tiny", resolution=48)
    rows, _, _ = harness.run(benches, quick=True, out_dir=tmp_path, device="cpu", impls=["diffusers"],
                             timer=one_call)
    assert {row["impl"]: row["status"] for row in rows} == {"eager": "ok", "diffusers": "ok"}
