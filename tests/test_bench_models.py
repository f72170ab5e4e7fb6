"""Model benchmark declarations: they build on the meta device and their tiny versions run
through the harness on CPU with every impl agreeing with eager."""
import time

import torch

from fastgen import bench
from fastgen.bench import harness, models_sana
from fastgen.ops.registry import FAST_BACKENDS


def test_full_suite_declares_quickly_without_allocating():
    started = time.perf_counter()
    names = [b.name for b in bench.benchmarks(quick=False)]
    assert "model.sana-1600m.step" in names and "model.sana-1600m.sample20" in names
    assert time.perf_counter() - started < 60


def test_sana_step_flops_match_the_parameter_count():
    """A step's matmul FLOPs are about 2 x parameters x tokens for a DiT (a loose bound that
    catches a FLOP count off by a layer factor)."""
    step = models_sana.benchmarks(quick=True)[0]
    tokens = 2 * 32 * 32
    with torch.device("meta"):
        parameters = sum(p.numel() for p in models_sana.sana.build("sana-1600m").parameters())
    assert 1.5 * parameters * tokens < step.cases[0].work < 3 * parameters * tokens


def _one_call_timer(prepare, reps, warmup):
    """Timings are not the point here (and the interpreter is slow): one call, a nominal 1 ms."""
    prepare()()
    return [1.0]


def test_tiny_sana_benchmarks_run_and_agree_on_cpu(tmp_path):
    benches = models_sana.benchmarks(quick=False, config_name="tiny", side=8, num_steps=2)
    # torch.compile is left out: compiling the tiny model on CPU takes longer than the rest.
    rows, _, paths = harness.run(benches, quick=True, out_dir=tmp_path, device="cpu", no_compile=True,
                                 timer=_one_call_timer)
    assert {(r["name"], r["impl"]) for r in rows} == {
        (name, impl) for name in ("model.tiny.step", "model.tiny.sample2") for impl in ("eager", *FAST_BACKENDS)}
    # The CUDA kernels take CUDA tensors only.
    assert all(r["status"] == "ok" for r in rows if r["impl"] != "cuda"), [r["status"] for r in rows]
    assert all(r["status"].startswith("skipped: BackendUnavailable") for r in rows if r["impl"] == "cuda")
    assert paths["json"].exists()
