"""ADM's noisy-image classifier: its state-dict layout against a transcription of
guided-diffusion's EncoderUNetModel construction, the released configs' parameter counts, the
forward and the attention pool against float64 re-derivations, the Triton backend, loading and
bad inputs. Classifier guidance (samplers' cond_fn, adm_unet.sample with a classifier): each
step against float64 transcriptions of guided-diffusion's guided DDPM and DDIM steps, and a
planted classifier that pulls samples towards its class."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen import samplers
from fastgen.models import adm_classifier, adm_unet
from model_checks import seed_global_rng
from test_adm_unet_model import _group_norm, _randomized, _reference_sequential

TINY = adm_classifier.CONFIGS["tiny"]


def _guided_diffusion_shapes(config) -> dict:
    """{key: shape} of guided-diffusion's EncoderUNetModel(pool="attention",
    use_scale_shift_norm=True, resblock_updown=True), written out from its constructor's loops:
    time MLP, input conv, per level num_res_blocks ResBlocks (+ AttentionBlock at the listed
    downsample rates) and a down ResBlock between levels, the middle ResBlock / attention /
    ResBlock, then out = [GroupNorm, SiLU, AttentionPool2d]."""
    shapes, emb = {}, 4 * config.model_channels

    def res_block(prefix, channels, out):
        shapes.update({
            f"{prefix}.in_layers.0.weight": (channels,), f"{prefix}.in_layers.0.bias": (channels,),
            f"{prefix}.in_layers.2.weight": (out, channels, 3, 3), f"{prefix}.in_layers.2.bias": (out,),
            f"{prefix}.emb_layers.1.weight": (2 * out, emb), f"{prefix}.emb_layers.1.bias": (2 * out,),
            f"{prefix}.out_layers.0.weight": (out,), f"{prefix}.out_layers.0.bias": (out,),
            f"{prefix}.out_layers.3.weight": (out, out, 3, 3), f"{prefix}.out_layers.3.bias": (out,),
        })
        if channels != out:
            shapes.update({f"{prefix}.skip_connection.weight": (out, channels, 1, 1),
                           f"{prefix}.skip_connection.bias": (out,)})

    def attention(prefix, channels):
        shapes.update({
            f"{prefix}.norm.weight": (channels,), f"{prefix}.norm.bias": (channels,),
            f"{prefix}.qkv.weight": (3 * channels, channels, 1), f"{prefix}.qkv.bias": (3 * channels,),
            f"{prefix}.proj_out.weight": (channels, channels, 1), f"{prefix}.proj_out.bias": (channels,),
        })

    shapes.update({"time_embed.0.weight": (emb, config.model_channels), "time_embed.0.bias": (emb,),
                   "time_embed.2.weight": (emb, emb), "time_embed.2.bias": (emb,)})
    attention_ds = [config.image_size // resolution for resolution in config.attention_resolutions]
    ch = config.channel_mult[0] * config.model_channels
    shapes.update({"input_blocks.0.0.weight": (ch, config.in_channels, 3, 3), "input_blocks.0.0.bias": (ch,)})
    block, ds = 1, 1
    for level, mult in enumerate(config.channel_mult):
        for _ in range(config.num_res_blocks):
            res_block(f"input_blocks.{block}.0", ch, mult * config.model_channels)
            ch = mult * config.model_channels
            if ds in attention_ds:
                attention(f"input_blocks.{block}.1", ch)
            block += 1
        if level != len(config.channel_mult) - 1:
            res_block(f"input_blocks.{block}.0", ch, ch)
            block += 1
            ds *= 2
    res_block("middle_block.0", ch, ch)
    attention("middle_block.1", ch)
    res_block("middle_block.2", ch, ch)
    side = config.image_size // ds
    shapes.update({
        "out.0.weight": (ch,), "out.0.bias": (ch,), "out.2.positional_embedding": (ch, side ** 2 + 1),
        "out.2.qkv_proj.weight": (3 * ch, ch, 1), "out.2.qkv_proj.bias": (3 * ch,),
        "out.2.c_proj.weight": (config.num_classes, ch, 1), "out.2.c_proj.bias": (config.num_classes,),
    })
    return shapes


@pytest.mark.parametrize("name", sorted(adm_classifier.CONFIGS))
def test_state_dict_is_guided_diffusions(name):
    with torch.device("meta"):
        state = adm_classifier.build(name).state_dict()
    assert {key: tuple(value.shape) for key, value in state.items()} == _guided_diffusion_shapes(
        adm_classifier.CONFIGS[name])


@pytest.mark.parametrize("name, count", [("imagenet64", 65_438_568), ("imagenet128", 42_568_040),
                                         ("imagenet256", 54_096_360)])
def test_released_classifiers_parameter_counts(name, count):
    """The counts of the transcription above (the paper does not list them): 4 bytes each, the
    float32 .pt files' sizes (about 262, 170 and 216 MB)."""
    with torch.device("meta"):
        model = adm_classifier.build(name)
    assert sum(p.numel() for p in model.parameters()) == count
    assert sum(math.prod(shape) for shape in _guided_diffusion_shapes(adm_classifier.CONFIGS[name]).values()) == count


