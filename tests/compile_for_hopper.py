"""Compile every Triton kernel that the ops' check cases launch, forward and backward, for an
H100 (sm_90; --arch 80 for an A100), on a machine without a GPU.

The interpreter accepts code that the GPU compiler rejects (block shapes, dot operand sizes,
non-constant globals, register-hungry tiles), so CI compiles the real kernels too: a stand-in
driver reports the target GPU and every launch becomes compile-only (Triton's warm-up path);
autotuned kernels compile every config their pruning keeps for the arguments. Outputs stay
zero: only compilation is checked here, values are checked under the interpreter and on a GPU.

Run as a script (the test does, in subprocesses: triton.jit must see TRITON_INTERPRET unset);
--help lists the options (--shard, --op, --arch, --shared-memory, and --ptxas-report: every
compiled variant's registers and spill bytes per thread from ptxas -v and its shared memory,
most spilled first). Exit 0 when everything compiled, 1 when a kernel failed to compile or
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
from typing import Optional

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.backends.nvidia.driver import ty_to_cpp
    from triton.runtime import autotuner, jit
    from triton.runtime import driver as active_driver
    from triton.runtime.errors import OutOfResources
except ImportError as error:
    print(f"Triton internals changed: {error}")
    sys.exit(3)

from fastgen.kernels import LAUNCH_OPTIONS  # noqa: E402
from fastgen.ops import registry  # noqa: E402

# The shared memory a block may opt in to per compute capability (--arch picks one,
# --shared-memory overrides it). A launch past it raises OutOfResources on the GPU; the
# autotuner skips such configs, so only a launch left with none that fits fails there, and here.
SHARED_MEMORY_BY_ARCH = {90: 232448, 80: 166912, 86: 101376, 89: 101376}  # H100, A100, RTX 30, L4 / RTX 40
target = GPUTarget("cuda", 90, 32)
shared_memory_limit = SHARED_MEMORY_BY_ARCH[90]


class CompileOnlyDriver(DriverBase):
    """Just enough of a driver for JITFunction.run(warmup=True): target, device and stream."""

    def __init__(self):  # the real driver loads libcuda; nothing to load here
        pass

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        return ty_to_cpp(ty)

    def get_benchmarker(self):
        raise RuntimeError("compile-only driver: nothing is timed")

    def get_device_interface(self):
        return torch.cuda

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("compile-only driver: nothing is timed")

    def clear_cache(self, cache):
        pass


compiled = set()
# (kernel, its launch options and floating argument dtypes) -> (PTX, shared memory bytes),
# kept for --ptxas-report.
ptx_by_variant: Optional[dict] = None
REPORT_HEADER = "spill B  regs  smem KB  kernel  options"
_launch = jit.JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _launch(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.add(self.fn.__name__)
    shared = kernel.metadata.shared
    if ptx_by_variant is not None:
        dtypes = sorted({str(a.dtype).replace("torch.", "") for a in args
                         if isinstance(a, torch.Tensor) and a.is_floating_point()})
        options = " ".join(f"{k}={v}" for k, v in sorted(kwargs.items())
                           if not isinstance(v, torch.Tensor) and k not in LAUNCH_OPTIONS)
        ptx_by_variant[(self.fn.__name__, f"{options} dtypes={'/'.join(dtypes)}")] = (kernel.asm["ptx"], shared)
    if shared > shared_memory_limit:
        raise OutOfResources(shared, shared_memory_limit, f"shared memory ({self.fn.__name__})")


def ptxas_report(variants: dict) -> str:
    """Registers and spill bytes per thread (ptxas -v for the target) and shared memory per
    block of each compiled variant, most spilled first: what a kernel costs can be read here
    without a GPU."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(target.arch).path
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


