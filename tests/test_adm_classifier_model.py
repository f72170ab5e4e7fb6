"""ADM's noisy-image classifier: its state-dict layout against a transcription of
guided-diffusion's EncoderUNetModel construction, the released configs' parameter counts, the
forward and the attention pool against float64 re-derivations, the Triton backend, loading and
bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen.models import adm_classifier
from test_adm_unet_model import _group_norm, _randomized, _reference_sequential, _seed_global_rng

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
    _seed_global_rng(generator)
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
    _seed_global_rng(generator)
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
    _seed_global_rng(generator)
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
    _seed_global_rng(generator)
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
