"""`fastgen bench order`: ranking backends from a result file, and the registry following it."""
import argparse
import json
import math

import pytest
import torch

from fastgen.bench import order
from fastgen.ops import registry

META = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "commit": "abc1234", "torch": "2.11",
        "triton": "3.6"}


def _row(name, impl, shape, speedup, status="ok", direction="fwd"):
    ok = status == "ok"
    return {"name": name, "impl": impl, "shape": shape, "dtype": "bfloat16", "direction": direction,
            "ms": 1.0 / speedup if ok else None, "ms_p20": 0.9 / speedup if ok else None,
            "ms_p80": 1.1 / speedup if ok else None, "speedup_vs_eager": speedup if ok else None, "status": status}


def _write_results(path, rows, meta=META):
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def _rank(tmp_path, rows):
    from fastgen.bench.compare import load_results

    return {r.op: r for r in order.rank(load_results(_write_results(tmp_path / "r.json", rows), "r")[1])}


@pytest.fixture
def order_file(tmp_path, monkeypatch):
    path = tmp_path / "backend_order.json"
    monkeypatch.setattr(registry, "MEASURED_ORDER_PATH", path)
    registry.measured_orders.cache_clear()
    yield path
    registry.measured_orders.cache_clear()


def test_backends_rank_by_geometric_mean_speedup_over_common_cases(tmp_path):
    rows = [
        _row("trms2d", "eager", "a", 1.0), _row("trms2d", "eager", "b", 1.0),
        _row("trms2d", "triton", "a", 4.0), _row("trms2d", "triton", "b", 1.0),
        _row("trms2d", "cuda", "a", 2.5), _row("trms2d", "cuda", "b", 2.0),
        # Only triton timed case c: it must not count, or triton would be scored on more cases.
        _row("trms2d", "triton", "c", 100.0), _row("trms2d", "cuda", "c", 1.0, status="skipped: no"),
        _row("model.sana-tiny.step", "triton", "a", 9.0),  # not an op: not ranked
    ]
    (ranking,) = _rank(tmp_path, rows).values()
    assert ranking.op == "trms2d" and ranking.cases == 2
    assert ranking.order == ("cuda", "triton")  # sqrt(2.5 * 2) > sqrt(4 * 1)
    assert ranking.geomean_speedup["triton"] == pytest.approx(2.0)
    assert ranking.geomean_speedup["cuda"] == pytest.approx(math.sqrt(5.0))


def test_a_backend_with_a_wrong_answer_ranks_last_however_fast(tmp_path):
    rows = [_row("bias_act", "triton", "a", 1.5), _row("bias_act", "cuda", "a", 3.0),
            _row("bias_act", "cuda", "b", 0.0, status="error: MISMATCH vs eager: result 0"),
            _row("bias_act", "triton", "b", 1.5)]
    ranking = _rank(tmp_path, rows)["bias_act"]
    assert ranking.order == ("triton", "cuda") and ranking.failed == ("cuda",)


def test_a_backend_skipped_everywhere_is_not_ranked(tmp_path):
    rows = [_row("upfirdn2d", "triton", "a", 2.0), _row("upfirdn2d", "cuda", "a", 0.0, status="skipped: not built")]
    assert _rank(tmp_path, rows)["upfirdn2d"].order == ("triton",)


def test_written_orders_drive_auto_and_keep_other_capabilities(tmp_path, order_file, monkeypatch):
    op = registry.OPS["trms2d"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert op.preference(torch.device("cuda")) == tuple(op.default_order)  # nothing measured yet

    rows = [_row("trms2d", "triton", "a", 3.0)]
    args = argparse.Namespace(results=_write_results(tmp_path / "h100.json", rows), write=True)
    assert order.run_from_args(args) == 0
    # triton was measured; cuda (unranked) follows in the default order.
    assert op.preference(torch.device("cuda")) == ("triton",) + tuple(b for b in op.default_order if b != "triton")
    assert op.preference(torch.device("cpu")) == tuple(op.default_order)

    ampere = dict(META, gpu="NVIDIA A100", compute_capability="8.0")
    args = argparse.Namespace(results=_write_results(tmp_path / "a100.json", [_row("trms2d", "cuda", "a", 2.0)],
                                                     ampere), write=True)
    assert order.run_from_args(args) == 0
    saved = json.loads(order_file.read_text())["orders"]["trms2d"]
    assert saved["9.0"]["order"] == ["triton"] and saved["9.0"]["gpu"] == META["gpu"]
    assert saved["8.0"]["order"] == ["cuda"] and saved["8.0"]["commit"] == "abc1234"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert op.preference(torch.device("cuda"))[0] == "cuda"


def test_order_command_refuses_what_it_cannot_rank(tmp_path, order_file, capsys):
    not_results = tmp_path / "x.json"
    not_results.write_text("[]")
    assert order.run_from_args(argparse.Namespace(results=not_results, write=False)) == 2
    no_ops = _write_results(tmp_path / "models.json", [_row("model.x.step", "triton", "a", 2.0)])
    assert order.run_from_args(argparse.Namespace(results=no_ops, write=False)) == 2
    cpu = _write_results(tmp_path / "cpu.json", [_row("trms2d", "triton", "a", 2.0)], dict(META, compute_capability=None))
    assert order.run_from_args(argparse.Namespace(results=cpu, write=True)) == 2
    assert "no compute_capability" in capsys.readouterr().err
    assert not order_file.exists()
