"""What a test session tells the terminal beyond pytest's own report (conftest.py loads it): one
line counting the skipped tests by reason, whatever -q or -r say; the fuzz cases that passed, per
op and backend (test_fuzz.py records them); and the `progress` fixture, through which a long test
says what it is doing while it does it."""
from __future__ import annotations

import collections
import sys

import pytest


def skip_reason(report) -> str:
    """The reason a skipped test's report gives (pytest.skip's message, or the skip mark's)."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def skip_summary(reports) -> str | None:
    """"N skipped: n1 reason1; n2 reason2; ...", most frequent reason first; None for none."""
    reasons = collections.Counter(skip_reason(report) for report in reports)
    if not reasons:
        return None
    return f"{sum(reasons.values())} skipped: " + "; ".join(f"{count} {reason}" for reason, count in
                                                             reasons.most_common())


# The user property under which test_fuzz.py records (op, backend, cases that passed).
FUZZ_CASES_PASSED = "fuzz cases passed"


def fuzz_summary(reports) -> list[str]:
    """One line per op: "fuzz cases passed: <op> <backend> N, <backend> N", from the reports'
    FUZZ_CASES_PASSED properties (a failing test's too: the cases before and while it shrank)."""
    counts = collections.defaultdict(collections.Counter)
    for report in reports:
        for key, value in getattr(report, "user_properties", ()):
            if key == FUZZ_CASES_PASSED and report.when == "call":
                op, backend, passed = value
                counts[op][backend] += passed
    return [f"fuzz cases passed: {op} " + ", ".join(f"{backend} {passed:,}" for backend, passed in
                                                   sorted(counts[op].items())) for op in sorted(counts)]


def pytest_terminal_summary(terminalreporter):
    lines = fuzz_summary(report for outcome in ("passed", "failed") for report in
                         terminalreporter.stats.get(outcome, []))
    skipped = skip_summary(terminalreporter.stats.get("skipped", []))
    for line in lines + ([skipped] if skipped is not None else []):
        terminalreporter.write_line(line)


@pytest.fixture
def progress(request):
    """`progress(line)` shows the line on the terminal at once, past pytest's output capture. An
    xdist worker has no terminal of its own: there the line goes to its stderr, which is the
    terminal's."""
    on_xdist_worker = hasattr(request.config, "workerinput")
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def tell(line: str) -> None:
        with capture.global_and_fixture_disabled():
            if on_xdist_worker:
                print(line, file=sys.__stderr__, flush=True)
                return
            writer = request.config.get_terminal_writer()
            if writer.width_of_current_line:  # after -q's dots: a line of its own
                writer.line()
            writer.line(line)

    return tell
