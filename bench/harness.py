"""The benchmark harness: declare a benchmark once, measure every implementation of it side by
side in one run, and write one row per measurement (ROW_FIELDS).

Declaring. A `Benchmark` is an op (or model) name, its `Case`s and its `Impl`s. A case is one
shape label, dtype and direction ("fwd" or "fwd+bwd"), a `make_inputs(device, dtype, seed)`
returning the keyword arguments of one call (fresh random tensors, never zeros), and `work`:
the fewest bytes the call must move (each input read once, each output written once) for a
memory-bound benchmark, or its FLOPs for a compute-bound one. An `Impl` builds, once per case
and outside the timing, the callable to measure; `standard_impls` gives the usual set: the
eager reference, `torch.compile` of it, and the fastgen op under each fast backend it registers
(`op_benchmark` declares an op's benchmark with them, named after the op).

Checking. Each case's inputs (seed 0) go through the eager reference first; every impl's
output (each of them, for an op that returns a tuple; and, for fwd+bwd, every input gradient)
is checked once. In float32 (and for integer
results) it must equal eager's elementwise under the dtype's tolerance from
fastgen.ops.registry.TOLERANCES (or the benchmark's own). In float16 / bfloat16 eager is not
the truth either: it rounds too, and a chain of layers drifts by more than any elementwise
tolerance. There the eager reference also runs once on the same inputs upcast to float32, and an
impl passes when its relative error (L2 norm of the difference over the L2 norm of the float32
result) is at most twice eager's own plus the dtype's rtol: no less accurate than eager, up to
rounding. A mismatch is an error row and is not timed: a fast wrong answer is not a result. An impl whose backend cannot run here
(`BackendUnavailable`) or whose package is not installed is a skipped row; any other exception
is an error row. Either way the run goes on.

Timing. CUDA events around each call, after a warm-up, with the median, p20 and p80 of the
per-call times, rather than triton.testing.do_bench: the same code runs on CPU with an
injected timer (the tests do), and caches are defeated by input rotation rather than a flush
kernel between calls: each case makes enough copies of its
inputs (and of the fixed random output gradient) that one pass over them moves more than twice
the L2 size, and calls cycle through them, so each call reads DRAM. Each call's output is kept
until its input set comes round again, so the next output is not written into memory the
previous call just left in L2. fwd+bwd calls run backward with that gradient and set input
gradients to None between calls (outside the timed region). Small calls are timed with their
launch overhead: that is what a user of the op pays.

Ceilings. Once per run: device copy bandwidth (a large device-to-device copy, bytes read plus
written) and the bf16 matrix-product rate; each row's `fraction_of_ceiling` divides its
achieved GB/s or TFLOP/s by the matching one.
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
import re
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from fastgen import BackendUnavailable, sysinfo, use_backend
from fastgen.ops.registry import FAST_BACKENDS, OPS, TOLERANCES

DIRECTIONS = ("fwd", "fwd+bwd")
# The fields of every row, in file order; exactly one of "gbps" / "tflops" sits after ms_p80.
ROW_FIELDS = ("name", "impl", "shape", "dtype", "direction", "ms", "ms_p20", "ms_p80", "fraction_of_ceiling",
              "speedup_vs_eager", "max_abs_err", "status")
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# A timer runs `reps` timed calls after `warmup` untimed ones. Each call is `prepare()()`:
# prepare (untimed) picks the next input set and clears gradients, and returns the call to time.
# It returns the milliseconds of each timed call.
Timer = Callable[[Callable[[], Callable[[], Any]], int, int], list]

LOW_PRECISION = (torch.float16, torch.bfloat16)
_ACCURACY_SLACK = 2.0  # how much larger than eager's own error (against float32) an impl's may be
_FALLBACK_L2_BYTES = 50 * 2**20
_CPU_CACHE_BYTES = 4 * 2**20  # CPU runs only test the harness: small, but still rotates
_MAX_INPUT_COPIES = 256  # tiny inputs are launch-bound anyway; bounds memory and setup time


@dataclass(frozen=True)
class Case:
    shape: str  # short label, e.g. "B1 C128->256 f2 1024px +res"
    dtype: torch.dtype
    direction: str  # "fwd" or "fwd+bwd"
    make_inputs: Callable[[torch.device, torch.dtype, int], dict]  # keyword arguments of one call
    work: int  # bytes moved (bound "memory") or FLOPs (bound "compute") of one call

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ValueError(f"Case.direction must be one of {DIRECTIONS}, got {self.direction!r}")


@dataclass(frozen=True)
class Impl:
    make: Callable[[Case], Callable[..., torch.Tensor]]  # called once per case, outside the timing
    backend: Optional[str] = None  # fastgen backend active around every call, backward included


@dataclass(frozen=True)
class Benchmark:
    name: str
    cases: Sequence[Case]
    impls: Mapping[str, Impl]  # must include "eager": the reference and the speedup baseline
    bound: str = "memory"  # "memory": GB/s against the copy ceiling; "compute": TFLOP/s against matmul
    # (rtol, atol) replacing the per-dtype elementwise tolerance of float32 cases (TF32 layers).
    tolerance: Optional[tuple] = None
    # The registered ops whose implementations the fast-backend impls time (op_benchmark fills
    # it); empty for a model benchmark, whose model calls many ops under each backend.
    ops: tuple = ()

    def __post_init__(self):
        if "eager" not in self.impls:
            raise ValueError(f"benchmark {self.name!r} has no 'eager' impl to check and compare against")
        if self.bound not in ("memory", "compute"):
            raise ValueError(f"Benchmark.bound must be 'memory' or 'compute', got {self.bound!r}")


def compile_reference(reference: Callable) -> Callable:
    """torch.compile of `reference` with a clean slate. Dynamo caches compiled code on the
    function's code object, so without the reset later cases would recompile with dynamic
    shapes and, past the recompile limit, silently run eager."""
    torch._dynamo.reset()
    return torch.compile(reference)


def diffusers_twin(diffusers_type: type, model: torch.nn.Module) -> torch.nn.Module:
    """The diffusers `diffusers_type` of `model`'s config (its `to_diffusers()`) sharing the
    fastgen model's weight tensors, for inference: what users run, beside the fastgen model."""
    with torch.device("meta"):
        twin = diffusers_type(**model.config.to_diffusers())
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    return twin.eval().requires_grad_(False)


