"""Compare two benchmark result files (the harness's JSON `{"meta": ..., "rows": [...]}`) and
flag what changed beyond noise: `fastgen bench compare OLD NEW`.

Rows are matched on (name, impl, shape, dtype, direction). For a row timed in both files,
with medians m_old, m_new and per-call percentiles p20/p80:

    change      = m_new / m_old - 1
    regression  if NEW.p20 > OLD.p80 and change > +threshold
    improvement if NEW.p80 < OLD.p20 and change < -threshold
    same        otherwise

Both conditions are needed: the middle 60% of the two runs' per-call times must not overlap
(so the shift is larger than the run-to-run spread), and the median must move by more than
the threshold (so a tiny but very steady shift is not reported). A row that was ok and is now
an error or a mismatch is "broken" and counts as a regression; the reverse is "fixed"; a move
to or from "skipped" (a backend or package missing on one machine) is "status changed". Rows
present in only one file are listed as such.

Timings from different GPUs or drivers do not compare; the report then carries a warning and
`run_from_args` exits with 2 unless `--allow-different-gpu` is given. Other differences that
can move timings (torch, triton, CUDA, a --quick run against a full one, the machine's own
measured copy bandwidth or matmul rate) are listed as notes above the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .harness import ROW_FIELDS

KEY_FIELDS = ROW_FIELDS[:5]  # name, impl, shape, dtype, direction
TIMES = ("ms", "ms_p20", "ms_p80")

REGRESSION, BROKEN, ONLY_OLD, STATUS_CHANGED = "REGRESSION", "BROKEN", "only in OLD", "status changed"
ONLY_NEW, FIXED, IMPROVEMENT, SAME, NOT_TIMED = "only in NEW", "fixed", "improvement", "same", "not timed"
# Table order: what needs attention first.
VERDICTS = (REGRESSION, BROKEN, ONLY_OLD, STATUS_CHANGED, ONLY_NEW, FIXED, IMPROVEMENT, SAME, NOT_TIMED)
FAILING = (REGRESSION, BROKEN)

# Software whose version can move timings by itself.
_SOFTWARE = ("torch", "triton", "cuda", "python")


@dataclass(frozen=True)
class RowComparison:
    key: tuple  # the KEY_FIELDS values
    verdict: str
    old: Optional[dict]  # None: the row is only in NEW
    new: Optional[dict]  # None: the row is only in OLD
    change: Optional[float] = None  # NEW median / OLD median - 1, when both were timed


@dataclass(frozen=True)
class Report:
    old_path: Path
    new_path: Path
    old_meta: dict
    new_meta: dict
    threshold: float
    rows: list  # RowComparison, in table order
    machine_warnings: list  # non-empty: different GPU or driver, timings do not compare
    notes: list  # other differences that can move timings

    def count(self, verdict: str) -> int:
        return sum(row.verdict == verdict for row in self.rows)

    @property
    def regressions(self) -> list:
        return [row for row in self.rows if row.verdict in FAILING]

    def exit_code(self, allow_different_gpu: bool = False) -> int:
        """2: different GPU or driver (unless allowed); 1: a regression; 0: none."""
        if self.machine_warnings and not allow_different_gpu:
            return 2
        return 1 if self.regressions else 0

    def summary(self) -> str:
        slower, broken = self.count(REGRESSION), self.count(BROKEN)
        parts = [f"{slower + broken} regression(s) ({slower} slower, {broken} broken)"]
        parts += [f"{self.count(verdict)} {verdict}" for verdict in VERDICTS[2:] if self.count(verdict)]
        caveat = "; DIFFERENT GPU OR DRIVER" if self.machine_warnings else ""
        return f"bench compare: {', '.join(parts)} (threshold {self.threshold:.0%}){caveat}"

    def markdown(self) -> str:
        lines = [f"OLD: {_describe(self.old_path, self.old_meta)}", f"NEW: {_describe(self.new_path, self.new_meta)}"]
        lines += [f"**WARNING**: {warning}" for warning in self.machine_warnings]
        lines += [f"note: {note}" for note in self.notes]
        lines += ["", "| verdict | op | impl | shape | dtype | direction | OLD ms [p20, p80] | NEW ms [p20, p80] "
                  "| change |", "|" + "---|" * 9]
        for row in self.rows:
            verdict = f"**{row.verdict}**" if row.verdict in FAILING else row.verdict
            change = "" if row.change is None else f"{row.change:+.1%}"
            lines.append("| " + " | ".join([verdict, *row.key, _times(row.old), _times(row.new), change]) + " |")
        changed = [row for row in self.rows if row.verdict in (BROKEN, FIXED, STATUS_CHANGED)]
        if changed:
            lines.append("")
            lines += [f"- {' '.join(row.key)}: {row.old['status']} -> {row.new['status']}" for row in changed]
        return "\n".join(lines)


def _describe(path: Path, meta: dict) -> str:
    commit = str(meta.get("commit") or "unknown")[:7] + (" (dirty)" if meta.get("commit_dirty") else "")
    return f"{path} ({meta.get('gpu')}, driver {meta.get('driver')}, commit {commit}, {meta.get('timestamp')})"


def _times(row: Optional[dict]) -> str:
    if row is None:
        return ""
    kind = _status_kind(row["status"])
    if kind != "ok":
        return "MISMATCH" if row["status"].startswith("error: MISMATCH") else kind
    return f"{row['ms']:.4g} [{row['ms_p20']:.4g}, {row['ms_p80']:.4g}]"


def _status_kind(status: str) -> str:
    return "ok" if status == "ok" else status.split(":", 1)[0]


def load_results(path, argument: str) -> tuple:
    """(meta, {key: row}) of one result file; ValueError naming `argument` when it is not one."""
    path = Path(path)
    expected = f"{argument} must be a benchmark result JSON file (the harness's {{\"meta\", \"rows\"}})"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{expected}; {path} is not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{expected}; {path} has no 'meta' object and 'rows' list")
    rows = {}
    for index, row in enumerate(data["rows"]):
        missing = [field for field in (*KEY_FIELDS, "status") if not isinstance(row, dict) or field not in row]
        if missing:
            raise ValueError(f"{expected}; row {index} of {path} lacks {missing}")
        if row["status"] == "ok" and not all(isinstance(row.get(field), (int, float)) and row[field] > 0
                                             for field in TIMES):
            raise ValueError(f"{expected}; row {index} of {path} is ok but lacks positive times {list(TIMES)}")
        key = tuple(str(row[field]) for field in KEY_FIELDS)
        if key in rows:
            raise ValueError(f"{expected}; {path} has two rows for {' '.join(key)}")
        rows[key] = row
    return data["meta"], rows


def _verdict(old: dict, new: dict, threshold: float) -> tuple:
    """(verdict, change) of a row present in both files."""
    old_kind, new_kind = _status_kind(old["status"]), _status_kind(new["status"])
    if old_kind == new_kind == "ok":
        change = new["ms"] / old["ms"] - 1
        if new["ms_p20"] > old["ms_p80"] and change > threshold:
            return REGRESSION, change
        if new["ms_p80"] < old["ms_p20"] and change < -threshold:
            return IMPROVEMENT, change
        return SAME, change
    if old_kind == new_kind:
        return NOT_TIMED, None
    if old_kind == "ok" and new_kind == "error":
        return BROKEN, None
    if old_kind == "error" and new_kind == "ok":
        return FIXED, None
    return STATUS_CHANGED, None


def _order(row: RowComparison) -> tuple:
    """Table order: by verdict, then the largest slowdown (or speedup) first."""
    magnitude = -abs(row.change) if row.verdict in (REGRESSION, IMPROVEMENT) else 0.0
    return VERDICTS.index(row.verdict), magnitude


def _machine_warnings(old: dict, new: dict) -> list:
    if (old.get("gpu"), old.get("driver")) == (new.get("gpu"), new.get("driver")):
        return []
    return [f"OLD ran on {old.get('gpu')} (driver {old.get('driver')}) and NEW on {new.get('gpu')} "
            f"(driver {new.get('driver')}): timings from different GPUs or drivers do not compare, "
            "so the timing verdicts below mean nothing"]


def _notes(old: dict, new: dict, threshold: float) -> list:
    notes = [f"{field} differs ({old.get(field)} -> {new.get(field)}): a timing change may come from it"
             for field in _SOFTWARE if old.get(field) != new.get(field)]
    if bool(old.get("quick")) != bool(new.get("quick")):
        notes.append("one run was --quick and the other full: fewer repetitions, so a noisier p20/p80")
    old_ceilings, new_ceilings = old.get("ceilings") or {}, new.get("ceilings") or {}
    for name, value in old_ceilings.items():
        if value and new_ceilings.get(name) and abs(new_ceilings[name] / value - 1) > threshold:
            notes.append(f"the machine's own {name} moved {new_ceilings[name] / value - 1:+.1%} between the runs "
                         "(clocks, heat or another process?): timings may have moved with it")
    return notes


def compare(old_path, new_path, threshold: float = 0.05, *, names: tuple = ("old_path", "new_path")) -> Report:
    """Compare the result file `new_path` against `old_path`; see the module docstring for the
    rules. `threshold` is the fraction (0.05 = 5%) by which a median must move to count; `names`
    are what error messages call the two files (the CLI's OLD and NEW)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number (a fraction, 0.05 for 5%), got {type(threshold).__name__}")
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be a fraction in [0, 1), e.g. 0.05 for 5%, got {threshold!r}")
    old_meta, old_rows = load_results(old_path, names[0])
    new_meta, new_rows = load_results(new_path, names[1])
    rows = []
    for key in dict.fromkeys([*old_rows, *new_rows]):
        old, new = old_rows.get(key), new_rows.get(key)
        if new is None:
            rows.append(RowComparison(key, ONLY_OLD, old, None))
        elif old is None:
            rows.append(RowComparison(key, ONLY_NEW, None, new))
        else:
            verdict, change = _verdict(old, new, threshold)
            rows.append(RowComparison(key, verdict, old, new, change))
    rows.sort(key=_order)
    return Report(Path(old_path), Path(new_path), old_meta, new_meta, float(threshold), rows,
                  _machine_warnings(old_meta, new_meta), _notes(old_meta, new_meta, threshold))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("old", metavar="OLD", type=Path, help="the earlier result file (.json)")
    parser.add_argument("new", metavar="NEW", type=Path, help="the later result file (.json)")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="fraction by which a median must move to count, beyond the p20/p80 spread "
                             "(default 0.05 = 5%%)")
    parser.add_argument("--allow-different-gpu", action="store_true",
                        help="compare files from different GPUs or drivers anyway (exit code 0/1, not 2)")


def run_from_args(args: argparse.Namespace) -> int:
    """Prints the table and a summary line. 0: no regression; 1: a regression (slower beyond
    noise, or ok -> error/mismatch); 2: the files do not compare (unreadable, or from different
    GPUs or drivers without --allow-different-gpu)."""
    try:
        report = compare(args.old, args.new, args.threshold, names=("OLD", "NEW"))
    except (OSError, ValueError) as exc:
        print(f"fastgen bench compare: {exc}", file=sys.stderr)
        return 2
    print(report.markdown() + "\n")
    print(report.summary())
    code = report.exit_code(args.allow_different_gpu)
    if code == 2:
        print("fastgen bench compare: the files come from different GPUs or drivers, so their timings do not "
              "compare (exit 2); pass --allow-different-gpu to compare them anyway", file=sys.stderr)
    return code
