"""The one way `fastgen.accelerate` changes a module, used by every accelerator.

An accelerator is a function `(module, backend, ops) -> None | Swap | str`, registered with
`@accelerator`: None when the module is not its kind, a Swap (what it replaced and how to undo
it) or the reason it leaves the module as it is. It recognises its kind with `is_diffusers`,
asks `op_not_selected` before replacing anything, and replaces only through `replace_forward`
(an instance-level forward) or `replace_attribute` (an attribute it has checked it knows, such
as a diffusers attention processor), so that every replacement is undone the same way and a
forward installed by something else is never overwritten. The replacement runs its op inside
a `BackendScope`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from fastgen.ops.registry import use_backend


@dataclass
class Swap:
    """What an accelerator did to one submodule, with the way back."""

    original: str
    replacement: str
    op: str
    undo: Callable[[], None]


class BackendScope:
    """Runs a replacement's op under the backend given to accelerate(); "auto" leaves the
    calling thread's choice (use_backend / FASTGEN_BACKEND) in charge.

    A pinned backend cannot be honoured inside torch.compile: the ops read the backend when the
    compiled graph runs, and a use_backend block traced into the graph leaves no trace there.
    Rather than silently running another backend, tracing then stops with the way out."""

    def __init__(self, backend: str):
        self.backend = backend

    def run(self, fn, *args):
        if self.backend == "auto":
            return fn(*args)
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"fastgen.accelerate(backend={self.backend!r}) pins the backend in eager mode only. Under "
                f"torch.compile, accelerate with backend='auto' and run the compiled model inside "
                f"fastgen.use_backend({self.backend!r}): the ops read the backend when the graph runs."
            )
        with use_backend(self.backend):
            return fn(*args)


Accelerator = Callable[[nn.Module, str, frozenset], Union[None, Swap, str]]

# Filled through @accelerator by the modules of fastgen.accelerators, one per kind of submodule.
ACCELERATORS: list = []


def accelerator(fn: Accelerator) -> Accelerator:
    """Register `fn(module, backend, ops)` (see the module docstring) with fastgen.accelerate."""
    ACCELERATORS.append(fn)
    return fn


def is_diffusers(module: nn.Module, class_name: str, module_prefix: str = "diffusers.") -> bool:
    """Whether `module` is diffusers' `class_name`, defined in a module under `module_prefix`:
    a class of the same name from another library is not what the replacement reproduces."""
    return type(module).__name__ == class_name and type(module).__module__.startswith(module_prefix)


def op_not_selected(op: str, ops: frozenset) -> Optional[str]:
    """The reason a module is left alone when accelerate(ops=...) leaves out the op replacing it."""
    return None if op in ops else f"op {op} was not selected (ops=...)"


def replace_forward(module: nn.Module, forward: Callable, original: str, replacement: str,
                    op: str) -> Union[Swap, str]:
    """Set `forward` on `module`'s instance, where it shadows the class's forward, with an undo
    that deletes it again. A forward already on the instance was installed by something else
    (offloading hooks, another patch): replacing it would bypass that wrapper and restore() would
    delete it, so the module is left as it is and the reason returned instead."""
    if "forward" in vars(module):
        return (f"{type(module).__name__}.forward is already wrapped on the instance (e.g. by offloading hooks): "
                f"replacing it would bypass the wrapper")
    module.forward = forward

    def undo() -> None:
        del module.forward

    return Swap(original, replacement, op, undo)


def replace_attribute(module: nn.Module, name: str, value, replacement: str, op: str) -> Swap:
    """Set `module.<name>` to `value`, with an undo that sets the value found back. The caller
    has checked that the value found is one it reproduces (by its class); the Swap names that
    class as the original."""
    found = getattr(module, name)
    setattr(module, name, value)
    return Swap(type(found).__name__, replacement, op, lambda: setattr(module, name, found))
