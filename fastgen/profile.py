"""`fastgen profile <model>`: where one step of a reference model spends its time, op family by
op family, with every op on its eager reference and then on a fastgen backend.

Models. Every module of `fastgen.models` that defines `CONFIGS`, `build`, `example_resolution`
and `example_step` is a model (the module name is the model name), so a new model module is
profiled without any change here. The model is built with random weights from seed 0 and
`example_step` makes one representative step (a denoising call on the guidance batch, a generator
forward, a decode...) at the image side `example_resolution` gives (the model's default for None).

Measurement. After `warmup` untimed steps, `steps` steps run under `torch.profiler`, once under
`use_backend("reference")` (the eager baseline) and once under the requested fastgen backend,
with the same model and inputs. Each unit of time is attributed to one family:

- on a GPU, every kernel's device time (Triton, CUDA, cuBLAS, cuDNN, memcpy/memset);
- on CPU, every op's self time (its time minus that of the ops it calls).

Times are per step: the sum over the profiled steps divided by `steps`. A family's share is its
time over the sum of all families in the same run. The wall-clock step time (synchronized,
measured outside the profiler) is reported beside them: it also contains launch gaps and Python
time that no kernel accounts for.

Classification (`classify`) looks at a unit's own name and the names of the ops enclosing it:

1. inside a `fastgen::<op>` custom op: that op's family (the `fastgen/ops/<family>.py` module
   that declares it). The custom op is recorded whichever backend runs it, so under the
   reference backend this is the eager reference's time for the family, under a fast backend
   the kernels' time: the two columns compare like with like.
2. a Triton kernel of `kernels/<family>.py`, by name, or a CUDA kernel of `csrc/<family>.cu`,
   by the namespace `fastgen::kernels::<family>` its name carries (reached only when a kernel runs
   outside its custom op);
3. convolutions (aten convolution ops, cuDNN / implicit-GEMM conv kernels), then GEMMs
   (linear, mm, bmm, matmul, cuBLAS / CUTLASS kernels);
4. everything else: "elementwise/other".

Without a GPU the fast backends' kernels only run under the Triton interpreter, whose timings
mean nothing, so on CPU only the eager reference is profiled (with CPU times) and the output
says that kernel timings need a GPU.
"""
from __future__ import annotations

import functools
import importlib
import json
import pkgutil
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterable, Optional, Sequence

import torch

from fastgen import sysinfo, use_backend
from fastgen.ops.registry import BACKENDS, Op

CONVOLUTION = "convolution"
GEMM = "gemm"
OTHER = "elementwise/other"
GENERIC_FAMILIES = (CONVOLUTION, GEMM, OTHER)

EAGER = "eager"
FASTGEN = "fastgen"

_CONVOLUTION_PATTERN = re.compile(r"\bconv(?!ert)|convolution|cudnn|fprop|dgrad|wgrad|winograd|im2col|col2im",
                                  re.IGNORECASE)
_GEMM_PATTERN = re.compile(r"gemm|matmul|::mm\b|addmm|bmm|::linear\b|cublas|cutlass|nvjet", re.IGNORECASE)
_CUDA_KERNEL_FAMILY = re.compile(r"\bfastgen::kernels::(\w+)::")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ProfileError(ValueError):
    """A bad argument to `profile` (unknown model, config, backend...), found before anything runs."""


# ---------------------------------------------------------------------------------------------
# Models


def _is_model(module: ModuleType) -> bool:
    return all(hasattr(module, attribute) for attribute in ("CONFIGS", "build", "example_resolution", "example_step"))


