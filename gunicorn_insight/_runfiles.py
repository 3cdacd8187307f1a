"""Files next to the scoreboard that let tools find a running server and read the master's own facts.

``server.json`` is written once when the master starts; ``status.json`` after every round (atomically,
by rename, on tmpfs). Per-worker facts stay in the scoreboard itself; these files hold what only the
master knows: the listen backlog, totals, and the recent worker exits with their causes.

Each file is one typed record below (:class:`ServerInfo`, :class:`StatusRecord`), used by the writer (the
master) and by every reader (discovery, ``status``/``top``, ``doctor``), so the two cannot drift apart. Each
file carries a ``format`` number: a reader given another format raises :class:`ContractError` saying which
side is newer and what to do, instead of guessing at fields it does not know.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
import types
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from ._facts import Round
from ._version import __version__

SERVER_FILE = "server.json"
STATUS_FILE = "status.json"
SERVER_FORMAT = 1
"""Version of server.json's fields; bumped when a field is removed or changes meaning (adding one is not)."""
STATUS_FORMAT = 2
"""Version of status.json's fields, bumped on the same rule."""
RECENT_EXITS = 20
STACKS_FILE = "stacks-{slot}.json"
"""A worker's answer to ``gunicorn-insight stacks`` (written by its watchdog, overwritten by the next answer)."""
STACKS_FORMAT = 1
"""Version of the stacks file's fields, bumped on the same rule as the others."""


class ContractError(ValueError):
    """A run file that this gunicorn-insight cannot read: another format, or a field missing or mistyped."""


@dataclass(frozen=True)
class ServerInfo:
    """``server.json``: what a tool needs to find and label a server. Written once by the master."""

    master_pid: int
    proc_name: str
    started: float
    """Wall-clock time the file was written; a pid that began well after it was recycled."""
    binds: tuple[str, ...]
    pidfile: str | None
    worker_class: str
    workers: int | None
    threads: int | None
    worker_connections: int | None
    connections_limit: int
    """Connections one worker serves at once (1 for sync): the scoreboard's per-slot limit."""
    per_worker_capacity: int
    """Requests one worker serves at once: what busy and capacity are counted in."""
    timeout: int | None
    interval: float
    """Seconds between two of the master's rounds: status.json is rewritten that often."""
    version: str
    request_hooks: str
    scoreboard_version: int
    scoreboard: str
    prometheus_dir: str | None
    metrics_url: str | None
    statsd: str | None
    otlp: str | None
    """The OTLP endpoint, ``OTEL_EXPORTER_OTLP_*`` when the variables give it, None when OTLP is off."""
    max_requests: int | None
    preload_app: bool | None
    gunicorn_version: str | None


@dataclass(frozen=True)
class Listener:
    """One of gunicorn's listening sockets and its accept queue (None: the kernel would not say)."""

    name: str
    backlog: int | None
    backlog_max: int | None
    time_wait: int | None = None
    """TCP: its connections closed in the last minute, in TIME_WAIT (see _timewait); None for a unix socket, or
    from a master before this field (a field with a default may be missing)."""
    drops: int | None = None
    """TCP: the packets the kernel dropped at it since the master started, almost all of them connection attempts
    met by a full accept queue; None for a unix socket, a kernel without SO_MEMINFO, or an older master."""


@dataclass(frozen=True)
class WorkerExit:
    """One worker exit as the master judged it (see gunicorn_insight._master.forensics)."""

    time: float
    pid: int
    slot: int
    cause: str
    detail: str
    uptime: float
    served: int
    rss: int
    request: str | None
    """``METHOD path`` of the oldest request the worker was serving, None when it was idle."""
    elapsed: float | None


@dataclass(frozen=True)
class HeldMemory:
    """What one worker's resident memory grows by per request it holds open, measured over the master's
    recent rounds (see gunicorn_insight._master.growth)."""

    slot: int
    pid: int
    bytes_per_request: int
    """The least-squares slope of the worker's RSS against its requests in flight."""
    idle_bytes: int
    """The line's RSS at no request in flight."""
    requests_low: int
    requests_high: int
    """The fewest and the most requests in flight seen in the rounds measured."""
    rounds: int
    correlation: float
    measured: float
    """Wall-clock time of the round that measured it (kept for the worker's life)."""


