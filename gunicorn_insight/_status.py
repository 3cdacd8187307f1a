"""Files next to the scoreboard that let tools find a running server and read the master's own facts.

``server.json`` is written once when the master starts; ``status.json`` after every round (atomically,
by rename, on tmpfs). Per-worker facts stay in the scoreboard itself; these files hold what only the
master knows: the listen backlog, totals, and the recent worker exits with their causes.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections import deque
from typing import Any

from ._drain import Round

SERVER_FILE = "server.json"
STATUS_FILE = "status.json"
FORMAT = 1
RECENT_EXITS = 20


def write_json(path: str, payload: dict[str, Any]) -> None:
    # mkstemp, not a predictable name opened with truncation: with gunicorn's --user the run directory
    # belongs to the workers' user, who could plant a symlink there for the root master to write through.
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, separators=(",", ":"))
        os.chmod(temporary, 0o644)  # readable by the CLI of any user, as before
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


class StatusFiles:
    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.exits: deque[dict[str, Any]] = deque(maxlen=RECENT_EXITS)
        self.listen_overflows = 0
        self.rounds = 0

    def write_server(self, description: dict[str, Any]) -> None:
        write_json(os.path.join(self.run_dir, SERVER_FILE), {"format": FORMAT, **description})

    def record_exit(self, **fields: Any) -> None:
        self.exits.append({"time": time.time(), **fields})

    def write_round(self, facts: Round) -> None:
        self.listen_overflows += facts.listen_overflows
        self.rounds += 1
        write_json(
            os.path.join(self.run_dir, STATUS_FILE),
            {
                "format": FORMAT,
                "time": time.time(),
                "monotonic": facts.at,
                "rounds": self.rounds,
                "workers": facts.workers,
                "busy_workers": facts.busy_workers,
                "in_flight": facts.in_flight,
                "capacity": facts.capacity,
                "waiting": facts.waiting,
                "connections": facts.total_connections,
                "listeners": [
                    {"name": name, "backlog": queued, "backlog_max": limit}
                    for name, (queued, limit) in sorted(facts.listeners.items())
                ],
                "listen_overflows": self.listen_overflows,
                "lost_requests": facts.lost,
                "recent_exits": list(self.exits),
                "workers_ready": facts.ready_workers,
                "workers_booting": facts.booting_workers,
                "stalled_requests": facts.stalled_requests,
                "crash_loop": facts.crash_loop,
                "host": host_status(facts),
            },
        )


def host_status(facts: Round) -> dict[str, Any]:
    """The host readings for tools (the doctor judges memory against the limit, throttling, pressure); a
    reading the kernel did not give is left out, never 0."""
    host = facts.host
    if host is None:
        return {}
    found: dict[str, Any] = {
        name: value for name, value in (
            ("cpu_quota_cores", host.quota_cores), ("memory_usage_bytes", host.memory_usage),
            ("memory_working_set_bytes", host.memory_working_set), ("memory_limit_bytes", host.memory_limit),
        ) if value is not None
    }
    if host.throttling is not None:
        found["cpu_periods"] = host.throttling.periods
        found["cpu_throttled_periods"] = host.throttling.throttled_periods
        found["cpu_throttled_seconds"] = host.throttling.throttled_seconds
    if host.pressure:
        found["pressure_seconds"] = {f"{resource}_{kind}": seconds
                                     for (resource, kind), seconds in sorted(host.pressure.items())}
    if facts.swap:
        found["swap_bytes"] = sum(facts.swap.values())
    return found
