"""The "auto" backend order, measured: `fastgen bench order RESULTS.json [--write]`.

For every op benchmark in a result file (a benchmark named after a fastgen op), each fast
backend is scored by the geometric mean of its speedup over eager across the cases that every
ranked backend timed successfully, so each backend is scored on the same cases. A backend that
gave a wrong answer (a mismatch or an error row) in any case ranks after every backend that did
not, whatever its speed: "auto" must not prefer a fast wrong kernel. Backends that were skipped
in every case (not built, not installed) are not ranked; the registry puts unranked backends
after the ranked ones, in the op's default order.

--write records each ranking under the GPU's compute capability in
fastgen/ops/backend_order.json (fastgen.ops.registry.MEASURED_ORDER_PATH), keeping what was
measured for other capabilities, with the GPU name, the commit and the scores as provenance.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from fastgen.ops import registry
from fastgen.ops.registry import FAST_BACKENDS, OPS

from .compare import load_results


@dataclass(frozen=True)
class Ranking:
    op: str
    order: tuple  # backends, preferred first
    geomean_speedup: dict  # backend -> geometric mean speedup vs eager over the common cases
    failed: tuple  # backends with a mismatch or error row
    cases: int  # how many cases every ranked backend timed

    def entry(self, meta: dict) -> dict:
        return {"order": list(self.order), "geomean_speedup_vs_eager": self.geomean_speedup,
                "failed": list(self.failed), "cases": self.cases, "gpu": meta.get("gpu"),
                "commit": meta.get("commit"), "torch": meta.get("torch"), "triton": meta.get("triton")}


def rank(rows: dict) -> list:
    """One Ranking per op benchmark in `rows` ({key: row} as compare.load_results gives)."""
    by_op: dict = {}
    for row in rows.values():
        if row["name"] in OPS and row["impl"] in FAST_BACKENDS:
            by_op.setdefault(row["name"], []).append(row)
    return [_rank_op(op, op_rows) for op, op_rows in sorted(by_op.items())]


def _case(row: dict) -> tuple:
    return row["shape"], row["dtype"], row["direction"]


def _rank_op(op: str, rows: list) -> Ranking:
    failed = sorted({row["impl"] for row in rows if row["status"].startswith("error")})
    timed = {}
    for row in rows:
        if row["status"] == "ok" and row.get("speedup_vs_eager"):
            timed.setdefault(row["impl"], {})[_case(row)] = row["speedup_vs_eager"]
    ranked = [backend for backend in FAST_BACKENDS if backend in timed or backend in failed]
    common = set.intersection(*(set(timed[b]) for b in ranked if b in timed)) if timed else set()
    scores = {b: math.exp(sum(math.log(timed[b][case]) for case in common) / len(common))
              for b in ranked if b in timed and common}
    order = sorted(ranked, key=lambda b: (b in failed, -scores.get(b, 0.0)))
    return Ranking(op, tuple(order), scores, tuple(failed), len(common))


def write(rankings: list, meta: dict) -> Path:
    """Record the rankings under the result file's compute capability; returns the file."""
    path = registry.MEASURED_ORDER_PATH
    capability = meta.get("compute_capability")
    if not capability:
        raise ValueError("the result file's meta has no compute_capability: it was not measured on a CUDA GPU")
    data = json.loads(path.read_text()) if path.exists() else {"orders": {}}
    for ranking in rankings:
        data["orders"].setdefault(ranking.op, {})[capability] = ranking.entry(meta)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    registry.measured_orders.cache_clear()
    return path


def markdown(rankings: list, meta: dict) -> str:
    lines = [f"Backend order for compute capability {meta.get('compute_capability')} ({meta.get('gpu')}, "
             f"commit {meta.get('commit')}):", "",
             "| op | order | geomean speedup vs eager | cases | wrong answers |", "|---|---|---|---|---|"]
    for r in rankings:
        speedups = ", ".join(f"{b} {s:.2f}x" for b, s in r.geomean_speedup.items()) or "-"
        lines.append(f"| {r.op} | {' > '.join(r.order) or '-'} | {speedups} | {r.cases} | "
                     f"{', '.join(r.failed) or '-'} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", metavar="RESULTS", type=Path, help="a result file of fastgen bench (.json)")
    parser.add_argument("--write", action="store_true",
                        help="record the orders for the GPU's compute capability in fastgen/ops/backend_order.json")


def run_from_args(args: argparse.Namespace) -> int:
    """0: printed (and written); 2: the file is not a result file, has no op rows, or is not
    from a CUDA GPU (for --write)."""
    try:
        meta, rows = load_results(args.results, "RESULTS")
        rankings = [r for r in rank(rows) if r.order]
        if not rankings:
            raise ValueError(f"{args.results} has no timed op benchmark rows of a fast backend")
        print(markdown(rankings, meta))
        if args.write:
            print(f"\nwrote {write(rankings, meta)}")
    except (OSError, ValueError) as exc:
        print(f"fastgen bench order: {exc}", file=sys.stderr)
        return 2
    return 0
