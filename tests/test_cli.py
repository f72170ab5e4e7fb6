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
    # This process has TRITON_INTERPRET=1 (conftest.py): Triton runs here as in the CLI.
    assert "(TRITON_INTERPRET=1):" in out and "  triton    every op: yes\n" in out, out
    assert "in fastgen's commands" not in out, out
    assert re.search(r"  cuda      every op but cross_attention, gated_residual_ada_layer_norm: no: "
                     r"(fastgen._C sees no CUDA device|fastgen._C is not built \(above\))", out), out


def test_info_tells_what_a_python_process_gets_apart_from_what_the_cli_does():
    """A user's script without TRITON_INTERPRET gets BackendUnavailable from the Triton backend
    on CPU, though the CLI runs it (it sets TRITON_INTERPRET for itself): info says both, and
    each backend's reason once, not once per op."""
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "fastgen.cli", "info"], capture_output=True, text=True,
                            env=environment, timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "a Python process started from this environment (TRITON_INTERPRET unset):" in out, out
    assert "  triton    every op: no: Triton kernels run on CPU tensors only under TRITON_INTERPRET=1\n" in out, out
    assert ("in fastgen's commands (check, bench, profile), which set TRITON_INTERPRET=1 themselves without a GPU: "
            "yes, under the interpreter") in out, out
    assert out.count("Triton kernels run on CPU tensors only") == 1
    cuda_reason = re.search(r"CUDA extension fastgen._C: (.*)", out).group(1)
    assert out.count(cuda_reason) == 1 or "built for" in cuda_reason, out


def test_check_runs_the_triton_kernels_under_the_interpreter(capsys):
    """Two ops' checks through the CLI; test_contract runs every op's, one test per op."""
    assert cli.main(["check", "--op", "trms2d", "--op", "qk_norm_rope"]) == 0
    out = capsys.readouterr().out
    assert "Triton under the interpreter" in out
    assert " 0 failed" in out
    checked = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and " ok " in line}
    assert checked == {"trms2d", "qk_norm_rope"}, out


