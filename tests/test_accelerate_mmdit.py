"""fastgen.accelerate on diffusers' FluxTransformer2DModel and SD3Transformer2DModel: every joint
attention runs qk_norm_rope and cross_attention, and every joint block its attention residual
and norm2 as gated_residual_ada_layer_norm (Triton, under the interpreter here), the outputs
equal the unaccelerated model's, restore gives them back exactly, and what does not fuse is
left with its reason."""
import pytest
import torch

import fastgen
from fastgen.models import mmdit
from fastgen.ops.ada_norm import GATED_RESIDUAL_ADA_LAYER_NORM

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")


@pytest.fixture
def op_calls(monkeypatch):
    """The number of qk_norm_rope and cross_attention calls the accelerated attention makes
    (through mmdit.joint_attention, which fastgen's own MM-DiT models run too)."""
    calls = {"qk_norm_rope": 0, "cross_attention": 0}
    for name in calls:
        op = getattr(mmdit, name)

        def counting(*args, op=op, name=name, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)

        monkeypatch.setattr(mmdit, name, counting)
    return calls


def _flux(generator, guidance: bool):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6),
    ).eval()
    batch, text, height, width = 2, 5, 3, 4
    # FLUX.1's image ids: (0, row, column) per latent position.
    rows, columns = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)
    inputs = dict(
        hidden_states=torch.randn(batch, height * width, 8, generator=generator),
        encoder_hidden_states=torch.randn(batch, text, 24, generator=generator),
        pooled_projections=torch.randn(batch, 20, generator=generator),
        timestep=torch.tensor([0.3, 0.9]), img_ids=image_ids, txt_ids=torch.zeros(text, 3),
        guidance=torch.tensor([3.5, 3.5]) if guidance else None,
    )
    return model, inputs, 2 + 2  # joint blocks + single blocks


def _sd3(generator, qk_norm="rms_norm", dual_attention_layers=(0,)):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4,
        pos_embed_max_size=16, qk_norm=qk_norm, dual_attention_layers=dual_attention_layers,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(2, 4, 6, 10, generator=generator),
        encoder_hidden_states=torch.randn(2, 7, 24, generator=generator),
        pooled_projections=torch.randn(2, 20, generator=generator),
        timestep=torch.tensor([100.0, 800.0]),
    )
    return model, inputs, 2 + len(dual_attention_layers)  # joint attentions + the dual layers' attn2


MODELS = {
    "flux-dev": lambda generator: _flux(generator, guidance=True),
    "flux-schnell": lambda generator: _flux(generator, guidance=False),
    "sd3.5-large (qk RMSNorm)": lambda generator: _sd3(generator, dual_attention_layers=()),
    "sd3.5-medium (dual attention)": _sd3,
    "sd3-medium (no qk norm)": lambda generator: _sd3(generator, qk_norm=None, dual_attention_layers=()),
}


@pytest.mark.parametrize("name", MODELS)
def test_accelerated_transformer_equals_diffusers(generator, op_calls, name):
    model, inputs, attentions = MODELS[name](generator)
    with torch.no_grad():
        expected = model(**inputs).sample
        report = fastgen.accelerate(model, backend="triton")
        replaced = [r for r in report.replaced if r.replacement == "JointAttentionProcessor"]
        assert len(replaced) == attentions, report
        actual = model(**inputs).sample
        assert op_calls["cross_attention"] == attentions
        # One qk_norm_rope per stream: two in a joint attention, one in a single-stream one.
        assert attentions < op_calls["qk_norm_rope"] <= 2 * attentions
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5)
        assert fastgen.restore(model) == len(report.replaced)
        assert torch.equal(model(**inputs).sample, expected)


def test_flux_with_fused_projections_reads_views_of_them(generator, op_calls):
    model, inputs, attentions = _flux(generator, guidance=False)
    model.fuse_qkv_projections()
    with torch.no_grad():
        expected = model(**inputs).sample
        fastgen.accelerate(model, backend="triton")
        torch.testing.assert_close(model(**inputs).sample, expected, rtol=1e-4, atol=2e-5)
    assert op_calls["cross_attention"] == attentions


def test_layer_norm_qk_norms_are_left_with_the_reason(generator):
    model, _, _ = _sd3(generator, qk_norm="layer_norm", dual_attention_layers=())
    report = fastgen.accelerate(model, ops=["qk_norm_rope", "cross_attention"])
    reasons = {left.reason for left in report.left if left.module == "Attention"}
    assert reasons == {"q/k norm LayerNorm is not an RMSNorm"}, report
    assert not [r for r in report.replaced if r.replacement == "JointAttentionProcessor"]


def test_an_unselected_op_leaves_the_attention(generator):
    model, _, attentions = _flux(generator, guidance=False)
    report = fastgen.accelerate(model, ops=["cross_attention"])
    left = [entry for entry in report.left if entry.module == "FluxAttention"]
    assert len(left) == attentions and all("qk_norm_rope was not selected" in entry.reason for entry in left)