def test_released_configs_are_the_readme_flags():
    """--classifier_width 128, --classifier_attention_resolutions 32,16,8, heads of 64 channels,
    --classifier_depth 4 at 64x64 and the default 2 at 128 and 256, 1000 ImageNet classes."""
    depths = {"imagenet64": 4, "imagenet128": 2, "imagenet256": 2}
    for name, depth in depths.items():
        config = adm_classifier.CONFIGS[name]
        assert (config.model_channels, config.num_res_blocks, config.attention_resolutions, config.num_head_channels,
                config.num_classes) == (128, depth, (32, 16, 8), 64, 1000)
        assert config.pooled_side == 8  # every released classifier pools an 8 x 8 map


def _reference_attention_pool(pool, x):
    """guided-diffusion's AttentionPool2d as written: every token's query through QKVAttention
    (q, k, v chunks, then heads), q and k each scaled by d^(-1/4), then the first token."""
    batch, channels = x.shape[:2]
    tokens = x.reshape(batch, channels, -1)
    tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1) + pool.positional_embedding[None]
    qkv = pool.qkv_proj(tokens)
    heads, length = pool.heads, tokens.shape[-1]
    head_channels = channels // heads
    scale = 1 / math.sqrt(math.sqrt(head_channels))
    q, k, v = (t.reshape(batch * heads, head_channels, length) for t in qkv.chunk(3, dim=1))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    attended = torch.einsum("bts,bcs->bct", weight, v).reshape(batch, channels, length)
    return pool.c_proj(attended)[:, :, 0]


def _reference_forward(model, x, timesteps):
    half = model.config.model_channels // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=x.dtype) / half)
    angles = timesteps.to(x.dtype)[:, None] * frequencies
    emb = model.time_embed(torch.cat([torch.cos(angles), torch.sin(angles)], dim=1))
    h = x
    for block in model.input_blocks:
        h = _reference_sequential(block, h, emb)
    h = _reference_sequential(model.middle_block, h, emb)
    return _reference_attention_pool(model.out[2], F.silu(_group_norm(h, model.out[0])))


@pytest.fixture
def tiny_classifier(generator):
    seed_global_rng(generator)
    return _randomized(adm_classifier.build("tiny"), generator).eval()


def _inputs(generator, batch=3, dtype=torch.float32):
    x = torch.randn(batch, TINY.in_channels, TINY.image_size, TINY.image_size, generator=generator, dtype=dtype)
    return x, torch.randint(0, 1000, (batch,), generator=generator).float()


def test_forward_matches_guided_diffusion_formulation_in_float64(generator, tiny_classifier):
    x, timesteps = _inputs(generator)
    with torch.no_grad():
        expected = _reference_forward(tiny_classifier.double(), x.double(), timesteps)
        logits = tiny_classifier.float()(x, timesteps)
    assert logits.shape == (3, TINY.num_classes) and logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("side, channels, head_channels, batch", [(1, 32, 32, 2), (3, 64, 16, 3), (5, 96, 32, 1)])
