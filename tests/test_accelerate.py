"""fastgen.accelerate / restore on diffusers models built from configs with random weights."""
import pytest
import torch

import fastgen
from fastgen.accelerator import accelerate, restore
from fastgen.accelerators.diffusers_attention import LinearAttentionProcessor
from fastgen.ops.registry import Implementation
from low_precision import assert_as_accurate_as_eager, float64_copy, to_float64

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")

LAYERS = 2
# Per block: the fused norms (ada_layer_norm), attn1 (linear_attention), attn2 (cross_attention);
# then the output head's modulated norm.
REPLACED = [row for i in range(LAYERS) for row in (
    (f"transformer_blocks.{i}", "ada_layer_norm"), (f"transformer_blocks.{i}.attn1", "linear_attention"),
    (f"transformer_blocks.{i}.attn2", "cross_attention"))] + [("norm_out", "ada_layer_norm")]


@pytest.fixture
def sana_transformer(generator):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    return diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=LAYERS,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
        patch_size=2, sample_size=8,
    ).eval()


def _sana_inputs(generator, dtype=torch.float32):
    latents = torch.randn(2, 4, 8, 6, generator=generator).to(dtype)
    caption = torch.randn(2, 7, 24, generator=generator).to(dtype)
    timestep = torch.tensor([3.0, 700.0])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return latents, caption, timestep, mask


def _run(model, inputs):
    latents, caption, timestep, mask = inputs
    with torch.no_grad():
        return model(latents, caption, timestep, encoder_attention_mask=mask).sample


def _processor_names(model):
    return [type(m.processor).__name__ for m in model.modules() if type(m).__name__ == "Attention"]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_sana_transformer_equal_outputs_and_restore(sana_transformer, generator, backend):
    inputs = _sana_inputs(generator)
    before = _run(sana_transformer, inputs)
    originals = _processor_names(sana_transformer)

    report = accelerate(sana_transformer, backend=backend)
    assert [(r.path, r.op) for r in report.replaced] == REPLACED
    assert report.left == []
    assert "replaced transformer_blocks.0.attn1" in str(report)
    torch.testing.assert_close(_run(sana_transformer, inputs), before)

    assert restore(sana_transformer) == len(REPLACED)
    assert _processor_names(sana_transformer) == originals
    assert not any("forward" in vars(module) for module in sana_transformer.modules())
    assert torch.equal(_run(sana_transformer, inputs), before)


def test_each_modulated_norm_is_one_ada_layer_norm_call(sana_transformer, generator, monkeypatch):
    """norm1 and norm2 of every block and the output head: one call each, with the block's
    own modulation (scale_shift_table + timestep), which the test makes nonzero."""
    from fastgen.ops.ada_norm import ADA_LAYER_NORM

    with torch.no_grad():
        for module in sana_transformer.modules():
            if hasattr(module, "scale_shift_table"):
                module.scale_shift_table.normal_(generator=generator)
    inputs = _sana_inputs(generator)
    before = _run(sana_transformer, inputs)
    calls = []
    triton = ADA_LAYER_NORM.implementations["triton"]

    def counting(x, scale, shift, eps, *, out):
        calls.append((tuple(x.shape), eps, bool(scale.any())))
        triton.run(x, scale, shift, eps, out=out)

    monkeypatch.setitem(ADA_LAYER_NORM.implementations, "triton", Implementation("triton", counting, triton.dtypes))
    accelerate(sana_transformer, backend="triton")
    torch.testing.assert_close(_run(sana_transformer, inputs), before)
    tokens = (2, 4 * 3, 32)  # 8 x 6 latents in patches of 2, width 2 heads x 16
    assert calls == [(tokens, 1e-6, True)] * (2 * LAYERS + 1)


def test_norms_the_op_cannot_fuse_are_left_with_the_reason(generator):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    transformer = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
        patch_size=2, sample_size=8, norm_elementwise_affine=True,
    ).eval()
    inputs = _sana_inputs(generator)
    before = _run(transformer, inputs)
    report = accelerate(transformer, ops=["ada_layer_norm"])
    assert [(r.path, r.reason) for r in report.left if "was not selected" not in r.reason] == [
        ("transformer_blocks.0", "norm2 has an elementwise affine, which ada_layer_norm does not apply")]
    assert [r.path for r in report.replaced] == ["norm_out"]
    torch.testing.assert_close(_run(transformer, inputs), before)


