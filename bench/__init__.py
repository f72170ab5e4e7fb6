"""fastgen's benchmark suite (installed as `fastgen.bench`): `fastgen bench` on a CUDA GPU.

Each module named ops_<family>.py or models_<model>.py declares its benchmarks with
`benchmarks(quick) -> list[harness.Benchmark]`; adding such a module adds its benchmarks to the
suite. harness.py says how cases are checked, timed and written.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import harness

# The benchmark modules, found by name: ops_<family>.py (one op family's kernels) first, then
# models_<model>.py (whole reference models), each in name order.
MODULES = tuple(importlib.import_module(f"{__name__}.{name}")
                for prefix in ("ops_", "models_")
                for name in sorted(module.name for module in pkgutil.iter_modules(__path__))
                if name.startswith(prefix))


def benchmarks(quick: bool = False) -> list:
    return [bench for module in MODULES for bench in module.benchmarks(quick)]


def run(filter: Optional[str] = None, quick: bool = False, out_dir: Optional[Path] = None,
        impls: Optional[Sequence[str]] = None, timer: Optional[harness.Timer] = None, device: str = "cuda",
        no_compile: bool = False, compile_filter: Optional[str] = None, quiet: bool = False) -> tuple:
    """Run the suite; returns (rows, meta, {"json": path, "csv": path}). See harness.run."""
    return harness.run(benchmarks(quick), filter=filter, quick=quick, out_dir=out_dir, impls=impls,
                       no_compile=no_compile, timer=timer, device=device, compile_filter=compile_filter, quiet=quiet)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--filter", metavar="REGEX",
                        help="only cases whose 'name shape dtype direction' matches (re.search)")
    parser.add_argument("--quick", action="store_true",
                        help="a few representative cases and fewer repetitions (a couple of minutes on an H100)")
    parser.add_argument("--out", metavar="DIR", type=Path,
                        help="directory for the JSON and CSV (default: bench/results/<gpu>/)")
    parser.add_argument("--impl", action="append", metavar="NAME",
                        help="only this implementation (repeatable); eager always runs, as the reference")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress line per case (without a GPU: per op checked), only the results")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--compile-filter", metavar="REGEX",
                        help="the torch.compile baseline only in cases whose 'name shape dtype direction' matches "
                             "(re.search); not with --no-compile")


def run_from_args(args: argparse.Namespace) -> int:
    """0: every row ok or skipped; 1: some row is an error or a mismatch; 2: nothing was run."""
    if not torch.cuda.is_available():
        print("fastgen bench: timings need a CUDA GPU and none is visible", file=sys.stderr)
        return 2
    try:
        rows, _, paths = run(filter=args.filter, quick=args.quick, out_dir=args.out, impls=args.impl,
                             no_compile=args.no_compile, compile_filter=args.compile_filter, quiet=args.quiet)
    except ValueError as exc:  # a filter or impl name that selects nothing, or options that contradict
        print(f"fastgen bench: {exc}", file=sys.stderr)
        return 2
    from . import plots

    plots.plot_results(paths["json"])
    failed = [row for row in rows if row["status"].startswith("error")]
    if failed:
        print(f"fastgen bench: {len(failed)} of {len(rows)} rows failed (listed under the table)", file=sys.stderr)
    return 1 if failed else 0
