"""VAR's multi-scale VQVAE (fastgen.models.var_vqvae): the residual quantizer against a plain
float64 loop with torch.cdist, backends, VAR's key layout and parameter count, the training
forward."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen.models import var_vqvae
from model_checks import EVERY_BACKEND, seed_global_rng

TINY = var_vqvae.CONFIGS["tiny"]


@pytest.fixture
def tiny_model(generator):
    seed_global_rng(generator)
    model = var_vqvae.build("tiny")
    with torch.no_grad():
        # Codes at the latent's scale (nn.Embedding's N(0, 1)), phis near VAR's trained ones: small convs.
        for phi in model.quantize.quant_resi.qresi_ls:
            phi.weight.mul_(0.3)
    return model


def _images(generator, batch=2, dtype=torch.float32):
    side = TINY.resolution
    return (torch.rand(batch, TINY.in_channels, side, side, generator=generator, dtype=dtype) * 2 - 1)


def _loop_quantizer(f, codebook, phis, config):
    """Residual quantization written out in float64: adaptive average pooling, cdist argmin,
    bicubic upsampling, phi(x) = (1 - q) x + q conv(x) with numpy's nearest tick. Returns
    (indices, f_hat, loss, f_hat after each scale)."""
    f = f.double()
    codebook = codebook.double()
    patch_nums, q = config.patch_nums, config.quant_resi
    n = len(phis)
    margin = 1 / 3 / n if n == 4 else 1 / 2 / n
    ticks = np.linspace(margin, 1 - margin, n)
    side = patch_nums[-1]
    rest, f_hat, loss, indices, partial_f_hats = f.clone(), torch.zeros_like(f), 0.0, [], []
    for s, p in enumerate(patch_nums):
        z = F.adaptive_avg_pool2d(rest, p)
        rows = z.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        idx = torch.cdist(rows, codebook).argmin(1)
        indices.append(idx.view(f.shape[0], p * p))
        h = codebook[idx].view(f.shape[0], p, p, -1).permute(0, 3, 1, 2)
        if p != side:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        phi = phis[int(np.argmin(np.abs(ticks - s / (len(patch_nums) - 1))))]
        h = (1 - q) * h + q * F.conv2d(h, phi.weight.double(), phi.bias.double(), padding=1)
        f_hat = f_hat + h
        partial_f_hats.append(f_hat)
        rest = rest - h
        loss = loss + (1 + config.beta) * (f_hat - f).square().mean()
    return indices, f_hat, loss / len(patch_nums), partial_f_hats


def test_quantizer_matches_the_plain_loop(generator, tiny_model):
    model = tiny_model.double()
    f = torch.randn(3, TINY.z_channels, 6, 6, generator=generator, dtype=torch.float64)
    indices, f_hat, loss = model.quantize.quantize(f, with_loss=True)
    expected_indices, expected_f_hat, expected_loss, _ = _loop_quantizer(
        f, model.quantize.embedding.weight.detach(), model.quantize.quant_resi.qresi_ls, TINY)
    for scale, (idx, expected) in enumerate(zip(indices, expected_indices)):
        assert torch.equal(idx, expected), f"scale {scale}"
    torch.testing.assert_close(f_hat, expected_f_hat)
    torch.testing.assert_close(loss, expected_loss)
    # The scales really refine: each adds information, so the last residual is smaller than f.
    assert (f_hat - f).square().mean() < f.square().mean()


def test_teacher_forcing_input_is_each_partial_f_hat_pooled_to_the_next_scale(generator, tiny_model):
    """VAR's training input: f_hat after scales 1..s, average-pooled to p_{s+1}, rows in raster order."""
    model = tiny_model.double()
    f = torch.randn(2, TINY.z_channels, 6, 6, generator=generator, dtype=torch.float64)
    indices, _, _, partial_f_hats = _loop_quantizer(
        f, model.quantize.embedding.weight.detach(), model.quantize.quant_resi.qresi_ls, TINY)
    expected = torch.cat([F.adaptive_avg_pool2d(f_hat, p).flatten(2).transpose(1, 2)
                          for f_hat, p in zip(partial_f_hats, TINY.patch_nums[1:])], dim=1)
    with torch.no_grad():
        got = model.quantize.teacher_forcing_input(indices)
    assert got.shape == (2, sum(p * p for p in TINY.patch_nums[1:]), TINY.z_channels)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match=r"indices\[1\] must be int64 of shape \(2, 4\)"):
        model.quantize.teacher_forcing_input([indices[0], indices[1][:, :3]] + indices[2:])