def op_backends(op_name: str) -> tuple:
    """The fast backends the registered op `op_name` implements, in FAST_BACKENDS order."""
    if op_name not in OPS:
        raise ValueError(f"{op_name!r} is not a registered op; registered: {', '.join(sorted(OPS))}")
    return tuple(backend for backend in FAST_BACKENDS if backend in OPS[op_name].implementations)


def backend_impls(call: Callable, backends: Sequence[str] = FAST_BACKENDS) -> dict:
    """One Impl per backend, timing `call` under it. A model benchmark takes every fast backend:
    its model calls many ops, and one that lacks the backend runs as under "auto"."""
    return {backend: Impl(lambda case: call, backend=backend) for backend in backends}


def standard_impls(op_name: str, call: Callable, reference: Callable) -> dict:
    """eager reference, torch.compile of it (compiled per case, warmed up by the first call),
    and `call` (the registered op `op_name`, called as the benchmark calls it) under each fast
    backend the op registers, in FAST_BACKENDS order: registering a backend adds its row. A
    fwd+bwd row runs the backward under the same backend; where the op's backward lacks it (a
    CUDA forward with a Triton backward), the backward runs as under "auto"."""
    impls = {"eager": Impl(lambda case: reference), "compile": Impl(lambda case: compile_reference(reference))}
    impls.update(backend_impls(call, op_backends(op_name)))
    return impls


def op_benchmark(op_name: str, cases: Sequence[Case], call: Callable, reference: Callable,
                 extra_impls: Optional[Mapping[str, Impl]] = None, **options) -> Benchmark:
    """The benchmark of the registered op `op_name`, named after it (`fastgen bench order` ranks
    an op's backends by the rows of that name): standard_impls, then `extra_impls` (peers from
    other libraries, variants of the call). `options` are Benchmark's (bound, tolerance)."""
    impls = {**standard_impls(op_name, call, reference), **(extra_impls or {})}
    return Benchmark(op_name, cases, impls, ops=(op_name,), **options)


