"""The `fastgen` command: info, check, bench, bench compare."""
from __future__ import annotations

import argparse
import os
import sys

import torch


def _use_interpreter_without_gpu() -> None:
    # Must happen before any Triton kernel module is imported: triton.jit reads it then.
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def _info(args) -> int:
    import fastgen
    from fastgen import _cuda, sysinfo
    from fastgen.check import default_device
    from fastgen.ops.registry import FAST_BACKENDS, backend_unavailable_reason, current_backend

    versions = sysinfo.versions()
    dirty = " (uncommitted changes)" if versions.get("commit_dirty") else ""
    print(f"fastgen {versions['fastgen']}  commit {versions['commit']}{dirty}")
    print(f"python {versions['python']}  torch {versions['torch']} (CUDA {versions['cuda'] or 'none'})  "
          f"triton {versions['triton']}")
    build = _cuda.build_info()
    if build is None:
        print(f"CUDA extension fastgen._C: {_cuda.available()}")
    else:
        print(f"CUDA extension fastgen._C: built for {build['archs']}, CUDA runtime {build['cuda_runtime_version']}")
    gpus = sysinfo.gpus()
    if not gpus:
        print("GPU: none found (NVML and torch see no CUDA device)")
    for index, gpu in enumerate(gpus):
        details = ", ".join(f"{key} {value}" for key, value in gpu.items() if key != "name")
        print(f"GPU {index}: {gpu['name']}: {details}")
    device = default_device()
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    print(f"backend: {current_backend()} (FASTGEN_BACKEND or use_backend)  "
          f"Triton interpreter: {'on' if interpreter else 'off'}  ops run on: {device}")
    print("implementations available here:")
    for name, op in sorted(fastgen.OPS.items()):
        cells = []
        for backend in FAST_BACKENDS:
            if backend not in op.implementations:
                cells.append(f"{backend}: none")
                continue
            reason = backend_unavailable_reason(backend, device)
            cells.append(f"{backend}: {'yes' if reason is None else 'no (' + reason + ')'}")
        print(f"  {name:32s} reference: yes  " + "  ".join(cells))
    return 0


def _run_check(op_names, backends, seed) -> int:
    from fastgen.check import default_device, run_checks, summarize

    device = default_device()
    where = "GPU kernels" if device.type == "cuda" else "CPU tensors, Triton under the interpreter"
    print(f"fastgen check on {device} ({where}): every implementation against the float64 reference")
    results = run_checks(device, backends=backends, op_names=op_names, seed=seed)
    print(summarize(results))
    failed = sum(r.status == "FAIL" for r in results)
    passed = sum(r.status == "ok" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    print(f"{passed} passed, {failed} failed, {skipped} implementation(s) skipped")
    return 1 if failed or not passed else 0


def _check(args) -> int:
    return _run_check(args.op, args.backend or ("triton", "cuda"), args.seed)


def _bench(args) -> int:
    if not torch.cuda.is_available():
        print("fastgen bench: no CUDA GPU here, so no timings were taken. "
              "Verifying every kernel under the Triton interpreter instead.\n")
        code = _run_check(None, ("triton", "cuda"), seed=0)
        print("\nNo timings were taken (CPU only). Run `fastgen bench` on a machine with a CUDA GPU for the "
              "benchmark suite.")
        return code
    from fastgen import bench

    return bench.run_from_args(args)


def _bench_compare(args) -> int:
    from fastgen.bench import compare

    return compare.run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("info", help="versions, GPU, CUDA extension and available implementations").set_defaults(
        run=_info)

    check = commands.add_parser("check", help="every implementation of every op against its reference")
    check.add_argument("--op", action="append", help="only this op (repeatable)")
    check.add_argument("--backend", action="append", choices=("triton", "cuda"), help="only this backend")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(run=_check)

    bench_parser = commands.add_parser("bench", help="benchmark suite (on CPU: runs check, no timings)")
    from fastgen import bench

    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=_bench)
    # Optional, so `fastgen bench [--quick ...]` still runs the suite; its defaults override run=_bench.
    bench_commands = bench_parser.add_subparsers(dest="bench_command", metavar="{compare}")
    compare_parser = bench_commands.add_parser(
        "compare", help="compare two result files: regressions beyond noise, status changes, missing rows")
    from fastgen.bench import compare

    compare.add_arguments(compare_parser)
    compare_parser.set_defaults(run=_bench_compare)
    return parser


def main(argv=None) -> int:
    _use_interpreter_without_gpu()
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
