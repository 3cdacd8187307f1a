"""What ``gunicorn-insight status`` and ``top`` show: one snapshot of a server's facts, then its rendering.

:func:`snapshot` turns raw readings (server.json, status.json, the scoreboard's slots) into one plain,
JSON-ready dict: ``status --json`` prints it as is, and :func:`render` draws the same dict with rich. One
source for both means the table can never show a fact the JSON lacks, or disagree with it. The keys are a
public interface, documented in docs/cli.md: add keys freely, never rename or repurpose one.

Times: the scoreboard stores ``time.monotonic()`` values written by the workers and the master. On Linux
that clock is CLOCK_MONOTONIC, one clock for every process on the host, so ``now - started`` computed here
is the request's real age even though another process wrote ``started``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from . import _scoreboard as sb
from ._discovery import Server

FORMAT = 1
"""Version of the ``status --json`` document; bumped only if a key changes meaning."""
STALE_STATUS = 5.0
"""status.json is rewritten every round: older than this, or three rounds when server.json gives the
round ``interval`` (0.5 s by default, up to 60 s), means the master's exporter is not keeping up."""

_MARKS = (
    (sb.FLAG_ABORT_HANDLER, "timeout_abort"),
    (sb.FLAG_INT_HANDLER, "interrupted"),
    (sb.FLAG_EXITED, "exiting"),
    (sb.FLAG_MAX_REQUESTS, "max_requests"),
    (sb.FLAG_BOOT_FAILED, "boot_failed"),
)
_SERVER_KEYS = (
    "master_pid", "proc_name", "binds", "pidfile", "worker_class", "workers", "threads", "connections_limit",
    "timeout", "started", "scoreboard", "prometheus_dir", "metrics_url", "statsd", "otlp",
)


@dataclass(frozen=True)
class Reading:
    """Everything read from one server at one moment."""

    server: Server
    slots: Sequence[sb.SlotView]
    status: Mapping[str, Any] | None
    status_problem: str | None
    monotonic: float
    wall: float


def read_status(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """status.json and, when it is missing or unreadable, why (for the warnings line)."""
    try:
        with open(path) as handle:
            status = json.load(handle)
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(path)):
            return None, "the server's run directory is gone: the master is shutting down"
        return None, "status.json is not written yet (the master writes it after its first round)"
    except PermissionError:
        return None, f"permission denied reading {path}; run as the server's user or root"
    except (OSError, ValueError) as error:
        return None, f"cannot read {path}: {error}"
    if not isinstance(status, dict):
        return None, f"{path} does not hold a JSON object"
    return status, None


def take_reading(server: Server, board: sb.Scoreboard) -> Reading:
    # The clocks are read after the slots so no elapsed time comes out negative.
    slots = list(board)
    status, problem = read_status(server.status_path)
    return Reading(server, slots, status, problem, time.monotonic(), time.time())


# -- the snapshot --------------------------------------------------------------------------------------


def per_worker_capacity(worker_class: str, threads: int, worker_connections: int) -> int:
    """Requests one worker can serve at once: what busy/capacity is counted in."""
    if worker_class == "sync":
        return 1
    if worker_class == "gthread":
        return max(1, threads)
    return max(1, worker_connections)


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _seconds(value: float) -> float:
    return round(max(0.0, value), 3)


def _worker(view: sb.SlotView, now: float, limit: int) -> dict[str, Any]:
    state = "booting" if view.state == sb.BOOTING else "busy" if view.in_flight else "idle"
    return {
        "slot": view.index,
        "pid": view.pid or None,  # 0 between the master's fork and the worker's first write
        "state": state,
        "requests": [
            {
                "method": request.method,
                "path": request.path,
                "client": request.client,
                "thread": request.thread,
                "elapsed": _seconds(now - request.started),
            }
            for request in view.requests
        ],
        "in_flight": view.in_flight,
        "untracked_in_flight": view.overflow,
        # gthread: accepted connections waiting for a free thread (0 where the scoreboard has no such field).
        "waiting": int(getattr(view, "waiting", 0)),
        "served": view.served,
        "connections": view.connections_now,
        "connections_limit": limit,
        "rss_bytes": view.rss or None,
        "age": _seconds(now - view.spawned) if view.spawned else None,
        "booted_after": _seconds(view.booted - view.spawned) if view.booted and view.spawned else None,
        "slow_requests": view.slow,
        "marks": [name for flag, name in _MARKS if view.flags & flag],
    }


