"""fastgen.accelerate on diffusers' group norms (fastgen.accelerators.diffusers_norm): ResnetBlock2D
(norm1 -> SiLU and norm2 -> SiLU, time_embedding_norm "default" and "scale_shift") and
AdaGroupNorm, on small diffusers modules with random weights."""
import pytest
import torch

import fastgen
from fastgen.accelerator import accelerate, restore
from fastgen.accelerators import diffusers_norm  # noqa: F401  (registers the accelerators)
from fastgen.ops.ada_norm import ADA_GROUP_NORM
from fastgen.ops.registry import Implementation

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
from diffusers.models.normalization import AdaGroupNorm  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D  # noqa: E402

# UNet2DModel below: 2 down blocks x (1 resnet + 1 downsampling resnet in the first), a mid
# block of 2, and 2 up blocks x (2 resnets + 1 upsampling resnet in the second).
UNET_RESNETS = 9


def _seed(generator):
    torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))


def _randomize(module, generator):
    """Every parameter drawn afresh (GroupNorms start at weight 1, bias 0: this exercises the
    norm's own affine), scaled by 1/sqrt(fan-in) so activations stay O(1) through the network
    rather than amplifying float32 rounding layer after layer."""
    with torch.no_grad():
        for parameter in module.parameters():
            fan_in = parameter[0].numel() if parameter.ndim > 1 else 4
            parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)
    return module


@pytest.fixture
def unet(generator):
    _seed(generator)
    model = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        norm_num_groups=8, attention_head_dim=16, resnet_time_scale_shift="scale_shift",
    )
    return _randomize(model, generator).eval()


def _unet_inputs(generator, dtype=torch.float32):
    return torch.randn(2, 3, 16, 16, generator=generator).to(dtype), torch.tensor([7.0, 640.0])


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def _resnet_paths(model, cls):
    return [path for path, module in model.named_modules() if type(module) is cls]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_unet_equal_outputs_and_restore(unet, generator, backend):
    inputs = _unet_inputs(generator)
    before = _run(unet, inputs)

    report = accelerate(unet, backend=backend, ops=["ada_group_norm"])
    resnets = _resnet_paths(unet, ResnetBlock2D)
    assert len(resnets) == UNET_RESNETS
    assert [(r.path, r.op) for r in report.replaced] == [(path, "ada_group_norm") for path in resnets]
    assert all("forward" in unet.get_submodule(path).__dict__ for path in resnets)
    torch.testing.assert_close(_run(unet, inputs), before, rtol=1e-4, atol=1e-5)

    assert restore(unet) == UNET_RESNETS
    assert not any("forward" in unet.get_submodule(path).__dict__ for path in resnets)
    assert torch.equal(_run(unet, inputs), before)


@pytest.fixture
def op_calls(monkeypatch):
    """The arguments of every ada_group_norm call on the Triton backend (which it still runs)."""
    calls = []
    triton = ADA_GROUP_NORM.implementations["triton"]

    def counting(*args, out):
        calls.append(args)
        triton.run(*args, out=out)

    monkeypatch.setitem(ADA_GROUP_NORM.implementations, "triton", Implementation("triton", counting, triton.dtypes))
    return calls


def _resnet_norms(model):
    return [norm for path in _resnet_paths(model, ResnetBlock2D)
            for norm in (model.get_submodule(path).norm1, model.get_submodule(path).norm2)]


def assert_one_call_per_norm(calls, norms):
    """Each norm ran exactly once, as one fused call with its own affine, groups and eps and the SiLU."""
    by_weight = {norm.weight.data_ptr(): norm for norm in norms}
    assert len(by_weight) == len(norms) == len(calls)
    for x, scale, shift, groups, weight, bias, eps, act in calls:
        norm = by_weight.pop(weight.data_ptr())
        assert bias.data_ptr() == norm.bias.data_ptr()
        assert (groups, eps, act) == (norm.num_groups, norm.eps, "silu")
    assert by_weight == {}


def test_the_op_runs_once_per_group_norm_on_the_pinned_backend(unet, generator, op_calls):
    accelerate(unet, backend="triton", ops=["ada_group_norm"])
    _run(unet, _unet_inputs(generator))
    assert_one_call_per_norm(op_calls, _resnet_norms(unet))
    # norm1 is a plain GroupNorm (zero modulation); norm2 carries the block's scale and shift.
    modulated = [bool(scale.any()) for _, scale, *_ in op_calls]
    assert modulated == [False, True] * UNET_RESNETS


