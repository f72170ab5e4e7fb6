"""The benchmark harness end to end on CPU (wall-clock timer injected, tiny cases), the shortcut
benchmark declarations, and fastgen.sysinfo."""
import argparse
import csv
import json
import re
import sys
import time
import types

import pytest
import torch

import fastgen
from fastgen import bench, sysinfo
from fastgen.bench import harness, ops_shortcut
from fastgen.ops import shortcut

# ---------------------------------------------------------------- a toy benchmark with known faults


def _scale_add(x, residual, alpha):
    return x * alpha + residual


class _WrongGradient(torch.autograd.Function):
    """The right forward with a backward twice too large: only a fwd+bwd check can catch it."""

    @staticmethod
    def forward(ctx, x, residual, alpha):
        ctx.alpha = alpha
        return x * alpha + residual

    @staticmethod
    def backward(ctx, grad):
        return grad * (2 * ctx.alpha), grad, None


def _raise(exc):
    def fn(**_):
        raise exc

    return fn


def _toy_case(direction, side=8, dtype=torch.float32, seeds=None):
    def make_inputs(device, dtype, seed):
        if seeds is not None:
            seeds.append(seed)
        generator = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(2, 4, side, side, generator=generator, device=device, dtype=dtype)
        return {"x": x, "residual": torch.randn(x.shape, generator=generator, device=device, dtype=dtype), "alpha": 1.5}

    elements = 2 * 4 * side * side
    moved = 3 * elements if direction == "fwd" else 6 * elements  # + read dy, write dx and dresidual
    return harness.Case(f"{side}x{side}", dtype, direction, make_inputs, moved * dtype.itemsize)


def _sleepy(**kwargs):
    time.sleep(0.002)
    return _scale_add(**kwargs)


TOY_IMPLS = {
    "eager": harness.Impl(lambda case: _scale_add),
    "same": harness.Impl(lambda case: lambda x, residual, alpha: torch.add(x * alpha, residual), backend="reference"),
    "slow": harness.Impl(lambda case: _sleepy),
    "off_by_one": harness.Impl(lambda case: lambda **kw: _scale_add(**kw) + 1),
    "wrong_grad": harness.Impl(lambda case: _WrongGradient.apply),
    "crashes": harness.Impl(lambda case: _raise(RuntimeError("kernel exploded\nsecond line"))),
    "unavailable": harness.Impl(lambda case: _raise(fastgen.BackendUnavailable("no such GPU here"))),
    "peer_missing": harness.Impl(lambda case: _raise(ModuleNotFoundError("No module named 'flash_attn'"))),
}


def _toy(name="toy", cases=None, impls=TOY_IMPLS, bound="memory"):
    cases = cases or [_toy_case("fwd"), _toy_case("fwd+bwd")]
    return harness.Benchmark(name, cases, impls, bound)


class RecordingTimer:
    """The wall-clock timer, recording how the harness drives it."""

    def __init__(self):
        self.calls = []

    def __call__(self, prepare, reps, warmup):
        self.calls.append((reps, warmup))
        return harness.wall_clock_timer(prepare, reps, warmup)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    timer = RecordingTimer()
    rows, meta, paths = harness.run([_toy()], quick=True, out_dir=out, timer=timer, device="cpu")
    return rows, meta, paths, timer


def _by(rows, impl, direction):
    (row,) = [r for r in rows if r["impl"] == impl and r["direction"] == direction]
    return row


# ---------------------------------------------------------------- rows


def test_every_row_has_exactly_the_design_fields_in_order(toy_run):
    rows = toy_run[0]
    assert len(rows) == 2 * len(TOY_IMPLS)
    for row in rows:
        fields = list(row)
        assert fields == list(harness.ROW_FIELDS[:8]) + ["gbps"] + list(harness.ROW_FIELDS[8:])
        assert row["name"] == "toy" and row["dtype"] == "float32" and row["shape"] == "8x8"