def snapshot(reading: Reading) -> dict[str, Any]:
    """The facts of one reading as a JSON-ready dict (the ``status --json`` document)."""
    info = reading.server.info
    status = reading.status or {}
    worker_class = str(info.get("worker_class") or "unknown")
    threads = _int(info.get("threads"), 1)
    limit = _int(info.get("connections_limit", info.get("worker_connections")), 1)
    per_worker = per_worker_capacity(worker_class, threads, limit)
    workers = [_worker(view, reading.monotonic, limit) for view in reading.slots if view.state != sb.FREE]
    # busy is counted here from the scoreboard, in requests like capacity, and fresh: status.json is up to a
    # round old. capacity comes from the master when it writes it: it resolved the worker class itself.
    capacity = status.get("capacity")
    warnings = []
    if reading.status_problem:
        warnings.append(reading.status_problem)
    status_age = None
    if isinstance(status.get("time"), (int, float)):
        status_age = _seconds(reading.wall - status["time"])
        interval = info.get("interval")
        stale_after = max(STALE_STATUS, 3 * interval) if isinstance(interval, (int, float)) else STALE_STATUS
        if status_age > stale_after:
            warnings.append(
                f"status.json was last written {status_age:.0f}s ago, though the master rewrites it every round: "
                "its exporter thread is stuck or the master is overloaded; recent exits may be missing"
            )
    started = info.get("started")
    server = {key: info.get(key) for key in _SERVER_KEYS}
    server["run_dir"] = reading.server.run_dir
    server["uptime"] = _seconds(reading.wall - started) if isinstance(started, (int, float)) else None
    exits = status.get("recent_exits")
    return {
        "format": FORMAT,
        "time": round(reading.wall, 3),
        "server": server,
        "totals": {
            "workers": len(workers),
            "booting": sum(1 for worker in workers if worker["state"] == "booting"),
            "busy": sum(min(worker["in_flight"], per_worker) for worker in workers),
            "capacity": _int(capacity, len(workers) * per_worker),
            "busy_workers": sum(1 for worker in workers if worker["in_flight"]),
            "in_flight": sum(worker["in_flight"] for worker in workers),
            "waiting": sum(worker["waiting"] for worker in workers),
            "connections": sum(worker["connections"] for worker in workers),
            "served": sum(worker["served"] for worker in workers),
        },
        "listeners": _listeners(status.get("listeners")),
        "workers": workers,
        "recent_exits": list(reversed(exits)) if isinstance(exits, list) else [],
        "status_age": status_age,
        "warnings": warnings,
    }


def _listeners(raw: Any) -> list[dict[str, Any]] | None:
    """None when the server does not report listeners (older versions): unknown is not "none"."""
    if not isinstance(raw, list):
        return None
    return [
        {"name": item.get("name"), "backlog": item.get("backlog"), "backlog_max": item.get("backlog_max")}
        for item in raw
        if isinstance(item, dict)
    ]


# -- rendering -----------------------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def mebibytes(value: Any) -> str:
    return f"{value / 1048576:.1f}" if isinstance(value, (int, float)) and value > 0 else "-"


def clock(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)):
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(epoch))


_STATE_STYLE = {"busy": "bold yellow", "idle": "green", "booting": "cyan"}


def _header(snap: Mapping[str, Any]) -> Text:
    server = snap["server"]
    text = Text()
    text.append(str(server.get("proc_name") or "gunicorn"), style="bold")
    text.append(f"  master {server.get('master_pid')}  {server.get('worker_class')}")
    binds = server.get("binds") or []
    if binds:
        text.append(f"  {', '.join(binds)}")
    text.append(f"  up {duration(server.get('uptime'))}")
    return text


