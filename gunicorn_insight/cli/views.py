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

import dataclasses
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, cast

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from .. import _scoreboard as sb
from .._discovery import Server
from .._runfiles import ContractError, StatusRecord, read_record

FORMAT = 1
"""Version of the ``status --json`` document (:class:`StatusDocument`); bumped only if a key changes meaning."""
STALE_STATUS = 5.0
"""status.json is rewritten every round: older than this, or three rounds when server.json gives the
round ``interval`` (0.5 s by default, up to 60 s), means the master's exporter is not keeping up."""
MASTER_LOOP_STUCK = 5.0
"""Seconds of gunicorn's master loop not seen waiting from which status says it is stuck (as the master's log)."""

_MARKS = (
    (sb.FLAG_ABORT_HANDLER, "timeout_abort"),
    (sb.FLAG_INT_HANDLER, "interrupted"),
    (sb.FLAG_EXITED, "exiting"),
    (sb.FLAG_MAX_REQUESTS, "max_requests"),
    (sb.FLAG_BOOT_FAILED, "boot_failed"),
    (sb.FLAG_REQUESTS_UNSEEN, "requests_unseen"),
)


# -- the status --json document: keys documented in docs/cli.md --------------------------------------------


class ServerFacts(TypedDict):
    """``server``: the master's facts from its server.json, and how long it has run."""

    master_pid: int
    proc_name: str
    binds: list[str]
    pidfile: str | None
    worker_class: str
    workers: int | None
    threads: int | None
    connections_limit: int
    timeout: int | None
    started: float
    scoreboard: str
    prometheus_dir: str | None
    metrics_url: str | None
    statsd: str | None
    otlp: str | None
    run_dir: str
    uptime: float


class RequestFacts(TypedDict):
    """One request in flight on a worker."""

    method: str
    path: str
    client: str
    thread: int
    elapsed: float


class WorkerFacts(TypedDict):
    """One live worker slot, from the scoreboard."""

    slot: int
    pid: int | None
    state: str
    requests: list[RequestFacts]
    in_flight: int
    untracked_in_flight: int
    waiting: int
    served: int
    connections: int
    connections_limit: int
    rss_bytes: int | None
    age: float | None
    booted_after: float | None
    slow_requests: int
    marks: list[str]


class Totals(TypedDict):
    """Sums over the live workers; capacity from the master's last round when it has written one."""

    workers: int
    booting: int
    busy: int
    capacity: int
    busy_workers: int
    in_flight: int
    waiting: int
    connections: int
    served: int
    desired: int | None
    """The number of workers gunicorn keeps, from the master's last round; None before one."""
    master_loop_stuck: float | None
    """Seconds since gunicorn's master loop was last seen waiting for signals (the last round); None: unknown."""


class ListenerFacts(TypedDict):
    """One listening socket's accept queue."""

    name: str
    backlog: int | None
    backlog_max: int | None
    drops: int | None
    """TCP: connection attempts the kernel dropped at it on a full queue since the master started; else None."""


class ExitFacts(TypedDict):
    """One recent worker exit (the fields of _runfiles.WorkerExit)."""

    time: float
    pid: int
    slot: int
    cause: str
    detail: str
    uptime: float
    served: int
    rss: int
    request: str | None
    elapsed: float | None


class StatusDocument(TypedDict):
    """What ``status --json`` prints and what :func:`render` draws: one server at one moment."""

    format: int
    time: float
    server: ServerFacts
    totals: Totals
    listeners: list[ListenerFacts] | None
    """None when status.json could not be read: unknown, which is not "no backlog"."""
    workers: list[WorkerFacts]
    recent_exits: list[ExitFacts]
    """Newest first."""
    status_age: float | None
    warnings: list[str]


@dataclass(frozen=True)
class Reading:
    """Everything read from one server at one moment."""

    server: Server
    slots: Sequence[sb.SlotView]
    status: StatusRecord | None
    status_problem: str | None
    monotonic: float
    wall: float


