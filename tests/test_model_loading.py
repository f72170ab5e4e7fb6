"""Every reference model's `from_safetensors` returns it ready for inference: in eval mode (no
dropout, no running averages a call would update), with the file's weights."""
import importlib
import pkgutil

import pytest
import torch

import fastgen.models

# Loader arguments beyond (path, config) where the file holds the network under a prefix.
_LOADER_OPTIONS = {"vqgan": {"prefix": ""}}
MODEL_MODULES = sorted(info.name for info in pkgutil.iter_modules(fastgen.models.__path__)
                       if hasattr(importlib.import_module(f"fastgen.models.{info.name}"), "from_safetensors"))


def test_every_model_module_is_listed():
    assert len(MODEL_MODULES) >= 12, MODEL_MODULES


@pytest.mark.parametrize("name", MODEL_MODULES)
def test_from_safetensors_returns_the_model_in_eval_mode(name, tmp_path):
    from safetensors.torch import save_file

    module = importlib.import_module(f"fastgen.models.{name}")
    saved = module.build("tiny")
    assert saved.training  # a fresh model trains, as nn.Module starts
    state = {key: value.contiguous() for key, value in saved.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = module.from_safetensors(str(tmp_path / "model.safetensors"), "tiny", **_LOADER_OPTIONS.get(name, {}))
    assert not any(submodule.training for submodule in loaded.modules()), name
    for key, value in loaded.state_dict().items():
        if key in state:
            assert torch.equal(value, state[key]), key