def test_good_impls_are_timed_and_rates_follow_from_the_times(toy_run):
    rows, meta = toy_run[0], toy_run[1]
    case_bytes = {c.direction: c.work for c in _toy().cases}
    for direction in ("fwd", "fwd+bwd"):
        eager = _by(rows, "eager", direction)
        for impl in ("eager", "same", "slow"):
            row = _by(rows, impl, direction)
            assert row["status"] == "ok", row
            assert 0 < row["ms_p20"] <= row["ms"] <= row["ms_p80"]
            assert row["gbps"] == pytest.approx(case_bytes[direction] / row["ms"] / 1e6)
            assert row["fraction_of_ceiling"] == pytest.approx(row["gbps"] / meta["ceilings"]["copy_gbps"])
            assert row["speedup_vs_eager"] == pytest.approx(eager["ms"] / row["ms"])
            assert row["max_abs_err"] is not None and row["max_abs_err"] <= 1e-5
        assert eager["speedup_vs_eager"] == 1.0
        # 2 ms of sleep per call against microseconds of arithmetic: the timer must see it.
        assert _by(rows, "slow", direction)["speedup_vs_eager"] < 0.5


def test_a_wrong_answer_is_an_untimed_error_row(toy_run):
    rows = toy_run[0]
    for direction in ("fwd", "fwd+bwd"):
        row = _by(rows, "off_by_one", direction)
        assert row["status"].startswith("error: MISMATCH vs eager")
        assert row["max_abs_err"] == pytest.approx(1.0)
        assert row["ms"] is None and row["speedup_vs_eager"] is None
    assert _by(rows, "wrong_grad", "fwd")["status"] == "ok"
    assert _by(rows, "wrong_grad", "fwd+bwd")["status"].startswith("error: MISMATCH")


def _running_sum(values):
    """A long sum rounded to the input's dtype at every step: in bfloat16, eager's own error
    against float32 is large."""
    total, sums = torch.zeros_like(values[:, 0]), []
    for column in values.unbind(-1):
        total = total + column
        sums.append(total)
    return torch.stack(sums, -1)


def _running_sum_in_float32(values):
    return values.float().cumsum(-1).to(values.dtype)


def test_low_precision_results_are_held_to_eagers_accuracy_against_float32(tmp_path):
    """bfloat16: an impl that differs from eager elementwise by far more than the dtype's
    tolerance passes when it is as accurate against eager-in-float32 as eager itself is (here:
    more accurate); one 5% off fails with both relative errors in the status."""
    def make_inputs(device, dtype, seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        return {"values": torch.rand(4, 300, generator=generator, device=device).to(dtype)}

    case = harness.Case("4x300", torch.bfloat16, "fwd", make_inputs, 4 * 300 * 4)
    impls = {
        "eager": harness.Impl(lambda case: _running_sum),
        "fp32_accumulation": harness.Impl(lambda case: _running_sum_in_float32),
        "five_percent_off": harness.Impl(lambda case: lambda values: _running_sum_in_float32(values) * 1.05),
    }
    rows, _, _ = harness.run([harness.Benchmark("sum", [case], impls)], quick=True, out_dir=tmp_path,
                             timer=harness.wall_clock_timer, device="cpu")
    accurate, off = _by(rows, "fp32_accumulation", "fwd"), _by(rows, "five_percent_off", "fwd")
    eager_output = _running_sum(make_inputs("cpu", torch.bfloat16, 0)["values"]).float()
    elementwise_tolerance = 1.6e-2 * (1 + eager_output.abs().max().item())
    assert accurate["max_abs_err"] > elementwise_tolerance  # the old elementwise check would fail it
    assert accurate["status"] == "ok"
    assert off["status"].startswith("error: MISMATCH vs eager: result 0: relative error vs float32")
    assert "eager's" in off["status"]


def test_raising_impls_become_error_or_skipped_rows(toy_run):
    rows = toy_run[0]
    for direction in ("fwd", "fwd+bwd"):
        assert _by(rows, "crashes", direction)["status"] == "error: RuntimeError: kernel exploded"
        assert _by(rows, "unavailable", direction)["status"] == "skipped: BackendUnavailable: no such GPU here"
        assert _by(rows, "peer_missing", direction)["status"].startswith("skipped: ModuleNotFoundError")
        assert _by(rows, "crashes", direction)["ms"] is None


def test_timer_gets_a_warm_up_and_reps_within_the_budget(toy_run):
    timer = toy_run[3]
    timed_rows = 3 * 2 + 1  # eager, same, slow in both directions; wrong_grad in fwd only
    assert len(timer.calls) == 2 * (2 + timed_rows)  # a probe and a measurement each, ceilings first
    probes, measurements = timer.calls[::2], timer.calls[1::2]
    assert all(warmup > 0 for _, warmup in probes)
    assert all(warmup == 0 and 10 <= reps <= 100 for reps, warmup in measurements)


def test_wall_clock_timer_warms_up_untimed_then_times_each_call():
    log = []

    def prepare():
        log.append("prepare")
        return lambda: (log.append("call"), time.sleep(0.001))

    times = harness.wall_clock_timer(prepare, reps=4, warmup=3)
    assert log == ["prepare", "call"] * 7
    assert len(times) == 4 and all(t >= 1.0 for t in times)


def test_cuda_event_timer_brackets_only_the_call(monkeypatch):
    """The GPU timer's protocol, on CPU: events stand in for CUDA's."""
    log = []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            log.append("record")
            self.at = time.perf_counter()

        def elapsed_time(self, end):
            return (end.at - self.at) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: log.append("synchronize"))

    def prepare():
        log.append("prepare")
        return lambda: (log.append("call"), time.sleep(0.001))

    times = harness.cuda_event_timer(prepare, reps=2, warmup=1)
    assert log == ["prepare", "call"] + ["prepare", "record", "call", "record"] * 2 + ["synchronize"]
    assert len(times) == 2 and all(t >= 1.0 for t in times)