def _every_config(self, *args, **kwargs):
    """Every configuration the autotuner would time for these arguments (after its pruning);
    fails, as the autotuner would on the GPU, when none fits in shared memory."""
    self.nargs = dict(zip(self.arg_names, args))
    try:
        configs = self.prune_configs(kwargs)
        too_large = []
        for config in configs:
            try:
                self.fn.run(*args, **{**kwargs, **config.all_kwargs()})
            except OutOfResources as error:
                too_large.append(f"{config}: {error}")
    finally:
        self.nargs = None
    if len(too_large) == len(configs):
        raise RuntimeError(f"no config fits in {shared_memory_limit} bytes of shared memory: {'; '.join(too_large)}")


def _zeroed(allocate_output):
    """Kernels write nothing here; zeros keep index outputs valid for eager backward code."""
    def allocate(*args):
        out = allocate_output(*args)
        for tensor in out if isinstance(out, tuple) else (out,):
            tensor.zero_()
        return out

    return allocate


def _floating_leaves(args):
    return tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def main(shard: int = 0, shards: int = 1, op_names: Optional[list] = None) -> int:
    """Compiles the (op, check case, dtype) items numbered shard, shard + shards, ... (of the
    ops named, or all)."""
    try:
        active_driver.set_active(CompileOnlyDriver())
        jit.JITFunction.run = _compile_only
        autotuner.Autotuner.run = _every_config
    except AttributeError as error:
        print(f"Triton internals changed: {error}")
        return 3
    # The Triton backend takes CPU tensors (they only supply shapes, strides and dtypes here).
    # Only the backend check is told so: the launchers must still see the interpreter off, or
    # they pick the configurations and operand types they use under it instead of the GPU's.
    unavailable = registry.backend_unavailable_reason
    registry.backend_unavailable_reason = lambda backend, device: (
        None if backend == "triton" else unavailable(backend, device))
    generator = torch.Generator().manual_seed(0)
    failures = []
    item = -1
    unknown = set(op_names or ()) - set(registry.OPS)
    if unknown:
        print(f"unknown op(s) {sorted(unknown)}; known: {sorted(registry.OPS)}")
        return 2
    for name, op in sorted(registry.OPS.items()):
        if op_names and name not in op_names:
            continue
        op.allocate_output = _zeroed(op.allocate_output)
        implementation = op.implementations["triton"]
        for case in op.check_cases():
            for dtype in implementation.dtypes:
                args = case.make_args(torch.device("cpu"), dtype, generator)
                item += 1
                if item % shards != shard:
                    continue
                try:
                    with registry.use_backend("triton"):
                        outputs = getattr(torch.ops.fastgen, name)(*_floating_leaves(args))
                        if op.differentiable:
                            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                            floating = [o for o in outputs if o.is_floating_point()]
                            torch.autograd.backward(floating, [torch.ones_like(o) for o in floating])
                except Exception as error:  # report every failing case, not just the first
                    failures.append(f"{name} [{case.label}, {dtype}]: {type(error).__name__}: {str(error)[:2000]}")
    print(f"compiled for sm_{target.arch}: {len(compiled)} kernels: {', '.join(sorted(compiled))}")
    for failure in failures:
        print(f"FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="take every N-th (op, case, dtype) item from the I-th (a test runs N of these "
                             "processes side by side: compiling is CPU-bound and the items are independent)")
    parser.add_argument("--op", action="append", help="only this op (repeatable)")
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_MEMORY_BY_ARCH),
                        help="compute capability to compile for (default 90, the H100's; 80 is the A100's)")
    parser.add_argument("--shared-memory", type=int, metavar="KIB",
                        help="the shared memory a block may use (default: the arch's, 227 KiB on sm_90)")
    parser.add_argument("--ptxas-report", action="store_true",
                        help="then list every compiled variant's registers and spill bytes, most spilled first")
    options = parser.parse_args()
    target = GPUTarget("cuda", options.arch, 32)
    shared_memory_limit = (SHARED_MEMORY_BY_ARCH[options.arch] if options.shared_memory is None
                           else options.shared_memory * 1024)
    if options.ptxas_report:
        ptx_by_variant = {}
    index, count = (int(v) for v in options.shard.split("/"))
    status = main(index, count, options.op)
    if options.ptxas_report and status != 3:
        print(ptxas_report(ptx_by_variant))
    sys.exit(status)
