"""Model benchmark declarations: they build on the meta device and their tiny versions run
through the harness on CPU with every impl agreeing with eager."""
import time

import pytest
import torch

from fastgen import bench
from fastgen.bench import harness, models_flux, models_sana, models_sd3
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


def test_mmdit_steps_are_declared_with_their_block_slices():
    """The full suite times the whole networks; the quick one a few blocks, as the label says."""
    full = {b.name: b.cases[0].shape for b in bench.benchmarks(quick=False)}
    quick = {b.name: b.cases[0].shape for b in bench.benchmarks(quick=True)}
    for name in ("model.flux-dev.step", "model.sd3.5-large.step"):
        assert "blocks" not in full[name] and "1024 px" in full[name] and "4096 image" in full[name]
    assert quick["model.flux-dev.step"].endswith("2 of 19 double + 4 of 38 single blocks")
    assert quick["model.sd3.5-large.step"].endswith("4 of 38 blocks")


def _joint_attention_flops(batch, tokens, dim, attentions):
    return 4 * batch * tokens ** 2 * dim * attentions


def test_flux_step_flops_are_the_block_matmuls_and_attention():
    """Per token, a double-stream block multiplies by 12 C^2 weights in its stream (q, k, v, out:
    4 C^2; MLP: 8 C^2), a single-stream block by 12 C^2 too (q, k, v: 3; MLP in: 4; out: 5)."""
    work = models_flux.benchmarks(quick=False)[0].cases[0].work
    config = models_flux.flux.CONFIGS["flux-dev"]
    dim, tokens, blocks = config.hidden_size, 4096 + 512, config.num_layers + config.num_single_layers
    expected = 2 * 12 * dim ** 2 * tokens * blocks + _joint_attention_flops(1, tokens, dim, blocks)
    assert work == pytest.approx(expected, rel=0.01)


def test_sd3_step_flops_are_the_block_matmuls_and_attention():
    """Per token, a joint block multiplies by 12 C^2 weights; the last block's text stream skips
    its output projection and MLP (9 C^2 less per text token)."""
    work = models_sd3.benchmarks(quick=False)[0].cases[0].work
    config = models_sd3.sd3.CONFIGS["sd3.5-large"]
    dim, image, text = config.hidden_size, 4096, 333
    matmuls = 2 * 2 * dim ** 2 * (12 * (image + text) * config.num_layers - 9 * text)
    expected = matmuls + _joint_attention_flops(2, image + text, dim, config.num_layers)
    assert work == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("module, blocks", [(models_flux, (1, 1)), (models_sd3, 2)], ids=["flux", "sd3"])
def test_tiny_mmdit_benchmarks_run_and_agree_on_cpu(tmp_path, module, blocks):
    # A few text tokens: the Triton interpreter runs the attention of every fast row.
    benches = module.benchmarks(config_name="tiny", side=4, blocks=blocks, text_tokens=6)
    rows, _, _ = harness.run(benches, quick=True, out_dir=tmp_path, device="cpu", no_compile=True,
                             timer=_one_call_timer)
    assert {r["impl"] for r in rows} == {"eager", *FAST_BACKENDS}
    assert all(r["status"] == "ok" for r in rows if r["impl"] != "cuda"), [r["status"] for r in rows]
