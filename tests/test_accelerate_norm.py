"""fastgen.accelerate on diffusers' modulated group norms (fastgen.accelerators.diffusers_norm):
ResnetBlock2D with time_embedding_norm="scale_shift" and AdaGroupNorm, on small diffusers
modules with random weights."""
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


def test_the_op_runs_once_per_resnet_on_the_pinned_backend(unet, generator, monkeypatch):
    calls = []
    triton = ADA_GROUP_NORM.implementations["triton"]

    def counting(*args, out):
        calls.append(args[3:8])  # num_groups, weight, bias, eps, act
        triton.run(*args, out=out)

    monkeypatch.setitem(ADA_GROUP_NORM.implementations, "triton", Implementation("triton", counting, triton.dtypes))
    accelerate(unet, backend="triton", ops=["ada_group_norm"])
    _run(unet, _unet_inputs(generator))
    assert len(calls) == UNET_RESNETS
    # The norm's own affine is folded in: every call gets one norm2's weight and bias.
    norms = {unet.get_submodule(path).norm2.weight.data_ptr(): unet.get_submodule(path).norm2
             for path in _resnet_paths(unet, ResnetBlock2D)}
    for groups, weight, bias, eps, act in calls:
        norm = norms.pop(weight.data_ptr())
        assert bias.data_ptr() == norm.bias.data_ptr()
        assert (groups, eps, act) == (8, norm.eps, "silu")
    assert norms == {}


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


def test_gradients_match(generator):
    _seed(generator)
    block = _randomize(ResnetBlock2D(in_channels=16, out_channels=32, temb_channels=12, groups=4,
                                     time_embedding_norm="scale_shift", skip_time_act=True), generator)
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
        (dict(time_embedding_norm="default"), "time_embedding_norm='default'"),
        (dict(time_embedding_norm="scale_shift", non_linearity="mish"), "nonlinearity Mish"),
        (dict(time_embedding_norm="scale_shift", temb_channels=None), "no time embedding"),
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


def test_default_backend_follows_use_backend(unet, generator, monkeypatch):
    calls = []
    triton = ADA_GROUP_NORM.implementations["triton"]
    monkeypatch.setitem(ADA_GROUP_NORM.implementations, "triton",
                        Implementation("triton", lambda *a, out: (calls.append(1), triton.run(*a, out=out)),
                                       triton.dtypes))
    accelerate(unet, ops=["ada_group_norm"])
    inputs = _unet_inputs(generator)
    _run(unet, inputs)  # "auto" on CPU tensors: the reference
    assert calls == []
    with fastgen.use_backend("triton"):
        _run(unet, inputs)
    assert len(calls) == UNET_RESNETS


def test_a_forward_wrapped_by_someone_else_is_left_alone(generator):
    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=6, groups=4, time_embedding_norm="scale_shift")
    hook = block.forward  # what accelerate's offloading hooks do: an instance-level wrapper
    block.forward = lambda *args, **kwargs: hook(*args, **kwargs)
    wrapper = block.forward
    report = accelerate(block)
    assert report.replaced == [] and "already wrapped" in report.left[0].reason
    assert block.forward is wrapper
