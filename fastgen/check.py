"""`fastgen check`: every implementation of every op against its reference, on this machine.

Each op's check cases are drawn fresh from a seed, run through each available fast
implementation into an output poisoned with NaN (an element a kernel forgets stays NaN and
fails), and compared with the reference evaluated in float64 on the same inputs. The backward
goes through the registered custom op and autograd with the backend forced, against the
float64 reference's autograd. On a machine without a GPU the Triton kernels run under the
interpreter (TRITON_INTERPRET=1) on CPU tensors.

An element passes when it is within the dtype's tolerance of the float64 value, or no further
from it than twice the worst error the reference itself makes when evaluated in the input
dtype (the FlashAttention tests' standard). The second clause is what an ill-conditioned
element needs: a filter's or a bias's gradient sums thousands of terms that cancel to a small
value, where any float32 summation order is more than 1e-5 relative off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from fastgen.ops.registry import FAST_BACKENDS, OPS, TOLERANCES, Op, backend_unavailable_reason, use_backend


@dataclass
class CheckResult:
    op: str
    backend: str
    case: str
    dtype: str
    direction: str  # "fwd" or "bwd"
    status: str  # "ok", "FAIL" or "skipped"
    max_abs_err: Optional[float] = None
    detail: str = ""


def _upcast(args: tuple) -> tuple:
    return tuple(a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def mismatch(actual: torch.Tensor, expected: torch.Tensor, same_dtype_reference: Optional[torch.Tensor] = None,
             magnitude: Optional[torch.Tensor] = None) -> tuple:
    """(max abs error, description of the worst violation or "") under the dtype's tolerance,
    widened to twice the worst error of `same_dtype_reference` (the reference evaluated in
    `actual`'s dtype) when one is given.

    `magnitude`, when given, is the elementwise size of the terms that sum to `expected`; rtol
    then applies to it where it exceeds |expected|. Where those terms cancel, rounding each of
    them to `actual`'s dtype is already more than rtol of their small sum, in any correct
    algorithm; an error of the size of the terms themselves (a term dropped or doubled) still
    fails. Integer tensors (indices, counts) must be equal."""
    if not actual.is_floating_point():
        if actual.shape != expected.shape:
            return float("inf"), f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
        wrong = actual.cpu() != expected.cpu()
        return 0.0, f"{int(wrong.sum())} of {wrong.numel()} differ" if wrong.any() else ""
    rtol, atol = TOLERANCES[actual.dtype]
    actual64 = actual.detach().double().cpu()
    expected64 = expected.detach().double().cpu()
    if actual64.shape != expected64.shape:
        return float("inf"), f"shape {tuple(actual64.shape)} != expected {tuple(expected64.shape)}"
    error = (actual64 - expected64).abs()
    max_error = error.max().item() if error.numel() else 0.0
    scale = expected64.abs() if magnitude is None else torch.maximum(expected64.abs(), magnitude.double().cpu())
    allowed = atol + rtol * scale
    reference_error = 0.0
    if same_dtype_reference is not None and error.numel():
        reference_error = (same_dtype_reference.detach().double().cpu() - expected64).abs().max().item()
        if math.isfinite(reference_error):  # a reference that overflows in this dtype widens nothing
            allowed = allowed.clamp(min=2 * reference_error)
    bad = ~(error <= allowed)  # NaN (an unwritten output element) counts as bad
    if not bad.any():
        return max_error, ""
    index = tuple(int(i) for i in bad.nonzero()[0])
    widened = f", or 2 x the reference's own error {reference_error:.3g}" if same_dtype_reference is not None else ""
    return max_error, (
        f"{int(bad.sum())} of {error.numel()} elements off, first at {index}: "
        f"got {actual64[index].item():.6g}, expected {expected64[index].item():.6g} "
        f"(rtol {rtol}, atol {atol}{widened})"
    )


def _as_tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _poison(tensor: torch.Tensor) -> None:
    # NaN for floats; for indices and counts a value no kernel would write.
    tensor.fill_(float("nan") if tensor.is_floating_point() else -1)


def _worst(triples, what: str) -> tuple:
    """(max abs error, first failure's description) over (actual, expected, same-dtype
    reference) triples: floating tensors under `mismatch`, integer ones (indices, counts)
    exactly. None on both sides is a gradient neither gives (an argument the op treats as a
    constant, such as a RoPE table); None on one side only fails."""
    worst = 0.0
    for i, (actual, expected, same_dtype_reference) in enumerate(triples):
        if actual is None or expected is None:
            if actual is not expected:
                return float("inf"), f"{what} {i}: {'no' if actual is None else 'a'} gradient where the reference " \
                                     f"gives {'one' if actual is None else 'none'}"
            continue
        error, detail = mismatch(actual, expected, same_dtype_reference)
        if detail:
            return error, f"{what} {i}: {detail}"
        worst = max(worst, error)
    return worst, ""


def check_forward(op: Op, backend: str, args: tuple) -> tuple:
    """(max abs error, first failure or "") of the backend's forward on args, written into
    NaN-poisoned outputs, against the float64 reference."""
    out = op.allocate_output(*args)
    for tensor in _as_tuple(out):
        _poison(tensor)
    op.implementations[backend].run(*args, out=out)
    expected = _as_tuple(op.reference(*_upcast(args)))
    with torch.no_grad():
        same_dtype = _as_tuple(op.reference(*args))
    return _worst(zip(_as_tuple(out), expected, same_dtype), "output")


def check_backward(op: Op, backend: str, args: tuple, generator: torch.Generator) -> tuple:
    """Gradients of every floating input through every floating output, against float64
    autograd of the reference."""
    custom_op = getattr(torch.ops.fastgen, op.name)
    leaves = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    fast_args, reference_args, same_dtype_args = list(args), list(_upcast(args)), list(args)
    for i in leaves:
        fast_args[i] = args[i].detach().requires_grad_()
        reference_args[i] = reference_args[i].requires_grad_()
        same_dtype_args[i] = args[i].detach().requires_grad_()
    with use_backend(backend):
        outputs = _as_tuple(custom_op(*fast_args))
    expected = _as_tuple(op.reference(*reference_args))
    same_dtype = _as_tuple(op.reference(*same_dtype_args))
    differentiable = [i for i, o in enumerate(outputs) if o.is_floating_point()]
    grads = [torch.randn(outputs[i].shape, generator=generator).to(outputs[i].device, outputs[i].dtype)
             for i in differentiable]
    torch.autograd.backward([outputs[i] for i in differentiable], grads)
    torch.autograd.backward([expected[i] for i in differentiable], [g.double() for g in grads])
    torch.autograd.backward([same_dtype[i] for i in differentiable], grads)
    return _worst(((fast_args[i].grad, reference_args[i].grad, same_dtype_args[i].grad) for i in leaves),
                  "grad of argument")


def check_op(op: Op, backend: str, device: torch.device, seed: int = 0,
             on_result: Optional[Callable[[CheckResult], None]] = None) -> list:
    """Every check case of `op` on `backend`, forward and backward, in each dtype the backend
    takes; `on_result` sees each result as soon as it is known (progress output)."""
    implementation = op.implementations.get(backend)
    if implementation is None:
        return []
    reason = backend_unavailable_reason(backend, device)
    if reason is not None:
        results = [CheckResult(op.name, backend, "*", "*", "*", "skipped", detail=reason)]
        if on_result is not None:
            on_result(results[0])
        return results
    generator = torch.Generator().manual_seed(seed)
    results = []
    for case in op.check_cases():
        for dtype in implementation.dtypes:
            dtype_name = str(dtype).replace("torch.", "")
            for direction in ("fwd", "bwd") if op.differentiable else ("fwd",):
                args = case.make_args(device, dtype, generator)
                try:
                    if direction == "fwd":
                        error, detail = check_forward(op, backend, args)
                    else:
                        error, detail = check_backward(op, backend, args, generator)
                except Exception as exc:  # a crashing kernel is a failed check, reported with the rest
                    error, detail = None, f"{type(exc).__name__}: {exc}"
                status = "FAIL" if detail else "ok"
                results.append(CheckResult(op.name, backend, case.label, dtype_name, direction, status, error, detail))
                if on_result is not None:
                    on_result(results[-1])
    return results


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run_checks(device: Optional[torch.device] = None, backends: Iterable[str] = FAST_BACKENDS,
               op_names: Optional[Iterable[str]] = None, seed: int = 0,
               on_result: Optional[Callable[[CheckResult], None]] = None) -> list:
    """check_op of every (op, backend), op by op; ValueError for an unknown op name."""
    device = device or default_device()
    names = list(op_names) if op_names is not None else sorted(OPS)
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {unknown}; known: {sorted(OPS)}")
    return [r for name in names for backend in backends for r in check_op(OPS[name], backend, device, seed, on_result)]


def summarize(results: list) -> str:
    """One line per (op, backend) checked: counts, the worst error, and every failure in full;
    then one line per backend skipped and its reason, which is the same for every op."""
    lines = []
    groups: dict = {}
    skipped: dict = {}
    for r in results:
        if r.status == "skipped":
            skipped.setdefault((r.backend, r.detail), []).append(r.op)
        else:
            groups.setdefault((r.op, r.backend), []).append(r)
    for (op_name, backend), rows in groups.items():
        failed = [r for r in rows if r.status == "FAIL"]
        errors = [r.max_abs_err for r in rows if r.max_abs_err is not None]
        worst = max(errors) if errors else float("nan")
        verdict = f"FAILED {len(failed)} of {len(rows)}" if failed else f"ok {len(rows)} checks"
        directions = "+".join(d for d in ("fwd", "bwd") if any(r.direction == d for r in rows))
        lines.append(f"  {op_name:32s} {backend:7s} {verdict} ({directions}, max abs err {worst:.2e})")
        lines.extend(f"      {r.case} {r.dtype} {r.direction}: {r.detail}" for r in failed)
    for (backend, detail), op_names in skipped.items():
        which = op_names[0] if len(op_names) == 1 else f"{len(op_names)} ops"
        lines.append(f"  {which:32s} {backend:7s} skipped: {detail}")
    return "\n".join(lines)
