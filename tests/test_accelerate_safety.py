"""fastgen.accelerate changes a model all the way or not at all, and never replaces a forward that
something else installed on an instance (offloading hooks, another patch)."""
import pytest
import torch

from fastgen.accelerator import accelerate, restore
from fastgen.accelerators import diffusers_attention, diffusers_dcae, diffusers_norm, load_all, patch
from fastgen.models import dcae

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (it is in the test extra)")
from diffusers.models.autoencoders.vae import VectorQuantizer  # noqa: E402
from diffusers.models.normalization import AdaGroupNorm  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402


def _seed(generator):
    torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))


def _autoencoder_dc(generator):
    _seed(generator)
    return diffusers.AutoencoderDC(**dcae.CONFIGS["tiny"].to_diffusers()).eval()


def _run_autoencoder_dc(model, generator):
    images = torch.randn(2, 3, 16, 16, generator=generator)
    latents = torch.randn(2, dcae.CONFIGS["tiny"].latent_channels, 4, 4, generator=generator)
    return model.encode(images).latent, model.decode(latents).sample


def _unet(generator):
    """ResnetBlock2D scale_shift (diffusers_norm) and Attention (diffusers_attention) modules."""
    _seed(generator)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, resnet_time_scale_shift="scale_shift",
    ).eval()


def _autoencoder_kl(generator):
    """ResnetBlock2D "default" and the Encoder / Decoder output heads (diffusers_norm)."""
    _seed(generator)
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
    ).eval()


def _run_autoencoder_kl(model, generator):
    return (model(torch.randn(2, 3, 8, 8, generator=generator)).sample,)


def _run_unet(model, generator):
    return (model(torch.randn(2, 3, 8, 8, generator=generator), torch.tensor([3.0, 500.0])).sample,)


def _instance_state(model) -> dict:
    """{module path: {attribute: value}} of every module's instance dict, one level into the
    dicts it holds (_modules, _parameters, hooks...), to compare by identity."""
    return {path: {name: dict(value) if isinstance(value, dict) else value for name, value in vars(module).items()}
            for path, module in model.named_modules()}


def _changes(before: dict, after: dict) -> list:
    """(module path, attribute) of every instance attribute added, removed or rebound."""
    changed = []
    for path in before.keys() | after.keys():
        old, new = before.get(path, {}), after.get(path, {})
        for name in old.keys() | new.keys():
            old_value, new_value = old.get(name), new.get(name)
            if isinstance(old_value, dict) and isinstance(new_value, dict):
                same = old_value.keys() == new_value.keys() and all(old_value[k] is new_value[k] for k in old_value)
            else:
                same = name in old and name in new and old_value is new_value
            if not same:
                changed.append((path, name))
    return sorted(changed)


def _raising_on_its_nth_module(accelerator, class_name: str, n: int):
    """`accelerator`, raising when it meets the n-th module of class `class_name` (after it
    replaced the ones before)."""
    met = []

    def failing(module, backend, ops):
        if type(module).__name__ == class_name:
            met.append(module)
            if len(met) == n:
                raise RuntimeError(f"{accelerator.__name__} fails on its module {n}")
        return accelerator(module, backend, ops)

    return failing


