"""Test setup: without a CUDA GPU the Triton kernels run under the interpreter on CPU tensors,
and tests marked `gpu` are skipped with the reason."""
import os

import torch

# Before anything imports triton: triton.jit reads this when a kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def generator():
    """A fresh seed every run; printed so a failure (pytest shows captured output) can be replayed."""
    seed = torch.seed() % (2**63)
    print(f"generator seed: {seed}")
    return torch.Generator().manual_seed(seed)
