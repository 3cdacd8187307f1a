"""``gunicorn-insight doctor --pid N``: judge a running server from what it measurably does.

The doctor watches the server for a short window (``--window``, 3 s by default), reading only: the
scoreboard (mapped read-only) every 50 ms for busy workers and requests in flight; ``status.json`` for the
listen backlog and recent exits; ``/proc`` for the workers' CPU time at both ends of the window and the
cgroup's memory; and, when the server exports to Prometheus, the multiprocess files at both ends of the
window for queue time; the kernel's sock_diag for the connections each TCP listener closed (TIME_WAIT);
and every server of the host's ``status.json``: when two or more are stalled at once, their workers are
asked for their requests' stacks (see cli.hoststalls), the one write the doctor makes. Each check in
:data:`LIVE_CHECKS` turns those facts into findings (``_doctor.Finding``) that state the evidence in
``what`` and say what to change in ``fix``.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import _scoreboard as sb
from .._cgroup import memory_cgroup_dirs
from .._discovery import Server
from .._proc import cpu_seconds
from .._runfiles import Growth, HeldMemory, ServerInfo, StatusRecord, WorkerExit
from .._timewait import TIME_WAIT_SECONDS, ephemeral_ports, time_wait
from .doctor import Finding, Severity
from .hostfacts import GunicornOnHost, gunicorn_on_host, meminfo
from .hoststalls import HostStalls, module_of
from .hoststalls import find as find_host_stalls
from .views import read_status

DEFAULT_WINDOW = 3.0
SAMPLE_EVERY = 0.05
SATURATED = 0.9
"""Mean busy/capacity over the window at or above which the server is saturated."""
CPU_BOUND = 0.6
"""CPU seconds per busy request-second at or above which requests are computing rather than waiting."""
CPU_FULL = 0.9
"""Share of the CPUs the workers may use at or above which the CPUs are the limit."""
MEMORY_NEAR_LIMIT = 0.8
HOST_MEMORY_LOW = 0.1
"""The host's MemAvailable below this share of MemTotal: memory is nearly exhausted."""
QUEUE_SLOW = 0.1
"""Mean seconds a request waits for a worker at or above which the queue is worth a finding."""
TIME_WAIT_FLOOR = 100
"""Fewer connections in TIME_WAIT on a listener than this are never worth a finding."""
TIME_WAIT_PORT_SHARE = 0.1
"""TIME_WAIT connections on one listener, as a share of the ephemeral port range, worth a warning..."""
TIME_WAIT_PORT_SHARE_ERROR = 0.5
"""...and an error: the proxy is near the end of the ports it can connect from."""
CONNECTIONS_PER_REQUEST = 0.5
"""Connections gunicorn closed per request finished, during the window, at or above which most requests
come on a connection of their own."""
TIMEOUT_CAUSES = ("timeout", "timeout_kill")
_UNLIMITED = 1 << 60
_QUEUE = "gunicorn_request_queue_seconds"


@dataclass
class Histogram:
    """Count and sum of a histogram's observations (over every label)."""

    count: float = 0.0
    total: float = 0.0

    def minus(self, earlier: Histogram) -> Histogram:
        return Histogram(self.count - earlier.count, self.total - earlier.total)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count > 0 else None


@dataclass(frozen=True)
class ListenerTimeWait:
    """One TCP listener's connections in TIME_WAIT, as the doctor read them at the end of its window."""

    listener: str
    count: int
    closed_in_window: int | None
    """Those that entered TIME_WAIT during the window; None where the doctor could not ask the kernel itself
    (another network namespace) and took the master's count."""