@dataclass(frozen=True)
class Growth:
    """A resource one worker holds more of with every request it serves, still held while it is idle."""

    slot: int
    pid: int
    resource: str
    """``open_fds``, ``threads`` or ``memory_bytes``."""
    at_ready: int
    """The reading when the master first saw the worker ready."""
    now: int
    """The reading at the worker's latest idle moment."""
    served: int
    """Requests the worker served between the two readings."""
    per_1000: float
    kinds: str
    """For descriptors: what they are by kind ("300 files, 4 sockets"); "" otherwise or unreadable."""

    def what(self) -> str:
        """The evidence, in one sentence (the master's log line and the doctor's finding say the same)."""
        name = _GROWN[self.resource]
        show = _mebibytes if self.resource == "memory_bytes" else str
        rate = f"{self.per_1000 / 1048576:.1f} MiB" if self.resource == "memory_bytes" else f"{self.per_1000:,.0f}"
        return (
            f"worker pid={self.pid} slot={self.slot} holds more {name} with every request it serves: "
            f"{show(self.at_ready)} when it became ready, {show(self.now)} after {self.served:,} requests "
            f"(about {rate} more per 1,000 requests), and {'it is' if self.resource == 'memory_bytes' else 'they are'} "
            "still held while it is idle"
            + (f"; its descriptors by kind, when last listed: {self.kinds}" if self.kinds else "")
        )

    def fix(self, max_requests: int, fd_limit: int | None = None) -> str:
        """Where to look for the leak, and the stopgap."""
        find = {
            "open_fds": f"`ls -l /proc/{self.pid}/fd` shows what each descriptor is (a file, a socket and its "
            "peer in `ss -tp`); look for files or connections opened per request and never closed (a client "
            "or session built per request)",
            "threads": f"`gunicorn-insight stacks` or `py-spy dump --pid {self.pid}` names the threads and "
            "where they wait; look for a thread, pool or client started per request and never stopped",
            "memory_bytes": "compare two tracemalloc snapshots (or run memray) in one worker to see which "
            "allocation sites grow; look for caches without a bound and objects kept per request",
        }[self.resource]
        stopgap = (
            f"max_requests={max_requests} already recycles each worker after that many requests"
            if max_requests
            else "as a stopgap set max_requests (e.g. 1000, with max_requests_jitter 100) so each worker is "
            "replaced before the leak hurts"
        )
        if self.resource == "open_fds" and fd_limit and self.per_1000 > 0:
            left = (fd_limit - self.now) / self.per_1000 * 1000
            stopgap += (
                f"; at this rate it reaches its open-file limit ({fd_limit}) in about {max(0, left):.0f} more requests"
            )
        return f"find the leak: {find}; {stopgap}"


_GROWN = {"open_fds": "open file descriptors", "threads": "threads", "memory_bytes": "memory"}


def _mebibytes(value: int) -> str:
    return f"{value / 1048576:.0f} MiB"


@dataclass(frozen=True)
class StatusRecord:
    """``status.json``: the master's last round. Rewritten after every round."""

    time: float
    monotonic: float
    workers: int
    busy_workers: int
    in_flight: int
    capacity: int
    waiting: int
    connections: int
    listeners: tuple[Listener, ...]
    listen_overflows: int
    lost_requests: int
    recent_exits: tuple[WorkerExit, ...]
    """Oldest first, at most RECENT_EXITS."""
    rounds: int
    """Rounds the master has run since it started (a scrape flood must not multiply them)."""
    workers_ready: int
    workers_booting: int
    stalled_requests: int
    crash_loop: bool
    host: dict[str, Any]
    """The host readings (see host_status); a reading the kernel did not give is left out."""
    workers_desired: int | None
    """The number of workers gunicorn keeps (``workers``, moved by TTIN/TTOU); None where it was not read."""
    master_loop_stuck: float | None
    """Seconds since gunicorn's master loop was last seen waiting for signals; None while unknown."""
    held_memory: tuple[HeldMemory, ...] = ()
    """Per live worker whose rounds measured it: the memory each request in flight holds."""
    growth: tuple[Growth, ...] = ()
    """Per live worker: what it holds more of with each request served (descriptors, threads, memory)."""
    stalled_since: float | None = None
    """Unix time the stall in progress began (its last request finished); None when the server is not stalled.
    ``doctor`` compares it across the servers of a host."""


