"""Shared fixtures for the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gunicorn_insight import _scoreboard as sb


@pytest.fixture
def board(tmp_path: Path) -> Iterator[sb.Scoreboard]:
    """A small scoreboard: 4 slots, 3 request entries each, a ring of 8 records."""
    scoreboard = sb.Scoreboard.create(str(tmp_path / "scoreboard"), slots=4, entries=3, ring=8, master_pid=1)
    yield scoreboard
    scoreboard.close()