@dataclass
class LiveFacts:
    """What the doctor measured on one server over one window."""

    info: ServerInfo
    window: float
    samples: int = 0
    worker_class: str = "unknown"
    workers: int = 0
    """Live workers that have loaded the application (the last sample)."""
    per_worker: int = 1
    capacity: int = 0
    busy_now: int = 0
    """Request slots in use in the last sample."""
    utilisation: float = 0.0
    """Mean of busy/capacity over the samples."""
    busy_seconds: float = 0.0
    """Request-seconds spent serving during the window (sampled)."""
    cpu_seconds: float = 0.0
    """CPU seconds (user + system) the workers used during the window."""
    cpus: float = 1.0
    """CPUs the server may use: its affinity, and its cgroup's CPU quota when that is lower."""
    backlog_peak: int = 0
    backlog_limit: int | None = None
    backlog_listener: str | None = None
    listen_overflows: int = 0
    """The network namespace's connections dropped on a full accept queue since the master started."""
    listen_drops: dict[str, int] = field(default_factory=dict)
    """TCP listener -> connection attempts the kernel dropped at it since the master started (where it says)."""
    rss: list[int] = field(default_factory=list)
    memory_used: int | None = None
    memory_limit: int | None = None
    slow_requests: int = 0
    """Requests the watchdogs reported past slow_request_timeout, since the server started."""
    oldest_request: tuple[str, float] | None = None
    """(method and path, seconds in flight) of the oldest request in flight at the end."""
    recent_exits: tuple[WorkerExit, ...] = ()
    cpu_start: dict[int, float] = field(default_factory=dict)
    """pid -> CPU seconds the worker had used when the doctor first saw it."""
    queue_window: Histogram | None = None
    """Queue time observed during the window; None when the server exports no Prometheus files."""
    queue_total: Histogram | None = None
    host_memory: tuple[int, int] | None = None
    """(MemTotal, MemAvailable) of the host, in bytes."""
    host_gunicorn: GunicornOnHost | None = None
    """Every gunicorn server on the host, this one included."""
    held_memory: tuple[HeldMemory, ...] = ()
    """The master's estimates of the memory each request in flight holds, per worker (status.json)."""
    growth: tuple[Growth, ...] = ()
    """What the master found growing with requests served, per worker (status.json)."""
    host_stalls: HostStalls | None = None
    """The host's servers with gunicorn-insight stalled right now, when two or more are (this one or not)."""
    requests_in_window: int | None = None
    """Requests the workers finished during the window (the scoreboard's ring heads)."""
    time_wait: tuple[ListenerTimeWait, ...] = ()
    ephemeral_ports: tuple[int, int] | None = None
    """The kernel's ip_local_port_range: where a proxy on this host takes each connection's local port."""

    @property
    def timeout(self) -> float:
        return float(self.info.timeout or 0)

    @property
    def cpu_per_busy_second(self) -> float | None:
        return self.cpu_seconds / self.busy_seconds if self.busy_seconds >= 0.1 else None

    def summary(self) -> str:
        """One line of what was measured, above the findings."""
        ratio = self.cpu_per_busy_second
        memory = (
            "no cgroup memory limit"
            if self.memory_limit is None or self.memory_used is None
            else f"memory {_mib(self.memory_used)} of {_mib(self.memory_limit)}"
        )
        queue = self.queue_window.mean if self.queue_window is not None else None
        return (
            f"watched {self.window:.1f}s: {self.workers} {self.worker_class} workers, utilisation "
            f"{self.utilisation:.0%}, busy {self.busy_now}/{self.capacity} at the end, CPU {self.cpu_seconds:.2f}s"
            f" ({'-' if ratio is None else f'{ratio:.0%}'} of busy time) on {self.cpus:g} CPUs, backlog peak "
            f"{self.backlog_peak}, {memory}, queue time "
            + ("not measured" if queue is None else f"{queue * 1000:.0f} ms")
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "master_pid": self.info.master_pid,
            "worker_class": self.worker_class,
            "workers": self.workers,
            "capacity": self.capacity,
            "busy_now": self.busy_now,
            "window": round(self.window, 3),
            "samples": self.samples,
            "utilisation": round(self.utilisation, 3),
            "busy_seconds": round(self.busy_seconds, 3),
            "cpu_seconds": round(self.cpu_seconds, 3),
            "cpu_per_busy_second": None if self.cpu_per_busy_second is None else round(self.cpu_per_busy_second, 3),
            "cpus": round(self.cpus, 2),
            "backlog_peak": self.backlog_peak,
            "backlog_limit": self.backlog_limit,
            "listen_overflows": self.listen_overflows,
            "listen_drops": self.listen_drops,
            "worker_rss_bytes": self.rss,
            "memory_used_bytes": self.memory_used,
            "memory_limit_bytes": self.memory_limit,
            "host_memory_total_bytes": None if self.host_memory is None else self.host_memory[0],
            "host_memory_available_bytes": None if self.host_memory is None else self.host_memory[1],
            "host_gunicorn_servers": None if self.host_gunicorn is None else self.host_gunicorn.servers,
            "host_gunicorn_rss_bytes": None if self.host_gunicorn is None else self.host_gunicorn.rss,
            "host_stalled_servers": None
            if self.host_stalls is None
            else [
                {"master_pid": item.server.master_pid, "since": round(item.since, 3), "in_flight": item.in_flight}
                for item in self.host_stalls.stalled
            ],
            "slow_requests": self.slow_requests,
            "queue_seconds_mean": None
            if self.queue_window is None or self.queue_window.mean is None
            else round(self.queue_window.mean, 4),
            "timeout": self.timeout,
            "requests_in_window": self.requests_in_window,
            "time_wait": {
                found.listener: {"count": found.count, "closed_in_window": found.closed_in_window}
                for found in self.time_wait
            },
            "ephemeral_ports": None if self.ephemeral_ports is None else list(self.ephemeral_ports),
        }


