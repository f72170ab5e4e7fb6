"""fastgen.accelerate on diffusers' group norms (fastgen.accelerators.diffusers_norm): ResnetBlock2D
(norm1 -> SiLU and norm2 -> SiLU, time_embedding_norm "default" and "scale_shift"), the
conv_norm_out -> conv_act heads of the VAE's Encoder / Decoder and the UNets, and AdaGroupNorm,
on small diffusers modules and models with random weights."""
import functools

import pytest
import torch

import fastgen
from fastgen.accelerator import accelerate, restore
from fastgen.accelerators import diffusers_norm  # noqa: F401  (registers the accelerators)
from fastgen.ops.ada_norm import ADA_GROUP_NORM
from fastgen.ops.registry import Implementation
from low_precision import assert_as_accurate_as_eager, float64_copy, to_float64

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
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        norm_num_groups=8, attention_head_dim=16, resnet_time_scale_shift="scale_shift",
    )
    return _randomize(model, generator).eval()


def _unet_inputs(generator, dtype=torch.float32):
    # A small map: the Triton interpreter runs every group norm of the UNet.
    return torch.randn(2, 3, 8, 8, generator=generator).to(dtype), torch.tensor([7.0, 640.0])


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def _resnet_paths(model, cls):
    return [path for path, module in model.named_modules() if type(module) is cls]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_unet_equal_outputs_and_restore(unet, generator, backend):
    inputs = _unet_inputs(generator)
    before = _run(unet, inputs)

    conv_act = unet.conv_act
    report = accelerate(unet, backend=backend, ops=["ada_group_norm"])
    resnets = _resnet_paths(unet, ResnetBlock2D)
    assert len(resnets) == UNET_RESNETS
    # The UNet itself: its output head conv_norm_out -> conv_act.
    assert [(r.path, r.op) for r in report.replaced] == [(path, "ada_group_norm") for path in ["", *resnets]]
    assert all("forward" in unet.get_submodule(path).__dict__ for path in ["conv_norm_out", *resnets])
    assert type(unet.conv_act) is torch.nn.Identity
    torch.testing.assert_close(_run(unet, inputs), before, rtol=1e-4, atol=1e-5)

    assert restore(unet) == UNET_RESNETS + 1
    assert not any("forward" in unet.get_submodule(path).__dict__ for path in ["conv_norm_out", *resnets])
    assert unet.conv_act is conv_act
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
    assert_one_call_per_norm(op_calls, _resnet_norms(unet) + [unet.conv_norm_out])
    # norm1 and conv_norm_out are plain GroupNorms (zero modulation); norm2 carries the block's scale and shift.
    modulated = [bool(scale.any()) for _, scale, *_ in op_calls]
    assert modulated == [False, True] * UNET_RESNETS + [False]


def test_unet_bfloat16_is_as_accurate_as_diffusers(unet, generator):
    inputs = (_unet_inputs(generator)[0].bfloat16(), torch.tensor([7.0, 640.0]))
    exact = _run(float64_copy(unet), to_float64(inputs))
    unet.to(torch.bfloat16)
    eager = _run(unet, inputs)
    accelerate(unet, backend="triton", ops=["ada_group_norm"])
    assert_as_accurate_as_eager(_run(unet, inputs), eager, exact)


def test_compiles_as_one_graph(unet, generator):
    inputs = _unet_inputs(generator)
    before = _run(unet, inputs)
    accelerate(unet, ops=["ada_group_norm"])
    compiled = torch.compile(_run, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(unet, inputs), before, rtol=1e-4, atol=1e-5)


def _tiny_vae():
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=8,
    )


def _tiny_sd15_unet():
    """SD 1.5's layout, shrunk: cross-attention down/up levels around a plain one, additive time embedding."""
    return diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=4, sample_size=8,
    )


def _tiny_sdxl_unet():
    """SDXL's layout, shrunk: linear projections, several transformer blocks on the deeper level, the
    text_time added conditioning."""
    return diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, cross_attention_dim=16, attention_head_dim=(2, 4), norm_num_groups=4,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
        sample_size=8,
    )


def _vae_call(generator):
    image = torch.randn(2, 3, 8, 8, generator=generator)
    return (image,), {}, lambda output: output.sample


def _unet_call(generator, added_conditioning=False):
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 5, 16, generator=generator)
    kwargs = {}
    if added_conditioning:  # SDXL's pooled text embedding and size / crop ids
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 8, generator=generator),
                                       "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * 2)}
    return (latents, torch.tensor([3.0, 700.0]), context), kwargs, lambda output: output.sample


# name: (build the model, make its call's (args, kwargs, output -> tensor), the paths of its
# conv_norm_out -> conv_act owners, its ResnetBlock2D count)
MODELS = {
    "AutoencoderKL": (_tiny_vae, _vae_call, ["encoder", "decoder"], 10),
    "SD 1.5 UNet": (_tiny_sd15_unet, _unet_call, [""], 8),
    "SDXL UNet": (_tiny_sdxl_unet, functools.partial(_unet_call, added_conditioning=True), [""], 8),
}


