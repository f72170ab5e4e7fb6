"""`fastgen bench compare`: two synthetic result files, written by the harness's own
write_results, compared row by row."""
import argparse
import json
import re

import pytest

from fastgen.bench import compare as bench_compare
from fastgen.bench import harness

H100 = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "570.86.15", "torch": "2.11.0", "triton": "3.6.0",
        "cuda": "13.0", "python": "3.11.7", "commit": "0123456789abcdef0123", "commit_dirty": False,
        "timestamp": "2026-11-01T10:00:00+00:00", "quick": True,
        "ceilings": {"copy_gbps": 3000.0, "bf16_matmul_tflops": 700.0}}


def _row(name, impl, ms=None, spread=0.02, status="ok", shape="B1 64x64", dtype="bfloat16", direction="fwd"):
    """A harness row; `ms` is the median and p20/p80 sit `spread` (a fraction) either side."""
    row = dict.fromkeys(harness.ROW_FIELDS[:8] + ("gbps",) + harness.ROW_FIELDS[8:])
    row.update(name=name, impl=impl, shape=shape, dtype=dtype, direction=direction, status=status)
    if status == "ok":
        row.update(ms=ms, ms_p20=ms * (1 - spread), ms_p80=ms * (1 + spread), gbps=1.0 / ms,
                   fraction_of_ceiling=0.5, speedup_vs_eager=1.0, max_abs_err=0.0)
    return row


def _write(tmp_path, label, rows, **meta):
    return harness.write_results(rows, {**H100, **meta}, tmp_path / label)["json"]


def _pair(tmp_path, old_rows, new_rows, old_meta=None, new_meta=None):
    return (_write(tmp_path, "old", old_rows, **(old_meta or {})),
            _write(tmp_path, "new", new_rows, **(new_meta or {"timestamp": "2026-11-02T10:00:00+00:00"})))


def _verdicts(report):
    return {row.key[:2]: row.verdict for row in report.rows}


def _cli(capsys, *argv):
    """Exit code, stdout and stderr of `fastgen bench compare` with these arguments."""
    parser = argparse.ArgumentParser()
    bench_compare.add_arguments(parser)
    code = bench_compare.run_from_args(parser.parse_args([str(arg) for arg in argv]))
    out, err = capsys.readouterr()
    return code, out, err


def _table_line(out, name, impl):
    lines = [line for line in out.splitlines() if re.match(rf"\| [^|]+ \| {re.escape(name)} \| {impl} \|", line)]
    assert len(lines) == 1, f"expected one table line for {name} {impl} in:\n{out}"
    return lines[0]


def test_slower_beyond_noise_is_a_regression_listed_first_and_exits_1(tmp_path, capsys):
    old, new = _pair(tmp_path, [_row("a", "triton", 1.0), _row("b", "triton", 1.0)],
                     [_row("a", "triton", 1.0), _row("b", "triton", 1.2)])
    report = bench_compare.compare(old, new)
    assert _verdicts(report) == {("a", "triton"): "same", ("b", "triton"): "REGRESSION"}
    assert report.rows[0].change == pytest.approx(0.2)
    code, out, _ = _cli(capsys, old, new)
    assert code == 1
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[1].startswith("| **REGRESSION** | b | triton |"), "regressions come first"
    assert "| 1 [0.98, 1.02] | 1.2 [1.176, 1.224] | +20.0% |" in _table_line(out, "b", "triton")
    assert "bench compare: 1 regression(s) (1 slower, 0 broken), 1 same (threshold 5%)" in out


def test_faster_beyond_noise_is_an_improvement_and_exits_0(tmp_path, capsys):
    old, new = _pair(tmp_path, [_row("a", "triton", 1.0)], [_row("a", "triton", 0.8)])
    assert _verdicts(bench_compare.compare(old, new)) == {("a", "triton"): "improvement"}
    code, out, _ = _cli(capsys, old, new)
    assert code == 0
    assert "| improvement | a | triton |" in out and "-20.0% |" in out
    assert "0 regression(s) (0 slower, 0 broken), 1 improvement" in out