# -- measuring -------------------------------------------------------------------------------------------


def _read_int(path: str) -> int | None:
    try:
        with open(path) as handle:
            text = handle.read().split()
        return int(text[0]) if text and text[0] != "max" else None
    except (OSError, ValueError):
        return None


def server_cpus(pid: int) -> float:
    """CPUs the master (so its workers) may run on, lowered by a cgroup v2 CPU quota."""
    try:
        cpus: float = len(os.sched_getaffinity(pid))
    except OSError:
        cpus = float(os.cpu_count() or 1)
    for version, directory in memory_cgroup_dirs(f"/proc/{pid}/cgroup", include_root=False):
        if version != 2:
            continue
        try:
            with open(os.path.join(directory, "cpu.max")) as handle:
                quota, period = handle.read().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, int(quota) / int(period))
    return cpus


def server_memory(pid: int) -> tuple[int | None, int | None]:
    """(working set, limit) of the master's memory cgroup; (None, None) when it has no limit.

    The working set is usage minus the inactive file cache, as the kubelet counts it: the kernel reclaims
    that cache before it OOM-kills anyone, so it is not memory the workers are short of.
    """
    for version, directory in memory_cgroup_dirs(f"/proc/{pid}/cgroup", include_root=False):
        names = (
            ("memory.current", "memory.max", "inactive_file")
            if version == 2
            else ("memory.usage_in_bytes", "memory.limit_in_bytes", "total_inactive_file")
        )
        used, limit = _read_int(os.path.join(directory, names[0])), _read_int(os.path.join(directory, names[1]))
        if used is not None and limit is not None and limit < _UNLIMITED:
            return max(0, used - _stat_value(os.path.join(directory, "memory.stat"), names[2])), limit
    return None, None


def _stat_value(path: str, key: str) -> int:
    try:
        with open(path) as handle:
            for line in handle:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        return 0
    return 0


