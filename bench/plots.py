"""Plots of a benchmark result file (the harness's JSON `{"meta": ..., "rows": [...]}`):
`fastgen bench plot RESULTS.json`.

- `<stem>.<op>.png` per op: speedup over eager against problem size, one panel per direction,
  one line per (implementation, dtype). The size of a case is the work the harness measured it
  against (bytes moved for a memory-bound op, FLOPs for a compute-bound one), recovered from a
  timed row as rate x time, so cases of different shapes line up on one axis.
- `<stem>.models.png`: step (and sample) time of each model benchmark per implementation.

Only rows with status "ok" are drawn. matplotlib is imported when plotting (it is in the
`bench` extra, not a dependency of fastgen); without it nothing is drawn and the caller is told
so. The title carries the GPU, the commit and the date: a plot is meaningless without them.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

from .compare import load_results

MODEL_PREFIX = "model."
_BASELINE = "eager"


def _work(row: dict) -> Optional[float]:
    """Bytes (memory-bound) or FLOPs (compute-bound) of one call of a timed row."""
    if row.get("ms") is None:
        return None
    if row.get("gbps") is not None:
        return row["gbps"] * row["ms"] * 1e6
    if row.get("tflops") is not None:
        return row["tflops"] * row["ms"] * 1e9
    return None


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def speedup_series(rows: list) -> dict:
    """{op: {direction: {(impl, dtype): [(work, speedup), ...] sorted by work}}} over the timed
    non-eager rows of the ops (model rows excluded)."""
    series: dict = {}
    for row in rows:
        if row["name"].startswith(MODEL_PREFIX) or row["impl"] == _BASELINE or row["status"] != "ok":
            continue
        work, speedup = _work(row), row.get("speedup_vs_eager")
        if work is None or speedup is None:
            continue
        by_direction = series.setdefault(row["name"], {}).setdefault(row["direction"], {})
        by_direction.setdefault((row["impl"], row["dtype"]), []).append((work, speedup))
    for by_direction in series.values():
        for lines in by_direction.values():
            for points in lines.values():
                points.sort()
    return series


def model_times(rows: list) -> dict:
    """{"<model benchmark> <shape>": {impl: ms}} over the timed model rows."""
    times: dict = {}
    for row in rows:
        if row["name"].startswith(MODEL_PREFIX) and row["status"] == "ok" and row.get("ms") is not None:
            label = f"{row['name'].removeprefix(MODEL_PREFIX)}\n{row['shape']}"
            times.setdefault(label, {})[row["impl"]] = row["ms"]
    return times


def _title(meta: dict, what: str) -> str:
    return f"{what}\n{meta.get('gpu', '?')}, commit {str(meta.get('commit', '?'))[:7]}, {str(meta.get('timestamp', ''))[:10]}"


def _plot_op(plt, op: str, by_direction: dict, meta: dict, path: Path, bound_label: str) -> None:
    directions = sorted(by_direction)
    figure, axes = plt.subplots(1, len(directions), figsize=(6 * len(directions), 4.5), squeeze=False)
    for axis, direction in zip(axes[0], directions):
        for (impl, dtype), points in sorted(by_direction[direction].items()):
            work, speedup = zip(*points)
            axis.plot(work, speedup, marker="o", label=f"{impl} {dtype}")
        axis.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
        axis.set_xscale("log")
        axis.set_yscale("log", base=2)
        axis.yaxis.set_major_formatter(plt.FuncFormatter(lambda value, _: f"{value:g}x"))
        axis.set_xlabel(bound_label)
        axis.set_ylabel("speedup over eager")
        axis.set_title(direction)
        axis.legend(fontsize="small")
    figure.suptitle(_title(meta, op))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_models(plt, times: dict, meta: dict, path: Path) -> None:
    impls = list(dict.fromkeys(impl for by_impl in times.values() for impl in by_impl))
    width = 0.8 / len(impls)
    figure, axis = plt.subplots(figsize=(max(6.0, 2.5 * len(times)), 4.5))
    for i, impl in enumerate(impls):
        positions = [k + i * width for k in range(len(times))]
        axis.bar(positions, [by_impl.get(impl, 0.0) for by_impl in times.values()], width, label=impl)
    axis.set_xticks([k + 0.4 - width / 2 for k in range(len(times))])
    axis.set_xticklabels(list(times), fontsize="small")
    axis.set_ylabel("ms per call (median)")
    axis.legend()
    figure.suptitle(_title(meta, "model benchmarks"))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _import_pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        return None
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: Path, out_dir: Optional[Path] = None) -> Optional[list]:
    """Write the PNGs for one result file into out_dir (default: beside it). Returns their paths,
    or None (with a message on stderr) when matplotlib is not installed; ValueError when
    `results` is not a result file."""
    results = Path(results)
    meta, keyed_rows = load_results(results, "RESULTS")
    rows = list(keyed_rows.values())
    plt = _import_pyplot()
    if plt is None:
        print("fastgen bench plot: matplotlib is not installed (pip install 'fastgen[bench]'), so no plots "
              "were written", file=sys.stderr)
        return None
    out_dir = Path(out_dir) if out_dir is not None else results.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    bound = {row["name"]: "bytes moved per call" if row.get("gbps") is not None else "FLOPs per call"
             for row in rows if row.get("ms") is not None}
    for op, by_direction in sorted(speedup_series(rows).items()):
        path = out_dir / f"{results.stem}.{_file_name(op)}.png"
        _plot_op(plt, op, by_direction, meta, path, bound[op])
        written.append(path)
    times = model_times(rows)
    if times:
        path = out_dir / f"{results.stem}.models.png"
        _plot_models(plt, times, meta, path)
        written.append(path)
    print(f"wrote {len(written)} plot(s): {', '.join(str(p) for p in written) or 'no timed rows to plot'}")
    return written
