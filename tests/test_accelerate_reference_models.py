"""fastgen.accelerate on fastgen's own reference models: their layers call the ops already, so
accelerate pins a backend around the model's forward (and says so), and restore unpins it."""
import pytest
import torch

import fastgen
from fastgen.profile import discover_models

MODELS = sorted(discover_models())


@pytest.fixture(params=MODELS)
def model(request, monkeypatch):
    module = discover_models()[request.param]
    torch.manual_seed(0)
    model = module.build("tiny")
    seen = []

    def recording_forward(self, *args, **kwargs):
        seen.append((args, kwargs, fastgen.current_backend()))
        return "output"

    # The class's forward is what the pinned forward runs: record the backend it runs under.
    monkeypatch.setattr(type(model), "forward", recording_forward)
    model.seen = seen
    return model


def test_every_model_module_is_covered():
    assert {"sana", "ldm_unet", "adm_unet", "dcae", "stylegan", "stylegan2", "stylegan3", "var_vqvae",
            "vqgan"} <= set(MODELS)


def test_a_pinned_backend_wraps_the_forward_and_restore_unwraps_it(model):
    with fastgen.use_backend("triton"):
        report = fastgen.accelerate(model, backend="reference")
        assert [(r.path, r.replacement, r.op) for r in report.replaced] == [
            ("", "forward under backend 'reference'", "every op it calls")]
        assert str(report).splitlines() == [
            "fastgen.accelerate, backend 'reference': replaced 1, left 0",
            f"  replaced (the model): {type(model).__name__} -> forward under backend 'reference' [every op it calls]"]
        assert model(1, key=2) == "output"
        assert model.seen[-1] == ((1,), {"key": 2}, "reference")
        assert fastgen.restore(model) == 1
        model(3)
        assert model.seen[-1][2] == "triton"
    assert "forward" not in vars(model)


def test_auto_leaves_the_model_as_it_is_with_the_reason(model):
    report = fastgen.accelerate(model)
    assert report.replaced == [] and len(report.left) == 1
    assert "call fastgen ops already" in report.left[0].reason
    assert str(report).startswith("fastgen.accelerate, backend 'auto' (each call follows fastgen.use_backend / "
                                  "FASTGEN_BACKEND): replaced 0, left 1\n  left     (the model): ")
    assert "forward" not in vars(model)
    fastgen.restore(model)


def test_an_ops_subset_cannot_be_honoured_and_says_why(model):
    report = fastgen.accelerate(model, backend="triton", ops=["cross_attention"])
    assert report.replaced == [] and "ops= cannot exclude" in report.left[0].reason
    fastgen.restore(model)


def test_a_module_with_nothing_to_accelerate_says_so():
    report = fastgen.accelerate(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.SiLU()), backend="triton")
    assert report.replaced == [] and report.left == []
    assert str(report).splitlines() == [
        "fastgen.accelerate, backend 'triton': replaced 0, left 0",
        "  no submodule is of a kind fastgen accelerates (the kinds: fastgen.accelerators)"]
