"""The test session's own report (tests/session_report.py): one line of skips by reason, the fuzz
cases that passed per op and backend, progress lines that get past output capture, and the
compile check left out of a plain run."""
import os
import subprocess
import sys
from pathlib import Path

from session_report import FUZZ_CASES_PASSED, fuzz_summary, skip_summary

TESTS = Path(__file__).parent

_SAMPLE_TESTS = '''
import pytest

@pytest.mark.skip(reason="needs a CUDA GPU")
@pytest.mark.parametrize("n", [1, 2, 3])
def test_on_gpu(n):
    pass

def test_without_nvcc():
    pytest.skip("no nvcc")

def test_long(progress):
    progress("halfway through the long test")
    print("captured, never shown")
'''


def _pytest(*args, cwd=TESTS.parent):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=cwd,
                          capture_output=True, text=True, env=environment, timeout=300)


def test_skips_are_summed_up_by_reason_in_one_line_and_progress_gets_past_capture(tmp_path):
    (tmp_path / "test_sample.py").write_text(_SAMPLE_TESTS)
    result = _pytest("-q", "-p", "session_report", "test_sample.py", cwd=tmp_path)
    assert "1 passed, 4 skipped" in result.stdout, result.stdout + result.stderr
    assert "4 skipped: 3 needs a CUDA GPU; 1 no nvcc" in result.stdout.splitlines(), result.stdout
    assert "halfway through the long test" in result.stdout
    assert "captured, never shown" not in result.stdout


def test_fuzz_cases_are_summed_per_op_and_backend_from_call_reports_only():
    class Report:
        def __init__(self, when, *properties):
            self.when, self.user_properties = when, [(FUZZ_CASES_PASSED, p) for p in properties]

    reports = [Report("call", ("trms2d", "triton", 1667)), Report("call", ("trms2d", "triton", 1200)),
               Report("call", ("trms2d", "cuda", 5)), Report("call", ("bias_act", "cuda", 3)),
               Report("teardown", ("bias_act", "cuda", 100))]
    assert fuzz_summary(reports) == ["fuzz cases passed: bias_act cuda 3",
                                     "fuzz cases passed: trms2d cuda 5, triton 2,867"]
    assert fuzz_summary([]) == []


def test_skip_summary_of_no_skips_is_none():
    assert skip_summary([]) is None


def test_the_compile_check_runs_only_where_m_names_it():
    plain = _pytest("--collect-only", "-q", "tests/test_compiles_for_hopper.py")
    assert "test_every_triton_kernel_compiles_and_fits_in_shared_memory" not in plain.stdout, plain.stdout
    assert "2 deselected" in plain.stdout, plain.stdout
    assert "test_compile_check_rejects_an_unknown_op" in plain.stdout
    chosen = _pytest("--collect-only", "-q", "-m", "compile_check", "tests/test_compiles_for_hopper.py")
    assert "test_every_triton_kernel_compiles_and_fits_in_shared_memory[H100]" in chosen.stdout, chosen.stdout
    assert "test_every_triton_kernel_compiles_and_fits_in_shared_memory[A100]" in chosen.stdout