_EXCLUSIVE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """Replace the file whole (a temporary beside it, then a rename) readable by the CLI of any user.

    With gunicorn's --user the run directory belongs to the workers' user, who could plant a link there for a
    root master to write through. The temporary is opened with O_EXCL, which creates it or fails, never
    following a link; one already there (a master killed before its rename, or planted) is removed, which
    removes a link, not what it points to. Its name is this thread's own, as two threads may write at once.
    The master writes status.json every round: this costs half of mkstemp and a file object."""
    data = json.dumps(payload, separators=(",", ":")).encode()  # dumps: the C encoder; dump streams in Python
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(temporary, _EXCLUSIVE, 0o644)
    except FileExistsError:
        os.unlink(temporary)
        fd = os.open(temporary, _EXCLUSIVE, 0o644)
    try:
        try:
            os.fchmod(fd, 0o644)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def encode(record: ServerInfo | StatusRecord) -> dict[str, Any]:
    """The record as the JSON object its file holds, format number first."""
    form = SERVER_FORMAT if isinstance(record, ServerInfo) else STATUS_FORMAT
    return {"format": form, **_plain(record)}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _plain(value: Any) -> Any:
    """What ``json.dumps(dataclasses.asdict(value))`` writes, made without asdict's deep copy of every value:
    the master writes status.json every round (a record with ten exits: 30 µs here, 139 through asdict)."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    names = _FIELD_NAMES.get(kind)
    if names is None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = _FIELD_NAMES[kind] = tuple(field.name for field in dataclasses.fields(value))
    if names is not None:
        return {name: _plain(getattr(value, name)) for name in names}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


_R = TypeVar("_R")


def decode(kind: type[_R], data: Any, source: str) -> _R:
    """The record of type `kind` held in `data` (parsed JSON) read from `source` (a path, for messages).

    Keys the record does not know are ignored (a newer writer of the same format may add some); a field added
    within the format has a default, taken when an older writer left it out; any other missing or mistyped
    field, or another format number, is a ContractError naming the file and the field.
    """
    expected = SERVER_FORMAT if kind is ServerInfo else STATUS_FORMAT
    if not isinstance(data, dict):
        raise ContractError(f"{source} does not hold a JSON object")
    written = data.get("format")
    if not isinstance(written, int) or isinstance(written, bool):
        raise ContractError(f"{source} has no format number: it was not written by gunicorn-insight")
    if written != expected:
        newer = written > expected
        writer = data.get("version")  # server.json names the version that wrote it
        raise ContractError(
            f"{source} is format {written}, written by {'a newer' if newer else 'an older'} gunicorn-insight"
            + (f" ({writer})" if isinstance(writer, str) else "")
            + f"; this gunicorn-insight ({__version__}) reads format {expected}: "
            + (
                "upgrade it (pip install -U gunicorn-insight) or run the server's own gunicorn-insight"
                if newer
                else "run the server's own gunicorn-insight, or restart the server with this version"
            )
        )
    return _fields(kind, data, source)


def _fields(kind: type[_R], data: Mapping[str, Any], where: str) -> _R:
    hints = get_type_hints(kind)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(kind):  # type: ignore[arg-type]  # kind is one of the records above
        if field.name not in data:
            if field.default is not dataclasses.MISSING:  # added within the format: an older writer leaves it out
                continue
            raise ContractError(f"{where} has no field {field.name!r}")
        values[field.name] = _value(hints[field.name], data[field.name], f"{where}: {field.name}")
    return kind(**values)


def _value(kind: Any, value: Any, where: str) -> Any:
    origin = get_origin(kind)
    if origin in (Union, types.UnionType):
        options = [option for option in get_args(kind) if option is not type(None)]
        if value is None and len(options) < len(get_args(kind)):
            return None
        (kind,) = options
        origin = get_origin(kind)
    if origin is dict:
        if not isinstance(value, dict):
            raise ContractError(f"{where} is {value!r}, not an object")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list):
            raise ContractError(f"{where} is {value!r}, not a list")
        item_kind = get_args(kind)[0]
        return tuple(_value(item_kind, item, f"{where}[{number}]") for number, item in enumerate(value))
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ContractError(f"{where} is {value!r}, not an object")
        return _fields(kind, value, where)  # type: ignore[arg-type]  # a record class, not an instance
    wanted = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) is not (kind is bool) or not isinstance(value, wanted):
        raise ContractError(f"{where} is {value!r}, not {kind.__name__}")
    return float(value) if kind is float else value


def newer_or_same(answered: int, asked: int) -> bool:
    """The STACKS_ASKED counter wraps at 2**32: an answer counts when it is the question or a later one."""
    return (answered - asked) & 0xFFFFFFFF < 0x80000000


def read_stacks_answer(run_dir: str, slot: int, pid: int, asked: int) -> dict[str, Any] | None:
    """A worker's stacks file answering question ``asked`` (or a later one), from worker ``pid``; None when
    there is none yet: not written, another worker's, an earlier answer, or not readable."""
    try:
        with open(os.path.join(run_dir, STACKS_FILE.format(slot=slot))) as handle:
            answer = json.load(handle)
    except (OSError, ValueError):
        return None  # not written yet (or another user's: then it never will be readable, and the caller says so)
    if (
        not isinstance(answer, dict)
        or answer.get("format") != STACKS_FORMAT
        or answer.get("pid") != pid
        or not isinstance(answer.get("asked"), int)
        or not newer_or_same(answer["asked"], asked)
    ):
        return None
    return answer