def read_status(path: str) -> tuple[StatusRecord | None, str | None]:
    """status.json and, when it is missing or unreadable, why (for the warnings line)."""
    try:
        return read_record(StatusRecord, path), None
    except FileNotFoundError:
        if not os.path.isdir(os.path.dirname(path)):
            return None, "the server's run directory is gone: the master is shutting down"
        return None, "status.json is not written yet (the master writes it after its first round)"
    except PermissionError:
        return None, f"permission denied reading {path}; run as the server's user or root"
    except ContractError as error:
        return None, str(error)
    except OSError as error:
        return None, f"cannot read {path}: {error}"


def take_reading(server: Server, board: sb.Scoreboard) -> Reading:
    # The clocks are read after the slots so no elapsed time comes out negative.
    slots = list(board)
    status, problem = read_status(server.status_path)
    return Reading(server, slots, status, problem, time.monotonic(), time.time())


# -- the snapshot --------------------------------------------------------------------------------------


def _seconds(value: float) -> float:
    return round(max(0.0, value), 3)


def _worker(view: sb.SlotView, now: float, limit: int) -> WorkerFacts:
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


def snapshot(reading: Reading) -> StatusDocument:
    """The facts of one reading as a JSON-ready dict (the ``status --json`` document)."""
    info = reading.server.info
    status = reading.status
    limit = info.connections_limit
    per_worker = info.per_worker_capacity
    workers = [_worker(view, reading.monotonic, limit) for view in reading.slots if view.state != sb.FREE]
    warnings = []
    if reading.status_problem:
        warnings.append(reading.status_problem)
    status_age = None
    if status is not None:
        status_age = _seconds(reading.wall - status.time)
        stale_after = max(STALE_STATUS, 3 * info.interval)
        if status_age > stale_after:
            warnings.append(
                f"status.json was last written {status_age:.0f}s ago, though the master rewrites it every round: "
                "its exporter thread is stuck or the master is overloaded; recent exits may be missing"
            )
    server = ServerFacts(
        master_pid=info.master_pid,
        proc_name=info.proc_name,
        binds=list(info.binds),
        pidfile=info.pidfile,
        worker_class=info.worker_class,
        workers=info.workers,
        threads=info.threads,
        connections_limit=info.connections_limit,
        timeout=info.timeout,
        started=info.started,
        scoreboard=info.scoreboard,
        prometheus_dir=info.prometheus_dir,
        metrics_url=info.metrics_url,
        statsd=info.statsd,
        otlp=info.otlp,
        run_dir=reading.server.run_dir,
        uptime=_seconds(reading.wall - info.started),
    )
    return StatusDocument(
        format=FORMAT,
        time=round(reading.wall, 3),
        server=server,
        totals=Totals(
            workers=len(workers),
            booting=sum(1 for worker in workers if worker["state"] == "booting"),
            # busy is counted here from the scoreboard, in requests like capacity, and fresh: status.json is up
            # to a round old. capacity comes from the master when it wrote one: it resolved the worker class.
            busy=sum(min(worker["in_flight"], per_worker) for worker in workers),
            capacity=status.capacity if status is not None else len(workers) * per_worker,
            busy_workers=sum(1 for worker in workers if worker["in_flight"]),
            in_flight=sum(worker["in_flight"] for worker in workers),
            waiting=sum(worker["waiting"] for worker in workers),
            connections=sum(worker["connections"] for worker in workers),
            served=sum(worker["served"] for worker in workers),
            desired=status.workers_desired if status is not None else None,
            master_loop_stuck=status.master_loop_stuck if status is not None else None,
        ),
        listeners=None
        if status is None
        else [
            ListenerFacts(name=item.name, backlog=item.backlog, backlog_max=item.backlog_max, drops=item.drops)
            for item in status.listeners
        ],
        workers=workers,
        recent_exits=[]
        if status is None
        else [
            cast(ExitFacts, dataclasses.asdict(item))  # the same fields: test_cli pins them equal
            for item in reversed(status.recent_exits)
        ],
        status_age=status_age,
        warnings=warnings,
    )


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


def _header(snap: StatusDocument) -> Text:
    server = snap["server"]
    text = Text()
    text.append(server["proc_name"], style="bold")
    text.append(f"  master {server['master_pid']}  {server['worker_class']}")
    binds = server["binds"]
    if binds:
        text.append(f"  {', '.join(binds)}")
    text.append(f"  up {duration(server['uptime'])}")
    return text


