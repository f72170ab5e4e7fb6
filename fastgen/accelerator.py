"""`fastgen.accelerate(model)`: swap fastgen kernels into an existing model, in place, reversibly.

The model keeps its weights and its modules; what changes is how some of them compute. For
diffusers models that means installing fastgen attention processors on their `Attention`
modules (diffusers' own extension point), so the state dict, hooks and `torch.compile` see the
same module tree. Each replacement computes the same function as the code it replaces, up to
floating-point rounding; `fastgen.restore(model)` puts every original back.

Which submodules can be accelerated is declared by the `_ACCELERATORS` list below, one entry per
kind of submodule; each returns, for a submodule, nothing (not its kind), a replacement (with
how to undo it) or the reason it is left as it is. The report lists both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from fastgen.ops.registry import BACKENDS, OPS, current_backend, use_backend

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
    replaced: list = field(default_factory=list)
    left: list = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastgen.accelerate: replaced {len(self.replaced)}, left {len(self.left)}"]
        lines += [f"  replaced {r.path}: {r.original} -> {r.replacement} (op {r.op})" for r in self.replaced]
        lines += [f"  left     {r.path}: {r.module}: {r.reason}" for r in self.left]
        return "\n".join(lines)


@dataclass
class _Swap:
    """What an accelerator did to one submodule, with the way back."""

    original: str
    replacement: str
    op: str
    undo: Callable[[], None]


class _BackendScope:
    """Runs a replacement's op under the backend given to accelerate(); "auto" leaves the
    process-wide choice (use_backend / FASTGEN_BACKEND) in charge.

    A pinned backend cannot be honoured inside torch.compile: the ops read the backend when the
    compiled graph runs, and a use_backend block traced into the graph leaves no trace there.
    Rather than silently running another backend, tracing then stops with the way out."""

    def __init__(self, backend: str):
        self.backend = backend

    def run(self, fn, *args):
        if self.backend == "auto" or self.backend == current_backend():
            return fn(*args)
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"fastgen.accelerate(backend={self.backend!r}) pins the backend in eager mode only. Under "
                f"torch.compile, accelerate with backend='auto' and run the compiled model inside "
                f"fastgen.use_backend({self.backend!r}): the ops read the backend when the graph runs."
            )
        with use_backend(self.backend):
            return fn(*args)


def _projected_heads(attn, hidden_states, encoder_hidden_states):
    """q, k, v of a diffusers Attention as (B, L, H, D) views of its projections (channel
    h*D + d, as diffusers splits heads), with its optional q/k norms applied."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return tuple(t.unflatten(-1, (attn.heads, -1)) for t in (query, key, value))


def _project_out(attn, heads_out):
    return attn.to_out[1](attn.to_out[0](heads_out.flatten(2)))


class LinearAttentionProcessor(_BackendScope):
    """diffusers attention processor for SANA's ReLU linear attention, backed by
    `fastgen::linear_attention`. It computes what `SanaLinearAttnProcessor2_0` computes: the
    ReLU kernel over the heads, the eps = 1e-15 denominator, the output projection, and the
    float16 clip."""

    eps = 1e-15

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        from fastgen.ops.linear_attention import linear_attention

        q, k, v = _projected_heads(attn, hidden_states, encoder_hidden_states)
        out = _project_out(attn, self.run(linear_attention, q, k, v, self.eps))
        if out.dtype == torch.float16:
            out = out.clip(-65504, 65504)
        return out


class CrossAttentionProcessor(_BackendScope):
    """diffusers attention processor for softmax attention to a padded context (SANA's caption
    cross-attention), backed by `fastgen::cross_attention`.

    diffusers hands the caption mask over as an additive bias (0 to attend, -10000 for padding,
    broadcast over queries); it becomes the op's boolean key padding mask. The one difference:
    a row whose keys are all padding gives zeros here, where the bias form averages the padding
    tokens (a real caption always keeps at least one token)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        from fastgen.ops.cross_attention import cross_attention

        q, k, v = _projected_heads(attn, hidden_states, encoder_hidden_states)
        key_padding_mask = None
        if attention_mask is not None:
            key_padding_mask = attention_mask.reshape(k.shape[0], k.shape[1]) == 0
        return _project_out(attn, self.run(cross_attention, q, k, v, key_padding_mask))


# diffusers processor class name -> (fastgen processor class, the op it runs)
_DIFFUSERS_PROCESSORS = {
    "SanaLinearAttnProcessor2_0": (LinearAttentionProcessor, "linear_attention"),
    "SanaAttnProcessor2_0": (CrossAttentionProcessor, "cross_attention"),
}


def _diffusers_attention(module: nn.Module, backend: str, ops: frozenset) -> Union[None, _Swap, str]:
    if type(module).__name__ != "Attention" or not type(module).__module__.startswith("diffusers."):
        return None
    original = module.processor
    name = type(original).__name__
    if name not in _DIFFUSERS_PROCESSORS:
        return f"attention processor {name} has no fastgen replacement yet"
    processor_class, op = _DIFFUSERS_PROCESSORS[name]
    if op not in ops:
        return f"op {op} was not selected (ops=...)"
    module.set_processor(processor_class(backend))
    return _Swap(name, processor_class.__name__, op, lambda: module.set_processor(original))


_ACCELERATORS = (_diffusers_attention,)


def _named_modules(model) -> Iterator[tuple]:
    """Submodules of a module, or of every module component of a diffusers pipeline."""
    if isinstance(model, nn.Module):
        yield from model.named_modules()
        return
    components = getattr(model, "components", None)
    if not isinstance(components, dict):
        raise TypeError(f"accelerate takes a torch.nn.Module or a diffusers pipeline, got {type(model).__name__}")
    for component_name, component in components.items():
        if isinstance(component, nn.Module):
            for path, module in component.named_modules():
                yield (f"{component_name}.{path}" if path else component_name), module


def _selected_ops(ops: Optional[Iterable[str]]) -> frozenset:
    if ops is None:
        return frozenset(OPS)
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
    report, undo = AccelerationReport(), []
    for path, module in _named_modules(model):
        for accelerator in _ACCELERATORS:
            outcome = accelerator(module, backend, selected)
            if isinstance(outcome, _Swap):
                report.replaced.append(Replacement(path, outcome.original, outcome.replacement, outcome.op))
                undo.append(outcome.undo)
            elif isinstance(outcome, str):
                report.left.append(LeftAlone(path, type(module).__name__, outcome))
    setattr(model, _UNDO_ATTRIBUTE, undo)
    return report


def restore(model) -> int:
    """Undo accelerate(model); returns how many replacements were reverted."""
    undo = getattr(model, _UNDO_ATTRIBUTE, None) or []
    for step in reversed(undo):
        step()
    if hasattr(model, _UNDO_ATTRIBUTE):
        delattr(model, _UNDO_ATTRIBUTE)
    return len(undo)