def test_a_timestep_in_another_dtype_runs_diffusers_forward(sana_transformer, generator):
    """Under autocast a bfloat16 block can get a float32 timestep embedding: diffusers'
    modulation then promotes to float32, which the op (one dtype for x, scale and shift) would
    not, so the block runs diffusers' forward."""
    block = sana_transformer.transformer_blocks[0].bfloat16()
    hidden = torch.randn(2, 12, 32, generator=generator).bfloat16()
    caption = torch.randn(2, 7, 32, generator=generator).bfloat16()  # projected to the blocks' width
    temb = torch.randn(2, 6 * 32, generator=generator)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = block(hidden, None, caption, None, temb, 4, 3)
        accelerate(sana_transformer, ops=["ada_layer_norm"])
        got = block(hidden, None, caption, None, temb, 4, 3)
    assert got.dtype == expected.dtype == torch.float32
    assert torch.equal(got, expected)


def test_pinned_backend_runs_that_implementation(sana_transformer, generator, monkeypatch):
    from fastgen.ops.linear_attention import LINEAR_ATTENTION

    calls = []
    triton = LINEAR_ATTENTION.implementations["triton"]

    def counting(*args, out):
        calls.append(args[0].shape)
        triton.run(*args, out=out)

    monkeypatch.setitem(LINEAR_ATTENTION.implementations, "triton", Implementation("triton", counting, triton.dtypes))
    accelerate(sana_transformer, backend="triton")
    _run(sana_transformer, _sana_inputs(generator))
    assert len(calls) == LAYERS
    restore(sana_transformer)
    accelerate(sana_transformer)  # "auto": CPU tensors run the reference
    _run(sana_transformer, _sana_inputs(generator))
    assert len(calls) == LAYERS


def test_bfloat16_is_as_accurate_as_diffusers(sana_transformer, generator):
    inputs = _sana_inputs(generator, torch.bfloat16)
    exact = _run(float64_copy(sana_transformer), to_float64(inputs))
    sana_transformer.to(torch.bfloat16)
    eager = _run(sana_transformer, inputs)
    accelerate(sana_transformer, backend="triton")
    assert_as_accurate_as_eager(_run(sana_transformer, inputs), eager, exact)


def test_compiles_as_one_graph(sana_transformer, generator):
    """An accelerated model traces with fullgraph=True; the backend is chosen around the
    compiled call and read when the graph runs."""
    inputs = _sana_inputs(generator)
    before = _run(sana_transformer, inputs)
    accelerate(sana_transformer)
    compiled = torch.compile(_run, backend="aot_eager", fullgraph=True)
    with fastgen.use_backend("triton"):
        torch.testing.assert_close(compiled(sana_transformer, inputs), before)


def test_pinned_backend_under_compile_is_a_clear_error(sana_transformer, generator):
    accelerate(sana_transformer, backend="triton")
    compiled = torch.compile(_run, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"pins the backend in eager mode only.*use_backend\('triton'\)"):
        compiled(sana_transformer, _sana_inputs(generator))


def test_ops_filter_leaves_unselected_ops_with_the_reason(sana_transformer):
    report = accelerate(sana_transformer, ops=["cross_attention"])
    assert [r.path for r in report.replaced] == [f"transformer_blocks.{i}.attn2" for i in range(LAYERS)]
    assert sorted(r.reason for r in report.left) == sorted(
        ["op ada_layer_norm was not selected (ops=...)"] * (LAYERS + 1)
        + ["op linear_attention was not selected (ops=...)"] * LAYERS)


def test_pipeline_components_are_accelerated(sana_transformer):
    class Pipeline:  # what accelerate relies on: diffusers pipelines expose .components
        components = {"transformer": sana_transformer, "scheduler": object()}

    pipeline = Pipeline()
    report = accelerate(pipeline)
    assert [r.path for r in report.replaced] == [f"transformer.{path}" for path, _ in REPLACED]
    assert isinstance(sana_transformer.transformer_blocks[0].attn1.processor, LinearAttentionProcessor)
    assert restore(pipeline) == len(REPLACED)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m: accelerate(m, backend="fastest"), ValueError, "backend must be one of"),
        (lambda m: accelerate(m, ops=["flash_everything"]), ValueError, r"unknown op\(s\) \['flash_everything'\]"),
        (lambda m: accelerate(object()), TypeError, "takes a torch.nn.Module or a diffusers pipeline"),
    ],
)
def test_bad_arguments(sana_transformer, call, error, message):
    with pytest.raises(error, match=message):
        call(sana_transformer)


def test_accelerating_twice_asks_for_restore(sana_transformer):
    accelerate(sana_transformer)
    with pytest.raises(ValueError, match="already accelerated"):
        accelerate(sana_transformer)
    assert restore(sana_transformer) == len(REPLACED)
    assert restore(sana_transformer) == 0


def test_ops_as_one_string_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"write ops=\['linear_attention'\]"):
        fastgen.accelerate(torch.nn.Linear(2, 2), ops="linear_attention")
