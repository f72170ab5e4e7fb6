"""The op contract: one place where each op declares its reference and fast implementations.

An op is a `torch.library.custom_op` (so `torch.compile(fullgraph=True)` traces it as one node)
whose body calls `Op.run`. `Op.run` validates the arguments (the same function gives the fake
op its output shape), allocates the output and hands it to the implementation picked by the
active backend:

- "reference": the eager PyTorch reference (ground truth and benchmark baseline).
- "triton" / "cuda": that implementation for every op that has one; an op without one runs as
  under "auto". If the op has it but it cannot run here (extension not built, CPU tensors
  without TRITON_INTERPRET=1, unsupported dtype), `BackendUnavailable` says why: an explicit
  request never silently falls back.
- "auto" (default): CPU tensors run the reference; CUDA tensors take the first usable
  implementation in the op's preference order for this GPU's compute capability, else the
  op's default order (triton, then cuda: Triton's kernels are autotuned on the GPU they run
  on, while a CUDA kernel is only preferred where it was measured faster), else the
  reference. The per-capability orders are measured, not guessed:
  `fastgen bench order RESULTS.json --write` ranks each op's backends by their benchmark
  speedups on that GPU and records the ranking in backend_order.json next to this
  file, with the GPU and the commit it was measured on.

The backend is chosen per thread (a `contextvars.ContextVar`; an asyncio task works on a copy
of its creator's choice): `use_backend(...)` sets it for the block in the thread that enters
it, so concurrent threads neither see nor undo each other's choice. Where no block is open,
and in every new thread, the backend is the `FASTGEN_BACKEND` environment variable, else
"auto". A backward runs under the backend its forward ran with, carried in the autograd
context (`register_autograd`), because autograd runs backward passes on its own worker
threads for CUDA tensors, which never entered the forward's block.

Implementations write into an output tensor they are given (`out=`), so tests can poison it
beforehand and catch elements a kernel never writes.

Errors, one convention for every op. Arguments are validated before any kernel runs; a message
starts with the op the user called ("fastgen.cross_attention's backward", not an internal op's
name), names the argument and says what was expected and what was given:
- TypeError: a value of the wrong kind: not a tensor, an integer tensor where floats are
  needed, a dtype that differs from the primary tensor's, a string or a bool where a number is
  needed (`check_number`).
- ValueError: a value of the right kind the op cannot take: a shape, a device, a NaN or
  infinite scalar, a non-positive eps, an unknown activation or backend name (also
  FASTGEN_BACKEND, at the first op call).
- RuntimeError from PyTorch, quoting the schema, for what the schema itself cannot bind (a
  list where a tensor goes); None for an optional argument means "absent" everywhere (bias_act's
  act=None is no activation, as ada_group_norm's).
- BackendUnavailable (a RuntimeError) when an explicitly requested backend cannot run here.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

BACKENDS = ("auto", "reference", "triton", "cuda")
MEASURED_ORDER_PATH = Path(__file__).with_name("backend_order.json")
FAST_BACKENDS = ("triton", "cuda")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What the ops accept: the kernels' dtypes, and float64 for the reference (gradcheck).
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)

# Per output dtype (rtol, atol) against a reference computed in float32 or wider.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the given inputs on this machine."""


def _validated_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


# Read once, at import; validated where it is used, so that a bad value fails the first op
# call (or the CLI, up front) with the reason instead of `import fastgen` with a traceback.
_ENVIRONMENT_BACKEND = os.environ.get("FASTGEN_BACKEND") or "auto"
_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastgen_backend", default=None)