def discover_models() -> dict:
    """{model name: module} for every module of fastgen.models that follows the model contract.
    A module that fails to import is left out (and named on stderr) so that one broken model
    does not hide the others."""
    import fastgen.models

    models = {}
    for info in pkgutil.iter_modules(fastgen.models.__path__):
        try:
            module = importlib.import_module(f"fastgen.models.{info.name}")
        except Exception as exc:  # another model's bug must not stop this one from being profiled
            print(f"fastgen profile: skipping fastgen.models.{info.name}: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            continue
        if _is_model(module):
            models[info.name] = module
    return models


def resolve_model(name: str) -> ModuleType:
    """The model module called `name`; a ProfileError naming the available ones otherwise."""
    models = discover_models()
    if name not in models:
        raise ProfileError(f"unknown model {name!r}; available: {', '.join(sorted(models)) or 'none'}")
    return models[name]


def resolve_config(module: ModuleType, config: Optional[str], device: torch.device) -> str:
    """`config`, checked; by default "tiny" on CPU (seconds) and the first named config on a GPU."""
    if config is None:
        config = "tiny" if device.type != "cuda" and "tiny" in module.CONFIGS else next(iter(module.CONFIGS))
    if config not in module.CONFIGS:
        model = module.__name__.rsplit(".", 1)[-1]
        raise ProfileError(f"unknown config {config!r} for model {model!r}; available: {', '.join(module.CONFIGS)}")
    return config


# ---------------------------------------------------------------------------------------------
# Classification


@functools.lru_cache(maxsize=None)
def op_families() -> dict:
    """{custom op name: family}: every `Op` declared in a fastgen/ops/<family>.py module,
    backward ops included."""
    import fastgen.ops

    families = {}
    for info in pkgutil.iter_modules(fastgen.ops.__path__):
        module = importlib.import_module(f"fastgen.ops.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Op) and value.reference.__module__ == module.__name__:
                families[value.name] = info.name
    return families


def _triton_kernel_names(module: ModuleType) -> set:
    import triton

    names = set()
    for value in vars(module).values():
        if isinstance(value, triton.runtime.KernelInterface):
            while hasattr(value, "fn"):  # autotuner, heuristics and jit wrappers around the Python function
                value = value.fn
            names.add(value.__name__)
    return names


def _launched(names: set) -> set:
    # By this project's convention launched kernels end in "_kernel"; helpers are inlined into
    # them and never show up in a trace, and short helper names (`_tile`) could collide with
    # identifiers inside library kernel names.
    return {name for name in names if name.endswith("_kernel")}


@functools.lru_cache(maxsize=None)
def kernel_families() -> dict:
    """{kernel name: family} of the launched Triton kernels in fastgen.kernels. A name that two
    families share (`_query_grad_kernel`) says nothing about the family and is left out: such
    kernels are classified by their custom op."""
    import fastgen.kernels

    by_family = {}
    for info in pkgutil.iter_modules(fastgen.kernels.__path__):
        if info.name.startswith("_"):  # shared helpers, not a family
            continue
        module = importlib.import_module(f"fastgen.kernels.{info.name}")
        by_family.setdefault(info.name, set()).update(_launched(_triton_kernel_names(module)))
    owners: dict = {}
    for family, names in by_family.items():
        for name in names:
            owners.setdefault(name, set()).add(family)
    return {name: families.pop() for name, families in owners.items() if len(families) == 1}


def classify(names: Sequence[str], ops: Optional[dict] = None, kernels: Optional[dict] = None) -> str:
    """The family of a unit of time, from its own name followed by the names of the ops that
    enclose it, innermost first (see the module docstring for the rules). `ops` and `kernels`
    default to `op_families()` and `kernel_families()`."""
    ops = op_families() if ops is None else ops
    kernels = kernel_families() if kernels is None else kernels
    # The outermost fastgen op is the one the model called; a fastgen op may call others.
    for name in reversed(names):
        if name.startswith("fastgen::"):
            op = name.removeprefix("fastgen::").split(".", 1)[0]  # drop an overload suffix
            if op in ops:
                return ops[op]
    cuda_family = _CUDA_KERNEL_FAMILY.search(names[0]) if names else None
    if cuda_family and cuda_family[1] in ops.values():
        return cuda_family[1]
    for identifier in _IDENTIFIER.findall(names[0]) if names else ():
        if identifier in kernels:
            return kernels[identifier]
    if any(_CONVOLUTION_PATTERN.search(name) for name in names):
        return CONVOLUTION
    if any(_GEMM_PATTERN.search(name) for name in names):
        return GEMM
    return OTHER


def _enclosing_names(event) -> list:
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names


def _is_device_event(event) -> bool:
    return getattr(event.device_type, "name", str(event.device_type)) != "CPU"


def attribute(events: Iterable, device_times: bool) -> dict:
    """{family: microseconds} over profiler events (torch.autograd.profiler_util.FunctionEvent
    or anything with the same fields). device_times: each device kernel, memcpy and memset,
    classified with the CPU op that launched it; otherwise each CPU op's self time."""
    events = list(events)
    totals: dict = {}

    def add(family: str, microseconds: float) -> None:
        totals[family] = totals.get(family, 0.0) + microseconds

    if not device_times:
        for event in events:
            if not _is_device_event(event) and not event.is_async:
                add(classify(_enclosing_names(event)), event.self_cpu_time_total)
        return totals
    # Device activities point at the CPU op that launched them through linked_correlation_id.
    launchers = {event.id: event for event in events
                 if not _is_device_event(event) and not event.is_async and event.linked_correlation_id == 0}
    for event in events:
        if not _is_device_event(event) or "annotation" in str(getattr(event, "activity_type", "")):
            continue
        launcher = launchers.get(event.linked_correlation_id)
        duration = event.time_range.end - event.time_range.start
        add(classify([event.name] + _enclosing_names(launcher)), duration)
    return totals


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class Run:
    """One profiled backend: per-step milliseconds by family, the wall-clock step time and the
    trace file."""

    label: str  # EAGER or FASTGEN
    backend: str
    families: dict
    step_ms: float
    trace: Path

    @property
    def total_ms(self) -> float:
        return sum(self.families.values())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profile_backend(step: Callable, label: str, backend: str, device: torch.device, steps: int, warmup: int,
                     out_dir: Path) -> Run:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with use_backend(backend), torch.no_grad():
        for _ in range(warmup):
            step()
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _synchronize(device)
        step_ms = (time.perf_counter() - start) * 1e3 / steps
        with torch.profiler.profile(activities=activities) as profiler:
            for _ in range(steps):
                step()
            _synchronize(device)
    trace = out_dir / f"{label}.trace.json"
    profiler.export_chrome_trace(str(trace))
    microseconds = attribute(profiler.events(), device_times=device.type == "cuda")
    families = {family: us / 1e3 / steps for family, us in microseconds.items()}
    return Run(label, backend, families, step_ms, trace)


def family_order(families: Iterable[str]) -> list:
    """fastgen op families alphabetically, then convolution, GEMM, elementwise/other."""
    families = set(families)
    return sorted(families - set(GENERIC_FAMILIES)) + [f for f in GENERIC_FAMILIES if f in families]


def summarize(runs: Sequence[Run]) -> list:
    """One row per family: each run's ms per step and share, and the speedup of the fastgen run
    over the eager one where both ran."""
    by_label = {run.label: run for run in runs}
    rows = []
    for family in family_order(f for run in runs for f in run.families):
        row = {"family": family, "fastgen_op": family not in GENERIC_FAMILIES}
        for run in runs:
            ms = run.families.get(family, 0.0)
            row[f"{run.label}_ms"] = ms
            row[f"{run.label}_share"] = ms / run.total_ms if run.total_ms else None
        eager, fast = (by_label.get(label) for label in (EAGER, FASTGEN))
        if eager is not None and fast is not None:
            fast_ms = fast.families.get(family, 0.0)
            row["speedup"] = eager.families.get(family, 0.0) / fast_ms if fast_ms else None
        rows.append(row)
    return rows


def _cell(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: Sequence[dict], runs: Sequence[Run], unit: str) -> str:
    labels = [run.label for run in runs]
    both = len(labels) == 2
    header = ["family"] + [f"{label} {unit} ms" for label in labels] + (["speedup"] if both else [])
    header += [f"share ({label})" for label in labels]
    lines = [header]
    totals = {"family": "total"}
    for run in runs:
        totals.update({f"{run.label}_ms": run.total_ms, f"{run.label}_share": 1.0})
    if both:
        fast_total = runs[1].total_ms
        totals["speedup"] = runs[0].total_ms / fast_total if fast_total else None
    for row in list(rows) + [totals]:
        line = [row["family"]] + [_cell(row.get(f"{label}_ms"), ".3f") for label in labels]
        if both:
            speedup = row.get("speedup")
            line.append("-" if speedup is None else f"{speedup:.2f}x")
        line += [_cell(row.get(f"{label}_share"), ".1%") for label in labels]
        lines.append(line)
    lines.append(["wall-clock step"] + [f"{run.step_ms:.3f}" for run in runs]
                 + ([f"{runs[0].step_ms / runs[1].step_ms:.2f}x"] if both else []) + [""] * len(labels))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    text.insert(len(text) - 2, "-" * len(text[0]))
    return "\n".join(text)


def _check_arguments(backend: str, dtype: str, **counts: int) -> None:
    compared = [b for b in BACKENDS if b != "reference"]
    if backend not in compared:
        raise ProfileError(f"backend must be one of {', '.join(compared)} (the reference always runs, as the "
                           f"eager baseline); got {backend!r}")
    if dtype not in DTYPES:
        raise ProfileError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            # warmup 0 would leave kernel compilation and autotuning to the wall-clock loop alone.
            why = " (the first step pays one-time costs: kernel compilation, autotuning)" if name == "warmup" else ""
            raise ProfileError(f"{name} must be an int >= 1{why}; got {value!r}")


def profile(model: str, config: Optional[str] = None, backend: str = "auto", batch: int = 1,
            resolution: Optional[int] = None, steps: int = 5, warmup: int = 2, out_dir: Optional[Path] = None,
            dtype: Optional[str] = None, device: Optional[str] = None) -> dict:
    """Profile one step of `model` (see the module docstring); prints the table and writes
    <label>.trace.json per run and summary.json into out_dir (default profiles/<model>-<config>/).
    Returns the summary."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = resolve_model(model)
    config = resolve_config(module, config, device)
    if dtype is None:
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    _check_arguments(backend, dtype, steps=steps, warmup=warmup, batch=batch)
    out_dir = Path(out_dir) if out_dir is not None else Path("profiles") / f"{model}-{config}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ProfileError(f"cannot use {out_dir} as the output directory: {exc.strerror or exc}") from exc

    torch.manual_seed(0)
    network = module.build(config).to(device=device, dtype=DTYPES[dtype]).eval()
    try:
        resolution = module.example_resolution(network, resolution)
        step = module.example_step(network, batch=batch, resolution=resolution,
                                   generator=torch.Generator().manual_seed(0))
    except ValueError as exc:  # example_step only makes the inputs: its errors are about batch / resolution
        raise ProfileError(f"{model} {config}: {exc}") from exc
    on_gpu = device.type == "cuda"
    title = (f"fastgen profile {model} {config}: {dtype}, batch {batch}, {resolution} px, "
             f"{steps} profiled step{'s' if steps > 1 else ''} after {warmup} warm-up, on {device}")
    print(title)
    if not on_gpu:
        print("No CUDA GPU here: kernel timings need a GPU. Profiling the eager reference on CPU instead "
              "(CPU op self times; the fastgen backends would run under the Triton interpreter, whose "
              "timings mean nothing).")
    plan = [(EAGER, "reference")] + ([(FASTGEN, backend)] if on_gpu else [])
    runs = [_profile_backend(step, label, name, device, steps, warmup, out_dir) for label, name in plan]
    rows = summarize(runs)
    unit = "kernel" if on_gpu else "CPU"
    print(format_table(rows, runs, unit))
    summary = {
        "model": model,
        "config": config,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
        "dtype": dtype,
        "batch": batch,
        "resolution": resolution,
        "steps": steps,
        "warmup": warmup,
        "time": "CUDA kernel time per step" if on_gpu else "CPU op self time per step (no GPU: not kernel timings)",
        "runs": {run.label: {"backend": run.backend, "step_ms": run.step_ms, "total_ms": run.total_ms,
                             "families": run.families, "trace": run.trace.name} for run in runs},
        "families": rows,
        "versions": sysinfo.versions(),
    }
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {', '.join(str(run.trace) for run in runs)} and {summary_path}")
    return summary