def test_check_unknown_op_is_a_clear_error(capsys):
    assert cli.main(["check", "--op", "vq_nearest", "--op", "flash_everything"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastgen check: unknown op(s) ['flash_everything']; known: ") and "vq_nearest" in err


def test_bench_without_gpu_checks_and_says_no_timings(capsys):
    """README's first command without a GPU, on one op's cases (every op's checks run in
    test_contract)."""
    assert cli.main(["bench", "--quick", "--filter", "^trms2d "]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fastgen bench: no CUDA GPU here, so no timings will be taken")
    assert "selected by --filter '^trms2d ' --quick." in out and "No timings were taken" in out
    assert " 0 failed" in out and "trms2d                           triton  ok" in out


def test_bench_without_gpu_selects_cases_as_on_a_gpu(capsys):
    """--filter is matched against the same 'name shape dtype direction' labels as on a GPU: a
    pattern naming a dtype selects op cases, not op names."""
    from fastgen import bench
    from fastgen.bench import harness

    assert cli.main(["bench", "--filter", "^vq_nearest .* bfloat16", "--impl", "triton", "--impl", "compile"]) == 0
    out = capsys.readouterr().out
    cases = harness.select(bench.benchmarks(), "^vq_nearest .* bfloat16")
    assert f"{len(cases)} benchmark case(s) selected by --filter" in out
    assert "Verifying the triton kernels of vq_nearest on each op's check cases" in out
    checked = {tuple(line.split()[:2]) for line in out.splitlines() if line.startswith("  ")}
    assert checked == {("vq_nearest", "triton")}, out


@pytest.mark.parametrize("argv, message", [
    (["--filter", "no such benchmark"], "no benchmark case matches filter 'no such benchmark'"),
    (["--filter", "("], "filter '(' is not a regular expression"),
    (["--impl", "eager"], "the selection holds no fastgen backend (triton, cuda) among --impl"),
    (["--impl", "warp"], "unknown impl(s) ['warp']"),
    (["--filter", "^model\\."], "the selection holds no op benchmark"),
    (["--out", "results"], "--out only shapes timed runs"),
    (["--no-compile", "--quick"], "--no-compile only shapes timed runs"),
    (["--compile-filter", "vq"], "--compile-filter only shapes timed runs"),
])
def test_bench_without_gpu_refuses_what_selects_nothing_or_cannot_apply(argv, message, capsys):
    assert cli.main(["bench"] + argv) == 2
    assert message in capsys.readouterr().err


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


def _results_file(directory, rows):
    from fastgen.bench import harness

    meta = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "1", "torch": "t", "triton": "t", "cuda": "c",
            "commit": "0123456789abcdef", "timestamp": "2026-11-22T00:00:00+00:00",
            "ceilings": {"copy_gbps": 3000.0, "bf16_matmul_tflops": 700.0}}
    return harness.write_results(rows, meta, directory)["json"]


def _timed_row(name, impl, shape, ms, eager_ms, rate, direction="fwd", status="ok"):
    row = {"name": name, "impl": impl, "shape": shape, "dtype": "bfloat16", "direction": direction, "ms": ms,
           "ms_p20": ms, "ms_p80": ms, "fraction_of_ceiling": 0.5, "speedup_vs_eager": eager_ms / ms,
           "max_abs_err": 0.0, "status": status}
    row.update(rate)
    return row


def _synthetic_rows():
    rows = []
    for size, eager_ms in ((1, 0.1), (4, 0.4), (16, 1.6)):
        for impl, ms in (("eager", eager_ms), ("compile", eager_ms / 1.5), ("triton", eager_ms / 3)):
            for direction in ("fwd", "fwd+bwd"):
                rows.append(_timed_row("linear_attention", impl, f"N{size}k", ms, eager_ms,
                                       {"gbps": size * 1e3 / ms}, direction))
    rows.append({**_timed_row("linear_attention", "cuda", "N1k", 1.0, 1.0, {"gbps": 1.0}),
                 "ms": None, "speedup_vs_eager": None, "status": "skipped: no cuda implementation"})
    for impl, ms in (("eager", 80.0), ("compile", 60.0), ("triton", 40.0)):
        rows.append(_timed_row("model.sana-1600m.step", impl, "32x32 latent", ms, 80.0, {"tflops": 100.0}))
    return rows


def test_plot_series_from_a_results_file():
    from fastgen.bench import plots

    rows = _synthetic_rows()
    series = plots.speedup_series(rows)
    assert set(series) == {"linear_attention"}, "model rows and eager rows are not op speedups"
    fwd = series["linear_attention"]["fwd"]
    assert set(fwd) == {("compile", "bfloat16"), ("triton", "bfloat16")}, "skipped rows are not drawn"
    work, speedup = zip(*fwd[("triton", "bfloat16")])
    assert work == pytest.approx((1e9, 4e9, 16e9)), "size = GB/s x ms: the bytes the case moves"
    assert speedup == pytest.approx((3.0, 3.0, 3.0))
    assert plots.model_times(rows) == {"sana-1600m.step\n32x32 latent": {"eager": 80.0, "compile": 60.0,
                                                                          "triton": 40.0}}


def test_bench_plot_writes_pngs_beside_the_results(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (it is in the bench extra)")
    results = _results_file(tmp_path, _synthetic_rows())
    assert cli.main(["bench", "plot", str(results)]) == 0
    pngs = sorted(path.name for path in tmp_path.glob("*.png"))
    assert pngs == [f"{results.stem}.linear_attention.png", f"{results.stem}.models.png"]
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote 2 plot(s)" in capsys.readouterr().out


def test_bench_plot_of_a_missing_file_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["bench", "plot", str(tmp_path / "nothing.json")]) == 2
    assert "no result file" in capsys.readouterr().err


SAMPLE_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "sample_results.json")


def test_every_bench_subcommand_reads_the_sample_results_file(tmp_path, capsys):
    """bench/sample_results.json (invented numbers, labelled so in its meta) lets a user try the
    commands that read result files without a GPU."""
    assert cli.main(["bench", "compare", SAMPLE_RESULTS, SAMPLE_RESULTS]) == 0
    assert "0 regression(s)" in capsys.readouterr().out
    assert cli.main(["bench", "order", SAMPLE_RESULTS]) == 0
    assert "| trms2d | cuda > triton |" in capsys.readouterr().out
    assert cli.main(["bench", "headline", SAMPLE_RESULTS]) == 0
    assert "invented numbers" in capsys.readouterr().out
    assert cli.main(["bench", "order", "--write", SAMPLE_RESULTS]) == 2, "not measured on a GPU: no order is written"
    assert "no compute_capability" in capsys.readouterr().err


@pytest.mark.parametrize("content, problem", [("name,ms\n", "is not JSON"), ("{}", "has no 'meta' object"),
                                              ("[]", "has no 'meta' object"),
                                              ('{"meta": {}, "rows": [{"name": "x"}]}', "row 0 of")])
def test_commands_reading_result_files_refuse_other_files_in_one_line(tmp_path, capsys, content, problem):
    other = tmp_path / "other.json"
    other.write_text(content)
    for argv, named in ((["bench", "plot", str(other)], "RESULTS"), (["bench", "order", str(other)], "RESULTS"),
                        (["bench", "compare", str(other), SAMPLE_RESULTS], "OLD"),
                        (["bench", "compare", SAMPLE_RESULTS, str(other)], "NEW")):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and problem in err, err
        assert f"{named} must be a benchmark result JSON file" in err, err


def test_bench_plot_without_matplotlib_says_so(tmp_path, capsys, monkeypatch):
    results = _results_file(tmp_path, _synthetic_rows())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert cli.main(["bench", "plot", str(results)]) == 1
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plain_pytest_collects_only_tests():
    """CI runs the README's `python -m pytest -q -n auto`: pyproject's testpaths keeps bench/ (GPU timings
    through pytest-benchmark) out of it."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as handle:
        assert tomllib.load(handle)["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def test_pytest_benchmark_entry_skips_with_the_reason_without_gpu():
    # Not as an xdist worker: pytest-benchmark would read the inherited worker variables as xdist
    # being on and turn itself off, which --benchmark-only refuses.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    result = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-rs",
                             "-p", "no:cacheprovider"], cwd=REPO, env=environment, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ skipped in .*", summary), summary
    assert "needs a CUDA GPU" in result.stdout


def test_a_closed_pipe_ends_the_command_quietly(monkeypatch, capsys):
    """`fastgen info | head -1`: the reader closes the pipe; the command stops with status 0
    instead of a BrokenPipeError traceback."""
    import os

    from fastgen import cli

    read_end, write_end = os.pipe()
    os.close(read_end)
    with os.fdopen(write_end, "w", buffering=1) as closed_pipe:
        with capsys.disabled():
            monkeypatch.setattr("sys.stdout", closed_pipe)
            assert cli.main(["info"]) == 0


def _result(op, backend, status="ok", detail=""):
    from fastgen.check import CheckResult

    return CheckResult(op, backend, "4x4", "float32", "fwd", status, 1e-7 if status == "ok" else None, detail)


def test_check_progress_shows_each_op_and_backend_as_its_checks_finish():
    import io

    stream = io.StringIO()
    progress = cli._CheckProgress(stream)
    progress(_result("trms2d", "triton"))
    progress(_result("trms2d", "triton"))
    assert stream.getvalue() == "", "off a terminal, no status line"
    progress(_result("trms2d", "cuda", "skipped", "no GPU"))
    assert stream.getvalue().startswith("  trms2d                           triton  ok 2 checks (fwd, max abs err")
    progress(_result("vq_nearest", "cuda", "skipped", "no GPU"))
    progress.finish()
    assert stream.getvalue().count("\n") == 1, "skipped backends wait for the summary, which says the reason once"


def _on_a_terminal(*argv):
    """The CLI's output with its stdout on a pseudo-terminal."""
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "fastgen.cli", *argv], stdout=follower, stderr=subprocess.STDOUT)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=300) == 0, b"".join(chunks).decode()
    return b"".join(chunks).decode()


def test_check_on_a_terminal_shows_a_status_line_per_check_unless_quiet():
    out = _on_a_terminal("check", "--op", "trms2d", "--backend", "triton")
    assert "\r\x1b[K  trms2d triton: 1 check(s) done, last " in out, out
    assert "trms2d                           triton  ok" in out
    quiet = _on_a_terminal("check", "--op", "trms2d", "--backend", "triton", "--quiet")
    assert "check(s) done" not in quiet and "trms2d                           triton  ok" in quiet, quiet


def test_check_says_a_skipped_backends_reason_once(capsys):
    assert cli.main(["check", "--op", "trms2d", "--op", "ada_layer_norm", "--backend", "cuda"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"  2 ops +cuda +skipped: ", out), out
    assert out.count("skipped: ") == 1, out