def _totals(snap: Mapping[str, Any]) -> Text:
    totals = snap["totals"]
    text = Text()
    workers = f"workers {totals['workers']}"
    if totals["booting"]:
        workers += f" ({totals['booting']} booting)"
    text.append(workers)
    capacity = totals["capacity"]
    saturated = capacity > 0 and totals["busy"] >= capacity
    text.append("   busy ")
    text.append(f"{totals['busy']}/{capacity}", style="bold red" if saturated else "bold")
    if totals["capacity"] != totals["workers"]:
        text.append(f"   busy workers {totals['busy_workers']}/{totals['workers']}")
    text.append(f"   in flight {totals['in_flight']}")
    if totals["waiting"]:
        text.append("   waiting for a thread ")
        text.append(str(totals["waiting"]), style="bold red")
    text.append(f"   connections {totals['connections']}")
    for listener in snap["listeners"] or []:
        backlog, most = listener.get("backlog"), listener.get("backlog_max")
        style = "bold red" if isinstance(backlog, int) and backlog > 0 else ""
        text.append(f"   backlog {listener.get('name')} ")
        text.append(f"{backlog if backlog is not None else '-'}/{most if most is not None else '-'}", style=style)
    return text


def _request_cell(worker: Mapping[str, Any], timeout: Any) -> tuple[Text, Text]:
    requests = worker["requests"]
    if not requests:
        untracked = worker["untracked_in_flight"]
        return Text(f"{untracked} untracked" if untracked else ""), Text("")
    oldest = requests[0]
    label = Text(f"{oldest['method']} {oldest['path']}")
    more = worker["in_flight"] - 1
    if more > 0:
        label.append(f" (+{more} more)", style="dim")
    late = isinstance(timeout, (int, float)) and timeout > 0 and oldest["elapsed"] >= 0.8 * timeout
    return label, Text(duration(oldest["elapsed"]), style="bold red" if late else "")


def workers_table(snap: Mapping[str, Any]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name, justify in (
        ("slot", "right"), ("pid", "right"), ("state", "left"), ("request", "left"), ("elapsed", "right"),
        ("served", "right"), ("conns", "right"), ("RSS MiB", "right"), ("age", "right"),
    ):
        # Only the request wraps: the numbers stay on one line, readable at a glance in 80 columns.
        table.add_column(name, justify=justify, no_wrap=name != "request", overflow="fold",  # type: ignore[arg-type]
                         min_width=24 if name == "request" else None)
    timeout = snap["server"].get("timeout")
    for worker in snap["workers"]:
        request, elapsed = _request_cell(worker, timeout)
        state = Text(worker["state"], style=_STATE_STYLE.get(worker["state"], ""))
        if worker["marks"]:
            state.append(f" {','.join(worker['marks'])}", style="red")
        table.add_row(
            str(worker["slot"]), str(worker["pid"] or "-"), state, request, elapsed, str(worker["served"]),
            f"{worker['connections']}/{worker['connections_limit']}", mebibytes(worker["rss_bytes"]),
            duration(worker["age"]),
        )
    return table


def exits_table(exits: Iterable[Mapping[str, Any]]) -> Table:
    # Slot, served and RSS stay in the JSON: the human view keeps what explains the exit.
    table = Table(title="recent exits", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for name in ("time", "pid", "cause", "request", "elapsed", "uptime", "detail"):
        table.add_column(name, overflow="fold", no_wrap=name not in {"request", "detail"},
                         justify="right" if name in {"pid", "elapsed", "uptime"} else "left")
    for item in exits:
        cause = str(item.get("cause") or "-")
        expected = cause in {"max_requests", "graceful"}
        table.add_row(
            clock(item.get("time")), str(item.get("pid") or "-"), Text(cause, style="" if expected else "bold red"),
            str(item.get("request") or "-"), duration(item.get("elapsed")), duration(item.get("uptime")),
            str(item.get("detail") or ""),
        )
    return table


def render(snap: Mapping[str, Any], *, max_exits: int | None = None) -> RenderableType:
    parts: list[RenderableType] = [_header(snap), _totals(snap), workers_table(snap)]
    exits = snap["recent_exits"][:max_exits] if max_exits is not None else snap["recent_exits"]
    if exits:
        parts.append(exits_table(exits))
    for warning in snap["warnings"]:
        parts.append(Text(f"warning: {warning}", style="yellow"))
    if snap["server"].get("metrics_url"):
        parts.append(Text(f"metrics: {snap['server']['metrics_url']}", style="dim"))
    return Group(*parts)