def test_unet_bfloat16_is_as_accurate_as_diffusers(unet, generator):
    """Through a whole UNet bfloat16 rounding differs by O(0.1) between any two orderings of the
    arithmetic, so both are measured against the float32 model instead of against each other."""
    inputs = _unet_inputs(generator)
    exact = _run(unet, inputs)
    half_inputs = (inputs[0].bfloat16(), inputs[1])
    unet.to(torch.bfloat16)
    diffusers_error = (_run(unet, half_inputs).float() - exact).abs().max()
    accelerate(unet, backend="triton", ops=["ada_group_norm"])
    fastgen_error = (_run(unet, half_inputs).float() - exact).abs().max()
    assert fastgen_error <= 1.5 * diffusers_error + 1e-2 * exact.abs().max()


def test_compiles_as_one_graph(unet, generator):
    inputs = _unet_inputs(generator)
    before = _run(unet, inputs)
    accelerate(unet, ops=["ada_group_norm"])
    compiled = torch.compile(_run, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(unet, inputs), before, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("time_embedding_norm", ["default", "scale_shift"])
def test_gradients_match(generator, time_embedding_norm):
    _seed(generator)
    block = _randomize(ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=12, groups=4,
                                     time_embedding_norm=time_embedding_norm, skip_time_act=True), generator)
    x = torch.randn(2, 16, 6, 5, generator=generator, requires_grad=True)
    temb = torch.randn(2, 12, generator=generator, requires_grad=True)

    def grads():
        block.zero_grad()
        x.grad = temb.grad = None
        block(x, temb).square().sum().backward()
        return [x.grad, temb.grad] + [p.grad for p in block.parameters()]

    expected = grads()
    accelerate(block, backend="triton")
    for got, want in zip(grads(), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# Every branch of ResnetBlock2D.forward that the fused forward reproduces: the block's options
# (on in_channels=8, groups=4, temb_channels=6) and whether the call passes a time embedding.
RESNET_VARIANTS = {
    "default": (dict(), True),
    "no time embedding": (dict(temb_channels=None), False),
    "upsample, 3x3 shortcut": (dict(up=True, out_channels=16, conv_shortcut=True), True),
    "downsample, 1x1 shortcut without bias": (dict(down=True, out_channels=12, conv_shortcut_bias=False), True),
    "fir upsample": (dict(up=True, kernel="fir"), True),
    "sde_vp downsample": (dict(down=True, kernel="sde_vp"), True),
    "skip_time_act, output scale, groups_out": (dict(skip_time_act=True, output_scale_factor=1.7, groups_out=2,
                                                     out_channels=12, eps=1e-3), True),
    "conv_2d_out_channels": (dict(out_channels=16, conv_2d_out_channels=4), True),
    "scale_shift upsample": (dict(time_embedding_norm="scale_shift", up=True), True),
    # diffusers accepts any other name without temb_channels, and then ignores temb
    "other time_embedding_norm": (dict(time_embedding_norm="none", temb_channels=None), True),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("variant", RESNET_VARIANTS)
def test_resnet_variants_equal_outputs_and_restore(generator, variant, layout, op_calls):
    options, with_temb = RESNET_VARIANTS[variant]
    _seed(generator)
    block = _randomize(ResnetBlock2D(**{"in_channels": 8, "groups": 4, "temb_channels": 6, **options}), generator).eval()
    x = torch.randn(2, 8, 6, 4, generator=generator)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    temb = torch.randn(2, 6, generator=generator) if with_temb else None
    with torch.no_grad():
        before = block(x, temb)
        report = accelerate(block, backend="triton")
        assert [(r.path, r.op) for r in report.replaced] == [("", "ada_group_norm")]
        torch.testing.assert_close(block(x, temb), before, rtol=1e-5, atol=1e-5)
        assert_one_call_per_norm(op_calls, [block.norm1, block.norm2])
        assert op_calls[0][0].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        assert restore(block) == 1
        assert torch.equal(block(x, temb), before)


def test_dropout_in_training_mode_is_exact(generator):
    """Dropout follows the SiLU: the fused block draws the same mask from the same seed."""
    _seed(generator)
    block = _randomize(ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=6, groups=4, dropout=0.5),
                       generator).train()
    x, temb = torch.randn(2, 8, 5, 5, generator=generator), torch.randn(2, 6, generator=generator)
    seed = int(torch.randint(2**62, (), generator=generator))

    def run():
        torch.manual_seed(seed)
        with torch.no_grad():
            return block(x, temb)

    before = run()
    assert len(accelerate(block, backend="triton").replaced) == 1
    after = run()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    restore(block)
    assert not torch.equal(run(), block.eval()(x, temb))  # the mask was drawn: dropout was on


def test_the_deprecated_scale_argument_runs_diffusers_forward(generator, op_calls):
    _seed(generator)
    block = ResnetBlock2D(in_channels=8, temb_channels=6, groups=4).eval()
    x, temb = torch.randn(2, 8, 4, 4, generator=generator), torch.randn(2, 6, generator=generator)
    with torch.no_grad():
        with pytest.warns(FutureWarning, match="scale"):
            before = block(x, temb, scale=0.5)
        accelerate(block, backend="triton")
        with pytest.warns(FutureWarning, match="scale"):
            assert torch.equal(block(x, temb, scale=0.5), before)
    assert op_calls == []


def test_a_forward_patched_onto_the_class_is_left_alone(monkeypatch):
    """A library that patched ResnetBlock2D.forward keeps its patch: the fused forward reproduces diffusers' own."""
    diffusers_forward = ResnetBlock2D.forward

    def patched(self, *args, **kwargs):
        return diffusers_forward(self, *args, **kwargs)

    monkeypatch.setattr(ResnetBlock2D, "forward", patched)
    block = ResnetBlock2D(in_channels=8, temb_channels=6, groups=4)
    report = accelerate(block)
    assert report.replaced == []
    assert report.left[0].reason == ("ResnetBlock2D.forward is not diffusers' own (patched onto the class): "
                                     "the replacement would bypass the patch")


@pytest.mark.parametrize("act_fn", [None, "silu"])
def test_ada_group_norm_module(generator, act_fn):
    _seed(generator)
    norm = _randomize(AdaGroupNorm(embedding_dim=10, out_dim=24, num_groups=6, act_fn=act_fn, eps=1e-6), generator)
    x = torch.randn(3, 24, 5, 7, generator=generator) * 4 + 2
    emb = torch.randn(3, 10, generator=generator)
    before = norm(x, emb)
    report = accelerate(norm, backend="triton")
    assert [(r.path, r.original) for r in report.replaced] == [("", "AdaGroupNorm")]
    torch.testing.assert_close(norm(x, emb), before, rtol=1e-4, atol=1e-5)
    restore(norm)
    assert torch.equal(norm(x, emb), before)


def test_ada_group_resnet_block(generator):
    """ResnetBlockCondNorm2D("ada_group"): both of its norms are AdaGroupNorms."""
    _seed(generator)
    block = _randomize(ResnetBlockCondNorm2D(in_channels=16, out_channels=24, temb_channels=10, groups=4,
                                             time_embedding_norm="ada_group"), generator).eval()
    x, temb = torch.randn(2, 16, 6, 6, generator=generator), torch.randn(2, 10, generator=generator)
    before = block(x, temb)
    report = accelerate(block, backend="triton")
    assert [r.path for r in report.replaced] == ["norm1", "norm2"]
    torch.testing.assert_close(block(x, temb), before, rtol=1e-4, atol=1e-5)
    assert restore(block) == 2


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        (dict(non_linearity="mish"), "nonlinearity is Mish: the fused op applies SiLU only"),
        (dict(time_embedding_norm="scale_shift", non_linearity="gelu"), "nonlinearity is GELU"),
        (dict(time_embedding_norm="scale_shift", temb_channels=None), "'scale_shift' without a time embedding"),
    ],
)
def test_unsupported_resnets_are_left_alone_with_the_reason(kwargs, reason):
    block = ResnetBlock2D(in_channels=8, out_channels=8, groups=4, **{"temb_channels": 6, **kwargs})
    report = accelerate(block)
    assert report.replaced == []
    assert [r.path for r in report.left] == [""]
    assert reason in report.left[0].reason
    assert "forward" not in block.__dict__


def test_unselected_op_is_left_with_the_reason(unet):
    report = accelerate(unet, ops=["cross_attention"])
    assert not any(r.op == "ada_group_norm" for r in report.replaced)
    assert [r.reason for r in report.left if r.module == "ResnetBlock2D"] == [
        "op ada_group_norm was not selected (ops=...)"] * UNET_RESNETS


def test_default_backend_follows_use_backend(unet, generator, op_calls):
    accelerate(unet, ops=["ada_group_norm"])
    inputs = _unet_inputs(generator)
    _run(unet, inputs)  # "auto" on CPU tensors: the reference
    assert op_calls == []
    with fastgen.use_backend("triton"):
        _run(unet, inputs)
    assert len(op_calls) == 2 * UNET_RESNETS


def test_a_forward_wrapped_by_someone_else_is_left_alone(generator):
    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=6, groups=4, time_embedding_norm="scale_shift")
    hook = block.forward  # what accelerate's offloading hooks do: an instance-level wrapper
    block.forward = lambda *args, **kwargs: hook(*args, **kwargs)
    wrapper = block.forward
    report = accelerate(block)
    assert report.replaced == [] and "already wrapped" in report.left[0].reason
    assert block.forward is wrapper