def test_a_shift_inside_the_noise_or_under_the_threshold_is_the_same(tmp_path, capsys):
    shifts = {"noisy": (1.2, 0.3), "noisy_faster": (0.8, 0.3), "steady": (1.03, 0.001), "steady_faster": (0.97, 0.001)}
    old, new = _pair(tmp_path, [_row(name, "triton", 1.0, spread) for name, (_, spread) in shifts.items()],
                     [_row(name, "triton", ms, spread) for name, (ms, spread) in shifts.items()])
    report = bench_compare.compare(old, new)
    assert _verdicts(report) == {(name, "triton"): "same" for name in shifts}
    assert _cli(capsys, old, new)[0] == 0
    # The same steady 3% shifts count under a 2% threshold.
    strict = _verdicts(bench_compare.compare(old, new, threshold=0.02))
    assert (strict[("steady", "triton")], strict[("steady_faster", "triton")]) == ("REGRESSION", "improvement")
    code, out, _ = _cli(capsys, old, new, "--threshold", "0.02")
    assert code == 1 and "(threshold 2%)" in out


def test_ok_to_error_or_mismatch_is_a_regression_and_statuses_are_listed(tmp_path, capsys):
    mismatch = "error: MISMATCH vs eager: max_abs_err=0.5 (rtol 0.016, atol 0.016)"
    old, new = _pair(tmp_path,
                     [_row("a", "triton", 1.0), _row("b", "triton", 1.0), _row("c", "triton", status="error: boom"),
                      _row("d", "cuda", 1.0), _row("e", "triton", status="error: boom")],
                     [_row("a", "triton", status=mismatch), _row("b", "triton", status="error: Triton crashed"),
                      _row("c", "triton", 1.0), _row("d", "cuda", status="skipped: fastgen._C is not built"),
                      _row("e", "triton", status="error: boom")])
    report = bench_compare.compare(old, new)
    assert _verdicts(report) == {("a", "triton"): "BROKEN", ("b", "triton"): "BROKEN", ("c", "triton"): "fixed",
                                 ("d", "cuda"): "status changed", ("e", "triton"): "not timed"}
    code, out, _ = _cli(capsys, old, new)
    assert code == 1
    assert "| **BROKEN** | a | triton | B1 64x64 | bfloat16 | fwd | 1 [0.98, 1.02] | MISMATCH |  |" in out
    assert f"- a triton B1 64x64 bfloat16 fwd: ok -> {mismatch}" in out
    assert "- d cuda B1 64x64 bfloat16 fwd: ok -> skipped: fastgen._C is not built" in out
    assert "- c triton B1 64x64 bfloat16 fwd: error: boom -> ok" in out
    assert "e triton B1 64x64 bfloat16 fwd:" not in out, "an unchanged failure has no status line"
    assert "2 regression(s) (0 slower, 2 broken), 1 status changed, 1 fixed, 1 not timed" in out


def test_rows_in_only_one_file_are_reported_but_not_regressions(tmp_path, capsys):
    old, new = _pair(tmp_path, [_row("a", "triton", 1.0), _row("gone", "triton", 1.0)],
                     [_row("a", "triton", 1.0), _row("a", "triton", 1.0, dtype="float16")])
    report = bench_compare.compare(old, new)
    assert [(row.key, row.verdict) for row in report.rows] == [
        (("gone", "triton", "B1 64x64", "bfloat16", "fwd"), "only in OLD"),
        (("a", "triton", "B1 64x64", "float16", "fwd"), "only in NEW"),
        (("a", "triton", "B1 64x64", "bfloat16", "fwd"), "same")]
    code, out, _ = _cli(capsys, old, new)
    assert code == 0
    assert "| only in OLD | gone | triton | B1 64x64 | bfloat16 | fwd | 1 [0.98, 1.02] |  |  |" in out
    assert "| only in NEW | a | triton | B1 64x64 | float16 | fwd |  | 1 [0.98, 1.02] |  |" in out
    assert "1 only in OLD, 1 only in NEW, 1 same" in out


