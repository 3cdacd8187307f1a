"""The probes' verdicts from the files the /metrics process reads: status.json's age and the scoreboard."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._export import probes as _probes


def _status(run_dir: Path, monotonic: float) -> None:
    (run_dir / "status.json").write_text(json.dumps({"format": 1, "monotonic": monotonic, "workers": 2}))


def _serve(board: sb.Scoreboard, slot: int, pid: int, state: int = sb.READY) -> None:
    board.assign(slot, time.monotonic())
    sb.PID.pack_into(board.buffer, board.offset(slot) + sb.OFF_PID, pid)
    sb.STATE.pack_into(board.buffer, board.offset(slot) + sb.OFF_STATE, state)


@pytest.fixture
def zombie() -> Iterator[int]:
    """A child that has exited and is not reaped yet, as a dead worker is while the master is stuck."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child never became a zombie"
        time.sleep(0.01)
    yield pid
    os.waitpid(pid, 0)


def test_healthy_when_the_last_round_is_recent(tmp_path: Path) -> None:
    """A round 1 s ago with a 5 s limit: 200, with the age in the body."""
    _status(tmp_path, 100.0)
    verdict = _probes.health(str(tmp_path), True, stale=5.0, started=0.0, now=101.0)
    assert verdict.ok
    assert verdict.reason == "ok: master answering, last round 1.0s ago"


def test_unhealthy_when_rounds_stopped(tmp_path: Path) -> None:
    """No round for longer than the limit: the exporter thread is stuck, 503."""
    _status(tmp_path, 100.0)
    verdict = _probes.health(str(tmp_path), True, stale=5.0, started=0.0, now=106.0)
    assert not verdict.ok
    assert verdict.status.startswith("503")
    assert "last exporter round was 6.0s ago" in verdict.reason


def test_unhealthy_when_the_master_is_gone(tmp_path: Path) -> None:
    """The socket pair closed: the master is gone, whatever status.json says."""
    _status(tmp_path, 100.0)
    verdict = _probes.health(str(tmp_path), False, stale=5.0, started=0.0, now=100.0)
    assert not verdict.ok
    assert "master is gone" in verdict.reason


def test_first_round_pending_is_healthy_only_for_a_while(tmp_path: Path) -> None:
    """No status.json yet: healthy just after start, unhealthy once the limit has passed without a round."""
    assert _probes.health(str(tmp_path), True, stale=5.0, started=10.0, now=11.0).ok
    late = _probes.health(str(tmp_path), True, stale=5.0, started=10.0, now=16.0)
    assert not late.ok
    assert "no status.json" in late.reason


def test_stale_limit_follows_the_interval(tmp_path: Path) -> None:
    """Ten intervals, at least 5 s: a server with interval=2 is stale after 20 s."""
    (tmp_path / "server.json").write_text(json.dumps({"interval": 2.0}))
    assert _probes.stale_after(str(tmp_path)) == 20.0
    (tmp_path / "server.json").write_text(json.dumps({"interval": 0.1}))
    assert _probes.stale_after(str(tmp_path)) == 5.0


def test_ready_counts_live_ready_workers(board: sb.Scoreboard) -> None:
    """One READY slot owned by a live process: ready."""
    _serve(board, 0, os.getpid())
    verdict = _probes.readiness(board)
    assert verdict.ok
    assert verdict.reason == "ready: 1 worker serving (0 busy)"


def test_booting_workers_are_not_ready(board: sb.Scoreboard) -> None:
    """Workers still loading the application: 503 saying so."""
    _serve(board, 0, os.getpid(), sb.BOOTING)
    _serve(board, 1, os.getpid(), sb.BOOTING)
    verdict = _probes.readiness(board)
    assert not verdict.ok
    assert verdict.reason == "not ready: 2 workers still loading the application, none serving yet"


def test_dead_and_zombie_workers_are_not_ready(board: sb.Scoreboard, zombie: int) -> None:
    """A READY slot whose worker is a zombie (master not reaping) or gone is not counted."""
    _serve(board, 0, zombie)
    _serve(board, 1, 2**22 + 12345)  # above the kernel's largest pid_max: no such process
    verdict = _probes.readiness(board)
    assert not verdict.ok
    assert verdict.reason == "not ready: no live worker"
