"""Shared fixtures for the unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import fakes
import pytest

from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._worker import recorder as _recorder


@pytest.fixture
def board(tmp_path: Path) -> Iterator[sb.Scoreboard]:
    """A small scoreboard: 4 slots, 3 request entries each, a ring of 8 records."""
    scoreboard = sb.Scoreboard.create(str(tmp_path / "scoreboard"), slots=4, entries=3, ring=8, master_pid=1)
    yield scoreboard
    scoreboard.close()


@pytest.fixture(autouse=True)
def no_recorder_left_behind() -> Iterator[None]:
    """Tests that play a worker set the worker's recorder; the next test starts without one."""
    yield
    _recorder.RECORDER = None


@pytest.fixture(params=["python", "compiled"])
def each_hook_implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the pure-Python request hooks, then with the compiled ones (_speedups.c)."""
    name: str = request.param
    monkeypatch.setattr(fakes, "HOOKS", fakes.compiled_hooks() if name == "compiled" else fakes.IMPLEMENTATIONS[name])
    return name


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No GUNICORN_CMD_ARGS or plugin variables from the test runner; cwd without a gunicorn.conf.py."""
    for name in list(os.environ):
        if name.startswith("GUNICORN_INSIGHT_") or name in {"GUNICORN_CMD_ARGS", "PROMETHEUS_MULTIPROC_DIR"}:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path