def test_gpu_meta_comes_from_the_nvml_entry_of_the_torch_device(monkeypatch):
    props = types.SimpleNamespace(uuid="5c57ee15-34b0", name="torch's name", major=9, minor=0,
                                  multi_processor_count=132, total_memory=80 * 2**30, L2_cache_size=50 * 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    other = {"uuid": "GPU-1111", "name": "NVIDIA A100", "driver": "1", "sm_clock_max_mhz": 1, "mem_clock_max_mhz": 1}
    this = {"uuid": "GPU-5C57EE15-34B0", "name": "NVIDIA H100 80GB HBM3", "driver": "580.159.04",
            "sm_clock_max_mhz": 1980, "mem_clock_max_mhz": 2619}
    monkeypatch.setattr(sysinfo, "gpus", lambda: [other, this])
    meta = harness.collect_meta(torch.device("cuda"))
    assert (meta["gpu"], meta["driver"], meta["sm_count"], meta["compute_capability"]) == (
        "NVIDIA H100 80GB HBM3", "580.159.04", 132, "9.0")
    assert meta["sm_clock_max_mhz"] == 1980 and meta["memory_total_gib"] == 80.0
    assert meta["cache_bytes"] == 50 * 2**20
    monkeypatch.setattr(sysinfo, "gpus", lambda: [])
    assert harness.collect_meta(torch.device("cuda"))["gpu"] == "torch's name"


def test_calls_rotate_through_input_copies_and_clear_gradients(tmp_path):
    seeds, seen, stale_grads = [], set(), []

    def probe(x, residual, alpha):
        seen.add(x.data_ptr())
        stale_grads.append(x.grad is not None)
        return _scale_add(x, residual, alpha)

    impls = {"eager": harness.Impl(lambda case: _scale_add), "probe": harness.Impl(lambda case: probe)}
    case = _toy_case("fwd+bwd", side=64, seeds=seeds)
    rows, _, _ = harness.run([_toy(cases=[case], impls=impls)], quick=True, out_dir=tmp_path, device="cpu",
                             timer=harness.wall_clock_timer)
    assert all(row["status"] == "ok" for row in rows)
    set_bytes = 3 * (2 * 4 * 64 * 64) * 4  # x, residual and the gradient fed to backward, float32
    copies = -(-2 * harness._CPU_CACHE_BYTES // set_bytes)
    assert sorted(seeds) == list(range(copies)) and copies > 1
    assert len(seen) == copies, "every input copy is used"
    assert not any(stale_grads), "input gradients are cleared before every call"


def test_eager_failure_fails_the_whole_case(tmp_path):
    impls = {"eager": harness.Impl(lambda case: _raise(ValueError("bad reference"))), "same": TOY_IMPLS["same"]}
    rows, _, _ = harness.run([_toy(cases=[_toy_case("fwd")], impls=impls)], quick=True, out_dir=tmp_path,
                             device="cpu")
    assert [row["status"].startswith("error") for row in rows] == [True, True]
    assert "bad reference" in rows[0]["status"]


def test_compute_bound_rows_report_tflops(tmp_path):
    case = _toy_case("fwd")
    impls = {"eager": TOY_IMPLS["eager"]}
    rows, meta, _ = harness.run([_toy(cases=[case], impls=impls, bound="compute")], quick=True,
                                out_dir=tmp_path, device="cpu")
    (row,) = rows
    assert "tflops" in row and "gbps" not in row
    assert row["tflops"] == pytest.approx(case.work / row["ms"] / 1e9)
    assert row["fraction_of_ceiling"] == pytest.approx(row["tflops"] / meta["ceilings"]["bf16_matmul_tflops"])


# ---------------------------------------------------------------- files, table, progress


def test_json_and_csv_hold_the_rows_and_meta(toy_run):
    rows, meta, paths = toy_run[0], toy_run[1], toy_run[2]
    assert paths["json"].name == f"{meta['timestamp'][:10]}-{meta['commit'][:7]}.json"
    saved = json.loads(paths["json"].read_text())
    assert saved["rows"] == rows
    for key in ("gpu", "driver", "torch", "triton", "cuda", "commit", "timestamp", "ceilings"):
        assert key in saved["meta"]
    assert saved["meta"]["gpu"] == "cpu" and saved["meta"]["torch"] == torch.__version__
    assert saved["meta"]["ceilings"]["copy_gbps"] > 0 and saved["meta"]["ceilings"]["bf16_matmul_tflops"] > 0
    with paths["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows)
    for line, row in zip(table, rows):
        assert line["impl"] == row["impl"] and line["status"] == row["status"]
        assert line["commit"] == meta["commit"]
        assert float(line["ceilings.copy_gbps"]) == pytest.approx(meta["ceilings"]["copy_gbps"])
        assert line["tflops"] == ""
        if row["ms"] is not None:
            assert float(line["ms"]) == pytest.approx(row["ms"])


def test_a_second_run_does_not_overwrite_the_first(tmp_path):
    meta = {"gpu": "cpu", "timestamp": "2026-01-02T03:04:05+00:00", "commit": "0123456789abcdef", "ceilings": {}}
    first = harness.write_results([], meta, tmp_path)
    second = harness.write_results([], meta, tmp_path)
    assert first["json"].name == "2026-01-02-0123456.json"
    assert second["json"].name == "2026-01-02-0123456-2.json" and first["json"].exists()


def test_markdown_table_has_a_line_per_case_and_lists_failures(toy_run):
    table = harness.markdown_table(toy_run[0])
    lines = table.splitlines()
    assert lines[0].startswith("| op | shape | dtype | direction | eager ms | same ms |")
    case_lines = [line for line in lines if line.startswith("| toy |")]
    assert len(case_lines) == 2
    fwd_cells = [cell.strip() for cell in case_lines[0].strip("|").split("|")]
    assert fwd_cells[:4] == ["toy", "8x8", "float32", "fwd"]
    assert fwd_cells[4].endswith("(1.00x)")
    assert "**MISMATCH**" in case_lines[0] and "**ERROR**" in case_lines[0] and "skip" in case_lines[0]
    assert "- toy 8x8 float32 fwd crashes: error: RuntimeError: kernel exploded" in lines
    assert any("no such GPU here" in line for line in lines)


def test_best_fastgen_column_names_the_fast_backend(tmp_path):
    impls = {"eager": TOY_IMPLS["eager"], "triton": TOY_IMPLS["same"], "cuda": TOY_IMPLS["unavailable"]}
    rows, _, _ = harness.run([_toy(cases=[_toy_case("fwd")], impls=impls)], quick=True, out_dir=tmp_path,
                             device="cpu")
    line = harness.markdown_table(rows).splitlines()[2]
    fraction = _by(rows, "triton", "fwd")["fraction_of_ceiling"]
    assert line.endswith(f"| triton {fraction:.0%} |")


def test_progress_prints_one_counted_line_per_row(tmp_path, capsys):
    rows, _, _ = harness.run([_toy()], quick=True, out_dir=tmp_path, device="cpu")
    out = capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert len(progress) == len(rows)
    assert progress[0].startswith(f"[1/{len(rows)}] toy 8x8 float32 fwd eager: ")
    assert progress[-1].startswith(f"[{len(rows)}/{len(rows)}] toy 8x8 float32 fwd+bwd peer_missing: skipped")
    assert "| toy | 8x8 | float32 | fwd |" in out


# ---------------------------------------------------------------- selection and the command line


def test_filter_and_impl_selection():
    benches = [_toy("alpha"), _toy("beta", cases=[_toy_case("fwd", side=4)])]

    def picked(**kwargs):
        return [(b.name, c.shape, c.direction, names) for b, c, names in harness.select(benches, **kwargs)]

    assert len(picked()) == 3
    assert [p[:3] for p in picked(filter="beta")] == [("beta", "4x4", "fwd")]
    assert [p[:3] for p in picked(filter=r"^alpha 8x8 float32 fwd$")] == [("alpha", "8x8", "fwd")]
    assert {p[3] == ["eager", "same"] for p in picked(impls=["same"])} == {True}, "eager always runs"
    with pytest.raises(ValueError, match="no benchmark case matches"):
        harness.select(benches, filter="gamma")
    with pytest.raises(ValueError, match="unknown impl"):
        harness.select(benches, impls=["warp_drive"])
    with pytest.raises(ValueError, match="not a regular expression"):
        harness.select(benches, filter="(")


def test_no_compile_drops_the_compile_baseline():
    impls = harness.standard_impls("pixel_unshuffle_channel_avg", shortcut.pixel_unshuffle_channel_avg,
                                   shortcut.pixel_unshuffle_channel_avg_reference)
    assert list(impls) == ["eager", "compile", "triton", "cuda"]
    assert [impls[name].backend for name in impls] == [None, None, "triton", "cuda"]
    toy = _toy(impls=impls, cases=[_toy_case("fwd")])
    ((_, _, names),) = harness.select([toy], no_compile=True)
    assert names == ["eager", "triton", "cuda"]


def test_compile_filter_keeps_the_compile_baseline_only_in_matching_cases():
    impls = {"eager": TOY_IMPLS["eager"], "compile": TOY_IMPLS["same"], "triton": TOY_IMPLS["same"]}
    benches = [_toy("alpha", impls=impls), _toy("beta", impls=impls, cases=[_toy_case("fwd", side=4)])]

    def compiled(**kwargs):
        return [(b.name, c.shape, c.direction) for b, c, names in harness.select(benches, **kwargs)
                if "compile" in names]

    assert len(compiled()) == 3
    assert compiled(compile_filter=r"^alpha .* fwd\+bwd$") == [("alpha", "8x8", "fwd+bwd")]
    assert compiled(compile_filter="4x4") == [("beta", "4x4", "fwd")]
    assert compiled(filter="alpha", compile_filter="beta") == [], "the case filter applies first"
    assert len(harness.select(benches, compile_filter="nothing matches")) == 3, "every case still runs"
    with pytest.raises(ValueError, match="compile_filter .* is not a regular expression"):
        harness.select(benches, compile_filter="(")
    with pytest.raises(ValueError, match="--no-compile and --compile-filter exclude each other"):
        harness.select(benches, no_compile=True, compile_filter="alpha")


def test_standard_impls_time_the_backends_the_op_registers(monkeypatch):
    monkeypatch.delitem(fastgen.OPS["trms2d"].implementations, "cuda")
    impls = harness.standard_impls("trms2d", lambda **kw: None, lambda **kw: None)
    assert list(impls) == ["eager", "compile", "triton"]
    with pytest.raises(ValueError, match="'trms3d' is not a registered op"):
        harness.standard_impls("trms3d", lambda **kw: None, lambda **kw: None)


def test_command_line_arguments():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--filter", "1024px", "--quick", "--out", "somewhere", "--impl", "triton",
                              "--impl", "cuda", "--no-compile", "--compile-filter", "bf16"])
    assert (args.filter, args.quick, str(args.out), args.impl, args.no_compile, args.compile_filter) == (
        "1024px", True, "somewhere", ["triton", "cuda"], True, "bf16")
    defaults = parser.parse_args([])
    assert (defaults.filter, defaults.quick, defaults.out, defaults.impl, defaults.no_compile,
            defaults.compile_filter) == (None, False, None, None, False, None)


def test_no_compile_with_a_compile_filter_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the options are refused before any timing
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run_from_args(parser.parse_args(["--no-compile", "--compile-filter", "bfloat16"])) == 2
    error = capsys.readouterr().err
    assert error.startswith("fastgen bench: --no-compile and --compile-filter exclude each other")
    assert error.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_run_from_args_without_a_gpu_runs_nothing(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run_from_args(parser.parse_args(["--quick"])) == 2
    assert "need a CUDA GPU" in capsys.readouterr().err


# ---------------------------------------------------------------- the DC-AE shortcut declarations


def _y_shape(layer, batch):
    op = getattr(shortcut, layer.op)
    x = torch.empty(batch, layer.in_channels, layer.side, layer.side, device="meta")
    return tuple(op(x, layer.factor, layer.out_channels).shape)  # the op's own shape rules


def test_every_declared_shortcut_is_a_valid_call_of_the_op():
    layers = {c[0] for c in ops_shortcut._cases(quick=False) + ops_shortcut._cases(quick=True)}
    for layer in layers:
        assert _y_shape(layer, 1) == (1, layer.out_channels, layer.out_side, layer.out_side)
    sides = {layer.side for layer in layers}
    channels = {layer.in_channels for layer in layers} | {layer.out_channels for layer in layers}
    assert min(sides) == 16 and max(sides) == 2048 and channels == {32, 128, 256, 512, 1024}


@pytest.mark.parametrize("op", [ops_shortcut._UNSHUFFLE, ops_shortcut._DUPLICATE])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_declared_bytes_are_one_read_of_each_input_and_one_write_of_each_output(op, residual, direction):
    layer = ops_shortcut._Shortcut(op, 8, 16, 2, 8) if op == ops_shortcut._UNSHUFFLE else \
        ops_shortcut._Shortcut(op, 16, 8, 2, 4)
    case = ops_shortcut._case(layer, 2, residual, torch.float16, direction)
    inputs = case.make_inputs(torch.device("cpu"), torch.float16, 0)
    x, r = inputs["x"], inputs["residual"]
    y_bytes = 2 * torch.Size(_y_shape(layer, 2)).numel()
    fwd = x.nbytes + (r.nbytes if residual else 0) + y_bytes
    assert (r is not None) == residual and x.dtype == torch.float16
    assert case.work == (fwd if direction == "fwd" else fwd + y_bytes + x.nbytes)


def test_quick_suite_is_small_and_bf16_with_residual():
    for quick, lo, hi in ((True, 5, 20), (False, 100, 400)):
        cases = [c for b in ops_shortcut.benchmarks(quick) for c in b.cases]
        assert lo <= len(cases) <= hi
    quick_cases = [c for b in ops_shortcut.benchmarks(True) for c in b.cases]
    assert {(c.dtype, c.shape.endswith("+res")) for c in quick_cases} == {(torch.bfloat16, True)}
    assert {c.shape for c in quick_cases} >= {"B1 C128->256 f2 1024px +res", "B1 C1024->32 f1 32px +res",
                                              "B1 C1024->32 f1 64px +res"}


def test_shortcut_suite_runs_on_cpu_with_compile_and_skips_cuda(tmp_path):
    rows, _, paths = bench.run(filter=r"C1024->32 f1 32px", quick=True, out_dir=tmp_path, impls=["compile", "cuda"],
                               timer=RecordingTimer(), device="cpu")
    assert len(rows) == 6
    assert {(r["name"], r["direction"]) for r in rows} == {
        ("pixel_unshuffle_channel_avg", "fwd"), ("pixel_unshuffle_channel_avg", "fwd+bwd")}
    for row in rows:
        if row["impl"] == "cuda":
            assert row["status"].startswith("skipped: BackendUnavailable"), row
        else:
            assert row["status"] == "ok" and row["gbps"] > 0, row
    assert paths["json"].exists()


# ---------------------------------------------------------------- sysinfo


def test_versions_has_every_key():
    info = sysinfo.versions()
    assert set(info) == {"python", "torch", "triton", "cuda", "fastgen", "commit", "commit_dirty"}
    assert info["torch"] == torch.__version__ and info["cuda"] == torch.version.cuda
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", info["commit"])
    assert isinstance(info["commit_dirty"], bool)


def test_commit_can_be_given_by_the_environment(monkeypatch):
    monkeypatch.setenv("FASTGEN_COMMIT", "f" * 40)
    assert sysinfo.versions()["commit"] == "f" * 40


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_gpus_is_empty_without_a_gpu(capsys):
    assert sysinfo.gpus() == []
    assert capsys.readouterr() == ("", "")


class _FakeNVMLError(Exception):
    pass


def _fake_pynvml(init_error=None):
    def unsupported(*_):
        raise _FakeNVMLError("not supported")

    def init():
        if init_error:
            raise init_error

    return types.SimpleNamespace(
        NVMLError=_FakeNVMLError, NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2,
        nvmlInit=init, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"handle{i}",
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetUUID=lambda h: "GPU-0000",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=80 * 2**30),
        nvmlSystemGetDriverVersion=lambda: "580.159.04",
        nvmlDeviceGetMaxClockInfo=lambda h, kind: 1980 if kind == 1 else unsupported(),
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0),
    )


