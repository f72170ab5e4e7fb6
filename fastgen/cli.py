"""The `fastgen` command: info, check, bench (compare, plot, order, headline), profile, precompile."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch


# TRITON_INTERPRET as the user's environment has it, before the CLI sets it for itself.
_interpret_as_given: str | None = os.environ.get("TRITON_INTERPRET")


def _use_interpreter_without_gpu() -> None:
    # Must happen before any Triton kernel module is imported: triton.jit reads it then.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _availability(backend: str, device, interpret: str | None) -> str | None:
    """backend_unavailable_reason as a process whose TRITON_INTERPRET is `interpret` gets it."""
    from fastgen.ops.registry import backend_unavailable_reason

    saved = os.environ.get("TRITON_INTERPRET")
    os.environ.pop("TRITON_INTERPRET", None)
    if interpret is not None:
        os.environ["TRITON_INTERPRET"] = interpret
    try:
        return backend_unavailable_reason(backend, device)
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _info(args) -> int:
    """Versions, the CUDA extension (and what the install said about it), the GPUs, and which
    implementations run: in a Python process started from this environment (the user's own
    scripts), and, where that differs, in fastgen's commands, which set TRITON_INTERPRET=1
    themselves without a GPU. Each backend's reason is the same for every op: it is said once."""
    import fastgen
    from fastgen import _cuda, sysinfo
    from fastgen.check import default_device
    from fastgen.ops.registry import FAST_BACKENDS, current_backend

    versions = sysinfo.versions()
    dirty = " (uncommitted changes)" if versions.get("commit_dirty") else ""
    print(f"fastgen {versions['fastgen']}  commit {versions['commit']}{dirty}")
    print(f"python {versions['python']}  torch {versions['torch']} (CUDA {versions['cuda'] or 'none'})  "
          f"triton {versions['triton']}")
    build, record = _cuda.build_info(), _cuda.build_record()
    if build is None:
        print(f"CUDA extension fastgen._C: {_cuda.available().removeprefix('the CUDA extension fastgen._C is ')}")
    else:
        installed = f" ({record['message'].removeprefix('fastgen: ')})" if record and record["built"] else ""
        print(f"CUDA extension fastgen._C: built for {build['archs']}, CUDA runtime "
              f"{build['cuda_runtime_version']}{installed}")
    gpus = sysinfo.gpus()
    if not gpus:
        print("GPU: none found (NVML and torch see no CUDA device)")
    for index, gpu in enumerate(gpus):
        details = ", ".join(f"{key} {value}" for key, value in gpu.items() if key != "name")
        print(f"GPU {index}: {gpu['name']}: {details}")
    device = default_device()
    print(f"backend: {current_backend()} (FASTGEN_BACKEND or use_backend)  ops run on: {device}")
    print(f"ops ({len(fastgen.OPS)}): {', '.join(sorted(fastgen.OPS))}")
    interpret = "TRITON_INTERPRET unset" if _interpret_as_given is None else f"TRITON_INTERPRET={_interpret_as_given}"
    print(f"implementations, in a Python process started from this environment ({interpret}):")
    print(f"  {'reference':9s} every op: yes (the eager PyTorch ground truth)")
    for backend in FAST_BACKENDS:
        without = sorted(name for name, op in fastgen.OPS.items() if backend not in op.implementations)
        which = f"every op but {', '.join(without)}" if without else "every op"
        reason = _availability(backend, device, _interpret_as_given)
        in_commands = _availability(backend, device, os.environ.get("TRITON_INTERPRET"))
        shown = "fastgen._C is not built (above)" if build is None and reason == _cuda.available() else reason
        print(f"  {backend:9s} {which}: {'yes' if shown is None else 'no: ' + shown}")
        if in_commands != reason:
            verdict = "yes, under the interpreter" if in_commands is None else "no: " + in_commands
            print(f"  {'':9s} in fastgen's commands (check, bench, profile), which set TRITON_INTERPRET=1 "
                  f"themselves without a GPU: {verdict}")
    return 0


class _CheckProgress:
    """fastgen check's progress, fed each result as it is known: each (op, backend)'s summary
    line once its checks are done, and meanwhile, on a terminal, a status line that each check
    overwrites. Off the terminal (piped) the lines come as they are done, without the status."""

    def __init__(self, stream):
        self.stream = stream
        self.terminal = stream.isatty()
        self.group: list = []
        self.shown = 0

    def __call__(self, result) -> None:
        if self.group and (self.group[0].op, self.group[0].backend) != (result.op, result.backend):
            self.finish()
        self.group.append(result)
        if self.terminal and result.status != "skipped":
            self.stream.write(f"\r\033[K  {result.op} {result.backend}: {len(self.group)} check(s) done, "
                              f"last {result.case} {result.dtype} {result.direction}")
            self.stream.flush()

    def finish(self) -> None:
        """The finished (op, backend)'s line; skipped ones wait for the summary, which says each
        backend's reason once."""
        from fastgen.check import summarize

        if self.terminal:
            self.stream.write("\r\033[K")
        if self.group and self.group[0].status != "skipped":
            self.stream.write(summarize(self.group) + "\n")
            self.shown += 1
        self.stream.flush()
        self.group = []


