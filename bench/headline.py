"""The README's headline table, from committed result files: `fastgen bench headline RESULTS.json
[RESULTS.json ...] [--readme README.md]`.

One table per result file (one GPU and commit each), one line per benchmark. For every case the
best fastgen implementation is the fastest timed fast backend; the line gives, over the
benchmark's cases, the geometric mean (and the range) of its speedup over eager PyTorch and over
torch.compile of eager, and the median fraction of the ceiling (copy bandwidth or bf16 matmul
rate) it reached. Cases where no fastgen implementation was timed, or where an implementation
gave a wrong answer, are counted in the last column rather than silently dropped.

With --readme the tables replace whatever stands between the `<!-- headline:start -->` and
`<!-- headline:end -->` lines of that file.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from fastgen.ops.registry import FAST_BACKENDS

from .compare import load_results

START, END = "<!-- headline:start -->", "<!-- headline:end -->"


def _geomean(values: list) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _ratio_cell(values: list) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}x"
    return f"{_geomean(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def _summaries(rows: dict) -> list:
    """(benchmark name, cases, [vs eager], [vs compile], [fraction of ceiling], untimed, wrong)."""
    by_case: dict = {}
    for row in rows.values():
        key = (row["name"], row["shape"], row["dtype"], row["direction"])
        by_case.setdefault(key, {})[row["impl"]] = row
    summaries: dict = {}
    for (name, *_), impls in by_case.items():
        entry = summaries.setdefault(name, {"cases": 0, "eager": [], "compile": [], "ceiling": [], "untimed": 0,
                                            "wrong": 0})
        entry["cases"] += 1
        fast = [r for impl, r in impls.items() if impl in FAST_BACKENDS]
        if any(r["status"].startswith("error") for r in fast):
            entry["wrong"] += 1
        timed = [r for r in fast if r["status"] == "ok"]
        if not timed:
            entry["untimed"] += 1
            continue
        best = min(timed, key=lambda r: r["ms"])
        for baseline in ("eager", "compile"):
            reference = impls.get(baseline)
            if reference is not None and reference["status"] == "ok":
                entry[baseline].append(reference["ms"] / best["ms"])
        if best.get("fraction_of_ceiling") is not None:
            entry["ceiling"].append(best["fraction_of_ceiling"])
    # ops first, then the models ("model.<config>.<step>"), each alphabetically
    return sorted(summaries.items(), key=lambda item: (item[0].startswith("model."), item[0]))


def table(meta: dict, rows: dict) -> str:
    lines = [f"**{meta.get('gpu')}**, commit `{meta.get('commit')}`, {meta.get('timestamp', '')[:10]}, "
             f"torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}:", "",
             "| benchmark | cases | best fastgen vs eager | vs torch.compile | of ceiling (median) | not timed / wrong |",
             "|---|---|---|---|---|---|"]
    for name, s in _summaries(rows):
        ceiling = f"{statistics.median(s['ceiling']):.0%}" if s["ceiling"] else "-"
        lines.append(f"| {name} | {s['cases']} | {_ratio_cell(s['eager'])} | {_ratio_cell(s['compile'])} | "
                     f"{ceiling} | {s['untimed']} / {s['wrong']} |")
    return "\n".join(lines)


def replace_section(text: str, tables: str) -> str:
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"the README must hold one {START} line followed by one {END} line")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{tables}\n{END}{tail}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", metavar="RESULTS", type=Path, nargs="+",
                        help="result files of fastgen bench (.json), one table each")
    parser.add_argument("--readme", type=Path, help=f"write the tables between {START} and {END} of this file")


def run_from_args(args: argparse.Namespace) -> int:
    """0: printed (and written); 2: a file is not a result file, or the README has no markers."""
    try:
        tables = "\n\n".join(table(*load_results(path, "RESULTS")) for path in args.results)
        print(tables)
        if args.readme is not None:
            args.readme.write_text(replace_section(args.readme.read_text(), tables))
    except (OSError, ValueError) as exc:
        print(f"fastgen bench headline: {exc}", file=sys.stderr)
        return 2
    return 0
