"""The VQGAN-style single-scale quantizer (fastgen.models.vqgan): against a float64 formulation
with torch.cdist, across backends, the published codebook sizes, checkpoint loading."""
import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen.models import vqgan

TINY = vqgan.CONFIGS["tiny"]


def _model(generator, config=TINY, dtype=torch.float32):
    model = vqgan.build(config)
    with torch.no_grad():
        # Unit-scale codes (the default init is tiny) so that distances are well separated.
        model.embedding.weight.copy_(torch.randn(model.embedding.weight.shape, generator=generator))
    return model.to(dtype)


def _latents(generator, config=TINY, batch=2, height=3, width=5, dtype=torch.float32):
    return torch.randn(batch, config.embed_dim, height, width, generator=generator, dtype=dtype)


def _direct_quantizer(z, codebook, config):
    """The quantizer written out in float64: cdist + argmin, the loss terms with detach."""
    z, codebook = z.double(), codebook.double()
    if config.l2_normalized:
        z, codebook = F.normalize(z, dim=1), F.normalize(codebook, dim=1)
    rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    idx = torch.cdist(rows, codebook).argmin(1)
    e = codebook[idx]
    codebook_term = ((e - rows.detach()) ** 2).mean()
    commitment = ((e.detach() - rows) ** 2).mean()
    if config.legacy:
        loss = commitment + config.beta * codebook_term
    else:
        loss = codebook_term + config.beta * commitment
    z_q = rows + (e - rows).detach()
    b, _, h, w = z.shape
    return z_q.view(b, h, w, -1).permute(0, 3, 1, 2), loss, idx.view(b, h, w)


def _forward_and_grads(model, z):
    model.zero_grad()
    z = z.detach().requires_grad_(True)
    z_q, loss, idx = model(z)
    weights = torch.linspace(-1, 1, z_q.numel(), dtype=z_q.dtype).view(z_q.shape)
    ((z_q * weights).sum() + 3 * loss).backward()
    return z_q.detach(), loss.detach(), idx, z.grad, model.embedding.weight.grad


@pytest.mark.parametrize("config", [TINY, vqgan.VQGANQuantizerConfig(40, 8, beta=0.5, l2_normalized=True),
                                    vqgan.VQGANQuantizerConfig(40, 8, beta=0.3)],
                         ids=["legacy", "l2-normalized", "standard"])
def test_matches_direct_float64_formulation(generator, config):
    model = _model(generator, config)
    z = _latents(generator, config)
    z_q, loss, idx, grad_z, grad_codebook = _forward_and_grads(model, z)

    z64 = z.double().requires_grad_(True)
    codebook64 = model.embedding.weight.detach().double().requires_grad_(True)
    expected_zq, expected_loss, expected_idx = _direct_quantizer(z64, codebook64, config)
    weights = torch.linspace(-1, 1, z_q.numel(), dtype=torch.float64).view(z_q.shape)
    ((expected_zq * weights).sum() + 3 * expected_loss).backward()

    assert torch.equal(idx, expected_idx)
    torch.testing.assert_close(z_q, expected_zq.float())
    torch.testing.assert_close(loss, expected_loss.float())
    torch.testing.assert_close(grad_z, z64.grad.float())
    torch.testing.assert_close(grad_codebook, codebook64.grad.float())
    torch.testing.assert_close(model.indices_to_latents(idx), z_q)


@pytest.mark.parametrize("config_name", ["tiny", "l2norm-16384x8"])
def test_triton_backend_matches_the_reference(generator, config_name):
    config = vqgan.CONFIGS[config_name]
    if config.codebook_size > 1024:  # keep the interpreter fast: same flags, smaller codebook
        config = vqgan.VQGANQuantizerConfig(200, config.embed_dim, config.beta, config.l2_normalized, config.legacy)
    model = _model(generator, config)
    z = _latents(generator, config, batch=3, height=4, width=4)
    with fastgen.use_backend("reference"):
        expected = _forward_and_grads(model, z)
    with fastgen.use_backend("triton"):
        got = _forward_and_grads(model, z)
    assert torch.equal(got[2], expected[2])
    for name, tensor, reference in zip(("z_q", "loss", "", "grad z", "grad codebook"), got, expected):
        if name:
            torch.testing.assert_close(tensor, reference, msg=name)


@pytest.mark.parametrize("name, codes, dim", [("vqgan-16384x256", 16384, 256), ("l2norm-16384x8", 16384, 8)])
def test_published_codebook_sizes(name, codes, dim):
    with torch.device("meta"):
        model = vqgan.build(name)
    assert model.embedding.weight.shape == (codes, dim)
    assert sum(p.numel() for p in model.parameters()) == codes * dim


def test_safetensors_loads_the_quantizer_out_of_a_tokenizer_checkpoint(generator, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
    model = _model(generator)
    path = tmp_path / "tokenizer.safetensors"
    safetensors_torch.save_file({"quantize.embedding.weight": model.embedding.weight.detach().to(torch.bfloat16),
                                 "encoder.conv_in.weight": torch.randn(4, 3, 3, 3, generator=generator)}, str(path))
    loaded = vqgan.from_safetensors(path, "tiny")
    assert loaded.embedding.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.embedding.weight, model.embedding.weight.detach().to(torch.bfloat16))
    with pytest.raises(ValueError, match="vq.embedding.weight"):
        vqgan.from_safetensors(path, "tiny", prefix="vq.")


def test_bad_inputs_raise_value_errors(generator):
    model = _model(generator)
    with pytest.raises(ValueError, match=r"z must be \(B, 16, H, W\)"):
        model(torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="idx must be int64"):
        model.indices_to_latents(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="beta must be nonzero"):
        vqgan.VQGANQuantizerConfig(16, 4, beta=0.0, legacy=True)
    with pytest.raises(ValueError, match="unknown VQGAN quantizer config"):
        vqgan.build("vqgan-huge")
    with pytest.raises(ValueError, match="resolution"):
        vqgan.example_step(model, resolution=10)


def test_example_step_quantizes_the_latent_of_the_resolution(generator):
    model = _model(generator)
    z_q, loss, idx = vqgan.example_step(model, batch=2, resolution=12, generator=generator)()
    assert z_q.shape == (2, TINY.embed_dim, 3, 3) and idx.shape == (2, 3, 3)
    assert torch.isfinite(loss)
