"""Every Triton kernel compiles for sm_90 (H100) and sm_80 (A100) and fits in its shared
memory, checked without a GPU (see tests/compile_for_hopper.py for how). The whole check is
marked compile_check, which the test command leaves out (minutes of compiling: CI runs it as its
own step, `pytest -m compile_check`); the other tests here check the checker on one op."""
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import fastgen

COMPILE_TIMEOUT_S = 1500


def _run_side_by_side(commands, tell) -> list:
    """Runs the commands at once, passing each output line to `tell` as it comes (tagged with its
    process); returns (exit status, whole output) per command."""
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for command in commands]
    lines = queue.Queue()

    def read(number, stream):
        for line in stream:
            lines.put((number, line))
        lines.put((number, None))

    readers = [threading.Thread(target=read, args=(n, p.stdout), daemon=True) for n, p in enumerate(processes)]
    for reader in readers:
        reader.start()
    outputs, running, deadline = [[] for _ in processes], len(processes), time.monotonic() + COMPILE_TIMEOUT_S
    while running:
        try:
            number, line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
        except queue.Empty:
            for process in processes:
                process.kill()
            pytest.fail(f"the compile check took over {COMPILE_TIMEOUT_S} s: {''.join(sum(outputs, []))[-5000:]}")
        if line is None:
            running -= 1
            continue
        outputs[number].append(line)
        tell(f"process {number}: {line.rstrip()}")
    return [(process.wait(), "".join(output)) for process, output in zip(processes, outputs)]


@pytest.mark.compile_check
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests compile and run the real kernels")
# sm_80 skips the bfloat16 variants, a third of its compile time: they take the float16 variants'
# tiles, dots and shared memory (the same element size), or filtered_lrelu's float32 stages, and
# differ from both only in elementwise conversions. sm_90 compiles every dtype.
@pytest.mark.parametrize("arch, dtypes", [(90, []), (80, ["float32", "float16"])], ids=["H100", "A100"])
def test_every_triton_kernel_compiles_and_fits_in_shared_memory(arch, dtypes, tmp_path, progress):
    """One process per core (at most 4), sharing a Triton cache (a kernel variant that two ops
    launch, as an op's backward and its adjoint op's forward do, compiles once) and claiming
    (op, dtype) groups as they come free; a line per group as it finishes."""
    script = Path(__file__).with_name("compile_for_hopper.py")
    (tmp_path / "claims").mkdir()
    dtype_options = [option for dtype in dtypes for option in ("--dtype", dtype)]
    command = [sys.executable, str(script), "--arch", str(arch), "--claims", str(tmp_path / "claims"),
               "--cache-dir", str(tmp_path / "cache"), *dtype_options]
    processes = max(1, min(4, os.cpu_count() or 1))
    results = _run_side_by_side([command] * processes, lambda line: progress(f"sm_{arch} {line}"))
    codes = [code for code, _ in results]
    outputs = [output for _, output in results]
    if 3 in codes:
        pytest.skip(f"this Triton's internals do not fit the compile-only driver: {outputs[codes.index(3)][-2000:]}")
    for code, output in zip(codes, outputs):
        assert code == 0, output[-20000:]
        # Triton >= 3.9 warns when a launch leaves FMA contraction to its changing default.
        assert "TRITON_DEFAULT_FP_FUSION" not in output, "a launch lacks LAUNCH_OPTIONS"
    compiled = {kernel for output in outputs for kernel in output.split("kernels: ")[1].split("\n")[0].split(", ")
                if kernel}
    assert len(compiled) >= len(fastgen.OPS), compiled


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests compile and run the real kernels")
def test_ptxas_report_lists_registers_and_spills_of_each_variant():
    script = Path(__file__).with_name("compile_for_hopper.py")
    result = subprocess.run([sys.executable, str(script), "--op", "pixel_unshuffle_channel_avg", "--ptxas-report"],
                            capture_output=True, text=True, timeout=600)
    if result.returncode == 3:
        pytest.skip(f"this Triton's internals do not fit the compile-only driver: {result.stdout[-2000:]}")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    table = result.stdout.split("spill B  regs  smem KB  kernel  options\n")[1].splitlines()
    rows = [line.split(None, 4) for line in table]
    # The forward's kernel and the backward's (the adjoint shuffle).
    kernels = {"_pixel_unshuffle_channel_sum_kernel", "_channel_dup_pixel_shuffle_kernel"}
    assert rows and {name for *_, name, _ in rows} == kernels, table
    assert all(0 < int(registers) <= 255 and int(spilled) >= 0 and 0 <= float(shared) <= 227
               for spilled, registers, shared, *_ in rows), table
    assert any("dtypes=bfloat16" in options for *_, options in rows), table
    spills = [int(spilled) for spilled, *_ in rows]
    assert spills == sorted(spills, reverse=True)


def test_compile_check_rejects_an_unknown_op():
    script = Path(__file__).with_name("compile_for_hopper.py")
    result = subprocess.run([sys.executable, str(script), "--op", "no_such_op"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode in (2, 3), result.stdout + result.stderr
    if result.returncode == 2:
        assert "unknown op(s) ['no_such_op']" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the gpu tests compile and run the real kernels")
def test_compile_check_fails_a_kernel_past_the_shared_memory_limit():
    """The shortcut kernels take 0.5..1 KiB of shared memory on sm_90: under a 0 KiB limit the
    check must fail them, as the GPU would refuse the launch."""
    script = Path(__file__).with_name("compile_for_hopper.py")
    result = subprocess.run([sys.executable, str(script), "--op", "pixel_unshuffle_channel_avg", "--shared-memory", "0"],
                            capture_output=True, text=True, timeout=600)
    if result.returncode == 3:
        pytest.skip(f"this Triton's internals do not fit the compile-only driver: {result.stdout[-2000:]}")
    assert result.returncode == 1, result.stdout[-5000:] + result.stderr[-5000:]
    assert "OutOfResources: out of resource: shared memory" in result.stdout, result.stdout[-5000:]