def _model_and_call(name, generator, layout):
    build, make_call, owners, resnets = MODELS[name]
    _seed(generator)
    model = _randomize(build(), generator).eval()
    args, kwargs, output = make_call(generator)
    if layout == "channels_last":
        model.to(memory_format=torch.channels_last)
        args = (args[0].to(memory_format=torch.channels_last), *args[1:])

    def run():
        with torch.no_grad():
            return output(model(*args, **kwargs))

    return model, run, owners, resnets


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", MODELS)
def test_models_equal_outputs_report_and_restore(generator, name, layout, op_calls):
    model, run, owners, resnet_count = _model_and_call(name, generator, layout)
    before = run()

    report = accelerate(model, backend="triton", ops=["ada_group_norm"])
    resnets = _resnet_paths(model, ResnetBlock2D)
    assert len(resnets) == resnet_count
    assert sorted(r.path for r in report.replaced) == sorted(owners + resnets)
    assert [r for r in report.left if r.module in ("ResnetBlock2D", "Encoder", "Decoder", "UNet2DConditionModel")] == []
    for owner in owners:
        assert (f"replaced {owner or '(the model)'}: {type(model.get_submodule(owner)).__name__}.conv_norm_out+conv_act"
                f" -> fused GroupNorm+SiLU in conv_norm_out, conv_act Identity [ada_group_norm]") in str(report)
    torch.testing.assert_close(run(), before, rtol=1e-4, atol=1e-5)
    heads = [model.get_submodule(owner).conv_norm_out for owner in owners]
    assert_one_call_per_norm(op_calls, _resnet_norms(model) + heads)
    assert op_calls[0][0].is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")

    assert restore(model) == len(report.replaced)
    assert all(type(model.get_submodule(owner).conv_act) is torch.nn.SiLU for owner in owners)
    assert torch.equal(run(), before)


def test_output_heads_left_alone_with_the_reason(generator):
    from diffusers.models.autoencoders.vae import Decoder, Encoder

    movq = Decoder(in_channels=4, block_out_channels=(32,), norm_num_groups=8, norm_type="spatial")
    mish = Encoder(block_out_channels=(8,), norm_num_groups=4, act_fn="mish")
    mish.conv_act = torch.nn.Mish()  # diffusers' Encoder builds its head with a SiLU whatever act_fn
    hooked = Encoder(block_out_channels=(8,), norm_num_groups=4)
    hooked.conv_norm_out.register_forward_hook(lambda *args: None)
    offloaded = Encoder(block_out_channels=(8,), norm_num_groups=4)
    offloaded.forward = functools.partial(type(offloaded).forward, offloaded)
    cases = [(movq, "conv_norm_out is SpatialNorm, not a GroupNorm"),
             (mish, "conv_act is Mish: the fused op applies SiLU only"),
             (hooked, "forward hooks on conv_norm_out would see its output after the SiLU"),
             (offloaded, "Encoder.forward is wrapped on the instance (e.g. by offloading hooks): that conv_act "
                         "follows conv_norm_out there cannot be checked")]
    for model, reason in cases:
        report = accelerate(model)
        assert [r.reason for r in report.left if r.path == ""] == [reason]
        assert type(model.conv_act) is not torch.nn.Identity and "forward" not in vars(model.conv_norm_out)
        restore(model)


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


def test_norms_without_affine_or_bias(generator):
    _seed(generator)
    block = ResnetBlock2D(in_channels=8, out_channels=12, temb_channels=6, groups=4)
    block.norm1 = torch.nn.GroupNorm(4, 8, affine=False)
    block.norm2 = torch.nn.GroupNorm(4, 12, bias=False)
    block = _randomize(block, generator).eval()
    x, temb = torch.randn(2, 8, 4, 4, generator=generator), torch.randn(2, 6, generator=generator)
    with torch.no_grad():
        before = block(x, temb)
        assert len(accelerate(block, backend="triton").replaced) == 1
        torch.testing.assert_close(block(x, temb), before, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("submodule", ["norm1", "norm2", "nonlinearity"])
def test_resnets_with_hooks_or_wrappers_on_the_fused_submodules_are_left_alone(submodule):
    """The fused forward does not call them: their hooks would not run, nor an offloading wrapper
    that brings a norm's weights to the device."""
    hooked = ResnetBlock2D(in_channels=8, temb_channels=6, groups=4)
    getattr(hooked, submodule).register_forward_pre_hook(lambda *args: None)
    wrapped = ResnetBlock2D(in_channels=8, temb_channels=6, groups=4)
    getattr(wrapped, submodule).forward = getattr(wrapped, submodule).forward
    for block, reason in [(hooked, f"{submodule} has hooks, and the fused forward does not call {submodule}"),
                          (wrapped, f"{submodule}.forward is wrapped on the instance (e.g. by offloading hooks), "
                                    f"and the fused forward does not call {submodule}")]:
        report = accelerate(block)
        assert report.replaced == [] and [r.reason for r in report.left] == [reason]
        assert "forward" not in vars(block)


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
    assert [r.reason for r in report.left if r.module in ("ResnetBlock2D", "UNet2DModel")] == [
        "op ada_group_norm was not selected (ops=...)"] * (UNET_RESNETS + 1)


def test_default_backend_follows_use_backend(unet, generator, op_calls):
    accelerate(unet, ops=["ada_group_norm"])
    inputs = _unet_inputs(generator)
    _run(unet, inputs)  # "auto" on CPU tensors: the reference
    assert op_calls == []
    with fastgen.use_backend("triton"):
        _run(unet, inputs)
    assert len(op_calls) == 2 * UNET_RESNETS + 1


def test_a_forward_wrapped_by_someone_else_is_left_alone(generator):
    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=6, groups=4, time_embedding_norm="scale_shift")
    hook = block.forward  # what accelerate's offloading hooks do: an instance-level wrapper
    block.forward = lambda *args, **kwargs: hook(*args, **kwargs)
    wrapper = block.forward
    report = accelerate(block)
    assert report.replaced == [] and "already wrapped" in report.left[0].reason
    assert block.forward is wrapper