def cuda_event_timer(prepare, reps: int, warmup: int) -> list:
    for _ in range(warmup):
        prepare()()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        call = prepare()
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def wall_clock_timer(prepare, reps: int, warmup: int) -> list:
    """For CPU tensors (tests): the host clock is the device clock."""
    for _ in range(warmup):
        prepare()()
    times = []
    for _ in range(reps):
        call = prepare()
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


@dataclass(frozen=True)
class _Budget:
    warmup: int
    probe_reps: int  # timed once to size the real measurement
    target_ms: float  # reps are chosen to fill about this much time
    min_reps: int
    max_reps: int


_QUICK = _Budget(warmup=2, probe_reps=3, target_ms=25.0, min_reps=10, max_reps=100)
_FULL = _Budget(warmup=3, probe_reps=5, target_ms=100.0, min_reps=20, max_reps=500)


def _measure(prepare, timer: Timer, budget: _Budget) -> tuple:
    """(median, p20, p80) milliseconds per call."""
    probe = timer(prepare, budget.probe_reps, budget.warmup)
    per_call = max(statistics.median(probe), 1e-6)
    reps = min(budget.max_reps, max(budget.min_reps, int(budget.target_ms / per_call)))
    samples = torch.tensor(timer(prepare, reps, 0), dtype=torch.float64)
    return tuple(samples.quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist())


