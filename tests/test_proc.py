"""The one parser of /proc/<pid>/stat that every role uses."""

from __future__ import annotations

import os
from pathlib import Path

from gunicorn_insight._proc import cpu_seconds, stat_fields


def test_fields_start_after_a_command_name_with_spaces_and_parentheses(tmp_path: Path) -> None:
    """The command name may hold ") (": the fields are counted from the last ")", state first."""
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "stat").write_text("7 (gunicorn: worker (a) b) S 1 7 7 0 -1 4194560 0 0 0 0 12 3\n")
    fields = stat_fields(7, str(tmp_path))
    assert fields is not None
    assert (fields[0], fields[1], fields[11], fields[12]) == (b"S", b"1", b"12", b"3")
    assert stat_fields(8, str(tmp_path)) is None


def test_cpu_seconds_of_this_process_and_of_none() -> None:
    """utime + stime of a live process; None for pid 0 (no process) and for a pid beyond pid_max."""
    used = cpu_seconds(os.getpid())
    assert used is not None
    assert used > 0
    assert cpu_seconds(0) is None
    assert cpu_seconds(4_194_304 + 1) is None