@pytest.mark.parametrize("new_meta", [{"gpu": "NVIDIA H200"}, {"driver": "580.00"}], ids=["other-device", "other-driver"])
def test_different_gpu_or_driver_warns_and_exits_2_unless_allowed(tmp_path, capsys, new_meta):
    old, new = _pair(tmp_path, [_row("a", "triton", 1.0)], [_row("a", "triton", 1.5)], new_meta=new_meta)
    report = bench_compare.compare(old, new)
    assert report.machine_warnings and report.exit_code() == 2 and report.exit_code(allow_different_gpu=True) == 1
    code, out, err = _cli(capsys, old, new)
    assert code == 2
    assert "**WARNING**: OLD ran on NVIDIA H100 80GB HBM3 (driver 570.86.15) and NEW on" in out
    assert "do not compare" in out and "DIFFERENT GPU OR DRIVER" in out
    assert "--allow-different-gpu" in err
    code, out, err = _cli(capsys, old, new, "--allow-different-gpu")
    assert code == 1 and "**WARNING**" in out and err == ""


def test_same_machine_has_no_warning_and_software_changes_are_noted(tmp_path, capsys):
    old, new = _pair(tmp_path, [_row("a", "triton", 1.0)], [_row("a", "triton", 1.0)],
                     new_meta={"torch": "2.12.0", "quick": False,
                               "ceilings": {"copy_gbps": 2500.0, "bf16_matmul_tflops": 701.0}})
    report = bench_compare.compare(old, new)
    assert report.machine_warnings == [] and report.exit_code() == 0
    code, out, _ = _cli(capsys, old, new)
    assert code == 0 and "WARNING" not in out
    assert "note: torch differs (2.11.0 -> 2.12.0)" in out
    assert "note: one run was --quick and the other full" in out
    assert "note: the machine's own copy_gbps moved -16.7%" in out
    assert "bf16_matmul_tflops moved" not in out, "a 0.1% move of a ceiling is noise"
    assert "NEW: " in out and "commit 0123456" in out


def test_unreadable_files_exit_2_with_the_reason(tmp_path, capsys):
    good = _write(tmp_path, "good", [_row("a", "triton", 1.0)])
    not_json = tmp_path / "results.csv"
    not_json.write_text("name,impl\n")
    code, out, err = _cli(capsys, not_json, good)
    assert code == 2 and out == "" and "OLD must be a benchmark result JSON file" in err
    code, _, err = _cli(capsys, good, tmp_path / "missing.json")
    assert code == 2 and "missing.json" in err


def test_threshold_must_be_a_fraction():
    with pytest.raises(TypeError, match="threshold must be a number"):
        bench_compare.compare("old.json", "new.json", threshold="5%")
    with pytest.raises(ValueError, match=r"threshold must be a fraction in \[0, 1\), e.g. 0.05 for 5%, got 5"):
        bench_compare.compare("old.json", "new.json", threshold=5)


def test_a_json_without_meta_and_rows_is_rejected(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([_row("a", "triton", 1.0)]))
    with pytest.raises(ValueError, match="has no 'meta' object and 'rows' list"):
        bench_compare.compare(path, path)


def _with_broken_row(tmp_path, field, value):
    """A result file whose one row has `field` set to `value`, or deleted when value is ...;
    every other part of it is valid."""
    row = _row("a", "triton", 1.0)
    if value is ...:
        del row[field]
    else:
        row[field] = value
    path = tmp_path / f"broken-{field}.json"
    path.write_text(json.dumps({"meta": H100, "rows": [row]}))
    return path


def test_a_row_without_its_key_fields_is_rejected(tmp_path):
    good = _write(tmp_path, "good", [_row("a", "triton", 1.0)])
    with pytest.raises(ValueError, match=r"new_path .*row 0 of .* lacks \['direction'\]"):
        bench_compare.compare(good, _with_broken_row(tmp_path, "direction", ...))


@pytest.mark.parametrize("value", [None, 0.0], ids=["missing", "zero"])
def test_an_ok_row_without_positive_times_is_rejected(tmp_path, value):
    path = _with_broken_row(tmp_path, "ms_p80", value)
    with pytest.raises(ValueError, match=r"row 0 of .* is ok but lacks positive times \['ms', 'ms_p20', 'ms_p80'\]"):
        bench_compare.compare(path, path)


def test_duplicate_rows_are_rejected(tmp_path):
    path = _write(tmp_path, "dup", [_row("a", "triton", 1.0), _row("a", "triton", 2.0)])
    with pytest.raises(ValueError, match="has two rows for a triton B1 64x64 bfloat16 fwd"):
        bench_compare.compare(path, path)
