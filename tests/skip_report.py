"""A pytest plugin (loaded by tests/conftest.py): skipped tests end the run with a banner naming each
reason and how many tests it skipped, so a green run elsewhere (no kubectl, no ../shared) cannot hide
what it did not check."""

from __future__ import annotations

from collections import Counter


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    reasons: Counter = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        _, _, reason = (
            report.longrepr if isinstance(report.longrepr, tuple) else ("", 0, str(report.longrepr))
        )
        reasons[reason.removeprefix("Skipped: ")] += 1
    if not reasons:
        return
    terminalreporter.write_sep(
        "!", f"{sum(reasons.values())} TESTS SKIPPED: NOT CHECKED ON THIS MACHINE", red=True
    )
    for reason, n in reasons.most_common():
        terminalreporter.write_line(f"  {n:4d} skipped: {reason}", red=True)
