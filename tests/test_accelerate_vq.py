"""fastgen.accelerate / restore on diffusers' VQModel: its VectorQuantizer runs through
fastgen::vq_quantize with the same outputs and gradients, and is put back by restore."""
import numpy as np
import pytest
import torch

from fastgen.accelerator import accelerate, restore
from fastgen.accelerators import diffusers_vq  # noqa: F401  (registers the accelerator)

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
from diffusers.models.autoencoders.vae import VectorQuantizer  # noqa: E402

CODES, DIM = 40, 4


@pytest.fixture
def vq_model(generator):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = diffusers.VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 16), layers_per_block=1,
        latent_channels=DIM, num_vq_embeddings=CODES, norm_num_groups=8, vq_embed_dim=DIM,
    ).eval()
    with torch.no_grad():
        # Codes spread like the latents (diffusers' init is uniform in +-1/K): well separated distances.
        model.quantize.embedding.weight.copy_(torch.randn(CODES, DIM, generator=generator))
    return model


def _quantizer(generator, **options):
    quantizer = VectorQuantizer(CODES, DIM, **options)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.randn(CODES, DIM, generator=generator))
    return quantizer


def _model_outputs(model, images):
    with torch.no_grad():
        out = model(images)
        _, loss, (_, _, idx) = model.quantize(model.encode(images).latents)
    return out.sample, out.commit_loss, loss, idx


def _quantizer_outputs_and_grads(quantizer, z):
    quantizer.zero_grad()
    z = z.detach().requires_grad_(True)
    z_q, loss, (perplexity, encodings, idx) = quantizer(z)
    assert perplexity is None and encodings is None
    weights = torch.linspace(-1, 1, z_q.numel()).view(z_q.shape)
    ((z_q * weights).sum() + 5 * loss).backward()
    return z_q.detach(), loss.detach(), idx, z.grad, quantizer.embedding.weight.grad


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_vq_model_equal_outputs_and_restore(vq_model, generator, backend):
    images = torch.randn(2, 3, 12, 10, generator=generator)
    before = _model_outputs(vq_model, images)

    # Only this op: the model's attention blocks belong to other accelerators.
    report = accelerate(vq_model, backend=backend, ops=["vq_quantize"])
    assert [(r.path, r.op) for r in report.replaced] == [("quantize", "vq_quantize")]
    after = _model_outputs(vq_model, images)
    assert torch.equal(after[3], before[3])
    for name, got, expected in zip(("decoded", "commit_loss", "quantizer loss"), after[:3], before[:3]):
        torch.testing.assert_close(got, expected, msg=name)

    assert restore(vq_model) == 1
    assert "forward" not in vq_model.quantize.__dict__
    for got, expected in zip(_model_outputs(vq_model, images), before):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("options", [dict(beta=0.25), dict(beta=0.6, legacy=False, sane_index_shape=True)],
                         ids=["legacy", "standard-sane-shape"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_quantizer_outputs_and_gradients_match(generator, options, backend):
    quantizer = _quantizer(generator, **options)
    z = torch.randn(3, DIM, 5, 4, generator=generator)
    expected = _quantizer_outputs_and_grads(quantizer, z)
    accelerate(quantizer, backend=backend)
    got = _quantizer_outputs_and_grads(quantizer, z)
    assert got[2].shape == expected[2].shape and torch.equal(got[2], expected[2])
    assert got[0].is_contiguous()
    for name, tensor, reference in zip(("z_q", "loss", "", "grad z", "grad codebook"), got, expected):
        if name:
            torch.testing.assert_close(tensor, reference, msg=name)


def test_unsupported_options_are_left_with_the_reason(generator, tmp_path):
    remap = tmp_path / "used.npy"
    np.save(remap, np.arange(0, CODES, 2))
    report = accelerate(_quantizer(generator, beta=0.25, remap=str(remap)))
    assert [r.reason for r in report.left] == ["remap (index remapping to a used-code subset) is not supported"]
    report = accelerate(_quantizer(generator, beta=0.0))
    assert [r.reason for r in report.left] == ["legacy loss with beta = 0 has no vq_quantize form"]
    report = accelerate(_quantizer(generator, beta=0.25), ops=["cross_attention"])
    assert report.replaced == [] and [r.reason for r in report.left] == ["op vq_quantize was not selected (ops=...)"]


def test_accelerated_quantizer_traces_as_one_graph(generator):
    quantizer = _quantizer(generator, beta=0.25)
    z = torch.randn(2, DIM, 3, 3, generator=generator)
    with torch.no_grad():
        expected = quantizer(z)
        accelerate(quantizer)
        compiled = torch.compile(quantizer, fullgraph=True, backend="aot_eager")
        got = compiled(z)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert torch.equal(got[2][2], expected[2][2])