def current_backend() -> str:
    """The backend of the calling thread (see the module docstring); ValueError when no
    `use_backend` block is open and FASTGEN_BACKEND names no backend."""
    chosen = _backend.get()
    return _validated_backend(_ENVIRONMENT_BACKEND, "FASTGEN_BACKEND") if chosen is None else chosen


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the fastgen ops that this thread calls inside the block with backend `name` (see the
    module docstring)."""
    token = _backend.set(_validated_backend(name, "backend"))
    try:
        yield name
    finally:
        _backend.reset(token)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` cannot run on `device` here, or None when it can."""
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled()):
            return None
        if device.type == "cpu":
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
        return f"Triton kernels do not run on {device.type} tensors"
    if backend == "cuda":
        from fastgen import _cuda

        # Not built / no GPU first: that is the reason that matters on a machine without one.
        reason = _cuda.available()
        if reason is None and device.type != "cuda":
            reason = f"the CUDA extension needs CUDA tensors, got {device.type} tensors"
        return reason
    raise ValueError(f"unknown fast backend {backend!r}")


@functools.lru_cache(maxsize=None)
def _import_function(location: str) -> Callable[..., None]:
    module, _, function = location.partition(":")
    return getattr(importlib.import_module(module), function)


@dataclass(frozen=True)
class Implementation:
    """`target(*op_args, out=out)` writes the op's result into out. The target is a function,
    or its location "package.module:function", imported at the first call: the op module names
    its kernels without importing them, so importing fastgen never imports Triton, and a
    kernel module can import what it needs from its op module."""

    backend: str
    target: Callable[..., None] | str
    dtypes: tuple = KERNEL_DTYPES

    def run(self, *args, out) -> None:
        target = _import_function(self.target) if isinstance(self.target, str) else self.target
        target(*args, out=out)

    def unavailable_reason(self, reference_tensor: torch.Tensor) -> Optional[str]:
        if reference_tensor.dtype not in self.dtypes:
            supported = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"{self.backend} kernels support {supported}, not {reference_tensor.dtype}"
        return backend_unavailable_reason(self.backend, reference_tensor.device)


def random_tensor(shape: tuple, layout: str, device, dtype, generator: torch.Generator) -> torch.Tensor:
    """Standard-normal tensor of `shape` stored as `layout`: "contiguous", "channels_last", or
    "sliced" (every other element of the last dim of a wider tensor: no unit stride anywhere).
    Drawn in float32 on the CPU so a seed gives the same values on every device and dtype."""
    if layout == "sliced":
        wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator)
        return wide.to(device=device, dtype=dtype)[..., ::2]
    values = torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last)
    if layout != "contiguous":
        raise ValueError(f"unknown layout {layout!r}")
    return values


def check_float_tensor(op_name: str, name: str, tensor) -> None:
    """TypeError naming `name` unless `tensor` is a tensor of one of FLOAT_DTYPES."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op_name}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op_name}: {name} must be float32, float16, bfloat16 or float64, got {tensor.dtype}")


def check_same_dtype_and_device(op_name: str, name: str, tensor: torch.Tensor, primary: torch.Tensor,
                                primary_name: str) -> None:
    """A tensor that travels with the op's primary input must share its dtype and device."""
    if tensor.dtype != primary.dtype:
        raise TypeError(f"{op_name}: {name} dtype {tensor.dtype} must match {primary_name} dtype {primary.dtype}")
    if tensor.device != primary.device:
        raise ValueError(f"{op_name}: {name} is on {tensor.device} but {primary_name} is on {primary.device}")


def check_companion(op_name: str, name: str, tensor, primary: torch.Tensor, shape: tuple, meaning: str,
                    primary_name: str = "x") -> None:
    """A float tensor that travels with the primary input: `shape` (described as `meaning`),
    and the primary's dtype and device."""
    check_float_tensor(op_name, name, tensor)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{op_name}: {name} must have shape {meaning} = {shape}, got {tuple(tensor.shape)}")
    check_same_dtype_and_device(op_name, name, tensor, primary, primary_name)


def check_number(op_name: str, name: str, value, *, allow_none: bool = False, positive: bool = False) -> None:
    """The contract's convention for a scalar argument: TypeError naming `name` unless `value` is
    an int or a float (a bool is not a number here; None passes when `allow_none`), ValueError
    unless it is finite and, when `positive`, > 0."""
    if value is None and allow_none:
        return
    wanted = "a finite number" + (" > 0" if positive else "") + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op_name}: {name} must be {wanted}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{op_name}: {name} must be {wanted}, got {value!r}")


