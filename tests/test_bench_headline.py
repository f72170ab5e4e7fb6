"""`fastgen bench headline`: the README's results table from result files."""
import argparse
import json
import math

import pytest

from fastgen.bench import headline

META = {"gpu": "NVIDIA H100 80GB HBM3", "commit": "abc1234", "timestamp": "2026-11-22T23:00:00+00:00",
        "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0"}


def _row(name, impl, shape, ms, status="ok", fraction=None, direction="fwd"):
    ok = status == "ok"
    return {"name": name, "impl": impl, "shape": shape, "dtype": "bfloat16", "direction": direction,
            "ms": ms if ok else None, "ms_p20": ms if ok else None, "ms_p80": ms if ok else None,
            "fraction_of_ceiling": fraction, "speedup_vs_eager": None, "status": status}


ROWS = [
    # trms2d: case a, triton is the best fastgen impl (cuda slower); case b, cuda is.
    _row("trms2d", "eager", "a", 4.0), _row("trms2d", "compile", "a", 2.0),
    _row("trms2d", "triton", "a", 1.0, fraction=0.8), _row("trms2d", "cuda", "a", 2.0, fraction=0.4),
    _row("trms2d", "eager", "b", 9.0), _row("trms2d", "compile", "b", 3.0),
    _row("trms2d", "triton", "b", 3.0, fraction=0.5), _row("trms2d", "cuda", "b", 1.0, fraction=0.9),
    # a case no fastgen impl timed, and one where an impl was wrong
    _row("trms2d", "eager", "c", 1.0), _row("trms2d", "triton", "c", None, status="skipped: no"),
    _row("trms2d", "eager", "d", 1.0), _row("trms2d", "triton", "d", None, status="error: MISMATCH vs eager"),
    _row("model.sd15.step", "eager", "", 30.0), _row("model.sd15.step", "triton", "", 20.0, fraction=0.5),
]


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "h100.json"
    path.write_text(json.dumps({"meta": META, "rows": ROWS}))
    return path


def test_table_summarises_each_benchmark_over_its_cases(results, capsys):
    assert headline.run_from_args(argparse.Namespace(results=[results], readme=None)) == 0
    out = capsys.readouterr().out
    assert "**NVIDIA H100 80GB HBM3**, commit `abc1234`, 2026-11-22" in out
    lines = [line for line in out.splitlines() if line.startswith("| trms2d") or line.startswith("| model.")]
    assert [line.split(" | ")[0] for line in lines] == ["| trms2d", "| model.sd15.step"]  # ops before models
    # best fastgen: case a triton 1 ms (4x eager, 2x compile), case b cuda 1 ms (9x, 3x)
    eager = math.sqrt(4 * 9)
    assert lines[0] == (f"| trms2d | 4 | {eager:.2f}x (4.00-9.00) | {math.sqrt(6):.2f}x (2.00-3.00) | 85% | 2 / 1 |")
    assert lines[1] == "| model.sd15.step | 1 | 1.50x | - | 50% | 0 / 0 |"


def test_readme_section_is_replaced_between_the_markers(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Results\n\n{headline.START}\nnothing measured yet\n{headline.END}\n\n## Next\n")
    assert headline.run_from_args(argparse.Namespace(results=[results, results], readme=readme)) == 0
    text = readme.read_text()
    assert "nothing measured yet" not in text and text.count("| trms2d |") == 2
    assert text.startswith("# x\n\n## Results\n\n" + headline.START) and text.endswith(headline.END + "\n\n## Next\n")


def test_bad_inputs_are_refused(results, tmp_path, capsys):
    no_markers = tmp_path / "README.md"
    no_markers.write_text("# x\n")
    assert headline.run_from_args(argparse.Namespace(results=[results], readme=no_markers)) == 2
    assert "headline:start" in capsys.readouterr().err
    assert no_markers.read_text() == "# x\n"
    not_results = tmp_path / "x.json"
    not_results.write_text("{}")
    assert headline.run_from_args(argparse.Namespace(results=[not_results], readme=None)) == 2


def test_the_project_readme_has_the_markers():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert headline.replace_section(text, "TABLE").count("TABLE") == 1
