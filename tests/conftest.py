"""Test setup: without a CUDA GPU the Triton kernels run under the interpreter on CPU tensors,
and tests marked `gpu` are skipped with the reason. Also the fixtures every op family's CUDA
tests share: the built extension, and fake tensor arguments for its argument checks."""
import os
import shutil

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


def _find_nvcc():
    # The same places setup.py looks.
    candidates = [shutil.which("nvcc")]
    candidates += [os.path.join(os.environ[v], "bin", "nvcc")
                   for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((p for p in candidates if p and os.path.isfile(p)), None)


@pytest.fixture(scope="session")
def cuda_extension():
    """fastgen._C. Where nvcc exists but the module does not import, the install failed to
    build it: that fails the test instead of skipping it."""
    from fastgen import _cuda

    try:
        return _cuda.load()
    except RuntimeError as e:
        reason = str(e)
    if os.environ.get("FASTGEN_SKIP_CUDA", "") not in ("", "0"):
        pytest.skip("fastgen._C not built: FASTGEN_SKIP_CUDA is set")
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("fastgen._C not built: no nvcc on this machine")
    pytest.fail(f"nvcc is at {nvcc} but fastgen._C does not import, so the install failed to "
                f"build it (reinstall with pip install -v --no-build-isolation -e .): {reason}")


# A host address that is never dereferenced: calls with it must fail before any launch.
FAKE_PTR = 1 << 20


def fake_tensor_arg(sizes, dtype="float32", ptr=FAKE_PTR, strides=None):
    """The extension's tensor tuple for a contiguous (or `strides`) tensor at a fake address."""
    if strides is None:
        strides, acc = [], 1
        for s in reversed(sizes):
            strides.insert(0, acc)
            acc *= s
    return (ptr, dtype, tuple(sizes), tuple(strides))
