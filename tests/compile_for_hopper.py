"""Compile every Triton kernel that the ops' check cases launch, forward and backward, for an
H100 (sm_90; --arch 80 for an A100), on a machine without a GPU.

The interpreter accepts code that the GPU compiler rejects (block shapes, dot operand sizes,
non-constant globals, register-hungry tiles), so CI compiles the real kernels too, the way
`fastgen precompile` does (fastgen/precompile.py: a stand-in driver for the target GPU, every
launch compile-only, every config an autotuned kernel's pruning keeps, the target's shared
memory limit enforced). Only compilation is checked here; values are checked under the
interpreter and on a GPU.

Run as a script (the test does, in subprocesses: triton.jit must see TRITON_INTERPRET unset);
--help lists the options (--claims, --cache-dir, --op, --dtype, --arch, --shared-memory, and --ptxas-report: every
compiled variant's registers and spill bytes per thread from ptxas -v and its shared memory,
most spilled first). It prints a line per op and dtype as it finishes compiling them. Exit 0
when everything compiled, 1 when a kernel failed to compile or
would not launch for lack of shared memory, 2 for bad arguments (an unknown op), 3 when this
Triton's internals no longer fit the stand-in driver (the test then skips rather than fail for
a reason that is not ours).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

from fastgen import precompile  # noqa: E402

REPORT_HEADER = "spill B  regs  smem KB  kernel  options"


def ptxas_report(arch: int, variants: dict) -> str:
    """Registers and spill bytes per thread (ptxas -v for the target) and shared memory per
    block of each compiled variant, most spilled first: what a kernel costs can be read here
    without a GPU."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "kernel.ptx"
        for (name, options), (ptx, shared) in variants.items():
            source.write_text(ptx)
            gpu_name = re.search(r"^\.target (\w+)", ptx, re.MULTILINE).group(1)
            log = subprocess.run([ptxas, "-v", f"--gpu-name={gpu_name}", str(source), "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
            registers = int(re.search(r"Used (\d+) registers", log).group(1))
            spilled = int(re.search(r"(\d+) bytes spill stores", log).group(1))
            rows.append((spilled, registers, shared, name, options))
    rows.sort(key=lambda row: (-row[0], -row[1], row[3]))
    return "\n".join([REPORT_HEADER] + [f"{spilled:7d}  {registers:4d}  {shared / 1024:7.1f}  {name}  {options}"
                                         for spilled, registers, shared, name, options in rows])


def main(session: "precompile.CompileSession", claims, op_names, dtypes) -> int:
    """Compiles the (op, check case, dtype) items of the ops and dtypes named (or all), every op
    where `claims` is None, else the ops this process claims there first (precompile.compile_items)."""
    try:
        items = list(precompile.check_items(op_names))
    except ValueError as error:  # an unknown op
        print(error)
        return 2
    if dtypes:
        items = [(label, launch) for label, launch in items if label.endswith(tuple(f", {d}]" for d in dtypes))]
    try:
        with session:
            failures = precompile.compile_items(items, claims, report=lambda line: print(line, flush=True))
    except precompile.TritonInternalsChanged as error:
        print(f"Triton internals changed: {error}")
        return 3
    print(f"compiled for sm_{session.arch}: {len(session.compiled)} kernels: {', '.join(sorted(session.compiled))}")
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=Path, metavar="DIR",
                        help="compile only the (op, dtype) groups claimed first in DIR: processes sharing DIR "
                             "(a test runs one per core) divide them as they come free")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="the Triton cache to compile into, which processes sharing DIR share "
                             "(default: a scratch one)")
    parser.add_argument("--op", action="append", help="only this op (repeatable)")
    parser.add_argument("--dtype", action="append", choices=["float32", "float16", "bfloat16"],
                        help="only the check cases in this dtype (repeatable)")
    parser.add_argument("--arch", type=int, default=90, choices=sorted(precompile.SHARED_MEMORY_BY_ARCH),
                        help="compute capability to compile for (default 90, the H100's; 80 is the A100's)")
    parser.add_argument("--shared-memory", type=int, metavar="KIB",
                        help="the shared memory a block may use (default: the arch's, 227 KiB on sm_90)")
    parser.add_argument("--ptxas-report", action="store_true",
                        help="then list every compiled variant's registers and spill bytes, most spilled first")
    options = parser.parse_args()
    compile_session = precompile.CompileSession(
        options.arch, None if options.shared_memory is None else options.shared_memory * 1024,
        keep_ptx=options.ptxas_report)
    # Compiled into a scratch cache, never the user's: a kernel already there would not be
    # compiled again, and its PTX (for the report) is not kept there.
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["TRITON_CACHE_DIR"] = str(options.cache_dir or scratch)
        status = main(compile_session, options.claims, options.op, options.dtype)
    if options.ptxas_report and status != 3:
        print(ptxas_report(compile_session.arch, compile_session.variants))
    sys.exit(status)