def _totals(snap: StatusDocument) -> Text:
    totals = snap["totals"]
    text = Text()
    workers = f"workers {totals['workers']}"
    if totals["booting"]:
        workers += f" ({totals['booting']} booting)"
    text.append(workers)
    desired = totals["desired"]
    if desired is not None and desired != totals["workers"]:
        text.append(f" (gunicorn keeps {desired})", style="bold yellow")
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
        backlog, most = listener["backlog"], listener["backlog_max"]
        style = "bold red" if isinstance(backlog, int) and backlog > 0 else ""
        text.append(f"   backlog {listener['name']} ")
        text.append(f"{backlog if backlog is not None else '-'}/{most if most is not None else '-'}", style=style)
        dropped = listener.get("drops")
        if dropped:
            text.append(" dropped ")
            text.append(str(dropped), style="bold red")
    stuck = totals["master_loop_stuck"]
    if stuck is not None and stuck >= MASTER_LOOP_STUCK:
        text.append("   master loop stuck ")
        text.append(duration(stuck), style="bold red")
    return text


def _request_cell(worker: WorkerFacts, timeout: int | None) -> tuple[Text, Text]:
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


def workers_table(snap: StatusDocument) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name, justify in (
        ("slot", "right"),
        ("pid", "right"),
        ("state", "left"),
        ("request", "left"),
        ("elapsed", "right"),
        ("served", "right"),
        ("conns", "right"),
        ("RSS MiB", "right"),
        ("age", "right"),
    ):
        # Only the request wraps: the numbers stay on one line, readable at a glance in 80 columns.
        table.add_column(
            name,
            justify=justify,  # type: ignore[arg-type]  # rich wants a Literal; the pairs above are all valid
            no_wrap=name != "request",
            overflow="fold",
            min_width=24 if name == "request" else None,
        )
    timeout = snap["server"]["timeout"]
    for worker in snap["workers"]:
        request, elapsed = _request_cell(worker, timeout)
        state = Text(worker["state"], style=_STATE_STYLE.get(worker["state"], ""))
        if worker["marks"]:
            state.append(f" {','.join(worker['marks'])}", style="red")
        table.add_row(
            str(worker["slot"]),
            str(worker["pid"] or "-"),
            state,
            request,
            elapsed,
            str(worker["served"]),
            f"{worker['connections']}/{worker['connections_limit']}",
            mebibytes(worker["rss_bytes"]),
            duration(worker["age"]),
        )
    return table


def exits_table(exits: Iterable[ExitFacts]) -> Table:
    # Slot, served and RSS stay in the JSON: the human view keeps what explains the exit.
    table = Table(
        title="recent exits", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
    )
    for name in ("time", "pid", "cause", "request", "elapsed", "uptime", "detail"):
        table.add_column(
            name,
            overflow="fold",
            no_wrap=name not in {"request", "detail"},
            justify="right" if name in {"pid", "elapsed", "uptime"} else "left",
        )
    for item in exits:
        cause = item["cause"] or "-"
        expected = cause in {"max_requests", "graceful"}
        table.add_row(
            clock(item["time"]),
            str(item["pid"] or "-"),
            Text(cause, style="" if expected else "bold red"),
            item["request"] or "-",
            duration(item["elapsed"]),
            duration(item["uptime"]),
            item["detail"],
        )
    return table


def render(snap: StatusDocument, *, max_exits: int | None = None) -> RenderableType:
    parts: list[RenderableType] = [_header(snap), _totals(snap), workers_table(snap)]
    exits = snap["recent_exits"][:max_exits] if max_exits is not None else snap["recent_exits"]
    if exits:
        parts.append(exits_table(exits))
    for warning in snap["warnings"]:
        parts.append(Text(f"warning: {warning}", style="yellow"))
    if snap["server"]["metrics_url"]:
        parts.append(Text(f"metrics: {snap['server']['metrics_url']}", style="dim"))
    return Group(*parts)
