"""bench/gpu_check.sh, dry run: every tier's wiring on a machine without a GPU. The GPU
commands are echoed; argument handling, the precompiled cache's install and key check, the
order and headline steps, the summary and what comes back under $OUT run for real. Each tier
must stay inside its 8-minute budget and the device tool's limit of 8 returned files."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import archive_with_manifest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"
TIERS = {
    "verify": ["gpu", "install", "triton_cache", "info", "check", "smoke", "cache_report"],
    "measure": ["gpu", "install", "triton_cache", "info", "bench", "order", "headline"],
    "deep-tests": ["gpu", "install", "triton_cache", "info", "pytest_gpu"],
    "deep-sanitize": ["gpu", "install", "triton_cache", "info", "memcheck", "racecheck"],
    "deep-profile": ["gpu", "install", "triton_cache", "info", "profile_sana", "profile_ldm_unet",
                     "profile_stylegan2"],
}
TIER_BUDGET_S = 8 * 60
MAX_RETURNED_FILES = 8

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run stands in for the GPU")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A prepared folder as bench/prepare_gpu_artifacts.sh makes it, for this Triton and one op."""
    folder = tmp_path_factory.mktemp("artifacts")
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "fastgen.cli", "precompile", "build", "--op", "trms2d", "--jobs", "2",
                    "--cache-dir", str(folder / "built"), "--out", str(folder / "triton-cache-sm90.tar.xz")],
                   env=environment, check=True, capture_output=True, timeout=900)
    return folder


def _results_file(path: Path) -> Path:
    meta = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "commit": "abc1234", "quick": True}
    rows = []
    for impl, ms in (("eager", 3.0), ("compile", 2.0), ("triton", 1.0), ("cuda", 1.5)):
        rows.append({"name": "trms2d", "impl": impl, "shape": "B1 C128 1024px", "dtype": "bfloat16",
                     "direction": "fwd", "ms": ms, "ms_p20": ms, "ms_p80": ms, "gbps": 100 / ms,
                     "fraction_of_ceiling": 0.03 / ms, "speedup_vs_eager": 3.0 / ms, "max_abs_err": 0.0,
                     "status": "ok"})
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def _dry_run(tier: str, tmp_path: Path, artifacts: Path) -> tuple:
    out = tmp_path / "out"
    environment = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "ARTIFACTS": str(artifacts),
                   "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"), "PYTHON": sys.executable,
                   "DRY_RUN_RESULTS": str(_results_file(tmp_path / "results-h100.json"))}
    result = subprocess.run(["bash", str(SCRIPT), tier], capture_output=True, text=True, env=environment,
                            cwd=tmp_path, timeout=600)
    return result, out


def _summary_rows(out: Path) -> dict:
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 4 and not line.startswith("commit "):
            rows[fields[0]] = fields[1:]
    return rows


@pytest.mark.parametrize("tier", list(TIERS))
def test_every_tier_runs_its_steps_within_budget(tier, tmp_path, artifacts):
    result, out = _dry_run(tier, tmp_path, artifacts)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert "DRY RUN" in result.stdout
    rows = _summary_rows(out)
    assert list(rows) == TIERS[tier], rows
    assert all(exit_code == "0" for exit_code, *_ in rows.values()), rows
    assert sum(int(limit) for *_, limit in rows.values()) <= TIER_BUDGET_S
    # The precompiled cache was really installed, with its key checked against this Triton.
    assert list((tmp_path / "triton-cache").glob("*/__grp__*.json"))
    assert "kernel variants for sm_90" in (out / "gpu_check.log").read_text()
    returned = [p for p in out.rglob("*") if p.is_file()]
    assert len(returned) <= MAX_RETURNED_FILES, returned
    assert all(len(p.relative_to(out).parts) <= 3 for p in returned), returned


def test_measure_writes_the_order_and_the_headline(tmp_path, artifacts):
    result, out = _dry_run("measure", tmp_path, artifacts)
    assert result.returncode == 0, result.stdout[-5000:]
    assert json.loads((out / "results.json").read_text())["rows"][0]["name"] == "trms2d"
    assert re.search(r"trms2d\s.*triton", (out / "order.txt").read_text())
    assert "trms2d" in (out / "headline.md").read_text()


def test_a_cache_for_another_triton_fails_its_step_and_the_tier_goes_on(tmp_path, artifacts):
    forged = tmp_path / "forged"
    forged.mkdir()
    archive_with_manifest(artifacts / "triton-cache-sm90.tar.xz", forged / "triton-cache-sm90.tar.xz",
                          triton_key="0" * 16)
    result, out = _dry_run("verify", tmp_path, forged)
    assert result.returncode == 1
    rows = _summary_rows(out)
    assert rows["triton_cache"][0] == "1" and rows["smoke"][0] == "0", rows
    assert "every lookup would miss" in result.stdout


def test_an_unknown_tier_is_refused():
    result = subprocess.run(["bash", str(SCRIPT), "everything"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "usage: bash bench/gpu_check.sh verify|measure" in result.stderr


def test_the_default_compile_cases_are_few_and_all_exist():
    """Each cold torch.compile baseline costs seconds to a minute of the measure tier's budget:
    the default selects one case of each of a few ops, and every one of them exists."""
    from fastgen import bench
    from fastgen.bench import harness

    line = next(line for line in SCRIPT.read_text().splitlines() if line.startswith("COMPILE_CASES="))
    regex = subprocess.run(["bash", "-c", f'{line}; printf %s "$COMPILE_CASES"'], capture_output=True, text=True,
                           check=True).stdout
    selected = harness.select(bench.benchmarks(quick=True), compile_filter=regex)
    compiled = [(b.name, case.shape) for b, case, names in selected if "compile" in names]
    assert 1 <= len(compiled) <= 8, compiled
    assert len({name for name, _ in compiled}) == len(compiled), compiled
    named = re.findall(r"[(|]([a-z_0-9]+) ", regex)
    assert sorted(named) == sorted(name for name, _ in compiled), (named, compiled)