def test_attention_pool_matches_the_float64_formulation(generator, side, channels, head_channels, batch):
    """Odd map sides (a single position too), one to four heads."""
    seed_global_rng(generator)
    pool = _randomized(adm_classifier.AttentionPool(side, channels, head_channels, 7), generator).double()
    x = torch.randn(batch, channels, side, side, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        out = pool(x)
        expected = _reference_attention_pool(pool, x)
    assert out.shape == (batch, 7)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_attention_pool_uses_the_new_head_order(generator):
    """Permuting W_qkv's rows from the q, k, v-first order into the heads-first one changes the
    logits, so the test above tells the two orders apart."""
    seed_global_rng(generator)
    pool = _randomized(adm_classifier.AttentionPool(2, 64, 16, 5), generator)
    x = torch.randn(2, 64, 2, 2, generator=generator)
    with torch.no_grad():
        before = pool(x)
        heads_first = torch.arange(3 * 64).reshape(3, 4, 16).transpose(0, 1).reshape(-1)
        pool.qkv_proj.weight.copy_(pool.qkv_proj.weight[heads_first])
        pool.qkv_proj.bias.copy_(pool.qkv_proj.bias[heads_first])
        assert not torch.allclose(pool(x), before, rtol=1e-3, atol=1e-3)


# The pool alone (one query, an odd number of keys): the encoder's blocks are the UNet's, which
# test_adm_unet_model runs on every backend; the whole classifier takes half a minute in the
# Triton interpreter.
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_attention_pool_on_triton_matches_the_reference(generator, device):
    seed_global_rng(generator)
    pool = _randomized(adm_classifier.AttentionPool(3, 64, 16, 5), generator).to(device)
    x = torch.randn(2, 64, 3, 3, generator=generator).to(device)
    results = {}
    for backend in ("reference", "triton"):
        pool.zero_grad()
        x.grad = None
        x.requires_grad_(True)
        with fastgen.use_backend(backend):
            logits = pool(x)
            logits.logsumexp(-1).sum().backward()
        results[backend] = [logits.detach(), x.grad.clone()] + [p.grad.clone() for p in pool.parameters()]
    for got, expected in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_keeps_dtype_and_scalar_timestep_broadcasts(generator, tiny_classifier, dtype):
    model = tiny_classifier.to(dtype)
    x, _ = _inputs(generator, batch=2, dtype=dtype)
    logits = model(x, 250.0)
    assert logits.shape == (2, TINY.num_classes) and logits.dtype == dtype and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, model(x, torch.full((2,), 250.0)), rtol=0, atol=0)


def test_traces_as_one_graph(generator, tiny_classifier):
    inputs = _inputs(generator, batch=2)
    compiled = torch.compile(tiny_classifier, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), tiny_classifier(*inputs))


