"""torch.compile(fullgraph=True) traces the tiny SANA models as one graph (a graph break is an
error under fullgraph) and the compiled model computes what the eager one does.

The compiler backend is "aot_eager": Dynamo's capture plus AOTAutograd's functionalisation
through every fastgen op's fake implementation, which is where graph breaks and fake/real
mismatches show up, without Inductor generating and building C++ for the CPU (minutes on this
2-core machine, and nothing about graph breaks that aot_eager does not already show)."""
import pytest
import torch

import fastgen
from fastgen.models import sana

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn):
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


def test_our_tiny_sana_compiles_as_one_graph(generator):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = sana.build("tiny").eval()
    step = sana.example_step(model, resolution=128, generator=generator)
    with fastgen.use_backend("reference"), torch.no_grad():
        expected = step()
        compiled = _compiled(step)
        torch.testing.assert_close(compiled(), expected)


def test_accelerated_diffusers_sana_compiles_as_one_graph(generator):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
        patch_size=2, sample_size=8,
    ).eval()
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    caption = torch.randn(2, 5, 24, generator=generator)
    timestep = torch.tensor([10.0, 900.0])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])

    def run():
        return model(latents, caption, timestep, encoder_attention_mask=mask).sample

    with torch.no_grad():
        expected = run()
        report = fastgen.accelerate(model)
        assert report.replaced, f"nothing was accelerated: {report}"
        with fastgen.use_backend("reference"):
            torch.testing.assert_close(_compiled(run)(), expected, rtol=1e-4, atol=1e-5)
