"""``/healthz`` and ``/readyz``, answered by the /metrics process (see metrics_process) from facts it can read alone.

Neither probe goes through a worker or waits for the master, so a pod whose workers are all busy still
answers at once.

- healthz: the master and its exporter are alive. The socket pair to the master is open (it closes when
  the master dies) and the master wrote ``status.json`` recently (its exporter writes it every round).
- readyz: at least one worker has booted and is serving. Read from the scoreboard, not from the
  master's ``status.json``: a worker marks its own slot READY when the application is loaded, and is
  checked here against /proc. Workers accept from the listening socket without the master, so if the
  master is stuck the live workers keep serving and readyz stays 200; a worker that died meanwhile is a
  zombie the master has not reaped, and is not counted. ``status.json`` would keep its last count forever.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from .. import _scoreboard as sb
from .._runfiles import SERVER_FILE, STATUS_FILE

STALE_ROUNDS = 10
"""healthz fails when the last round is older than this many intervals ..."""
STALE_FLOOR = 5.0
"""... and at least this many seconds (a round can be slow on a loaded host)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str

    @property
    def status(self) -> str:
        return "200 OK" if self.ok else "503 Service Unavailable"


def _read_json(path: str) -> dict[str, object] | None:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stale_after(run_dir: str) -> float:
    """Seconds without a round after which the master's exporter counts as stuck."""
    server = _read_json(os.path.join(run_dir, SERVER_FILE)) or {}
    interval = server.get("interval")
    seconds = float(interval) if isinstance(interval, (int, float)) else 0.5
    return max(STALE_FLOOR, STALE_ROUNDS * seconds)


def health(run_dir: str, master_link_open: bool, stale: float, started: float, now: float | None = None) -> Verdict:
    """``started``: when this process started (monotonic); the master's first round may not have run yet."""
    if not master_link_open:
        return Verdict(False, "the master is gone (its socket to this process closed)")
    now = time.monotonic() if now is None else now
    status = _read_json(os.path.join(run_dir, STATUS_FILE))
    at = status.get("monotonic") if status is not None else None
    if not isinstance(at, (int, float)):
        waited = now - started
        if waited > stale:
            return Verdict(
                False,
                f"the master has not finished an exporter round in the {waited:.1f}s since "
                "this process started (no status.json): its exporter thread is stuck",
            )
        return Verdict(True, "ok: master answering, first exporter round pending")
    # CLOCK_MONOTONIC is one clock for every process on the host, so the master's stamp compares with ours.
    age = now - at
    if age > stale:
        return Verdict(
            False,
            f"the master's last exporter round was {age:.1f}s ago (limit {stale:.0f}s): its exporter thread is stuck",
        )
    return Verdict(True, f"ok: master answering, last round {max(0.0, age):.1f}s ago")


def running(pid: int) -> bool:
    """Alive and not a zombie: a dead worker stays a zombie until the master reaps it."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = stat.rsplit(b")", 1)[-1].split()[:1]
    return state not in ([b"Z"], [b"X"], [b"x"])


def readiness(board: sb.Scoreboard) -> Verdict:
    ready = booting = busy = 0
    for view in board:
        if view.state == sb.FREE or not running(view.pid):
            continue
        if view.state == sb.READY:
            ready += 1
            busy += bool(view.in_flight)
        else:
            booting += 1
    if ready:
        return Verdict(True, f"ready: {ready} worker{'s' if ready != 1 else ''} serving ({busy} busy)")
    if booting:
        return Verdict(
            False,
            f"not ready: {booting} worker{'s' if booting != 1 else ''} still loading the application, none serving yet",
        )
    return Verdict(False, "not ready: no live worker")


class Probes:
    """What the /metrics process needs to answer both probes."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self._board: sb.Scoreboard | None = None
        self._stale: float | None = None
        self._started = time.monotonic()

    def health(self, master_link_open: bool) -> Verdict:
        if self._stale is None:
            self._stale = stale_after(self.run_dir)
        return health(self.run_dir, master_link_open, self._stale, self._started)

    def readiness(self) -> Verdict:
        if self._board is None:
            try:
                self._board = sb.Scoreboard.attach(os.path.join(self.run_dir, "scoreboard"))
            except (OSError, ValueError) as error:
                return Verdict(False, f"not ready: cannot read the scoreboard ({error})")
        return readiness(self._board)