@contextlib.contextmanager
def _shared_merge_lock(directory: str) -> Iterator[None]:
    """The master's merge lock, taken shared through a read-only descriptor; nothing is created."""
    try:
        fd = os.open(os.path.join(directory, ".gunicorn-insight.lock"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def read_histogram(directory: str | None, name: str) -> Histogram | None:
    """Count and sum of ``name`` in the multiprocess files; None when there are no files to read."""
    if not directory or not os.path.isdir(directory):
        return None
    from prometheus_client.multiprocess import MultiProcessCollector

    from .._export.prometheus import usable_files

    found = Histogram()
    try:
        with _shared_merge_lock(directory):
            families = list(MultiProcessCollector.merge(usable_files(directory), accumulate=True))
    except (OSError, ValueError):
        return None
    for family in families:
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_count":
                found.count += sample.value
            elif sample.name == f"{name}_sum":
                found.total += sample.value
    return found


def _status(server: Server) -> StatusRecord | None:
    return read_status(server.status_path)[0]


def measure(server: Server, board: sb.Scoreboard, window: float = DEFAULT_WINDOW) -> LiveFacts:
    info = server.info
    facts = LiveFacts(info, window, worker_class=info.worker_class, per_worker=info.per_worker_capacity)
    facts.cpus = server_cpus(server.master_pid)
    queue_before = read_histogram(server.prometheus_dir, _QUEUE)
    heads_before = _heads(board)
    views = _watch(facts, server, board)
    facts.requests_in_window = max(0, _heads(board) - heads_before)
    for view in views:
        used = cpu_seconds(view.pid)
        if used is not None and view.pid in facts.cpu_start:
            facts.cpu_seconds += used - facts.cpu_start[view.pid]
    facts.rss = [view.rss for view in views if view.rss]
    facts.memory_used, facts.memory_limit = server_memory(server.master_pid)
    facts.host_memory, facts.host_gunicorn = meminfo(), gunicorn_on_host()
    facts.host_stalls = find_host_stalls()
    facts.slow_requests = sum(view.slow for view in board if view.state != sb.FREE)
    requests = [request for view in views for request in view.requests]
    if requests:
        oldest = min(requests, key=lambda request: request.started)
        facts.oldest_request = (f"{oldest.method} {oldest.path}", max(0.0, time.monotonic() - oldest.started))
    status = _status(server)
    if status is not None:
        facts.recent_exits = status.recent_exits
        facts.listen_overflows = status.listen_overflows
        facts.listen_drops = {item.name: item.drops for item in status.listeners if item.drops is not None}
        live = {view.pid for view in views}
        facts.held_memory = tuple(held for held in status.held_memory if held.pid in live)
        facts.growth = tuple(growth for growth in status.growth if growth.pid in live)
        facts.time_wait = _read_time_wait(status, server.master_pid, facts.window)
    facts.ephemeral_ports = ephemeral_ports()
    queue_after = read_histogram(server.prometheus_dir, _QUEUE)
    if queue_after is not None:
        facts.queue_total = queue_after
        facts.queue_window = queue_after.minus(queue_before) if queue_before is not None else None
    return facts


def _heads(board: sb.Scoreboard) -> int:
    """Requests ever finished in every slot (a slot's ring head survives its workers)."""
    return sum(board.head(index) for index in range(board.slots))


def _same_network(pid: int) -> bool | None:
    """Whether the server's network namespace is the doctor's; None where /proc will not say."""
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    except OSError:
        return None


def listener_address(name: str) -> tuple[int, str, int] | None:
    """(family, host, port) of a TCP listener named as gunicorn names it (``http://[::1]:8000``)."""
    _, separator, rest = name.partition("://")
    if not separator:
        return None
    host, _, port = rest.rpartition(":")
    if not port.isdigit() or not host:
        return None
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, host[1:-1], int(port)
    return socket.AF_INET, host, int(port)


def _read_time_wait(status: StatusRecord, master_pid: int, window: float) -> tuple[ListenerTimeWait, ...]:
    """Each TCP listener's TIME_WAIT connections now, and those closed during the window (the kernel reports
    each one's time left), read here so they match the window's requests; the master's count where the
    doctor sees another network namespace than the server's."""
    own = _same_network(master_pid) is not False
    found = []
    for listener in status.listeners:
        address = listener_address(listener.name)
        if listener.time_wait is None or address is None:
            continue
        reading = time_wait(*address, recent_seconds=min(window, TIME_WAIT_SECONDS)) if own else None
        if reading is None:
            found.append(ListenerTimeWait(listener.name, listener.time_wait, None))
        else:
            found.append(ListenerTimeWait(listener.name, reading.count, reading.recent))
    return tuple(found)


def _watch(facts: LiveFacts, server: Server, board: sb.Scoreboard) -> list[sb.SlotView]:
    """Sample the scoreboard every SAMPLE_EVERY seconds for the window; returns the last sample's workers."""
    per_worker = facts.per_worker
    ratios: list[float] = []
    started = last = next_status = time.monotonic()
    while True:
        views = [view for view in board if view.state == sb.READY and view.pid]
        now = time.monotonic()
        for view in views:
            if view.pid not in facts.cpu_start:
                used = cpu_seconds(view.pid)
                if used is not None:
                    facts.cpu_start[view.pid] = used
        busy = sum(min(view.in_flight, per_worker) for view in views)
        if views:
            ratios.append(busy / (len(views) * per_worker))
        if facts.samples:
            facts.busy_seconds += busy * (now - last)
        facts.samples += 1
        last = now
        if now >= next_status:
            _sample_status(facts, _status(server))
            next_status = now + 0.5
        if now - started >= facts.window:
            break
        time.sleep(SAMPLE_EVERY)
    facts.window = last - started
    facts.workers = len(views)
    facts.capacity = len(views) * per_worker
    facts.busy_now = busy
    facts.utilisation = sum(ratios) / len(ratios) if ratios else 0.0
    return views


def _sample_status(facts: LiveFacts, status: StatusRecord | None) -> None:
    for listener in status.listeners if status is not None else ():
        if listener.backlog is not None and listener.backlog >= facts.backlog_peak:
            facts.backlog_peak = listener.backlog
            facts.backlog_listener = listener.name
            facts.backlog_limit = listener.backlog_max


# -- judging ----------------------------------------------------------------------------------------------

LiveCheck = Callable[[LiveFacts], Iterable[Finding]]


def _mib(value: float) -> str:
    return f"{value / 1048576:.0f} MiB"


def _workers_advice(facts: LiveFacts) -> str:
    """What to change when the workers cannot keep up: it depends on whether requests compute or wait."""
    ratio = facts.cpu_per_busy_second
    cpu_used = facts.cpu_seconds / facts.window / facts.cpus if facts.window > 0 else 0.0
    if ratio is None:
        return "add workers (or threads) if CPU and memory allow; the CPU share could not be measured"
    if ratio >= CPU_BOUND:
        if cpu_used >= CPU_FULL:
            return (
                f"the requests compute ({ratio:.0%} of their time on a CPU) and the workers already use "
                f"{cpu_used:.0%} of the {facts.cpus:g} CPUs: more workers will not help; make the hot "
                "requests cheaper, or add CPUs or hosts"
            )
        target = max(facts.workers + 1, math.floor(facts.cpus) + 1)
        return (
            f"the requests compute ({ratio:.0%} of their time on a CPU) and CPUs are left: raise workers to "
            f"about {target} (workers={facts.workers} now, {facts.cpus:g} CPUs)"
        )
    if facts.worker_class == "sync":
        return (
            f"the requests mostly wait (only {ratio:.0%} of their time on a CPU): switch to gthread "
            "(e.g. --threads 4, each worker then serves 4 requests at once) or gevent rather than adding "
            "processes, each of which costs its full memory"
        )
    if facts.worker_class == "gthread":
        threads = facts.per_worker
        return (
            f"the requests mostly wait (only {ratio:.0%} of their time on a CPU): raise threads "
            f"(threads={threads} now, e.g. {threads * 2}), or add workers if memory allows"
        )
    return "add workers if memory allows, or find what the requests wait for (database pool, an API)"


def check_saturation(facts: LiveFacts) -> Iterable[Finding]:
    if facts.capacity == 0 or facts.utilisation < SATURATED:
        return
    ratio = facts.cpu_per_busy_second
    yield Finding(
        "live-saturation",
        "warning",
        f"every worker busy: utilisation {facts.utilisation:.0%} over {facts.window:.1f}s ({facts.samples} "
        f"samples of the scoreboard), {facts.busy_now} of {facts.capacity} request slots in use at the end "
        f"({facts.workers} {facts.worker_class} workers)"
        + (
            ""
            if ratio is None
            else f"; CPU {facts.cpu_seconds:.2f}s for {facts.busy_seconds:.1f} request-seconds ({ratio:.0%})"
        ),
        "new requests wait in the listen queue for a free worker: response times grow by the wait, and "
        "proxies or platforms time out (nginx 504 after 60 s, Heroku H12) while the server looks healthy.",
        _workers_advice(facts),
    )


def check_backlog(facts: LiveFacts) -> Iterable[Finding]:
    # A listener's own drop count where the kernel gives one; else the namespace's, which any server on the host
    # (nginx's own listeners too) can raise.
    dropped = sum(facts.listen_drops.values()) if facts.listen_drops else facts.listen_overflows
    if facts.backlog_peak <= 0 and dropped <= 0:
        return
    parts = []
    if facts.backlog_peak > 0:
        limit = f" (limit {facts.backlog_limit})" if facts.backlog_limit is not None else ""
        parts.append(
            f"up to {facts.backlog_peak} connections waited in the accept queue of "
            f"{facts.backlog_listener}{limit} during the window"
        )
    for name, count in sorted(facts.listen_drops.items()):
        if count > 0:
            parts.append(
                f"the kernel dropped {count} connection attempts at {name} because its accept queue was full, "
                "since the server started"
            )
    if not facts.listen_drops and facts.listen_overflows > 0:
        parts.append(
            f"{facts.listen_overflows} connections were dropped by the kernel because an accept queue was full, "
            "since the server started (the host's count: another server's queue may have been the full one)"
        )
    yield Finding(
        "live-backlog",
        "warning" if dropped <= 0 else "error",
        "; ".join(parts),
        "no worker was free to accept them: every one of them waits before its request even starts, and a full "
        "queue turns connections away: a TCP one drops them (nginx: '110: Connection timed out', 504), a unix "
        "one refuses them at once (nginx: '11: Resource temporarily unavailable', 502).",
        _workers_advice(facts) + "; a deeper backlog only turns the wait into timeouts",
    )


def check_queue_time(facts: LiveFacts) -> Iterable[Finding]:
    measured = facts.queue_window if facts.queue_window and facts.queue_window.count > 0 else facts.queue_total
    if measured is None or measured.mean is None or measured.mean < QUEUE_SLOW:
        return
    during = "during the window" if measured is facts.queue_window else "since the server started"
    yield Finding(
        "live-queue-time",
        "warning",
        f"requests waited {measured.mean * 1000:.0f} ms on average between the proxy and a worker "
        f"({measured.count:.0f} requests {during}, from X-Request-Start)",
        "the time users wait that gunicorn's own request duration does not show: too few free workers.",
        _workers_advice(facts),
    )


def check_cpu(facts: LiveFacts) -> Iterable[Finding]:
    if facts.window <= 0 or facts.cpus <= 0:
        return
    used = facts.cpu_seconds / facts.window
    if used / facts.cpus < CPU_FULL:
        return
    yield Finding(
        "live-cpu",
        "warning",
        f"the workers used {used:.2f} of the {facts.cpus:g} CPUs the server may use, over {facts.window:.1f}s",
        "the server is CPU-bound: requests queue for a CPU inside the kernel, and more workers or threads only "
        "add memory and context switches.",
        "keep workers near (2 x CPUs) + 1 at most; make the hot requests cheaper, or give the server more CPUs "
        "(its cgroup's cpu.max) or more hosts",
    )


def check_memory(facts: LiveFacts) -> Iterable[Finding]:
    ooms = [item for item in facts.recent_exits if item.cause == "oom"]
    max_requests = facts.info.max_requests
    recycle = (
        "; set max_requests (e.g. 1000, with max_requests_jitter 100) so workers that grow are replaced"
        if not max_requests
        else ""
    )
    rss = facts.rss
    each = sum(rss) / len(rss) if rss else 0.0
    if ooms:
        yield Finding(
            "live-memory",
            "error",
            f"the OOM killer killed {len(ooms)} worker{'s' if len(ooms) != 1 else ''} recently (last: "
            f"{ooms[-1].request or 'no request in flight'})",
            "each kill drops the requests the worker had in flight (502 at the proxy), and its replacement grows "
            "back towards the same size.",
            "run fewer workers or give the cgroup more memory" + recycle,
        )
        return
    if facts.memory_limit is None or facts.memory_used is None:
        return
    share = facts.memory_used / facts.memory_limit
    if share < MEMORY_NEAR_LIMIT:
        return
    fits = ""
    if each > 0:
        others = max(0.0, facts.memory_used - sum(rss))
        fitting = max(1, math.floor((MEMORY_NEAR_LIMIT * facts.memory_limit - others) / each))
        fits = (
            f"; about {fitting} worker{'s' if fitting != 1 else ''} of {_mib(each)} fit in "
            f"{MEMORY_NEAR_LIMIT:.0%} of the limit"
        )
    yield Finding(
        "live-memory",
        "warning",
        f"the server's cgroup uses {_mib(facts.memory_used)} (working set) of its {_mib(facts.memory_limit)} "
        f"limit ({share:.0%}); {len(rss)} workers at {_mib(each)} each on average",
        "at the limit the kernel's OOM killer SIGKILLs a worker mid-request, with nothing in gunicorn's log but "
        "'Perhaps out of memory?'.",
        "run fewer workers or give the cgroup more memory" + fits + recycle,
    )


def check_host_memory(facts: LiveFacts) -> Iterable[Finding]:
    """The whole host nearly out of memory: every gunicorn on it shares what is left (several sites on one
    small machine), whatever this server's own cgroup allows."""
    if facts.host_memory is None:
        return
    total, available = facts.host_memory
    if available >= HOST_MEMORY_LOW * total:
        return
    ours = sum(facts.rss)
    everyone = ""
    if facts.host_gunicorn is not None and facts.host_gunicorn.servers:
        on_host = facts.host_gunicorn
        everyone = (
            f"; {on_host.servers} gunicorn server{'s' if on_host.servers != 1 else ''} on this host use "
            f"{_mib(on_host.rss)} in {on_host.processes} processes"
        )
    yield Finding(
        "live-host-memory",
        "warning",
        f"the host has {_mib(available)} of {_mib(total)} available ({available / total:.0%})"
        + everyone
        + f", this server's {len(facts.rss)} workers {_mib(ours)}",
        "when the host runs out, the kernel's OOM killer SIGKILLs the largest process, often a worker of any of "
        "these servers mid-request, with nothing in gunicorn's log but 'Perhaps out of memory?'.",
        "give each server fewer workers (gunicorn-insight status lists every server and its workers' memory), "
        "load the application before forking (--preload) so workers share its memory, recycle workers that "
        "grow (max_requests), or move a server to another host",
    )


def check_shared_stall(facts: LiveFacts) -> Iterable[Finding]:
    """Two or more servers of the host stalled at once: most likely one resource they share, named by the frame
    their stuck requests are in."""
    stalls = facts.host_stalls
    if stalls is None:
        return
    now = time.time()
    servers = "; ".join(
        f"pid {item.server.master_pid} {item.server.proc_name!r} ({', '.join(item.server.binds) or '-'}) stalled "
        f"since {time.strftime('%H:%M:%S', time.localtime(item.since))} ({now - item.since:.0f}s, "
        f"{item.in_flight} request(s) in flight)" + (f" [{item.silent}]" if item.silent else "")
        for item in stalls.stalled
    )
    shared = stalls.shared
    if shared is None:
        evidence = (
            "; their stuck requests share no frame (each server's innermost frames: "
            + "; ".join(
                f"pid {item.server.master_pid}: "
                + (", ".join(sorted({_frame_name(stack[-1]) for stack in item.stacks})) or "no stack")
                for item in stalls.stalled
            )
            + ")"
        )
    else:
        sharing = ", ".join(
            f"pid {item.server.master_pid} {count} of {len(item.stacks)} request(s) at line {frame.get('line')}"
            for item, frame, count in shared.servers
        )
        code = next((frame.get("code") for _, frame, _ in shared.servers if frame.get("code")), None)
        evidence = (
            f"; the stuck requests of {len(shared.servers)} of them wait in {shared.function} ({shared.module}"
            + (f": {code}" if code else "")
            + f"): {sharing}"
        )
    yield Finding(
        "live-shared-stall",
        "error",
        f"{len(stalls.stalled)} gunicorn servers on this host are stalled at once (requests in flight, none "
        f"finishing): {servers}{evidence}",
        "servers that freeze together wait on something they share: a database or its connection limit, a lock "
        "(a file lock, an advisory lock), a cache, another service, a socket; the frame their requests are in "
        "is that resource's call. Restarting the servers frees it only until the next time.",
        "look at the shared resource named by the frame (for a database: pg_stat_activity and its locks; for a "
        "file lock: lslocks names the holder); give every call to it a timeout shorter than gunicorn's; "
        "gunicorn-insight stacks --pid N on each server prints the full stacks",
    )


def _frame_name(frame: dict[str, Any]) -> str:
    return f"{frame.get('function')} ({module_of(str(frame.get('file')))}:{frame.get('line')})"


def check_timeout(facts: LiveFacts) -> Iterable[Finding]:
    killed = [item for item in facts.recent_exits if item.cause in TIMEOUT_CAUSES]
    timeout = facts.timeout
    oldest = facts.oldest_request
    overdue = oldest is not None and timeout > 0 and oldest[1] >= timeout
    if not killed and not facts.slow_requests and not overdue:
        return
    evidence = []
    if killed:
        last = killed[-1]
        evidence.append(
            f"{len(killed)} worker{'s' if len(killed) != 1 else ''} killed by timeout={timeout:g}s "
            f"recently (last: {last.request or 'no request named'}"
            + (f" after {last.elapsed:.1f}s" if last.elapsed is not None else "")
            + ")"
        )
    if facts.slow_requests:
        evidence.append(f"{facts.slow_requests} requests ran past slow_request_timeout since the server started")
    if overdue and oldest is not None:
        evidence.append(f"{oldest[0]} has been running {oldest[1]:.1f}s, past timeout={timeout:g}s")
    yield Finding(
        "live-timeout",
        "warning" if killed or overdue else "info",
        "; ".join(evidence),
        "requests this slow are either stuck (a dead database or API) or legitimately long; a timeout below "
        "the slowest legitimate request kills the worker and the request with it ([CRITICAL] WORKER TIMEOUT).",
        "if the slow requests are legitimate, raise timeout above the slowest of them (and keep the proxy's "
        "read timeout above it), or move the work to a job queue; if they are stuck, bound the outside calls "
        "they wait on (the slow-request report in the error log has their stacks)",
    )


_CONCURRENCY_SETTING = {"gthread": "threads", "uvicorn": "limit_concurrency"}


def check_memory_per_request(facts: LiveFacts) -> Iterable[Finding]:
    """The memory each request held open costs, against what the configured concurrency allows: slow
    backends keep requests open, and each one keeps its memory."""
    if not facts.held_memory:
        return
    held = max(facts.held_memory, key=lambda item: item.bytes_per_request)
    setting = _CONCURRENCY_SETTING.get(facts.worker_class, "worker_connections")
    per_worker = facts.per_worker
    peak = held.idle_bytes + per_worker * held.bytes_per_request
    workers = max(1, facts.workers)
    if facts.memory_limit is not None:
        limit, limit_name = facts.memory_limit, "the cgroup's memory limit"
    elif facts.host_memory is not None:
        limit, limit_name = facts.host_memory[0], "the host's memory (no cgroup limit)"
    else:
        limit, limit_name = None, ""
    against = ""
    severity: Severity = "info"
    fits = ""
    if limit is not None:
        together = workers * peak
        against = (
            f"; {workers} worker{'s' if workers != 1 else ''} at that size: {_mib(together)} in all, against "
            f"{limit_name} of {_mib(limit)}"
        )
        if together >= MEMORY_NEAR_LIMIT * limit:
            severity = "warning"
        budget = MEMORY_NEAR_LIMIT * limit / workers - held.idle_bytes
        allowed = max(1, math.floor(budget / held.bytes_per_request)) if budget > 0 else 1
        if allowed < per_worker:
            fits = f" (about {allowed} keep {workers} workers within {MEMORY_NEAR_LIMIT:.0%} of it)"
    yield Finding(
        "live-memory-per-request",
        severity,
        f"each request held open costs about {_mib_precise(held.bytes_per_request)} in worker pid={held.pid} "
        f"slot={held.slot}: its resident memory followed its requests in flight ({held.requests_low} to "
        f"{held.requests_high}) over {held.rounds} rounds of the master (correlation {held.correlation:.2f}, "
        f"{_mib(held.idle_bytes)} with none); at {setting}={per_worker} a worker could reach {_mib(peak)}" + against,
        "requests that wait on a slow backend stay open, and each keeps what it allocated: when the backend "
        "slows, requests pile up to the concurrency limit and memory with them, until the OOM killer SIGKILLs "
        "a worker mid-request.",
        f"lower {setting} to what memory allows{fits}, or make each request hold less (stream instead of "
        "buffering whole bodies); and fix or bound the slow backend the requests wait on (a timeout on the "
        "outbound call; `gunicorn-insight stacks` shows where they wait)",
    )


def check_growth(facts: LiveFacts) -> Iterable[Finding]:
    """A resource a worker holds more of with every request served, still held while idle: a leak, which
    makes each load test slower and more prone to timeouts than the one before."""
    for growth in facts.growth:
        yield Finding(
            "live-leak",
            "warning",
            growth.what(),
            "a leak grows with traffic and survives between load tests: each run starts where the previous one "
            "left off, so timeouts and errors rise run after run (out of open files: 'Too many open files'; "
            "threads: the CPU and memory they hold; memory: the OOM killer) until the worker is replaced.",
            growth.fix(facts.info.max_requests or 0),
        )


def _mib_precise(value: float) -> str:
    return f"{value / 1048576:.1f} MiB"


def check_time_wait(facts: LiveFacts) -> Iterable[Finding]:
    ports = None if facts.ephemeral_ports is None else facts.ephemeral_ports[1] - facts.ephemeral_ports[0] + 1
    for found in facts.time_wait:
        if found.count < TIME_WAIT_FLOOR:
            continue
        share = found.count / ports if ports else None
        per_request = (
            found.closed_in_window / facts.requests_in_window
            if found.closed_in_window is not None and facts.requests_in_window
            else None
        )
        if (share is None or share < TIME_WAIT_PORT_SHARE) and (
            per_request is None or per_request < CONNECTIONS_PER_REQUEST
        ):
            continue
        evidence = [f"{found.count} connections to {found.listener} were closed in the last 60 s (in TIME_WAIT)"]
        if share is not None and facts.ephemeral_ports is not None:
            low, high = facts.ephemeral_ports
            evidence.append(f"{share:.1%} of the {ports} ephemeral ports ({low}-{high}, ip_local_port_range)")
        if per_request is not None:
            evidence.append(
                f"{found.closed_in_window} connections closed for {facts.requests_in_window} requests during "
                f"the {facts.window:.1f}s window: {per_request:.2f} new connections per request"
            )
        yield Finding(
            "live-time-wait",
            "error" if share is not None and share >= TIME_WAIT_PORT_SHARE_ERROR else "warning",
            "; ".join(evidence),
            "requests arrive on a new TCP connection each: the proxy keeps no connection to gunicorn open (nginx "
            "speaks HTTP/1.0 to an upstream and closes after every response unless told otherwise)"
            + ("; and sync workers close every connection after its response" if facts.worker_class == "sync" else "")
            + ". Every request pays a TCP handshake before gunicorn sees it (time gunicorn's request duration does "
            "not show), and every closed connection holds its address pair for 60 s: when the proxy runs out of "
            "ports its connect() fails (nginx: '(99: Cannot assign requested address) while connecting to "
            "upstream', 502). A unix socket has neither cost.",
            _time_wait_fix(facts.worker_class),
        )


def _time_wait_fix(worker_class: str) -> str:
    keep_alive = (
        "keep connections to gunicorn open: in nginx, keepalive 16; in the upstream block, and "
        'proxy_http_version 1.1; with proxy_set_header Connection ""; where it proxies; and keep gunicorn\'s '
        "--keep-alive above the proxy's idle time for upstream connections (nginx's keepalive_timeout, 60 s by "
        "default), so the proxy closes them first"
    )
    unix = (
        "with the proxy on the same host, bind gunicorn to a unix socket (--bind unix:/run/gunicorn.sock; "
        "nginx: server unix:/run/gunicorn.sock;)"
    )
    if worker_class == "sync":
        return f"{unix}; otherwise switch to gthread or gevent (sync closes every connection) and {keep_alive}"
    return f"{keep_alive}; or, {unix}"


LIVE_CHECKS: list[LiveCheck] = [
    check_saturation,
    check_backlog,
    check_time_wait,
    check_queue_time,
    check_cpu,
    check_memory,
    check_host_memory,
    check_shared_stall,
    check_timeout,
    check_memory_per_request,
    check_growth,
]


def run_live_checks(facts: LiveFacts, checks: Sequence[LiveCheck] = LIVE_CHECKS) -> list[Finding]:
    return [finding for check in checks for finding in check(facts)]