def test_gpus_reads_nvml_and_blanks_only_unsupported_fields(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    (gpu,) = sysinfo.gpus()
    assert gpu == {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-0000", "memory_total_gib": 80.0,
                   "driver": "580.159.04", "sm_count": None, "sm_clock_max_mhz": 1980, "mem_clock_max_mhz": None,
                   "compute_capability": "9.0"}


def test_gpus_is_empty_when_nvml_cannot_start(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(init_error=_FakeNVMLError("driver not loaded")))
    assert sysinfo.gpus() == []


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ("NVIDIA H200", "nvidia-h200"),
    ("NVIDIA A100-SXM4-40GB", "nvidia-a100-sxm4-40gb"),
    ("  Tesla T4 (rev. 2) ", "tesla-t4-rev-2"),
    ("cpu", "cpu"),
    ("???", "unknown"),
])
def test_gpu_slug(name, slug):
    assert sysinfo.gpu_slug(name) == slug


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_harness_on_the_gpu_with_cuda_events(tmp_path):
    cases = [_toy_case(direction, side=256, dtype=dtype) for direction in ("fwd", "fwd+bwd")
             for dtype in (torch.float32, torch.bfloat16)]
    impls = {name: TOY_IMPLS[name] for name in ("eager", "same", "off_by_one")}
    rows, meta, _ = harness.run([_toy(cases=cases, impls=impls)], quick=True, out_dir=tmp_path)
    assert meta["gpu"] != "cpu" and meta["sm_count"] > 0
    assert meta["cache_bytes"] == torch.cuda.get_device_properties(0).L2_cache_size
    assert meta["ceilings"]["copy_gbps"] > 100 and meta["ceilings"]["bf16_matmul_tflops"] > 10
    for row in rows:
        if row["impl"] == "off_by_one":
            assert row["status"].startswith("error: MISMATCH")
        else:
            assert row["status"] == "ok" and 0 < row["ms_p20"] <= row["ms"] <= row["ms_p80"]