def test_indices_round_trip_to_the_same_f_hat_and_image(generator, tiny_model):
    images = _images(generator)
    with torch.no_grad():
        indices = tiny_model.img_to_idx(images)
        assert [idx.shape for idx in indices] == [(2, p * p) for p in TINY.patch_nums]
        f_hat = tiny_model.encode(images)
        torch.testing.assert_close(tiny_model.quantize.indices_to_f_hat(indices), f_hat)
        image = tiny_model.idx_to_img(indices)
        torch.testing.assert_close(image, tiny_model.decode(f_hat))
    assert image.shape == images.shape and image.abs().max() <= 1


@pytest.mark.parametrize("phis, scales", [(4, 10), (4, 5), (4, 4), (3, 10), (6, 7), (2, 2)])
def test_phi_sharing_matches_vars_numpy_rule(phis, scales):
    margin = 1 / 3 / phis if phis == 4 else 1 / 2 / phis
    ticks = np.linspace(margin, 1 - margin, phis)
    expected = [int(np.argmin(np.abs(ticks - s / (scales - 1)))) for s in range(scales)]
    assert var_vqvae.shared_phi_choice(phis, scales) == expected


def _tokens_and_training_pass(model, images):
    model.zero_grad()
    reconstruction, loss, indices = model(images)
    (reconstruction.square().mean() + loss).backward()
    return indices, reconstruction.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("device, backend", EVERY_BACKEND)
def test_fast_backends_match_the_reference(generator, tiny_model, device, backend):
    images = _images(generator).to(device)
    tiny_model.to(device)
    with fastgen.use_backend("reference"):
        indices, reconstruction, loss, grads = _tokens_and_training_pass(tiny_model, images)
    with fastgen.use_backend(backend):
        got_indices, got_reconstruction, got_loss, got_grads = _tokens_and_training_pass(tiny_model, images)
    for scale, (idx, expected) in enumerate(zip(got_indices, indices)):
        assert torch.equal(idx, expected), f"scale {scale}"
    torch.testing.assert_close(got_reconstruction, reconstruction, rtol=0, atol=0)
    torch.testing.assert_close(got_loss, loss, rtol=0, atol=0)
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, grads[name], msg=name)


def test_training_forward_reaches_every_parameter(generator, tiny_model):
    images = _images(generator)
    indices, reconstruction, loss, grads = _tokens_and_training_pass(tiny_model, images)
    assert reconstruction.shape == images.shape and loss.dtype == torch.float32
    with torch.no_grad():
        for idx, expected in zip(indices, tiny_model.img_to_idx(images)):
            assert torch.equal(idx, expected)
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
        # A bias whose every path ends in a one-channel-per-group GroupNorm (tiny's width 32)
        # has a zero gradient up to rounding.
        assert name.endswith("bias") or grad.abs().sum() > 0, name