def check_attention_inputs(op_name: str, q, k, v, max_head_dim: int, layout: str) -> None:
    """q (B, Lq, H, D), k and v (B, Lkv, H, D) float tensors of one dtype and device (`layout`
    names the dims in messages), 1 <= D <= max_head_dim."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(op_name, name, tensor)
        if tensor.dim() != 4:
            raise ValueError(f"{op_name}: {name} must be 4-D {layout}, got shape {tuple(tensor.shape)}")
    for name, tensor in (("k", k), ("v", v)):
        check_same_dtype_and_device(op_name, name, tensor, q, "q")
    batch, _, heads, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, heads, head_dim):
        raise ValueError(f"{op_name}: k must have q's batch, heads and head dim (B, H, D) = {(batch, heads, head_dim)}, "
                         f"got k of shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{op_name}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if not 1 <= head_dim <= max_head_dim:
        raise ValueError(f"{op_name}: head dim D must be between 1 and {max_head_dim}, got {head_dim}")


@functools.lru_cache(maxsize=1)
def measured_orders() -> dict:
    """{op name: {"major.minor": backends fastest first}} from MEASURED_ORDER_PATH; {} without it."""
    if not MEASURED_ORDER_PATH.exists():
        return {}
    entries = json.loads(MEASURED_ORDER_PATH.read_text())["orders"]
    return {op: {capability: tuple(entry["order"]) for capability, entry in by_capability.items()}
            for op, by_capability in entries.items()}


@dataclass
class CheckCase:
    """One input for `fastgen check`: positional op args, with tensors made on demand."""

    label: str
    make_args: Callable[[torch.device, torch.dtype, torch.Generator], tuple]


@dataclass
class Op:
    """An op family member: its reference, output allocation and fast implementations.

    `allocate_output(*args)` validates the arguments (raising TypeError/ValueError that name the
    offending argument) and returns an uninitialised output, or a tuple of them for an op with
    several outputs (then `out=` and the reference's result are tuples too); the fake op calls
    it on meta tensors. The first positional argument is the tensor whose device and dtype select the
    implementation.
    """

    name: str
    reference: Callable[..., torch.Tensor]
    allocate_output: Callable[..., torch.Tensor]
    default_order: Sequence[str] = ("triton", "cuda")
    check_cases: Callable[[], list] = lambda: []
    differentiable: bool = True  # False: no autograd (index outputs); checks skip the backward
    implementations: dict = field(default_factory=dict)
    # What messages call an internal op (a forward with extra outputs, a backward): the public
    # call the user made, e.g. "cross_attention's backward", not a name they never wrote.
    called_as: Optional[str] = None

    @property
    def user_facing_name(self) -> str:
        return f"fastgen.{self.called_as or self.name}"

    def implement(self, backend: str, dtypes: tuple = KERNEL_DTYPES):
        """Decorator registering the function it decorates as this op's `backend`."""

        def register(run):
            self.implement_at(backend, run, dtypes)
            return run

        return register

    def implement_at(self, backend: str, target: Callable[..., None] | str, dtypes: tuple = KERNEL_DTYPES) -> None:
        """Registers `target` (see Implementation), for example
        OP.implement_at("triton", "fastgen.kernels.family:op_forward")."""
        if backend not in FAST_BACKENDS:
            raise ValueError(f"{self.name}: implementations are {FAST_BACKENDS}, got {backend!r}")
        self.implementations[backend] = Implementation(backend, target, dtypes)

    def preference(self, device: torch.device) -> Sequence[str]:
        """The measured order for this GPU's compute capability (backends it did not rank, such
        as one added since, follow in the default order), else the default order."""
        if device.type != "cuda":
            return tuple(self.default_order)
        major, minor = torch.cuda.get_device_capability(device)
        measured = measured_orders().get(self.name, {}).get(f"{major}.{minor}", ())
        return tuple(measured) + tuple(b for b in self.default_order if b not in measured)

    def select(self, reference_tensor: torch.Tensor, backend: Optional[str] = None) -> Optional[Implementation]:
        """The implementation the backend picks for these inputs; None means the reference."""
        backend = backend or current_backend()
        if backend == "reference":
            return None
        if backend in self.implementations:
            implementation = self.implementations[backend]
            reason = implementation.unavailable_reason(reference_tensor)
            if reason is not None:
                raise BackendUnavailable(f"{self.user_facing_name}: backend {backend!r} was requested but {reason}")
            return implementation
        if reference_tensor.device.type != "cuda":
            return None
        for candidate in self.preference(reference_tensor.device):
            implementation = self.implementations.get(candidate)
            if implementation is not None and implementation.unavailable_reason(reference_tensor) is None:
                return implementation
        return None

    def run(self, *args):
        out = self.allocate_output(*args)
        implementation = self.select(args[0])
        if implementation is None:
            result = self.reference(*args)
            if isinstance(out, tuple):
                return tuple(_as_fresh_output(r, o, args) for r, o in zip(result, out))
            return _as_fresh_output(result, out, args)
        implementation.run(*args, out=out)
        return out


def _as_fresh_output(result: torch.Tensor, out: torch.Tensor, args: tuple) -> torch.Tensor:
    """A custom op must return a new tensor laid out as its fake says: copy when the reference
    returned a view of an input or a different memory layout."""
    aliases_input = any(
        isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == result.untyped_storage().data_ptr()
        for a in args
    )
    if aliases_input or result.stride() != out.stride() or result.dtype != out.dtype:
        return out.copy_(result)
    return result


OPS: dict = {}


def register(op: Op) -> Op:
    if op.name in OPS:
        raise ValueError(f"op {op.name!r} is registered twice")
    OPS[op.name] = op
    return op


def with_the_math(function: Callable) -> Callable:
    """A public op function whose docstring goes on with its family module's docstring, which
    states the math its one-line docstring points to: help() and IDEs show both."""
    math = inspect.getmodule(function).__doc__
    if math:
        function.__doc__ = f"{function.__doc__}\n\n{math}"
    return function


def define_custom_op(op: Op, mutates_args: tuple = ()):
    """Decorator turning a typed signature (its body is never run) into the custom op
    `fastgen::<op.name>`: the signature's parameters and type hints give the schema, `op.run`
    the body and `op.allocate_output` the fake, so each op states these once. It returns a
    plain function of that signature and docstring calling the custom op (`help()` and IDEs
    show the arguments and the math, not torch's CustomOpDef), the custom op as its `custom_op`."""

    def decorate(signature):
        parameters = inspect.signature(signature, eval_str=True)

        def run(*args, **kwargs):
            bound = parameters.bind(*args, **kwargs)
            bound.apply_defaults()
            return op.run(*bound.args)

        functools.update_wrapper(run, signature)
        run.__signature__ = parameters  # the schema is inferred from this, evaluated in the op's module
        custom_op = torch.library.custom_op(f"fastgen::{op.name}", run, mutates_args=mutates_args)
        custom_op.register_fake(op.allocate_output)

        @with_the_math
        @functools.wraps(signature)
        def public(*args, **kwargs):
            return custom_op(*args, **kwargs)

        public.custom_op = custom_op
        return public

    return decorate


def register_autograd(op_function, backward: Callable, setup_context: Callable) -> None:
    """The autograd of the custom op behind `op_function` (a define_custom_op function), with
    the backward run under the backend the forward ran
    with, even when `.backward()` is called after the `use_backend` block has closed or runs on
    another thread (autograd's worker thread, for CUDA tensors). (Under torch.compile the compiled
    backward reads the backend when it runs, like every op: torch runs it in a copy of the
    context of the thread that calls `.backward()`, on whichever thread autograd picks.)"""

    def remember_backend(ctx, inputs, output):
        ctx.fastgen_backend = current_backend()
        setup_context(ctx, inputs, output)

    def backward_with_forward_backend(ctx, *grads):
        with use_backend(ctx.fastgen_backend):
            return backward(ctx, *grads)

    op_function.custom_op.register_autograd(backward_with_forward_backend, setup_context=remember_backend)
