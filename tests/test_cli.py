"""The `fastgen` command on a machine without a GPU."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from fastgen import cli
from fastgen.ops.registry import OPS

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_info_lists_versions_and_every_op(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    assert "GPU: none found" in out
    for name in OPS:
        assert name in out
    assert "triton: yes" in out, "the interpreter makes Triton available on CPU"
    assert re.search(r"cuda: no \((fastgen._C sees no CUDA device|the CUDA extension fastgen._C is not built)", out)


def test_check_runs_every_triton_kernel_under_the_interpreter(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "Triton under the interpreter" in out
    assert " 0 failed" in out
    for name in OPS:
        assert f"{name}" in out


def test_check_unknown_op_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown op"):
        cli.main(["check", "--op", "flash_everything"])


def test_bench_without_gpu_checks_and_says_no_timings(capsys):
    assert cli.main(["bench", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "no timings were taken" in out
    assert "Verifying every kernel under the Triton interpreter" in out
    assert " 0 failed" in out


def test_console_script_is_installed():
    script = shutil.which("fastgen", path=os.path.dirname(sys.executable))
    assert script, f"pip install put no `fastgen` script beside {sys.executable}"
    result = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "info" in result.stdout and "bench" in result.stdout


def test_bench_compare_subcommand(tmp_path, capsys):
    from fastgen.bench import harness

    def write(directory, ms):
        row = {"name": "op", "impl": "triton", "shape": "s", "dtype": "float32", "direction": "fwd", "ms": ms,
               "ms_p20": ms * 0.99, "ms_p80": ms * 1.01, "gbps": 1.0, "fraction_of_ceiling": 0.5,
               "speedup_vs_eager": 1.0, "max_abs_err": 0.0, "status": "ok"}
        meta = {"gpu": "NVIDIA H100", "driver": "1", "torch": "t", "triton": "t", "cuda": "c", "commit": "c",
                "timestamp": "t", "ceilings": {"copy_gbps": 1.0, "bf16_matmul_tflops": 1.0}}
        return harness.write_results([row], meta, tmp_path / directory)["json"]

    old, new = write("old", 1.0), write("new", 2.0)
    assert cli.main(["bench", "compare", str(old), str(new)]) == 1
    assert "regression" in capsys.readouterr().out.lower()
    assert cli.main(["bench", "compare", str(old), str(old)]) == 0