def test_var_256_parameter_count_and_key_layout():
    with torch.device("meta"):
        model = var_vqvae.build("var-256")
    # VAR's vae_ch160v4096z32.pth: 108.9M parameters (plus the ema_vocab_hit_SV statistics buffer).
    assert sum(p.numel() for p in model.parameters()) == 108_948_355
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes["quantize.embedding.weight"] == (4096, 32)
    assert shapes["quantize.quant_resi.qresi_ls.3.weight"] == (32, 32, 3, 3)
    assert shapes["encoder.down.4.attn.1.qkv.weight"] == (1920, 640, 1, 1)
    assert shapes["encoder.down.3.downsample.conv.weight"] == (320, 320, 3, 3)
    assert shapes["encoder.down.1.block.0.conv1.weight"] == (160, 160, 3, 3)
    assert shapes["encoder.down.2.block.0.nin_shortcut.weight"] == (320, 160, 1, 1)
    assert shapes["encoder.mid.attn_1.proj_out.weight"] == (640, 640, 1, 1)
    assert shapes["decoder.up.4.attn.2.qkv.weight"] == (1920, 640, 1, 1)
    assert shapes["decoder.up.3.block.0.nin_shortcut.weight"] == (320, 640, 1, 1)
    assert shapes["decoder.up.1.upsample.conv.weight"] == (160, 160, 3, 3)
    assert shapes["decoder.conv_out.weight"] == (3, 160, 3, 3)
    assert shapes["quant_conv.weight"] == shapes["post_quant_conv.weight"] == (32, 32, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in shapes and "encoder.down.4.downsample.conv.weight" not in shapes


def test_safetensors_round_trip_with_vars_statistics_buffer(generator, tiny_model, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    state = dict(tiny_model.state_dict())
    state["quantize.ema_vocab_hit_SV"] = torch.rand(len(TINY.patch_nums), TINY.vocab_size, generator=generator)
    path = tmp_path / "var-tiny.safetensors"
    safetensors_torch.save_file(state, str(path))
    loaded = var_vqvae.from_safetensors(path, "tiny")
    images = _images(generator)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(images), tiny_model.encode(images), rtol=0, atol=0)


def test_bad_inputs_raise_value_errors(generator, tiny_model):
    images = _images(generator)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 12, 12\)"):
        tiny_model.img_to_idx(images[..., :8, :8])
    indices = tiny_model.img_to_idx(images)
    with pytest.raises(ValueError, match="one tensor per scale"):
        tiny_model.idx_to_img(indices[:-1])
    with pytest.raises(ValueError, match=r"indices\[2\] must be int64"):
        tiny_model.idx_to_img(indices[:2] + [indices[2][:, :4]] + indices[3:])
    with pytest.raises(ValueError, match="latent must be"):
        tiny_model.quantize.quantize(torch.randn(2, TINY.z_channels, 5, 5), with_loss=False)
    with pytest.raises(ValueError, match="share_quant_resi"):
        var_vqvae.VarVQVAEConfig(share_quant_resi=1)
    with pytest.raises(ValueError, match="unknown VAR VQVAE config"):
        var_vqvae.build("var-512")
    with pytest.raises(ValueError, match="resolution must be 12"):
        var_vqvae.example_step(tiny_model, resolution=16)


def test_example_step_tokenizes_a_batch(generator, tiny_model):
    indices = var_vqvae.example_step(tiny_model, batch=3, generator=generator)()
    assert [idx.shape for idx in indices] == [(3, p * p) for p in TINY.patch_nums]
    assert all(idx.dtype == torch.int64 and 0 <= idx.min() and idx.max() < TINY.vocab_size for idx in indices)


def test_cosine_search_with_using_znorm(generator, tiny_model):
    """using_znorm: each scale's code is the one of highest cosine similarity."""
    config = var_vqvae.VarVQVAEConfig(**{**TINY.__dict__, "using_znorm": True})
    model = var_vqvae.build(config)
    model.load_state_dict(tiny_model.state_dict())
    f = torch.randn(2, TINY.z_channels, 6, 6, generator=generator)
    indices, _, _ = model.quantize.quantize(f, with_loss=False)
    first = F.adaptive_avg_pool2d(f, 1).flatten(1)
    similarity = F.normalize(first, dim=1) @ F.normalize(model.quantize.embedding.weight.detach(), dim=1).T
    assert torch.equal(indices[0][:, 0], similarity.argmax(1))


def _one_call_timer(prepare, reps, warmup):
    """Timings are not the point on CPU: one call, a nominal 1 ms."""
    prepare()()
    return [1.0]


def test_tiny_benchmarks_run_and_agree_on_cpu(tmp_path):
    from fastgen.bench import harness, models_var

    full = models_var.benchmarks(quick=True)
    assert [b.name for b in full] == ["model.var-256.img_to_idx", "model.var-256.quantizer", "model.var-d16.generate"]
    # The search's cross term alone: 2 x (16 x 680 tokens) x 4096 codes x 32 channels.
    assert full[1].cases[0].work == 2 * 16 * 680 * 4096 * 32
    # The tokenizer's benchmarks; test_var_model runs the generation one.
    benches = models_var.benchmarks(config_name="tiny", batches=(2,))[:2]
    rows, _, _ = harness.run(benches, quick=True, out_dir=tmp_path, device="cpu", no_compile=True,
                             timer=_one_call_timer)
    assert {(r["name"], r["impl"]) for r in rows} == {
        (f"model.tiny.{name}", impl) for name in ("img_to_idx", "quantizer") for impl in ("eager", "triton", "cuda")}
    # The CUDA kernels take CUDA tensors only: those rows are there, skipped with the reason.
    assert all(r["status"] == "ok" for r in rows if r["impl"] != "cuda"), [r["status"] for r in rows]
    assert all(r["status"].startswith("skipped: BackendUnavailable") for r in rows if r["impl"] == "cuda"), rows
