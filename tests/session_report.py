"""What a test session tells the terminal beyond pytest's own report (conftest.py loads it): one
line counting the skipped tests by reason, whatever -q or -r say, and the `progress` fixture,
through which a long test says what it is doing while it does it."""
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


def pytest_terminal_summary(terminalreporter):
    line = skip_summary(terminalreporter.stats.get("skipped", []))
    if line is not None:
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