def test_safetensors_round_trip_is_strict(generator, tiny_classifier, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    path = tmp_path / "classifier-tiny.safetensors"
    state = tiny_classifier.state_dict()
    safetensors_torch.save_file(state, str(path))
    loaded = adm_classifier.from_safetensors(path, "tiny")
    assert not loaded.training
    inputs = _inputs(generator)
    torch.testing.assert_close(loaded(*inputs), tiny_classifier(*inputs), rtol=0, atol=0)
    del state["out.2.positional_embedding"]
    safetensors_torch.save_file(state, str(path))
    with pytest.raises(RuntimeError, match="positional_embedding"):
        adm_classifier.from_safetensors(path, "tiny")


def test_bad_inputs(generator, tiny_classifier):
    x, timesteps = _inputs(generator)
    cases = [
        ((x.numpy(), timesteps), TypeError, "x must be a torch.Tensor"),
        ((x[:, :2], timesteps), ValueError, r"x must be a \(B, 3, 16, 16\) tensor"),
        ((x[..., :8, :8], timesteps), ValueError, "positional embedding fixes the size"),
        ((x, timesteps[:2]), ValueError, r"timesteps must be a scalar or of shape \(3,\)"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            tiny_classifier(*args)
    with pytest.raises(ValueError, match="unknown ADM classifier config"):
        adm_classifier.build("imagenet512")
    with pytest.raises(ValueError, match="multiple of num_head_channels 24"):
        adm_classifier.AttentionPool(2, 64, 24, 10)


# Classifier guidance. guided-diffusion's sampling loops transcribed in float64 on its respaced
# diffusion (alphas_cumprod, posterior variance and its log clipped at index 0, the posterior
# mean coefficients, indexed by the respaced step i, original timestep kept[i] ascending); each
# step starts from the sampler's own x_t so that rounding does not compound.
def _linear_schedule(kept):
    full = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    abar = full[kept]
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1 - abar / abar_prev
    posterior_variance = betas * (1 - abar_prev) / (1 - abar)
    return dict(abar=abar, abar_prev=abar_prev, betas=betas, posterior_variance=posterior_variance,
                log_variance_clipped=torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
                mean_coef1=betas * abar_prev.sqrt() / (1 - abar),
                mean_coef2=(1 - abar_prev) * (1 - betas).sqrt() / (1 - abar))


def _reference_cond_fn(classifier, scale):
    """guided-diffusion's classifier-guidance cond_fn: the scaled gradient of the selected log-softmax."""
    def cond_fn(x, t, labels):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            return torch.autograd.grad(log_probs[range(len(labels)), labels].sum(), x_in)[0] * scale
    return cond_fn


def _pred_xstart(schedule, i, x, eps):
    abar = schedule["abar"][i]
    return ((1 / abar).sqrt() * x - (1 / abar - 1).sqrt() * eps).clamp(-1, 1)


def _reference_p_sample(model, cond_fn, schedule, kept, i, x, labels, noise, eta=None, learned_variance=True):
    """p_sample with condition_mean; the variance LEARNED_RANGE or FIXED_SMALL."""
    t = torch.full((x.shape[0],), float(kept[i]), dtype=torch.float64)
    if learned_variance:
        eps, v = model(x, t, labels).chunk(2, dim=1)
        frac = (v + 1) / 2
        log_variance = frac * schedule["betas"][i].log() + (1 - frac) * schedule["log_variance_clipped"][i]
        variance = log_variance.exp()
    else:
        eps = model(x, t, labels)
        variance, log_variance = schedule["posterior_variance"][i], schedule["log_variance_clipped"][i]
    mean = schedule["mean_coef1"][i] * _pred_xstart(schedule, i, x, eps) + schedule["mean_coef2"][i] * x
    mean = mean + variance * cond_fn(x, t, labels)
    return mean + (i != 0) * (0.5 * log_variance).exp() * noise


def _reference_ddim_sample(model, cond_fn, schedule, kept, i, x, labels, noise, eta, learned_variance=True):
    """ddim_sample with condition_score."""
    t = torch.full((x.shape[0],), float(kept[i]), dtype=torch.float64)
    abar, abar_prev = schedule["abar"][i], schedule["abar_prev"][i]
    out = model(x, t, labels)
    pred_xstart = _pred_xstart(schedule, i, x, out.chunk(2, dim=1)[0] if learned_variance else out)
    eps = ((1 / abar).sqrt() * x - pred_xstart) / (1 / abar - 1).sqrt()
    eps = eps - (1 - abar).sqrt() * cond_fn(x, t, labels)
    pred_xstart = (1 / abar).sqrt() * x - (1 / abar - 1).sqrt() * eps
    eps = ((1 / abar).sqrt() * x - pred_xstart) / (1 / abar - 1).sqrt()
    sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
    mean = pred_xstart * abar_prev.sqrt() + (1 - abar_prev - sigma ** 2).sqrt() * eps
    return mean + (i != 0) * sigma * noise


def _assert_steps_match(reference_step, inputs, images, kept, replay, rtol, atol, **step_arguments):
    """Each sampler step, from the x_t the model was called with to the next one (the images
    after the last step), against `reference_step` in float64 with the same noise draws."""
    assert len(inputs) == len(kept)
    largest_error = 0.0
    for step, (x_t, out) in enumerate(zip(inputs, inputs[1:] + [images])):
        i = len(kept) - 1 - step
        # The samplers draw no noise for the last step, which guided-diffusion masks out.
        noise = (torch.randn(x_t.shape, generator=replay, dtype=x_t.dtype) if i != 0 else torch.zeros(x_t.shape))
        with torch.no_grad():
            expected = reference_step(schedule=_linear_schedule(kept), kept=kept, i=i, x=x_t.double(),
                                      noise=noise.double(), **step_arguments)
        torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol, msg=f"step {step}")
        largest_error = max(largest_error, (out.double() - expected).abs().max().item())
    return largest_error


def _recording(function, inputs):
    def recorded(x, t, cond):
        inputs.append(x.detach().clone())
        return function(x, t, cond)
    return recorded


CHAINS = {"ddpm": ([0, 500, 999], 0.0), "ddim": ([0, 250, 500, 750], 0.5)}


@pytest.mark.parametrize("method, learned_variance", [("ddpm", True), ("ddpm", False), ("ddim", False)])
def test_cond_fn_steps_match_guided_diffusion_in_float64(generator, method, learned_variance):
    """samplers.ddpm / ddim in float64 on a random model (eps and v: tanh of a random linear map)
    and a random gradient field, 10^4 times larger at t = 0, where the DDPM step's variance is
    about 1e-4: every step's guidance term is O(1), so a tolerance of 1e-10 sees each one."""
    kept, eta = CHAINS[method]
    weight = torch.randn(10, 5, generator=generator, dtype=torch.float64) / 2
    field = torch.randn(3, 5, generator=generator, dtype=torch.float64)

    def model(x, t, cond):
        out = torch.tanh(x @ weight.T + t[:, None].double() / 1000)
        return out if learned_variance else out[:, :5]

    def cond_fn(x, t, cond):
        return field * torch.sin(x) * (1 + 1e4 * (t[:, None] == 0))

    noise = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    seed = int(torch.randint(2**62, (), generator=generator))
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    inputs, sampler = [], getattr(samplers, method)
    options = dict(learned_variance=learned_variance) if method == "ddpm" else dict(eta=eta)
    images = sampler(_recording(model, inputs), noise, abar, timesteps=torch.tensor(kept[::-1]), clip_denoised=True,
                     generator=torch.Generator().manual_seed(seed), cond_fn=cond_fn, **options)
    reference_step = _reference_p_sample if method == "ddpm" else _reference_ddim_sample
    _assert_steps_match(reference_step, inputs, images, kept, torch.Generator().manual_seed(seed), 1e-10, 1e-10,
                        model=model, cond_fn=cond_fn, labels=None, eta=eta, learned_variance=learned_variance)


@pytest.fixture
def tiny_unet(generator):
    seed_global_rng(generator)
    return _randomized(adm_unet.build("tiny"), generator).eval()


@pytest.mark.parametrize("method", sorted(CHAINS))
def test_classifier_guided_adm_sampling_matches_guided_diffusion(generator, tiny_unet, tiny_classifier, method):
    """adm_unet.sample with the random tiny UNet and classifier, in float32, against the float64
    transcription on float64 copies of both (labels reach the classifier, the scale applies)."""
    kept, eta = CHAINS[method]
    x, _ = _inputs(generator, batch=2)
    labels = torch.randint(0, TINY.num_classes, (2,), generator=generator)
    scale = 3.0
    seed = int(torch.randint(2**62, (), generator=generator))
    inputs = []
    hook = tiny_unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    try:
        with torch.no_grad():  # the gradient is taken all the same
            images = adm_unet.sample(tiny_unet, x, labels, num_steps=len(kept), method=method, eta=eta,
                                     generator=torch.Generator().manual_seed(seed), classifier=tiny_classifier,
                                     classifier_scale=scale)
    finally:
        hook.remove()
    torch.testing.assert_close(inputs[0], x, rtol=0, atol=0)
    reference_step = _reference_p_sample if method == "ddpm" else _reference_ddim_sample
    cond_fn = _reference_cond_fn(copy.deepcopy(tiny_classifier).double(), scale)
    _assert_steps_match(reference_step, inputs, images, kept, torch.Generator().manual_seed(seed), 1e-4, 1e-4,
                        model=copy.deepcopy(tiny_unet).double(), cond_fn=cond_fn, labels=labels, eta=eta)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_guidance_by_a_planted_classifier_moves_samples_to_its_class(generator, method):
    """Data N(0, I), whose exact noise prediction is eps(x_t) = sqrt(1 - abar_t) x_t, and the
    planted log p(y | x) = -|x - mu_y|^2 + const with known class means: from the same noise
    and noise draws, every guided sample lands closer to its class mean than the unguided one,
    and a zero gradient changes nothing."""
    means = torch.randn(4, 3, 4, 4, generator=generator)
    labels = torch.randint(0, 4, (8,), generator=generator)
    noise = torch.randn(8, 3, 4, 4, generator=generator)
    seed = int(torch.randint(2**62, (), generator=generator))
    abar = samplers.alphas_cumprod(samplers.beta_schedule("linear"))

    def eps(x, t, cond):
        return (1 - abar[t.long()]).sqrt().float().view(-1, 1, 1, 1) * x

    chain = dict(timesteps=adm_unet.respaced_timesteps(25)) if method == "ddpm" else dict(num_steps=25)

    def sampled(scale=None):
        def cond_fn(x, t, y):
            return -2 * scale * (x - means[y])
        return getattr(samplers, method)(eps, noise, abar, cond=labels, generator=torch.Generator().manual_seed(seed),
                                         cond_fn=None if scale is None else cond_fn, **chain)

    def distance(images):
        return (images - means[labels]).flatten(1).norm(dim=1)

    unguided = sampled()
    torch.testing.assert_close(sampled(0.0), unguided, rtol=0, atol=0)
    ratio = distance(sampled(0.3)) / distance(unguided)
    assert ratio.max() < 0.9 and ratio.mean() < 0.75, ratio  # about 0.65 (DDPM) and 0.1 (DDIM) on average


class _PlantedClassifier(torch.nn.Module):
    """logits_c(x) = -|x - mu_c|^2: grad_x log softmax(x)_y = 2 (mu_y - sum_c p_c(x) mu_c)."""

    def __init__(self, means):
        super().__init__()
        self.means = means

    def forward(self, x, t):
        return -(x[:, None] - self.means[None]).square().flatten(2).sum(-1)


def test_classifier_gradient_is_the_scaled_gradient_of_log_softmax(generator):
    means = torch.randn(5, 2, 3, generator=generator, dtype=torch.float64) / 3
    x = torch.randn(4, 2, 3, generator=generator, dtype=torch.float64) / 3
    labels = torch.randint(0, 5, (4,), generator=generator)
    classifier = _PlantedClassifier(means)
    probabilities = torch.softmax(classifier(x, None), dim=-1)
    expected = 2.5 * 2 * (means[labels] - torch.einsum("bc,cij->bij", probabilities, means))
    with torch.no_grad():
        gradient = adm_unet.classifier_gradient(classifier, 2.5)(x, torch.zeros(4), labels)
    assert gradient.dtype == torch.float64
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"classifier guidance needs labels of shape \(4,\)"):
        adm_unet.classifier_gradient(classifier, 1.0)(x, torch.zeros(4), None)


def test_unconditional_model_is_guided_by_the_classifier_alone(generator, tiny_classifier):
    """256x256_diffusion_uncond's use: the labels reach the classifier, not the model."""
    seed_global_rng(generator)
    model = _randomized(adm_unet.build(dataclasses.replace(adm_unet.CONFIGS["tiny"], num_classes=None)), generator)
    x, _ = _inputs(generator, batch=2)
    labels = torch.randint(0, TINY.num_classes, (2,), generator=generator)
    with torch.no_grad():
        unguided = adm_unet.sample(model.eval(), x, num_steps=2, method="ddim")
        guided = adm_unet.sample(model, x, labels, num_steps=2, method="ddim", classifier=tiny_classifier,
                                 classifier_scale=5.0)
    assert guided.shape == x.shape and not torch.allclose(guided, unguided)
    with pytest.raises(ValueError, match="not class-conditional"):
        adm_unet.sample(model, x, labels, num_steps=2, method="ddim")


def test_learned_variance_guidance_refuses_a_one_step_chain(generator):
    abar = samplers.alphas_cumprod(samplers.beta_schedule("linear"))
    x = torch.randn(2, 3, generator=generator)
    with pytest.raises(ValueError, match="cond_fn with learned_variance needs at least 2 timesteps"):
        samplers.ddpm(lambda x, t, c: torch.cat([x, x], 1), x, abar, timesteps=torch.tensor([500]),
                      learned_variance=True, cond_fn=lambda x, t, c: x)
    # Without learned variance the last step's variance is 0: one guided step is the unguided one.
    unguided = samplers.ddpm(lambda x, t, c: x, x, abar, timesteps=torch.tensor([500]))
    torch.testing.assert_close(samplers.ddpm(lambda x, t, c: x, x, abar, timesteps=torch.tensor([500]),
                                             cond_fn=lambda x, t, c: x), unguided, rtol=0, atol=0)


def test_guidance_is_refused_where_its_formulation_is_undefined(generator, tiny_classifier):
    """DPM-Solver has no classifier guidance here; DDIM's guided x0 divides by sqrt(abar), 0 at
    the first timestep of a zero-terminal-SNR chain."""
    model = adm_unet.build("tiny").eval()
    x, _ = _inputs(generator, batch=2)
    with pytest.raises(ValueError, match="method 'dpm_solver' takes no classifier"):
        adm_unet.sample(model, x, torch.zeros(2, dtype=torch.long), num_steps=2, method="dpm_solver",
                        classifier=tiny_classifier)
    abar = samplers.alphas_cumprod(samplers.zero_terminal_snr(samplers.beta_schedule("linear")))
    noise = torch.randn(2, 3, generator=generator)
    with pytest.raises(ValueError, match="alphas_cumprod is 0 at timestep 999 .* classifier guidance re-derives"):
        samplers.ddim(lambda x, t, c: x, noise, abar, timesteps=samplers.trailing_timesteps(4),
                      prediction_type="v_prediction", cond_fn=lambda x, t, c: x)
