"""The ADM (guided-diffusion) UNet reference model: tiny config against a float64 re-derivation
of guided-diffusion's forward, every backend against the reference, the published parameter
counts and key names, checkpoint loading, the samplers and bad inputs."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen.models import adm_unet
from model_checks import NOT_EMULATED, assert_backend_matches_reference, seed_global_rng

TINY = adm_unet.CONFIGS["tiny"]
ORDERS = {"legacy": TINY, "new": dataclasses.replace(TINY, use_new_attention_order=True)}


def _randomized(model, generator):
    """Every parameter drawn afresh (GroupNorms included, whose init is 1 and 0), scaled so that
    activations stay O(1) through the network."""
    with torch.no_grad():
        for parameter in model.parameters():
            fan_in = parameter[0].numel() if parameter.ndim > 1 else 4
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(fan_in))
    return model


@pytest.fixture
def tiny_model(generator):
    seed_global_rng(generator)
    return _randomized(adm_unet.build("tiny"), generator).eval()


def _inputs(generator, config=TINY, batch=2, side=16, dtype=torch.float32):
    x = torch.randn(batch, config.in_channels, side, side, generator=generator, dtype=dtype)
    timesteps = torch.randint(0, adm_unet.NUM_TRAIN_TIMESTEPS, (batch,), generator=generator).float()
    labels = torch.randint(0, config.num_classes, (batch,), generator=generator)
    return x, timesteps, labels


# guided-diffusion's UNetModel.forward, written out op by op from the module's parameters: its
# GroupNorm32, AdaGN, BigGAN resampling and the two QKV head orders as reshape / split.
def _group_norm(x, norm):
    return F.group_norm(x, 32, norm.weight, norm.bias, 1e-5)


def _reference_res_block(block, x, emb):
    resample = {"up": lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest"),
                "down": lambda t: F.avg_pool2d(t, 2), None: lambda t: t}[block.resample]
    h = block.in_layers[2](resample(F.silu(_group_norm(x, block.in_layers[0]))))
    emb_out = block.emb_layers[1](F.silu(emb))[..., None, None]
    scale, shift = emb_out.chunk(2, dim=1)
    h = F.silu(_group_norm(h, block.out_layers[0]) * (1 + scale) + shift)
    return block.skip_connection(resample(x)) + block.out_layers[3](h)


def _reference_attention(block, x):
    batch, channels, height, width = x.shape
    qkv = block.qkv(_group_norm(x.reshape(batch, channels, -1), block.norm))  # (B, 3C, T)
    heads, length = block.heads, height * width
    width_per_head = channels // heads
    if block.new_order:  # QKVAttention: split q, k, v, then heads
        q, k, v = (t.reshape(batch * heads, width_per_head, length) for t in qkv.chunk(3, dim=1))
    else:  # QKVAttentionLegacy: split heads, then q, k, v
        q, k, v = qkv.reshape(batch * heads, 3 * width_per_head, length).split(width_per_head, dim=1)
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(width_per_head), dim=-1)
    attended = torch.einsum("bts,bcs->bct", weight, v).reshape(batch, channels, length)
    return x + block.proj_out(attended).reshape(x.shape)


def _reference_sequential(sequential, h, emb):
    for layer in sequential:
        if isinstance(layer, adm_unet.ResBlock):
            h = _reference_res_block(layer, h, emb)
        elif isinstance(layer, adm_unet.AttentionBlock):
            h = _reference_attention(layer, h)
        else:
            h = layer(h)
    return h


def _reference_forward(model, x, timesteps, labels):
    half = model.config.model_channels // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=x.dtype) / half)
    angles = timesteps.to(x.dtype)[:, None] * frequencies
    emb = model.time_embed(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)) + model.label_emb(labels)
    skips, h = [], x
    for block in model.input_blocks:
        h = _reference_sequential(block, h, emb)
        skips.append(h)
    h = _reference_sequential(model.middle_block, h, emb)
    for block in model.output_blocks:
        h = _reference_sequential(block, torch.cat([h, skips.pop()], dim=1), emb)
    return model.out[2](F.silu(_group_norm(h, model.out[0])))


@pytest.mark.parametrize("order", sorted(ORDERS))
def test_matches_guided_diffusion_formulation_in_float64(generator, order):
    seed_global_rng(generator)
    model = _randomized(adm_unet.build(ORDERS[order]), generator).eval()
    x, timesteps, labels = _inputs(generator)
    with torch.no_grad():
        expected = _reference_forward(model.double(), x.double(), timesteps, labels)
        out = model.float()(x, timesteps, labels)
    assert out.shape == (2, 2 * TINY.in_channels, 16, 16)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_attention_orders_differ(generator):
    """The same weights give different outputs under the two head orders, so the float64 test
    above tells them apart."""
    seed_global_rng(generator)
    legacy = _randomized(adm_unet.build(ORDERS["legacy"]), generator).eval()
    new = adm_unet.build(ORDERS["new"]).eval()
    new.load_state_dict(legacy.state_dict())
    inputs = _inputs(generator)
    with torch.no_grad():
        assert not torch.allclose(legacy(*inputs), new(*inputs), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device, backend", NOT_EMULATED)
def test_every_backend_matches_the_reference(generator, tiny_model, backend, device):
    model = tiny_model.to(device)
    # 8 px images (attention over 4 x 4 positions): the Triton interpreter is slow.
    inputs = [t.to(device) for t in _inputs(generator, side=8)]
    assert_backend_matches_reference(model, inputs, backend, atol=1e-4, grad_rtol=1e-3)


def test_ops_are_called_with_the_blocks_shapes(generator, tiny_model, monkeypatch):
    norm_calls, attention_calls = [], []

    def recording_norm(x, scale, shift, groups, weight, bias, eps, act):
        norm_calls.append((x.shape[1], groups, eps, act))
        return fastgen.ada_group_norm(x, scale, shift, groups, weight, bias, eps, act)

    def recording_attention(q, k, v):
        attention_calls.append(q.shape)
        return fastgen.cross_attention(q, k, v)

    monkeypatch.setattr(adm_unet, "ada_group_norm", recording_norm)
    monkeypatch.setattr(adm_unet, "cross_attention", recording_attention)
    tiny_model(*_inputs(generator))
    residual_blocks = sum(isinstance(m, adm_unet.ResBlock) for m in tiny_model.modules())
    assert len(norm_calls) == residual_blocks == 10
    assert all(call[1:] == (32, 1e-5, "silu") for call in norm_calls)
    # Attention at 8 x 8 (downsample rate 2): 1 encoder block, the middle, 2 decoder blocks.
    assert attention_calls == [(2, 64, 4, 16)] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_keeps_dtype_and_scalar_timestep_broadcasts(generator, tiny_model, dtype):
    model = tiny_model.to(dtype)
    x, _, labels = _inputs(generator, dtype=dtype)
    out = model(x, 250.0, labels)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, model(x, torch.full((2,), 250.0), labels), rtol=0, atol=0)


def test_traces_as_one_graph(generator, tiny_model):
    inputs = _inputs(generator)
    compiled = torch.compile(tiny_model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), tiny_model(*inputs))


@pytest.mark.parametrize("name, published", [("imagenet64", 296e6), ("imagenet256", 554e6)])
def test_published_parameter_counts(name, published):
    with torch.device("meta"):
        model = adm_unet.build(name)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(published, rel=2e-3)  # the paper rounds to millions


def test_imagenet256_has_guided_diffusions_key_layout():
    with torch.device("meta"):
        state = adm_unet.build("imagenet256").state_dict()
    expected_shapes = {
        "time_embed.0.weight": (1024, 256), "time_embed.2.weight": (1024, 1024), "label_emb.weight": (1000, 1024),
        "input_blocks.0.0.weight": (256, 3, 3, 3),
        "input_blocks.3.0.emb_layers.1.weight": (512, 1024),  # the first downsampling ResBlock
        "input_blocks.7.0.skip_connection.weight": (512, 256, 1, 1),  # 256 -> 512 channels
        "input_blocks.13.1.qkv.weight": (3 * 1024, 1024, 1),  # attention at 16 px (rate 16)
        "middle_block.1.proj_out.weight": (1024, 1024, 1), "middle_block.2.out_layers.3.weight": (1024, 1024, 3, 3),
        "output_blocks.17.0.in_layers.0.weight": (512,), "output_blocks.2.2.out_layers.0.bias": (1024,),
        "out.0.weight": (256,), "out.2.weight": (6, 256, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert max(int(k.split(".")[1]) for k in state if k.startswith("input_blocks")) == 17
    assert max(int(k.split(".")[1]) for k in state if k.startswith("output_blocks")) == 17


def test_safetensors_round_trip(generator, tiny_model, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    path = tmp_path / "adm-tiny.safetensors"
    safetensors_torch.save_file(tiny_model.state_dict(), str(path))
    loaded = adm_unet.from_safetensors(path, "tiny")
    inputs = _inputs(generator)
    torch.testing.assert_close(loaded(*inputs), tiny_model(*inputs), rtol=0, atol=0)
    safetensors_torch.save_file(tiny_model.to(torch.bfloat16).state_dict(), str(path))
    assert {p.dtype for p in adm_unet.from_safetensors(path, TINY).parameters()} == {torch.bfloat16}


def test_bad_inputs(generator, tiny_model):
    x, timesteps, labels = _inputs(generator)
    cases = [
        ((x[:, :2], timesteps, labels), ValueError, r"x must be a \(B, 3, H, W\)"),
        ((x.numpy(), timesteps, labels), TypeError, "x must be a torch.Tensor"),
        ((x[..., :15], timesteps, labels), ValueError, "multiples of 2"),
        ((x, timesteps[:1], labels), ValueError, "timesteps must be"),
        ((x, timesteps, None), ValueError, "labels are required"),
        ((x, timesteps, labels.float()), TypeError, "labels must be an int32 or int64"),
        ((x, timesteps, labels[:1]), ValueError, r"labels must have shape \(2,\)"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            tiny_model(*args)
    unconditional = adm_unet.build(dataclasses.replace(TINY, num_classes=None))
    with pytest.raises(ValueError, match="not class-conditional"):
        unconditional(x, timesteps, labels)
    with pytest.raises(ValueError, match="unknown ADM config"):
        adm_unet.build("imagenet512")
    with pytest.raises(ValueError, match="method must be 'ddpm', 'ddim' or 'dpm_solver'; got 'euler'"):
        adm_unet.sample(tiny_model, x, labels, method="euler")
    with pytest.raises(ValueError, match="num_steps must be"):
        adm_unet.respaced_timesteps(0)


def test_respacing_is_guided_diffusions():
    """space_timesteps(1000, "N") for every N: a float stride (T - 1) / (N - 1) accumulated and
    rounded (Python's round: ties to even)."""
    for steps in range(1, 1001):
        stride, position, expected = 999 / (steps - 1) if steps > 1 else 1.0, 0.0, []
        for _ in range(steps):
            expected.append(round(position))
            position += stride
        assert adm_unet.respaced_timesteps(steps).tolist() == expected[::-1]


def test_ddim_sample_runs_guided_diffusions_ddim_chain(generator, tiny_model):
    """ddim3: stride 334 (stride 333 would give 4 timesteps), so 668, 334, 0."""
    x, _, labels = _inputs(generator)
    calls, hook = _recorded_calls(tiny_model)
    try:
        adm_unet.sample(tiny_model, x, labels, num_steps=3, method="ddim")
    finally:
        hook.remove()
    assert [call[0] for call in calls] == [[668.0] * 2, [334.0] * 2, [0.0] * 2]
    with pytest.raises(ValueError, match="num_steps=300 cannot be DDIM-respaced.* 250 or 334"):
        adm_unet.sample(tiny_model, x, labels, num_steps=300, method="ddim")


def test_dpm_solver_sample_with_guidance_matches_diffusers_scheduler(generator, tiny_model):
    """DPMSolverMultistepScheduler (DPM-Solver++(2M), "linspace" timesteps) on the tiny config's
    beta schedule, stepped by hand on the eps channels with separate guidance calls."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
    x, _, labels = _inputs(generator)
    null = torch.full_like(labels, TINY.num_classes - 1)
    scale, steps = 2.0, 3
    with torch.no_grad():
        sampled = adm_unet.sample(tiny_model, x, labels, null_labels=null, guidance_scale=scale, num_steps=steps,
                                  method="dpm_solver")
    schedule = {"linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
                "cosine": dict(beta_schedule="squaredcos_cap_v2")}[TINY.noise_schedule]
    scheduler = diffusers.DPMSolverMultistepScheduler(**schedule)
    scheduler.set_timesteps(steps)
    expected = x
    with torch.no_grad():
        for t in scheduler.timesteps:
            time = t.expand(x.shape[0]).float()
            eps_c, eps_u = (tiny_model(expected, time, y)[:, :TINY.in_channels] for y in (labels, null))
            expected = scheduler.step(eps_u + scale * (eps_c - eps_u), t, expected).prev_sample
    torch.testing.assert_close(sampled, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _recorded_calls(model):
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append((args[1].tolist(), args[2].tolist())))
    return calls, hook


def test_ddpm_sample_runs_the_respaced_chain_with_learned_variance(generator, tiny_model):
    x, _, labels = _inputs(generator)
    calls, hook = _recorded_calls(tiny_model)
    try:
        images = adm_unet.sample(tiny_model, x, labels, num_steps=3, generator=generator)
    finally:
        hook.remove()
    assert [call[0] for call in calls] == [[999.0] * 2, [500.0] * 2, [0.0] * 2]
    assert all(call[1] == labels.tolist() for call in calls)
    assert images.shape == x.shape and torch.isfinite(images).all()


def test_ddim_with_guidance_is_one_batched_call_per_step(generator, tiny_model):
    x, _, labels = _inputs(generator)
    null = torch.full_like(labels, TINY.num_classes - 1)
    scale = 3.0
    calls, hook = _recorded_calls(tiny_model)
    try:
        images = adm_unet.sample(tiny_model, x, labels, null_labels=null, guidance_scale=scale, num_steps=2,
                                 method="ddim")
    finally:
        hook.remove()
    assert [call[1] for call in calls] == [null.tolist() + labels.tolist()] * 2
    # The same two deterministic DDIM steps (timesteps 500, 0 of the linear schedule) by hand,
    # with guided-diffusion's clipping of x0 and eps re-derived from the clipped x0.
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    expected = x
    for t, previous in ((500, 0), (0, None)):
        eps_c, eps_u = (tiny_model(expected, torch.full((2,), float(t)), y)[:, :3] for y in (labels, null))
        eps = eps_u + scale * (eps_c - eps_u)
        x0 = ((expected - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()).clamp(-1, 1)
        eps = (expected - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
        abar_prev = abar[previous] if previous is not None else torch.tensor(1.0, dtype=torch.float64)
        expected = (abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps).float()
    torch.testing.assert_close(images, expected, rtol=1e-4, atol=1e-4)


def test_example_step(generator, tiny_model):
    step = adm_unet.example_step(tiny_model, batch=2, resolution=8, generator=generator)
    out = step()
    assert out.shape == (4, 2 * TINY.in_channels, 8, 8) and not out.requires_grad
    torch.testing.assert_close(step(), out, rtol=0, atol=0)  # the inputs are drawn once
    with pytest.raises(ValueError, match="resolution must be a positive multiple of 2"):
        adm_unet.example_step(tiny_model, resolution=9)
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        adm_unet.example_step(tiny_model, batch=0)


def test_step_benchmark_runs_through_the_harness_on_cpu(tmp_path):
    from fastgen.bench import harness, models_adm

    def one_call_timer(prepare, reps, warmup):
        """Timings are not the point here (the interpreter is slow): one call, a nominal 1 ms."""
        prepare()()
        return [1.0]

    benches = models_adm.benchmarks(config_names=("tiny",), side=8)
    rows, _, _ = harness.run(benches, quick=True, out_dir=tmp_path, device="cpu", no_compile=True,
                             timer=one_call_timer)
    statuses = {r["impl"]: r["status"] for r in rows}
    assert set(statuses) == {"eager", "triton", "cuda"} and {r["name"] for r in rows} == {"model.adm-tiny.step"}
    assert statuses["eager"] == statuses["triton"] == "ok", statuses
    # The CUDA kernels take CUDA tensors only: the row is there, skipped with the reason.
    assert statuses["cuda"].startswith("skipped: BackendUnavailable"), statuses


def test_step_flops_are_about_twice_the_published_macs():
    """DiT's table lists ADM 256 at 1120 GFLOPs (multiply-adds) per image and forward."""
    from fastgen.bench import models_adm

    step = models_adm.benchmarks(quick=True)[0]
    assert step.cases[0].work == pytest.approx(2 * 2 * 1120e9, rel=0.02)