def test_an_attention_mask_runs_the_original_processor(generator, op_calls):
    model, inputs, _ = _sd3(generator, dual_attention_layers=())
    attention = model.transformer_blocks[0].attn
    hidden = torch.randn(2, 6, 32, generator=generator)
    context = torch.randn(2, 3, 32, generator=generator)
    mask = torch.zeros(2, 1, 9, 9)
    with torch.no_grad():
        expected = attention(hidden, context, attention_mask=mask)
        fastgen.accelerate(model, backend="triton")
        actual = attention(hidden, context, attention_mask=mask)
    assert op_calls["cross_attention"] == 0
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-medium (dual attention)"])
def test_accelerated_transformer_compiles_as_one_graph(generator, name):
    torch._dynamo.reset()
    model, inputs, _ = MODELS[name](generator)
    with torch.no_grad():
        expected = model(**inputs).sample
        fastgen.accelerate(model)
        compiled = torch.compile(lambda: model(**inputs).sample, backend="aot_eager", fullgraph=True)
        with fastgen.use_backend("reference"):
            torch.testing.assert_close(compiled(), expected, rtol=1e-4, atol=2e-5)
    torch._dynamo.reset()


_GATED_RESIDUAL = "gated_residual_ada_layer_norm"


def _fused_streams(model) -> int:
    """The streams whose residual and norm2 the accelerated joint blocks fuse: the image's in
    every block, the text's where the block returns it (not in SD3's context_pre_only last one)."""
    return sum(1 + (block.norm2_context is not None) for block in model.transformer_blocks)


@pytest.mark.parametrize("name", MODELS)
def test_accelerated_joint_blocks_fuse_the_gated_residual(generator, kernel_runs, name):
    model, inputs, _ = MODELS[name](generator)
    runs = kernel_runs(GATED_RESIDUAL_ADA_LAYER_NORM)
    block_class = type(model.transformer_blocks[0]).__name__
    with torch.no_grad():
        expected = model(**inputs).sample
        report = fastgen.accelerate(model, backend="triton", ops=[_GATED_RESIDUAL])
        replaced = [r for r in report.replaced if r.op == _GATED_RESIDUAL]
        assert [r.path for r in replaced] == [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
        assert replaced[0].original == f"{block_class} residual+norm2+modulation and residual+norm2_context+modulation"
        actual = model(**inputs).sample
        assert len(runs) == _fused_streams(model)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5)
        assert fastgen.restore(model) == len(report.replaced)
        assert torch.equal(model(**inputs).sample, expected)


def test_a_chunked_feed_forward_runs_the_diffusers_block(generator, kernel_runs):
    model, inputs, _ = _sd3(generator, dual_attention_layers=())
    model.transformer_blocks[0].set_chunk_feed_forward(1, dim=0)
    runs = kernel_runs(GATED_RESIDUAL_ADA_LAYER_NORM)
    with torch.no_grad():
        expected = model(**inputs).sample
        fastgen.accelerate(model, backend="triton", ops=[_GATED_RESIDUAL])
        torch.testing.assert_close(model(**inputs).sample, expected, rtol=1e-4, atol=2e-5)
    assert len(runs) == _fused_streams(model) - 2, "block 0 (both streams) runs diffusers' forward"


def test_blocks_the_op_cannot_reproduce_are_left_with_the_reason(generator):
    model, _, _ = _flux(generator, guidance=False)
    report = fastgen.accelerate(model, ops=["qk_norm_rope", "cross_attention"])
    left = [entry for entry in report.left if entry.module == "FluxTransformerBlock"]
    assert len(left) == 2 and all(f"op {_GATED_RESIDUAL} was not selected" in entry.reason for entry in left)
    fastgen.restore(model)
    model.transformer_blocks[0].norm2.register_forward_hook(lambda *args: None)
    model.transformer_blocks[1].norm2_context = torch.nn.LayerNorm(model.transformer_blocks[1].norm2.normalized_shape)
    report = fastgen.accelerate(model, ops=[_GATED_RESIDUAL])
    reasons = [entry.reason for entry in report.left if entry.module == "FluxTransformerBlock"]
    assert reasons == ["norm2 has hooks, and the fused forward does not call norm2",
                       "norm2_context has an elementwise affine, which ada_layer_norm does not apply"], report


def test_a_modulation_of_another_dtype_runs_the_two_steps(generator, kernel_runs):
    """Under autocast the adaLN linear can hand bfloat16 gates to a float32 stream: the op takes
    one dtype, so the block's residual and norm2 run as diffusers writes them, promoting."""
    from fastgen.accelerators.diffusers_mmdit import _gated_residual_norm
    from fastgen.accelerators.patch import BackendScope

    runs = kernel_runs(GATED_RESIDUAL_ADA_LAYER_NORM)
    norm = torch.nn.LayerNorm(16, elementwise_affine=False, eps=1e-6)
    x, branch = (torch.randn(2, 5, 16, generator=generator) for _ in "xb")
    gate, shift, scale = (torch.randn(2, 16, generator=generator).bfloat16() for _ in "gab")
    h, normed = _gated_residual_norm(BackendScope("triton"), norm, x, branch, gate, shift, scale)
    expected_h = x + gate.unsqueeze(1) * branch
    assert runs == [] and torch.equal(h, expected_h)
    assert torch.equal(normed, norm(expected_h) * (1 + scale[:, None]) + shift[:, None])
    gate, shift, scale = (t.float() for t in (gate, shift, scale))
    h, normed = _gated_residual_norm(BackendScope("triton"), norm, x, branch, gate, shift, scale)
    assert runs == [(2, 5, 16)]
    torch.testing.assert_close(h, expected_h)
    torch.testing.assert_close(normed, norm(expected_h) * (1 + scale[:, None]) + shift[:, None])