def read_record(kind: type[_R], path: str) -> _R:
    """Read and decode one run file; OSError when it cannot be read, ContractError when it is not usable."""
    with open(path) as handle:
        try:
            data = json.load(handle)
        except ValueError as error:
            raise ContractError(f"{path} is not JSON: {error}") from None
    return decode(kind, data, path)


class StatusFiles:
    """The master's writer of server.json (once) and status.json (every round), with the recent exits."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.exits: deque[WorkerExit] = deque(maxlen=RECENT_EXITS)
        self.listen_overflows = 0
        self.listen_drops: dict[str, int] = {}  # listener -> drops since the master started
        self.rounds = 0
        self.held_memory: tuple[HeldMemory, ...] = ()
        self.growth: tuple[Growth, ...] = ()

    def write_server(self, description: ServerInfo) -> None:
        write_json(os.path.join(self.run_dir, SERVER_FILE), encode(description))

    def record_exit(
        self,
        *,
        pid: int,
        slot: int,
        cause: str,
        detail: str,
        uptime: float,
        served: int,
        rss: int,
        request: str | None,
        elapsed: float | None,
    ) -> None:
        self.exits.append(WorkerExit(time.time(), pid, slot, cause, detail, uptime, served, rss, request, elapsed))

    def write_round(self, facts: Round) -> None:
        self.listen_overflows += facts.listen_overflows
        for name, dropped in facts.listen_drops.items():
            self.listen_drops[name] = self.listen_drops.get(name, 0) + dropped
        self.rounds += 1
        now = time.time()
        record = StatusRecord(
            time=now,
            monotonic=facts.at,
            workers=facts.workers,
            busy_workers=facts.busy_workers,
            in_flight=facts.in_flight,
            capacity=facts.capacity,
            waiting=facts.waiting,
            connections=facts.total_connections,
            listeners=tuple(
                Listener(
                    name,
                    queued,
                    limit,
                    facts.time_wait.get(name),
                    self.listen_drops.get(name) if name in facts.listen_drops else None,
                )
                for name, (queued, limit) in sorted(facts.listeners.items())
            ),
            listen_overflows=self.listen_overflows,
            lost_requests=facts.lost,
            recent_exits=tuple(self.exits),
            rounds=self.rounds,
            workers_ready=facts.ready_workers,
            workers_booting=facts.booting_workers,
            stalled_requests=facts.stalled_requests,
            crash_loop=facts.crash_loop,
            host=host_status(facts),
            workers_desired=facts.desired_workers,
            master_loop_stuck=facts.master_loop_stuck,
            held_memory=self.held_memory,
            growth=self.growth,
            stalled_since=None if facts.stalled_for is None else now - facts.stalled_for,
        )
        write_json(os.path.join(self.run_dir, STATUS_FILE), encode(record))


def host_status(facts: Round) -> dict[str, Any]:
    """The host readings for tools (the doctor judges memory against the limit, throttling, pressure); a
    reading the kernel did not give is left out, never 0."""
    host = facts.host
    if host is None:
        return {}
    found: dict[str, Any] = {
        name: value
        for name, value in (
            ("cpu_quota_cores", host.quota_cores),
            ("memory_usage_bytes", host.memory_usage),
            ("memory_working_set_bytes", host.memory_working_set),
            ("memory_limit_bytes", host.memory_limit),
            ("pids", host.pids),
            ("pids_limit", host.pids_limit),
        )
        if value is not None
    }
    if host.throttling is not None:
        found["cpu_periods"] = host.throttling.periods
        found["cpu_throttled_periods"] = host.throttling.throttled_periods
        found["cpu_throttled_seconds"] = host.throttling.throttled_seconds
    if host.pressure:
        found["pressure_seconds"] = {
            f"{resource}_{kind}": seconds for (resource, kind), seconds in sorted(host.pressure.items())
        }
    if facts.swap:
        found["swap_bytes"] = sum(facts.swap.values())
    return found
