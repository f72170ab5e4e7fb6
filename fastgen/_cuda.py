"""Access to fastgen._C, the torch-free CUDA extension (csrc/), and the one way to launch it.

Every CUDA implementation calls ``launch(entry_point, name=value, ...)`` once: it loads the
extension, makes the device of the first tensor argument current (the kernels run on the
current device), passes each tensor as the tuple ``tensor_arg`` builds, None, numbers, bools
and strings as they are, and the current stream as ``stream``. The names are the entry
point's parameter names (csrc/bindings.cpp), which errors start with on either side. Importing
this module never fails and imports neither torch nor triton; torch is imported by the helpers
that take tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

_BUILD_HINT = (
    "pip install -e . builds it where nvcc is reachable (on PATH, in $CUDA_HOME/bin, $CUDA_PATH/bin "
    "or /usr/local/cuda/bin), for this machine's GPUs; on a machine without a GPU (a cluster's login "
    "node) name the GPUs to build for: FASTGEN_CUDA_ARCHS=90a (H100) or FASTGEN_CUDA_ARCHS=all "
    "pip install -e ."
)

# What the install did about the extension (setup.py writes it beside the module).
_BUILD_RECORD = Path(__file__).with_name("_C_build.json")

_DTYPE_NAMES = {"torch.float32": "float32", "torch.float16": "float16",
                "torch.bfloat16": "bfloat16", "torch.uint8": "uint8"}

# Where the memory the kernels dereference lives; the tests' CPU emulation of CUDA sets "cpu".
_DEVICE_TYPE = "cuda"

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


def build_record() -> dict | None:
    """What the install did about fastgen._C (setup.py): built (bool), the reason it was not
    (with how to build it), targets, seconds, the sources compiled, and the message it showed;
    None for an install from before the record existed."""
    try:
        return json.loads(_BUILD_RECORD.read_text())
    except (OSError, ValueError):
        return None


def _not_built_reason() -> str:
    record = build_record()
    if record is not None and not record["built"]:
        return f"the CUDA extension fastgen._C is not built: the install skipped it: {record['reason']}"
    return f"the CUDA extension fastgen._C is not built ({_import_error}); {_BUILD_HINT}"


def load():
    """The fastgen._C module; RuntimeError saying how to build it when it is missing."""
    module = _import()
    if module is None:
        raise RuntimeError(_not_built_reason()) from _import_error
    return module


def available() -> str | None:
    """None when fastgen._C imports and sees a CUDA device, else the reason it cannot run."""
    global _checked_device, _no_device_reason
    module = _import()
    if module is None:
        return _not_built_reason()
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
    """The extension's form of a CUDA tensor: an int64 vector as ``(data_ptr, size, stride)``;
    any other tensor of up to 4 dims as ``(data_ptr, dtype, sizes, strides)``, its sizes
    padded with trailing 1s to 4 (a (B, C) tensor reads as (B, C, 1, 1)).

    Strides are in elements, as torch gives them; any layout is accepted. ValueError, naming
    the argument, for anything else: the kernels would read a CPU pointer as device memory.
    """
    import torch

    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    vector = t.dtype == torch.int64
    if vector and t.dim() != 1:
        raise ValueError(f"{name}: expected an int64 vector, got shape {tuple(t.shape)}")
    if t.dim() > 4:
        raise ValueError(f"{name}: expected at most 4 dims, got shape {tuple(t.shape)}")
    dtype = _DTYPE_NAMES.get(str(t.dtype))
    if dtype is None and not vector:
        raise ValueError(f"{name}: dtype must be float32, float16, bfloat16, uint8 or int64, got {t.dtype}")
    if t.device.type != _DEVICE_TYPE:
        raise ValueError(f"{name}: expected a CUDA tensor, got one on {t.device}")
    if vector:
        return (t.data_ptr(), t.shape[0], t.stride(0))
    pad = (1,) * (4 - t.dim())
    return (t.data_ptr(), dtype, tuple(t.shape) + pad, t.stride() + pad)


def per_channel(t):
    """A (C,) vector as the (1, C, 1, 1) view the kernels read per-channel parameters through
    (tensor_arg's padding would make it (C, 1, 1, 1)); None stays None."""
    return None if t is None else t.view(1, -1, 1, 1)


def stream_handle(device=None) -> int:
    """The current CUDA stream of ``device`` as the integer cudaStream_t the kernels take."""
    import torch

    return torch.cuda.current_stream(device).cuda_stream


def launch(entry_point: str, /, **args) -> None:
    """Enqueue fastgen._C's ``entry_point`` on the current stream of the tensors' device.

    ``args`` are its arguments by name, tensors as torch tensors (see tensor_arg), which are
    held until the launch is enqueued (the caching allocator orders any later reuse of their
    memory after it on the stream)."""
    _call(entry_point, args, with_stream=True)


def query(entry_point: str, /, **args):
    """The result of a host-side entry point that sizes a launch (filtered_lrelu_tiles,
    bias_act_db_splits): launch's conversions and device, no stream."""
    return _call(entry_point, args, with_stream=False)


def _call(entry_point: str, args: dict, with_stream: bool):
    import torch

    module = load()
    converted = {name: tensor_arg(a, name) if isinstance(a, torch.Tensor) else a for name, a in args.items()}
    device = next(a.device for a in args.values() if isinstance(a, torch.Tensor))
    with torch.cuda.device(device):
        if with_stream:
            converted["stream"] = stream_handle(device)
        return getattr(module, entry_point)(**converted)
