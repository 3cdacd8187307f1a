"""The field-insights table in docs/troubleshooting.md agrees with its own summary line."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

TROUBLESHOOTING = Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md"


def test_summary_counts_the_verdicts_of_the_table() -> None:
    """ "N covered, M partly, K out of scope" is what the table's verdict column says, row by row."""
    text = TROUBLESHOOTING.read_text()
    verdicts = Counter(
        line.rstrip(" |").rsplit("|", 1)[1].strip() for line in text.splitlines() if re.match(r"^\| \d+ \| ", line)
    )
    summary = re.search(r"\*\*Summary: (\d+) covered, (\d+) partly, (\d+) out of scope\.\*\*", text)
    assert summary is not None
    assert (verdicts["covered"], verdicts["partly"], verdicts["out of scope"]) == tuple(
        int(count) for count in summary.groups()
    ), verdicts
    assert sum(verdicts.values()) == 80, verdicts