def measure_ceilings(device: torch.device, timer: Timer, budget: _Budget) -> dict:
    """Copy bandwidth (GB/s, bytes read + written) and bf16 matmul rate (TFLOP/s), on random
    data: zeros can run faster than real data."""
    big = device.type == "cuda"
    copy_bytes, n = (2**30, 8192) if big else (16 * 2**20, 256)
    source = torch.randn(copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    copy_ms = _measure(lambda: lambda: target.copy_(source), timer, budget)[0]
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    product = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    matmul_ms = _measure(lambda: lambda: torch.mm(a, b, out=product), timer, budget)[0]
    return {"copy_gbps": 2 * copy_bytes / copy_ms / 1e6, "bf16_matmul_tflops": 2 * n**3 / matmul_ms / 1e9}


def _cache_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_CACHE_BYTES
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or _FALLBACK_L2_BYTES


def _tensors(inputs: dict) -> list:
    return [v for v in inputs.values() if isinstance(v, torch.Tensor)]


def _grad_leaves(inputs: dict) -> list:
    return [t for t in _tensors(inputs) if t.requires_grad]


def _make_set(case: Case, device: torch.device, seed: int) -> dict:
    inputs = case.make_inputs(device, case.dtype, seed)
    if case.direction == "fwd+bwd":
        for tensor in _tensors(inputs):
            if tensor.is_floating_point():
                tensor.requires_grad_()
    return inputs


def _random_like(tensor: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=tensor.device).manual_seed(seed)
    return torch.randn(tensor.shape, generator=generator, device=tensor.device, dtype=tensor.dtype)


@dataclass
class _InputSets:
    """Input copies to rotate through, with each copy's output gradients (one per output; None
    for fwd)."""

    inputs: list
    grads: list

    @classmethod
    def build(cls, case: Case, eager: Callable, device: torch.device) -> "_InputSets":
        first = _make_set(case, device, seed=0)
        with torch.no_grad():  # fails fast, before any copy is made; gives the gradients' shapes
            outputs = as_outputs(eager(**first))
        backward = case.direction == "fwd+bwd"
        set_bytes = sum(t.nbytes for t in _tensors(first)) + (sum(o.nbytes for o in outputs) if backward else 0)
        copies = min(_MAX_INPUT_COPIES, max(1, math.ceil(2 * _cache_bytes(device) / set_bytes)))
        inputs = [first] + [_make_set(case, device, seed) for seed in range(1, copies)]
        grads = [tuple(_random_like(output, 10_000 + len(outputs) * seed + i) for i, output in enumerate(outputs))
                 if backward else None for seed in range(copies)]
        return cls(inputs, grads)

    def upcast_first(self) -> tuple:
        """The first input set and its gradient with every float16 / bfloat16 tensor in float32."""
        def upcast(tensor):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype not in LOW_PRECISION:
                return tensor
            return tensor.detach().float().requires_grad_(tensor.requires_grad)

        grads = None if self.grads[0] is None else tuple(upcast(grad) for grad in self.grads[0])
        return {name: upcast(value) for name, value in self.inputs[0].items()}, grads

    def rotation(self, fn: Callable) -> Callable[[], Callable[[], None]]:
        """A `prepare` for the timers: each call uses the next input set."""
        held = [None] * len(self.inputs)
        turn = itertools.count()

        def prepare():
            k = next(turn) % len(self.inputs)
            _clear_grads(self.inputs[k])

            def call():
                held[k] = _call(fn, self.inputs[k], self.grads[k])

            return call

        return prepare


def _clear_grads(inputs: dict) -> None:
    for tensor in _grad_leaves(inputs):
        tensor.grad = None


def as_outputs(result) -> tuple:
    """An impl's result as a tuple: its one tensor, or the tensors of an op with several."""
    return result if isinstance(result, tuple) else (result,)


def _call(fn: Callable, inputs: dict, grads: Optional[tuple]):
    result = fn(**inputs)
    if grads is not None:
        torch.autograd.backward(as_outputs(result), grads)
    return result


def _results_of(fn: Callable, inputs: dict, grads: Optional[tuple]) -> list:
    """What an impl is checked on: its outputs, then the gradient of every input."""
    _clear_grads(inputs)
    outputs = [output.detach() for output in as_outputs(_call(fn, inputs, grads))]
    return outputs + [t.grad for t in _grad_leaves(inputs)]


def _tolerance(bench: Benchmark, dtype: torch.dtype) -> tuple:
    return bench.tolerance or TOLERANCES[dtype]


def _relative_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    difference = torch.linalg.vector_norm(actual.double() - truth.double())
    return (difference / torch.linalg.vector_norm(truth.double()).clamp_min(1e-30)).item()


def _compare(got: list, expected: list, tolerance: tuple, golden: Optional[list] = None) -> tuple:
    """(max abs error against eager, None or why the results are wrong). With `golden` (eager in
    float32, for a low-precision case) floating results are held to eager's own accuracy against
    it, with the dtype's rtol as the floor; otherwise each element must be within `tolerance` of
    eager's."""
    if len(got) != len(expected):
        return math.inf, f"{len(got)} results where eager gives {len(expected)}"
    rtol, atol = tolerance
    errors, problems = [], []
    for i, (actual, reference) in enumerate(zip(got, expected)):
        if actual is None or actual.shape != reference.shape:
            return math.inf, f"result {i} is {None if actual is None else tuple(actual.shape)}, eager's {tuple(reference.shape)}"
        difference = (actual.float() - reference.float()).abs()
        errors.append(difference.max())
        if golden is not None and actual.is_floating_point():
            error, eager_error = _relative_error(actual, golden[i]), _relative_error(reference, golden[i])
            if not error <= _ACCURACY_SLACK * eager_error + TOLERANCES[reference.dtype][0]:  # NaN fails
                problems.append(f"result {i}: relative error vs float32 {error:.3g}, eager's {eager_error:.3g}")
        elif not bool((difference <= atol + rtol * reference.float().abs()).all()):  # NaN fails
            problems.append(f"result {i}: max_abs_err {difference.max().item():.3g} (rtol {rtol}, atol {atol})")
    # torch's max keeps a NaN that Python's would drop
    return torch.stack(errors).max().item(), "; ".join(problems) or None


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _backend(name: Optional[str]):
    return use_backend(name) if name else contextlib.nullcontext()


def _measure_impl(impl: Impl, case: Case, sets: _InputSets, checked_against: Optional[tuple], tolerance: tuple,
                  timer: Timer, budget: _Budget) -> tuple:
    """(results, max abs error, (ms, p20, p80) or None, status). `checked_against` is (eager's
    results, eager's float32 results or None); None means this impl is eager: its results are
    what the others are checked against."""
    fn = impl.make(case)
    with _backend(impl.backend):
        results = _results_of(fn, sets.inputs[0], sets.grads[0])
        if checked_against is None:
            return results, 0.0, _measure(sets.rotation(fn), timer, budget), "ok"
        expected, golden = checked_against
        error, problem = _compare(results, expected, tolerance, golden)
        if problem:
            return None, error, None, f"error: MISMATCH vs eager: {problem}"
        return None, error, _measure(sets.rotation(fn), timer, budget), "ok"


def _golden_results(eager: Impl, case: Case, sets: _InputSets) -> Optional[list]:
    """Eager's results on the first input set upcast to float32, for a low-precision case."""
    if case.dtype not in LOW_PRECISION:
        return None
    inputs, grad = sets.upcast_first()
    with _backend(eager.backend):
        return [r.float() if r is not None and r.is_floating_point() else r
                for r in _results_of(eager.make(case), inputs, grad)]


def _row(bench: Benchmark, case: Case, impl: str) -> dict:
    rate = "gbps" if bench.bound == "memory" else "tflops"
    fields = ROW_FIELDS[:8] + (rate,) + ROW_FIELDS[8:]
    row = dict.fromkeys(fields)
    row.update(name=bench.name, impl=impl, shape=case.shape, dtype=str(case.dtype).removeprefix("torch."),
               direction=case.direction)
    return row


def _run_case(bench: Benchmark, case: Case, impl_names: list, device: torch.device, timer: Timer,
              budget: _Budget, ceilings: dict, report: Callable[[dict], None]) -> None:
    """Measure each impl of one case ("eager" first in impl_names) and report its row."""
    rows = [_row(bench, case, name) for name in impl_names]
    try:
        sets = _InputSets.build(case, bench.impls["eager"].make(case), device)
    except Exception as exc:
        for row in rows:
            row["status"] = f"error: preparing inputs: {_first_line(exc)}"
            report(row)
        return
    checked_against = None
    for row in rows:
        if row["impl"] != "eager" and checked_against is None:
            row["status"] = "error: eager failed, so there is nothing to check this impl against"
            report(row)
            continue
        try:
            results, error, times, row["status"] = _measure_impl(
                bench.impls[row["impl"]], case, sets, checked_against, _tolerance(bench, case.dtype), timer, budget)
            if row["impl"] == "eager":
                checked_against = (results, _golden_results(bench.impls["eager"], case, sets))
            row["max_abs_err"] = error if math.isfinite(error) else None
            if times is not None:
                _fill_rates(row, times, case.work, ceilings)
                if rows[0]["ms"] is not None:
                    row["speedup_vs_eager"] = rows[0]["ms"] / row["ms"]
        except (BackendUnavailable, ModuleNotFoundError) as exc:
            row["status"] = f"skipped: {_first_line(exc)}"
        except Exception as exc:  # one failing impl must not end the run
            row["status"] = f"error: {_first_line(exc)}"
        report(row)


def _fill_rates(row: dict, times: tuple, work: int, ceilings: dict) -> None:
    row["ms"], row["ms_p20"], row["ms_p80"] = times
    if "gbps" in row:
        row["gbps"] = work / row["ms"] / 1e6
        row["fraction_of_ceiling"] = row["gbps"] / ceilings["copy_gbps"]
    else:
        row["tflops"] = work / row["ms"] / 1e9
        row["fraction_of_ceiling"] = row["tflops"] / ceilings["bf16_matmul_tflops"]


def _progress(i: int, n: int, row: dict) -> str:
    head = f"[{i}/{n}] {row['name']} {row['shape']} {row['dtype']} {row['direction']} {row['impl']}:"
    if row["ms"] is None:
        return f"{head} {row['status']}"
    rate = f"{row['gbps']:.0f} GB/s" if "gbps" in row else f"{row['tflops']:.1f} TFLOP/s"
    speedup = "" if row["speedup_vs_eager"] is None else f", {row['speedup_vs_eager']:.2f}x vs eager"
    return f"{head} {row['ms']:.4f} ms, {rate} ({row['fraction_of_ceiling']:.0%} of ceiling){speedup}"


def collect_meta(device: torch.device) -> dict:
    """What every result file records once (`run` adds the ceilings), plus what helps read it;
    cache_bytes is the L2 size the input rotation is sized against."""
    versions = sysinfo.versions()
    meta = {"gpu": "cpu", "driver": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        uuid = f"GPU-{getattr(props, 'uuid', '')}".lower()  # NVML's spelling of the same id
        nvml = next((gpu for gpu in sysinfo.gpus() if (gpu["uuid"] or "").lower() == uuid), {})
        meta = {
            "gpu": nvml.get("name") or props.name,
            "driver": nvml.get("driver"),
            "compute_capability": f"{props.major}.{props.minor}",
            "sm_count": props.multi_processor_count,
            "sm_clock_max_mhz": nvml.get("sm_clock_max_mhz"),
            "mem_clock_max_mhz": nvml.get("mem_clock_max_mhz"),
            "memory_total_gib": round(props.total_memory / 2**30, 2),
        }
    meta.update({key: versions[key] for key in ("torch", "triton", "cuda", "commit", "commit_dirty",
                                                 "fastgen", "python")})
    meta["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta["cache_bytes"] = _cache_bytes(device)
    return meta


def _available_path(directory: Path, stem: str) -> Path:
    """<stem>, or <stem>-2, -3...: a second run on the same day and commit keeps the first."""
    for n in itertools.count(1):
        candidate = directory / (stem if n == 1 else f"{stem}-{n}")
        if not candidate.with_suffix(".json").exists() and not candidate.with_suffix(".csv").exists():
            return candidate


def write_results(rows: list, meta: dict, out_dir: Optional[Path] = None) -> dict:
    """JSON {"meta", "rows"} and CSV (meta repeated as columns, ceilings flattened), named
    <date>-<short commit>; by default under bench/results/<gpu slug>/."""
    directory = Path(out_dir) if out_dir is not None else RESULTS_DIR / sysinfo.gpu_slug(meta["gpu"])
    directory.mkdir(parents=True, exist_ok=True)
    stem = _available_path(directory, f"{meta['timestamp'][:10]}-{meta['commit'][:7]}")
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    flat_meta = {}
    for key, value in meta.items():
        if isinstance(value, dict):
            flat_meta.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat_meta[key] = value
    columns = list(ROW_FIELDS[:8]) + ["gbps", "tflops"] + list(ROW_FIELDS[8:]) + list(flat_meta)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **flat_meta})
    return {"json": json_path, "csv": csv_path}


def _cell(row: dict) -> str:
    if row["status"].startswith("skipped"):
        return "skip"
    if row["status"].startswith("error: MISMATCH"):
        return "**MISMATCH**"
    if row["status"] != "ok":
        return "**ERROR**"
    speedup = "" if row["speedup_vs_eager"] is None else f" ({row['speedup_vs_eager']:.2f}x)"
    return f"{row['ms']:.4g}{speedup}"


def markdown_table(rows: list) -> str:
    """One line per case: ms (speedup vs eager) per impl, then the best fastgen impl's fraction
    of the ceiling; every error and skip reason is listed under the table."""
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    cases: dict = {}
    for row in rows:
        cases.setdefault((row["name"], row["shape"], row["dtype"], row["direction"]), {})[row["impl"]] = row
    lines = ["| op | shape | dtype | direction | " + " | ".join(f"{impl} ms" for impl in impls)
             + " | best fastgen, of ceiling |",
             "|" + "---|" * (5 + len(impls))]
    for key, by_impl in cases.items():
        cells = [_cell(by_impl[impl]) if impl in by_impl else "" for impl in impls]
        fastgen = [r for r in by_impl.values() if r["impl"] in FAST_BACKENDS and r["status"] == "ok"]
        best = max(fastgen, key=lambda r: r["fraction_of_ceiling"], default=None)
        best_cell = "" if best is None else f"{best['impl']} {best['fraction_of_ceiling']:.0%}"
        lines.append("| " + " | ".join([*key, *cells, best_cell]) + " |")
    problems = [f"- {r['name']} {r['shape']} {r['dtype']} {r['direction']} {r['impl']}: {r['status']}"
                for r in rows if r["status"].startswith("error")]
    skips: dict = {}
    for r in rows:
        if r["status"].startswith("skipped"):
            skips[(r["impl"], r["status"])] = skips.get((r["impl"], r["status"]), 0) + 1
    notes = problems + [f"- {impl} ({count} rows) {status}" for (impl, status), count in skips.items()]
    return "\n".join(lines + ([""] + notes if notes else []))


def _regex(option: str, text: str) -> re.Pattern:
    try:
        return re.compile(text)
    except re.error as exc:
        raise ValueError(f"{option} {text!r} is not a regular expression: {exc}") from None


def select(benchmarks: Sequence[Benchmark], filter: Optional[str] = None, impls: Optional[Sequence[str]] = None,
           no_compile: bool = False, compile_filter: Optional[str] = None) -> list:
    """[(benchmark, case, impl names)] to run. `filter` is searched in "name shape dtype
    direction"; eager always runs (it is the reference), whatever `impls` says. The "compile"
    impl runs in no case with `no_compile`, and with `compile_filter` only in the cases whose
    "name shape dtype direction" it matches (compiling is the slow part of a run)."""
    if no_compile and compile_filter is not None:
        raise ValueError("--no-compile and --compile-filter exclude each other: one drops every compile row, "
                         "the other keeps those of the cases it matches")
    pattern = _regex("filter", filter or "")
    compile_pattern = _regex("compile_filter", compile_filter or "")
    known = {name for bench in benchmarks for name in bench.impls}
    unknown = set(impls or ()) - known
    if unknown:
        raise ValueError(f"unknown impl(s) {sorted(unknown)}; known: {sorted(known)}")
    selected = []
    for bench in benchmarks:
        for case in bench.cases:
            label = f"{bench.name} {case.shape} {str(case.dtype).removeprefix('torch.')} {case.direction}"
            if not pattern.search(label):
                continue
            compiles = not no_compile and compile_pattern.search(label) is not None
            names = ["eager"] + [name for name in bench.impls if name != "eager" and (impls is None or name in impls)
                                 and (compiles or name != "compile")]
            selected.append((bench, case, names))
    if not selected:
        raise ValueError(f"no benchmark case matches filter {filter!r}")
    return selected


def run(benchmarks: Sequence[Benchmark], filter: Optional[str] = None, quick: bool = False,
        out_dir: Optional[Path] = None, impls: Optional[Sequence[str]] = None, no_compile: bool = False,
        timer: Optional[Timer] = None, device: str = "cuda", compile_filter: Optional[str] = None,
        quiet: bool = False) -> tuple:
    """Measure, write the JSON and CSV, print progress (a line per row, none when quiet) and the
    table. Returns (rows, meta, {"json": path, "csv": path}). `timer` defaults to CUDA events on a CUDA device and the
    wall clock otherwise; `select` says what the other arguments pick."""
    device = torch.device(device)
    timer = timer or (cuda_event_timer if device.type == "cuda" else wall_clock_timer)
    budget = _QUICK if quick else _FULL
    selected = select(benchmarks, filter, impls, no_compile, compile_filter)
    meta = collect_meta(device)
    meta["quick"] = quick
    meta["ceilings"] = measure_ceilings(device, timer, budget)
    print(f"{meta['gpu']}: copy {meta['ceilings']['copy_gbps']:.0f} GB/s, "
          f"bf16 matmul {meta['ceilings']['bf16_matmul_tflops']:.1f} TFLOP/s", flush=True)
    total = sum(len(names) for _, _, names in selected)
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        if not quiet:
            print(_progress(len(rows), total, row), flush=True)

    for bench, case, names in selected:
        _run_case(bench, case, names, device, timer, budget, meta["ceilings"], report)
    paths = write_results(rows, meta, out_dir)
    print("\n" + markdown_table(rows) + "\n")
    print(f"wrote {paths['json']} and {paths['csv']}")
    return rows, meta, paths


__all__ = ["Benchmark", "Case", "Impl", "ROW_FIELDS", "Timer", "backend_impls", "collect_meta", "compile_reference",
           "cuda_event_timer", "markdown_table", "measure_ceilings", "op_backends", "op_benchmark", "run", "select",
           "standard_impls", "wall_clock_timer", "write_results"]