@pytest.mark.parametrize("make_model, run, failing, class_name, n", [
    (_autoencoder_dc, _run_autoencoder_dc, diffusers_dcae.diffusers_dcae_attention, "SanaMultiscaleLinearAttention", 3),
    (_autoencoder_dc, _run_autoencoder_dc, diffusers_dcae.diffusers_dcae_shortcut, "DCUpBlock2d", 2),
    (_unet, _run_unet, diffusers_attention.diffusers_attention, "Attention", 2),
    (_autoencoder_kl, _run_autoencoder_kl, diffusers_norm.diffusers_resnet, "ResnetBlock2D", 3),
    (_autoencoder_kl, _run_autoencoder_kl, diffusers_norm.diffusers_output_norm_act, "Decoder", 1),
], ids=["dcae-attention", "dcae-shortcut", "unet-attention", "vae-resnet", "vae-output-head"])
def test_an_accelerator_raising_part_way_leaves_the_model_as_it_was(make_model, run, failing, class_name, n,
                                                                   generator, monkeypatch):
    model = make_model(generator)
    seed = int(torch.randint(2**62, (), generator=generator))
    with torch.no_grad():
        before_outputs = run(model, torch.Generator().manual_seed(seed))
    before = _instance_state(model)
    # Every accelerator module imported (registered) now: one imported first by the accelerate below
    # would register into the list patched in for this test, and be missing from the real one after.
    load_all()
    accelerators = [_raising_on_its_nth_module(a, class_name, n) if a is failing else a
                    for a in patch.ACCELERATORS]
    monkeypatch.setattr(patch, "ACCELERATORS", accelerators)

    with pytest.raises(RuntimeError, match=f"fails on its module {n}"):
        accelerate(model, backend="reference")
    assert _changes(before, _instance_state(model)) == []
    with torch.no_grad():
        for got, expected in zip(run(model, torch.Generator().manual_seed(seed)), before_outputs):
            assert torch.equal(got, expected)
    assert restore(model) == 0

    monkeypatch.undo()  # the model is not left marked as accelerated: accelerate runs again
    report = accelerate(model, backend="reference")
    assert restore(model) == len(report.replaced) > 0
    assert _changes(before, _instance_state(model)) == []


def _vq_quantizer(generator):
    _seed(generator)
    return VectorQuantizer(16, 4, beta=0.25)


def _scale_shift_resnet(generator):
    _seed(generator)
    return ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=6, groups=4, time_embedding_norm="scale_shift")


def _ada_group_norm(generator):
    _seed(generator)
    return AdaGroupNorm(6, 8, 4)


def _fastgen_dcae(generator):
    _seed(generator)
    return dcae.build("tiny")


# (make the model, the path of the module whose forward is wrapped, the attribute under it that
# accelerate would give a forward ("" for the module itself), the backend to accelerate with)
FOREIGN_FORWARD_CASES = {
    "vq-quantizer": (_vq_quantizer, "", "", "auto"),
    "dcae-shortcut": (_autoencoder_dc, "decoder.up_blocks.1.0", "", "auto"),
    "dcae-rms-norm": (_autoencoder_dc, "encoder.down_blocks.0.0", "norm", "auto"),
    "scale-shift-resnet": (_scale_shift_resnet, "", "", "auto"),
    "vae-output-head": (_autoencoder_kl, "decoder", "conv_norm_out", "auto"),
    "ada-group-norm": (_ada_group_norm, "", "", "auto"),
    "fastgen-reference-model": (_fastgen_dcae, "", "", "triton"),
}


@pytest.mark.parametrize("case", FOREIGN_FORWARD_CASES)
def test_a_forward_someone_else_installed_is_left_with_the_reason_and_kept_by_restore(case, generator):
    make_model, path, attribute, backend = FOREIGN_FORWARD_CASES[case]
    model = make_model(generator)
    owner = model.get_submodule(path)
    wrapped = getattr(owner, attribute) if attribute else owner
    hook = wrapped.forward  # what accelerate's offloading hooks do: an instance-level wrapper
    wrapped.forward = lambda *args, **kwargs: hook(*args, **kwargs)
    wrapper = wrapped.forward

    report = accelerate(model, backend=backend)
    assert path not in [r.path for r in report.replaced]
    assert [r.reason for r in report.left if r.path == path] == [
        f"{type(wrapped).__name__}.forward is already wrapped on the instance (e.g. by offloading hooks): "
        f"replacing it would bypass the wrapper"]
    assert wrapped.forward is wrapper
    restore(model)
    assert wrapped.forward is wrapper

