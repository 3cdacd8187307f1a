"""What one master round learned: the contract between the master, which fills it in, and every exporter,
which only formats it. Nothing here reads a process or a file."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(slots=True)
class Round:
    """What happened since the previous round (counts, durations) and how things are now (gauges)."""

    requests: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    """(method, status, route) -> requests finished this round; route is "" without route labels."""
    request_cpu: dict[tuple[str, int, str], float] = field(default_factory=dict)
    """(method, status, route) -> CPU seconds of the requests finished this round (see drain: per request
    where a request owns its thread, the worker's CPU shared by duration elsewhere)."""
    client_closed: Counter[tuple[str, str]] = field(default_factory=Counter)
    """(method, route) -> requests finished this round whose client had gone before the response."""
    durations: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    """(method, route) -> durations in seconds of the requests finished this round."""
    status_durations: dict[tuple[str, int, str], list[float]] = field(default_factory=dict)
    """(method, status, route) -> the same durations split by status; only filled for OTLP, whose
    http.server.request.duration carries the status code (see Drainer's ``by_status``)."""
    queue_times: list[float] = field(default_factory=list)
    """Seconds each request waited before a worker picked it up (from X-Request-Start), this round."""
    queue_invalid: int = 0
    """Requests whose X-Request-Start could not be right (garbage, future, clock skew), this round."""
    lost: int = 0
    """Records overwritten before they were read (a ring lapped between two rounds)."""
    workers: int = 0
    busy_workers: int = 0
    capacity: int = 0
    """Requests the live workers can run at once (filled in by the master, which knows the worker class)."""
    in_flight: int = 0
    waiting: int = 0
    """gthread: connections accepted but waiting for a free thread."""
    connections: dict[int, int] = field(default_factory=dict)
    """slot -> open connections, for every slot that has ever had a worker (0 once it is gone)."""
    busy_seconds: dict[int, float] = field(default_factory=dict)
    """slot -> request-seconds ever spent by its workers, including requests still running (a counter)."""
    cpu_seconds: dict[int, float] = field(default_factory=dict)
    """slot -> CPU seconds (user + system) ever used by its workers (a counter)."""
    listeners: dict[str, tuple[int, int]] = field(default_factory=dict)
    """listener -> (connections waiting in the accept queue, the queue's limit) (filled in by the master)."""
    unserved: dict[str, float] = field(default_factory=dict)
    """listener -> seconds connections have waited in its accept queue while no worker was in a request and
    none finished (0 while it is served or empty) (filled in by the master)."""
    listen_overflows: int = 0
    """Connections dropped on a full accept queue this round, by any listener of the network namespace."""
    listen_drops: dict[str, int] = field(default_factory=dict)
    """TCP listener -> packets the kernel dropped at it this round, almost all of them connection attempts met
    by a full accept queue (filled in by the master; a unix listener, or a kernel without SO_MEMINFO: missing)."""
    memory: dict[int, int] = field(default_factory=dict)
    """slot -> resident bytes of its live worker, read from /proc by the master this round."""
    slow: int = 0
    """Requests the workers' watchdogs reported slow this round."""
    log_lines: Counter[str] = field(default_factory=Counter)
    """level (critical, error, warning, exception) -> lines gunicorn's logger logged this round, in the master
    and the workers; counted only while gunicorn-insight's StatsD sink stands in for gunicorn's statsd logger."""
    rejected: Counter[str] = field(default_factory=Counter)
    """reason (REJECT_REASONS) -> requests gunicorn's HTTP parser rejected this round, in every worker."""
    time_wait: dict[str, int] = field(default_factory=dict)
    """TCP listener -> its connections closed in the last minute, in TIME_WAIT on gunicorn's end or on a local
    client's (see _timewait; filled in by the master; a unix listener, or one the kernel would not answer
    for, is missing)."""
    exits: Counter[str] = field(default_factory=Counter)
    """cause -> workers that exited this round (filled in by the master after the drain)."""
    at: float = 0.0
    pids: dict[int, int] = field(default_factory=dict)
    """slot -> pid of its live worker."""
    ready_workers: int = 0
    """Live workers that have loaded the application (post_worker_init ran); the rest are booting."""
    booting_workers: int = 0
    desired_workers: int | None = None
    master_loop_stuck: float | None = None
    """Seconds since gunicorn's master loop was last seen waiting for signals (0: this round); None: unknown."""
    """The number of workers gunicorn keeps (``workers``, moved by TTIN/TTOU); None where it was not read."""
    boot_durations: list[float] = field(default_factory=list)
    """Seconds from fork to application loaded, of the workers that became ready this round."""
    stalled_requests: int = 0
    """Requests in flight while the server is stalled (none finished for the stall threshold), else 0."""
    stalled_for: float | None = None
    """Seconds since the stall in progress began (the last request finished); None when not stalled."""
    stalls: int = 0
    """Stalls that began this round."""
    crash_loop: bool = False
    """Workers keep dying soon after they boot (see _master.lifecycle.CrashLoopWatch)."""
    crash_loops: int = 0
    """Crash loops that began this round."""
    host: HostPressure | None = None
    """cgroup CPU and memory, pressure stall information (filled in by the master; absent readings are None)."""
    context_switches: dict[int, tuple[int, int]] = field(default_factory=dict)
    """slot -> (voluntary, involuntary) context switches ever made by its workers (a counter); a slot is
    missing until /proc/<pid>/status could be read for one of its workers."""
    swap: dict[int, int] = field(default_factory=dict)
    """slot -> bytes of its live worker swapped out (VmSwap)."""
    open_fds: dict[int, int] = field(default_factory=dict)
    """slot -> open file descriptors of its live worker (/proc/<pid>/fd)."""
    fd_limits: dict[int, int] = field(default_factory=dict)
    """slot -> its live worker's soft limit on open file descriptors; absent where unlimited or unreadable."""
    threads: dict[int, int] = field(default_factory=dict)
    """slot -> threads of its live worker (/proc/<pid>/status); absent where unreadable."""
    slot_in_flight: dict[int, int] = field(default_factory=dict)
    """slot -> requests its live worker has in flight."""
    served: dict[int, int] = field(default_factory=dict)
    """slot -> requests its live worker has served."""

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_connections(self) -> int:
        return sum(self.connections.values())


CAUSES = ("timeout", "timeout_kill", "oom", "killed", "signal", "crash", "max_requests", "graceful", "boot_failure")


EXPECTED = frozenset({"max_requests", "graceful"})


@dataclass(frozen=True, slots=True)
class CpuThrottling:
    periods: int
    """Quota enforcement periods that elapsed while the group had runnable tasks (nr_periods)."""
    throttled_periods: int
    throttled_seconds: float


@dataclass(slots=True)
class HostPressure:
    """One round's readings of the host; None where the kernel file is absent."""

    throttling: CpuThrottling | None = None
    quota_cores: float | None = None
    memory_usage: int | None = None
    memory_working_set: int | None = None
    memory_limit: int | None = None
    pids: int | None = None
    """Processes and threads in the cgroup (``pids.current``)."""
    pids_limit: int | None = None
    """The lowest ``pids.max`` of the group and its ancestors; None where all are ``max``."""
    pressure: dict[tuple[str, str], float] = field(default_factory=dict)
    """(resource, "some" or "full") -> seconds ever stalled (PSI ``total=``, in microseconds in the file)."""


FATAL_SIGNALS = ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT")
"""The signals whose death the worker's faulthandler writes every thread's stack for (a crash in C code, an
abort()), unless a handler of the application's or gunicorn's owns the signal (see _worker.watchdog)."""


NO_RESPONSE = -1
"""The status of a request whose worker died under it (timeout kill, OOM, crash): no response was sent."""


def status_label(status: int) -> str:
    """The ``status`` label value: the code, ``aborted`` (NO_RESPONSE), ``unknown`` (0: gunicorn passed no
    response to post_request)."""
    if status == NO_RESPONSE:
        return "aborted"
    return str(status) if status else "unknown"


class Sink(Protocol):
    """An exporter the master feeds each round's facts to (Prometheus files, StatsD)."""

    def publish(self, facts: Round) -> None: ...

    def forget_process(self, pid: int) -> None:
        """A worker is gone: fold or drop what the sink keeps per process."""

    def close(self) -> None:
        """The master is stopping, after its last round."""
