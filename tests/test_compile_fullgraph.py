"""torch.compile(fullgraph=True) traces the tiny SANA, FLUX.1 and SD3 models, and the tiny
accelerated diffusers AutoencoderKL and UNet2DConditionModel, as one graph (a graph break is an
error under fullgraph) and the compiled model computes what the eager one does.

The compiler backend is "aot_eager": Dynamo's capture plus AOTAutograd's functionalisation
through every fastgen op's fake implementation, which is where graph breaks and fake/real
mismatches show up, without Inductor generating and building C++ for the CPU (minutes on this
2-core machine, and nothing about graph breaks that aot_eager does not already show)."""
import pytest
import torch

import fastgen
from fastgen.models import flux, sana, sd3

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


@pytest.mark.parametrize("module", [flux, sd3], ids=["flux", "sd3"])
def test_our_tiny_mmdit_models_compile_as_one_graph(generator, module):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    step = module.example_step(module.build("tiny").eval(), generator=generator)
    with fastgen.use_backend("reference"), torch.no_grad():
        expected = step()
        torch.testing.assert_close(_compiled(step)(), expected)


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



def _autoencoder_kl_run(generator):
    model = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=8,
    ).eval()
    image = torch.randn(2, 3, 8, 8, generator=generator)
    return model, lambda: model(image).sample


def _unet_2d_condition_run(generator):
    model = diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=4, sample_size=8,
    ).eval()
    latents, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 5, 16, generator=generator)
    return model, lambda: model(latents, torch.tensor([3.0, 700.0]), context).sample


# (make the model and its call, the classes whose group norms fuse with their SiLU)
GROUP_NORM_MODELS = {
    "AutoencoderKL": (_autoencoder_kl_run, {"ResnetBlock2D", "Encoder", "Decoder"}),
    "UNet2DConditionModel": (_unet_2d_condition_run, {"ResnetBlock2D", "UNet2DConditionModel"}),
}


@pytest.mark.parametrize("name", GROUP_NORM_MODELS)
def test_accelerated_diffusers_group_norm_models_compile_as_one_graph(generator, name):
    """Every ResnetBlock2D's fused forward and the fused conv_norm_out -> conv_act heads, in one graph."""
    make, fused_classes = GROUP_NORM_MODELS[name]
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model, run = make(generator)
    with torch.no_grad():
        expected = run()
        report = fastgen.accelerate(model)
        assert {r.original.split(".")[0] for r in report.replaced if r.op == "ada_group_norm"} == fused_classes
        with fastgen.use_backend("reference"):
            torch.testing.assert_close(_compiled(run)(), expected, rtol=1e-4, atol=1e-5)
