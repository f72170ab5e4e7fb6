"""Access to fastgen._C, the torch-free CUDA extension (csrc/).

The extension takes tensors as tuples ``(data_ptr, dtype, sizes, strides)`` and a raw
``cudaStream_t``; this module builds those from torch tensors and says why the extension
cannot be used when it cannot. Importing it never fails and imports neither torch nor
triton; torch is imported by the helpers that take tensors.

Callers launch with the tensors' device current (``with torch.cuda.device(x.device)``):
the kernels run on the current device, on the stream given.
"""

from __future__ import annotations

_BUILD_HINT = (
    "it is built when fastgen is installed with nvcc reachable (on PATH, in $CUDA_HOME/bin, "
    "$CUDA_PATH/bin or /usr/local/cuda/bin) and cmake and ninja available: "
    "pip install --no-build-isolation -e . (add -v to see the build; "
    "FASTGEN_CUDA_ARCHS=90a compiles for one arch only)"
)

_DTYPE_NAMES = {"torch.float32": "float32", "torch.float16": "float16",
                "torch.bfloat16": "bfloat16", "torch.uint8": "uint8"}

_module = None
_import_error: BaseException | None = None
_no_device_reason: str | None = None
_checked_device = False


def _import():
    global _module, _import_error
    if _module is None and _import_error is None:
        try:
            from fastgen import _C
            _module = _C
        except ImportError as e:  # not built, or built for another Python / platform
            _import_error = e
    return _module


def load():
    """The fastgen._C module; RuntimeError saying how to build it when it is missing."""
    module = _import()
    if module is None:
        raise RuntimeError(
            f"the CUDA extension fastgen._C is not built ({_import_error}); {_BUILD_HINT}"
        ) from _import_error
    return module


def available() -> str | None:
    """None when fastgen._C imports and sees a CUDA device, else the reason it cannot run."""
    global _checked_device, _no_device_reason
    module = _import()
    if module is None:
        return f"the CUDA extension fastgen._C is not built ({_import_error}); {_BUILD_HINT}"
    if not _checked_device:  # devices do not come and go within a process
        if module.cuda_device_count() == 0:
            _no_device_reason = ("fastgen._C sees no CUDA device (no driver, no GPU, or "
                                 "CUDA_VISIBLE_DEVICES hides them)")
        _checked_device = True
    return _no_device_reason


def build_info() -> dict | None:
    """fastgen._C's build_info() (cuda_runtime_version, archs), or None if not built."""
    module = _import()
    return dict(module.build_info()) if module is not None else None


def tensor_arg(t, name: str = "tensor") -> tuple:
    """``(data_ptr, dtype, sizes, strides)`` of a 4-D float32/float16/bfloat16 (or uint8) CUDA tensor.

    Strides are in elements, as torch gives them; any layout is accepted. ValueError, naming
    the argument, for anything else: the kernels would read a CPU pointer as device memory.
    """
    import torch

    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor, got shape {tuple(t.shape)}")
    dtype = _DTYPE_NAMES.get(str(t.dtype))
    if dtype is None:
        raise ValueError(f"{name}: dtype must be float32, float16, bfloat16 or uint8, got {t.dtype}")
    if t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got one on {t.device}")
    return (t.data_ptr(), dtype, tuple(t.shape), tuple(t.stride()))


def stream_handle(device=None) -> int:
    """The current CUDA stream of ``device`` as the integer cudaStream_t the kernels take."""
    import torch

    return torch.cuda.current_stream(device).cuda_stream
