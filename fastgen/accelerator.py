"""`fastgen.accelerate(model)`: swap fastgen kernels into an existing model, in place, reversibly.

The model keeps its weights and its modules; what changes is how some of them compute. For
diffusers models that means installing fastgen attention processors on their `Attention`
modules (diffusers' own extension point) and fused forwards on the blocks fastgen has kernels
for, so the state dict, hooks and `torch.compile` see the same module tree. fastgen's own
reference models (fastgen.models) call the ops already: for them accelerate pins a backend. A model
of another codebase that fastgen reimplements in its own layout (FoundationVision's VAR) is run
by loading its checkpoint into the fastgen model (`fastgen.models.var.from_safetensors` takes
their state dict as it is), not accelerated in place. Each replacement computes the same function
as the code it replaces, up to floating-point rounding; `fastgen.restore(model)` puts every
original back. `accelerate` makes all its swaps or none: when an accelerator raises, the swaps
made before are undone and the error raised. A forward that something else set on a module's instance (offloading hooks, another
patch) is never replaced: that module is left alone, with the reason.

Which submodules can be accelerated is declared in the modules of `fastgen.accelerators`, one
`@accelerator` function per kind of submodule; each returns, for a submodule, nothing (not its
kind), a replacement (with how to undo it) or the reason it is left as it is, and replaces
through `fastgen.accelerators.patch`, the one patch mechanism. The report lists both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Union

from torch import nn

from fastgen.accelerators import load_all, patch
from fastgen.accelerators.patch import BackendScope, Swap, replace_forward
from fastgen.ops.registry import BACKENDS, OPS

_UNDO_ATTRIBUTE = "_fastgen_undo"


@dataclass
class Replacement:
    path: str
    original: str
    replacement: str
    op: str


@dataclass
class LeftAlone:
    path: str
    module: str
    reason: str


@dataclass
class AccelerationReport:
    backend: str = "auto"
    replaced: list = field(default_factory=list)
    left: list = field(default_factory=list)

    def __str__(self) -> str:
        backend = ("'auto' (each call follows fastgen.use_backend / FASTGEN_BACKEND)" if self.backend == "auto"
                   else repr(self.backend))
        lines = [f"fastgen.accelerate, backend {backend}: replaced {len(self.replaced)}, left {len(self.left)}"]
        lines += [f"  replaced {r.path or '(the model)'}: {r.original} -> {r.replacement} [{r.op}]"
                  for r in self.replaced]
        lines += [f"  left     {r.path or '(the model)'}: {r.module}: {r.reason}" for r in self.left]
        if not self.replaced and not self.left:
            lines.append("  no submodule is of a kind fastgen accelerates (the kinds: fastgen.accelerators)")
        return "\n".join(lines)


def _named_modules(model) -> Iterator[tuple]:
    """Submodules of a module, or of every module component of a diffusers pipeline. A module
    that two components share comes once, under the first one's name: swapping it again would
    find its own swap in place and report the module as left."""
    if isinstance(model, nn.Module):
        yield from model.named_modules()
        return
    components = getattr(model, "components", None)
    if not isinstance(components, dict):
        raise TypeError(f"accelerate takes a torch.nn.Module or a diffusers pipeline, got {type(model).__name__}")
    seen = set()
    for component_name, component in components.items():
        if isinstance(component, nn.Module):
            yield from component.named_modules(memo=seen, prefix=component_name)


def _is_reference_model(model) -> bool:
    return isinstance(model, nn.Module) and type(model).__module__.startswith("fastgen.models.")


def _pin_reference_model(model: nn.Module, backend: str, ops: frozenset) -> Union[Swap, str]:
    """fastgen's own reference models call the ops in their layers already; what accelerate can
    add is pinning them to one backend, by running the model's forward under it."""
    if backend == "auto":
        return ("a fastgen reference model: its layers call fastgen ops already, under the calling thread's "
                "backend (fastgen.use_backend / FASTGEN_BACKEND); pass backend= to pin one")
    if ops != frozenset(OPS):
        return "a fastgen reference model calls its ops directly: ops= cannot exclude some of them"
    scope = BackendScope(backend)

    def forward(*args, **kwargs):
        return scope.run(lambda: type(model).forward(model, *args, **kwargs))

    return replace_forward(model, forward, type(model).__name__, f"forward under backend {backend!r}",
                           "every op it calls")


def _selected_ops(ops: Optional[Iterable[str]]) -> frozenset:
    if ops is None:
        return frozenset(OPS)
    if isinstance(ops, str):
        raise TypeError(f"accelerate: ops must be a list of op names, got the string {ops!r} "
                        f"(write ops=[{ops!r}])")
    selected = frozenset(ops)
    unknown = selected - set(OPS)
    if unknown:
        raise ValueError(f"accelerate: unknown op(s) {sorted(unknown)}; fastgen has {sorted(OPS)}")
    return selected


def accelerate(model, backend: str = "auto", ops: Optional[Iterable[str]] = None) -> AccelerationReport:
    """Install fastgen kernels into `model` (an nn.Module or a diffusers pipeline) in place.

    backend: "auto" follows fastgen.use_backend / FASTGEN_BACKEND at call time; another name
    pins the replaced parts to that backend. ops: restrict to these fastgen op names.
    Returns the report of what was replaced and what was left, and why. Undo with restore().
    """
    if backend not in BACKENDS:
        raise ValueError(f"accelerate: backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    selected = _selected_ops(ops)
    if getattr(model, _UNDO_ATTRIBUTE, None):
        raise ValueError("accelerate: this model is already accelerated; call fastgen.restore(model) first")
    load_all()

    report, undo = AccelerationReport(backend), []
    try:
        for path, module, outcome in _outcomes(model, backend, selected):
            if isinstance(outcome, Swap):
                report.replaced.append(Replacement(path, outcome.original, outcome.replacement, outcome.op))
                undo.append(outcome.undo)
            else:
                report.left.append(LeftAlone(path, type(module).__name__, outcome))
        setattr(model, _UNDO_ATTRIBUTE, undo)
    except BaseException:
        # All or nothing: a model left half swapped, with nothing recorded for restore() to undo,
        # would be neither the original model nor the accelerated one.
        _undo(undo)
        raise
    return report


def _outcomes(model, backend: str, ops: frozenset) -> Iterator[tuple]:
    """(path, module, Swap or reason) for every submodule some accelerator knows, as each
    accelerator makes its swap; for fastgen's reference models, the pinning of the backend."""
    if _is_reference_model(model):
        yield "", model, _pin_reference_model(model, backend, ops)
        return
    for path, module in _named_modules(model):
        for accelerator in patch.ACCELERATORS:
            outcome = accelerator(module, backend, ops)
            if outcome is not None:
                yield path, module, outcome


def _undo(steps: list) -> None:
    for step in reversed(steps):
        step()


def restore(model) -> int:
    """Undo accelerate(model); returns how many replacements were reverted."""
    undo = getattr(model, _UNDO_ATTRIBUTE, None) or []
    _undo(undo)
    if hasattr(model, _UNDO_ATTRIBUTE):
        delattr(model, _UNDO_ATTRIBUTE)
    return len(undo)