def _run_check(op_names, backends, seed, quiet=False) -> int:
    from fastgen.check import default_device, run_checks, summarize

    device = default_device()
    where = "GPU kernels" if device.type == "cuda" else "CPU tensors, Triton under the interpreter"
    print(f"fastgen check on {device} ({where}): every implementation against the float64 reference", flush=True)
    progress = None if quiet else _CheckProgress(sys.stdout)
    try:
        # run_checks reports a crashing kernel as a failed check: a ValueError here is an unknown op name.
        results = run_checks(device, backends=backends, op_names=op_names, seed=seed, on_result=progress)
    except ValueError as exc:
        print(f"fastgen check: {exc}", file=sys.stderr)
        return 2
    if progress is not None:
        progress.finish()
        # The checked (op, backend)s are shown: what is left is the skipped backends' reasons.
        results_left = [r for r in results if r.status == "skipped"]
    else:
        results_left = results
    if results_left:
        print(summarize(results_left))
    failed = sum(r.status == "FAIL" for r in results)
    passed = sum(r.status == "ok" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    print(f"{passed} passed, {failed} failed, {skipped} implementation(s) skipped")
    return 1 if failed or not passed else 0


def _check(args) -> int:
    return _run_check(args.op, args.backend or ("triton", "cuda"), args.seed, args.quiet)


def _bench(args) -> int:
    if not torch.cuda.is_available():
        return _bench_without_gpu(args)
    from fastgen import bench

    return bench.run_from_args(args)


def _bench_without_gpu(args) -> int:
    """Without a GPU, verify the kernels that the same arguments would time on one: --filter,
    --quick and --impl select the suite's cases exactly as they do there, and the selected
    backends' kernels of the ops those cases time are checked against the float64 reference
    (fastgen check, on the ops' own check cases; Triton under the interpreter). The options that
    only shape timed runs and the files they write are refused: nothing here is timed or written."""
    from fastgen import bench
    from fastgen.bench import harness
    from fastgen.ops.registry import FAST_BACKENDS

    print("fastgen bench: no CUDA GPU here, so no timings will be taken: the kernels the suite would time are "
          "verified under the Triton interpreter instead.")
    refused = [flag for flag, given in (("--out", args.out), ("--no-compile", args.no_compile),
                                        ("--compile-filter", args.compile_filter)) if given]
    if refused:
        print(f"fastgen bench: {', '.join(refused)} only shape{'s' if len(refused) == 1 else ''} timed runs and the "
              f"results they write; without a GPU nothing is timed or written. Leave "
              f"{'it' if len(refused) == 1 else 'them'} out, or run on a machine with a CUDA GPU.", file=sys.stderr)
        return 2
    try:
        selected = harness.select(bench.benchmarks(args.quick), args.filter, args.impl)
    except ValueError as exc:
        print(f"fastgen bench: {exc}", file=sys.stderr)
        return 2
    op_names = sorted({op for benchmark, _, _ in selected for op in benchmark.ops})
    backends = tuple(b for b in FAST_BACKENDS if any(b in names for _, _, names in selected))
    models = sorted({benchmark.name for benchmark, _, _ in selected if not benchmark.ops})
    options = [option for option, given in ((f"--filter {args.filter!r}", args.filter), ("--quick", args.quick),
                                            (f"--impl {' --impl '.join(args.impl or ())}", args.impl)) if given]
    print(f"{len(selected)} benchmark case(s) selected{' by ' + ' '.join(options) if options else ''}.")
    if models:
        print(f"Model benchmarks ({', '.join(models)}) time whole models: only a GPU run measures them; their ops' "
              f"kernels are verified through the op benchmarks.")
    if not op_names or not backends:
        what = "no op benchmark" if not op_names else f"no fastgen backend ({', '.join(FAST_BACKENDS)}) among --impl"
        print(f"fastgen bench: the selection holds {what}, so there is no kernel to verify here.", file=sys.stderr)
        return 2
    print(f"Verifying the {'/'.join(backends)} kernels of {', '.join(op_names)} on each op's check cases.\n")
    code = _run_check(op_names, backends, seed=0, quiet=args.quiet)
    print("\nNo timings were taken (no CUDA GPU). Run `fastgen bench` on a machine with one for the benchmark suite.")
    return code


def _bench_compare(args) -> int:
    from fastgen.bench import compare

    return compare.run_from_args(args)


def _bench_order(args) -> int:
    from fastgen.bench import order

    return order.run_from_args(args)


def _bench_headline(args) -> int:
    from fastgen.bench import headline

    return headline.run_from_args(args)


def _bench_plot(args) -> int:
    from fastgen.bench import plots

    if not args.results.is_file():
        print(f"fastgen bench plot: no result file {args.results}", file=sys.stderr)
        return 2
    try:
        written = plots.plot_results(args.results, args.out)
    except ValueError as exc:
        print(f"fastgen bench plot: {exc}", file=sys.stderr)
        return 2
    return 0 if written is not None else 1


def _profile(args) -> int:
    from fastgen import profile

    try:
        profile.profile(args.model, config=args.config, backend=args.backend, batch=args.batch,
                        resolution=args.resolution, steps=args.steps, warmup=args.warmup, out_dir=args.out,
                        dtype=args.dtype)
    except profile.ProfileError as exc:
        print(f"fastgen profile: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_profile_parser(commands) -> None:
    from fastgen.ops.registry import BACKENDS
    from fastgen.profile import DTYPES

    parser = commands.add_parser(
        "profile", help="time one step of a reference model per op family, eager vs fastgen (torch.profiler)",
        description="Profile one step of a reference model (module fastgen.models.<model>) under torch.profiler, "
                    "with every op on its eager reference and then on a fastgen backend; prints time per op "
                    "family side by side and writes a Chrome trace per run and summary.json. Without a GPU "
                    "it profiles the eager reference on CPU (no kernel timings).")
    parser.add_argument("model", help="model module name, e.g. sana")
    parser.add_argument("--config", help="named config (default: tiny on CPU, the model's first config on a GPU)")
    parser.add_argument("--backend", default="auto", choices=[b for b in BACKENDS if b != "reference"],
                        help="the fastgen backend compared with the eager reference (default auto)")
    parser.add_argument("--batch", type=int, default=1, help="images per step (diffusion: doubled by guidance)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the model's canonical size)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per backend (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before (default 2)")
    parser.add_argument("--out", type=Path, help="output directory (default profiles/<model>-<config>/)")
    parser.set_defaults(run=_profile)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("info", help="versions, GPU, CUDA extension and available implementations").set_defaults(
        run=_info)

    check = commands.add_parser("check", help="every implementation of every op against its reference")
    check.add_argument("--op", action="append", help="only this op (repeatable)")
    check.add_argument("--backend", action="append", choices=("triton", "cuda"), help="only this backend")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--quiet", action="store_true",
                       help="no line per op and backend as its checks finish: the summary at the end only")
    check.set_defaults(run=_check)

    bench_parser = commands.add_parser("bench", help="benchmark suite (on CPU: runs check, no timings)")
    from fastgen import bench

    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=_bench)
    # Optional, so `fastgen bench [--quick ...]` still runs the suite; its defaults override run=_bench.
    bench_commands = bench_parser.add_subparsers(dest="bench_command", metavar="{compare,plot,order,headline}")

    def bench_command(name: str, help_text: str, run) -> None:
        """The subcommand `name`, whose arguments fastgen.bench.<name> adds."""
        subparser = bench_commands.add_parser(name, help=help_text)
        importlib.import_module(f"fastgen.bench.{name}").add_arguments(subparser)
        subparser.set_defaults(run=run)

    bench_command("compare", "compare two result files: regressions beyond noise, status changes, missing rows",
                  _bench_compare)
    plot_parser = bench_commands.add_parser(
        "plot", help="PNG plots of a result file: speedup vs size per op, model step times")
    plot_parser.add_argument("results", type=Path, help="a result JSON written by fastgen bench")
    plot_parser.add_argument("--out", type=Path, help="directory for the PNGs (default: beside RESULTS)")
    plot_parser.set_defaults(run=_bench_plot)
    bench_command("order", "rank each op's backends by a result file's speedups: the 'auto' order for that GPU",
                  _bench_order)
    bench_command("headline",
                  "the README's headline table (per benchmark: speedups, fraction of ceiling) from result files",
                  _bench_headline)

    _add_profile_parser(commands)
    from fastgen import precompile

    precompile.add_arguments(commands.add_parser(
        "precompile", help="compile the Triton kernels of a workload for a GPU ahead of time, without one",
        description=precompile.__doc__.split("\n\n")[0]))
    return parser


def main(argv=None) -> int:
    global _interpret_as_given
    _interpret_as_given = os.environ.get("TRITON_INTERPRET")
    _use_interpreter_without_gpu()
    args = build_parser().parse_args(argv)
    from fastgen.ops.registry import current_backend

    try:
        current_backend()
    except ValueError as exc:
        print(f"fastgen: {exc}", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader (`fastgen bench | head`) closed the pipe: it has all it wanted. Python
        # would report the flush of the closed stdout at exit too, so stdout goes to devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
