"""Prometheus export through prometheus_client's multiprocess files.

The master writes the plugin's metrics into the multiprocess directory, where the application's own
metrics (written by the workers) already are; the /metrics process (metrics_process) serves both. Files of dead
workers are folded into one ``*_archive-<master pid>.db`` file per type so the directory, and therefore
scrape time, stays bounded however many workers have come and gone. This module never imports
prometheus_client: the master writes the format itself (mmapfile).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import mmap
import os
import re
import shutil
import stat
import struct
import sys
import tempfile
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from math import isnan

from .._facts import CAUSES, Round, status_label
from .._report import LOG, report
from .._scoreboard import REJECT_REASONS
from .._space import free_space
from ..settings import ConfigurationError
from .mmapfile import MetricFile, go_float, parse, read_file, sample_key

_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
_MIN_FILE = 8  # a file shorter than its own header was cut short by a kill and would break every scrape
_SUMMED = {"counter", "histogram", "summary", "gauge_sum"}
MERGE_LOCK = ".gunicorn-insight.lock"


def check_import_order(directory: str) -> None:
    """prometheus_client picks its storage when first imported: it must see the directory by then."""
    module = sys.modules.get("prometheus_client.values")
    if module is None:
        return
    # Public names only: the in-memory MutexValue is what prometheus_client picks without the directory.
    if module.ValueClass is module.MutexValue:
        raise ConfigurationError(
            "prometheus_client was imported before gunicorn-insight set PROMETHEUS_MULTIPROC_DIR, so its "
            "metrics live in process memory and cannot be shared between workers; call "
            "gunicorn_insight.install() before anything imports prometheus_client, or export "
            f"PROMETHEUS_MULTIPROC_DIR={directory} before starting gunicorn"
        )


def prepare_directory(directory: str) -> None:
    """Create the directory and prove it is writable (without removing anything: see remove_stale_files)."""
    try:
        os.makedirs(directory, exist_ok=True)
        # mkstemp: a fresh name opened O_EXCL, so a symlink planted in a shared directory is never followed.
        fd, probe = tempfile.mkstemp(prefix=".gunicorn-insight-probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise ConfigurationError(
            f"prometheus_dir={directory!r} is not a writable directory ({error.strerror}); create it and "
            "give the gunicorn user write access, or point GUNICORN_INSIGHT_PROMETHEUS_DIR elsewhere"
        ) from None


# The files prometheus_client's multiprocess mode writes (<type>_<pid>.db; a gauge's type names its
# multiprocess_mode) and this plugin's archives of them (<type>_archive-<master pid>.db).
_TYPES = r"(?:counter|histogram|summary|gauge_(?:live)?(?:all|min|max|sum|mostrecent))"
_METRIC_FILE = re.compile(_TYPES + r"_(archive-)?([0-9]{1,9})\.db")
_SCRAPED_FILE = re.compile(_TYPES + r"_.+\.db")  # prometheus_client lets an application name its processes


def is_metric_file(name: str) -> bool:
    """A file name prometheus_client's multiprocess mode (or this plugin's archive) uses."""
    return _SCRAPED_FILE.fullmatch(name) is not None


def remove_stale_files(directory: str, owners: set[int]) -> list[str]:
    """Remove metric files a previous run left, so its counters are not added to this run's.

    A file goes only when everything says it is a leftover: its name is one prometheus_client's
    multiprocess mode or this plugin writes, it is a regular file owned by one of ``owners`` (our uid
    and the workers' uid), its content parses as a multiprocess file, and the process named in it is
    gone. A user's ``app.db``, another user's files and a live server's files (two servers sharing
    the directory) stay. Returns the paths removed.
    """
    removed = []
    with merge_lock(directory, shared=False):
        for name in sorted(os.listdir(directory)):
            match = _METRIC_FILE.fullmatch(name)
            if match is None:
                continue
            path = os.path.join(directory, name)
            if _alive(int(match.group(2))) or not _ours(path, owners) or not _parses(path):
                continue
            with contextlib.suppress(FileNotFoundError):  # its own master folded it meanwhile
                os.remove(path)
                removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process id: nothing says it is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _ours(path: str, owners: set[int]) -> bool:
    try:
        status = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(status.st_mode) and status.st_uid in owners


def _parses(path: str) -> bool:
    """Empty (cut short by a kill) or a multiprocess file whose entries all parse."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(mmap.PAGESIZE)
        if not data.strip(b"\0"):
            return True
        if len(data) < 8:
            return False
        (used,) = struct.unpack_from("<i", data, 0)
        size = os.fstat(fd).st_size
        if not 8 <= used <= size:
            return False
        data += handle.read(used - len(data)) if used > len(data) else b""
    try:
        parse(data, used)
    except (ValueError, UnicodeDecodeError, struct.error):
        return False
    return True


def hand_over(source: str, target: str) -> int:
    """Move the final metric files of processes that are gone from ``source`` into ``target``; live gauges
    stay behind (a gone process has no live value). Returns how many files moved."""
    moved = 0
    with merge_lock(source, shared=False):
        for name in sorted(os.listdir(source)):
            if not is_metric_file(name) or name.startswith("gauge_live"):
                continue
            destination = os.path.join(target, name)
            if os.path.lexists(destination):
                continue
            try:
                os.rename(os.path.join(source, name), destination)
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
                shutil.move(os.path.join(source, name), destination)
            moved += 1
    return moved


@contextlib.contextmanager
def merge_lock(directory: str, *, shared: bool) -> Iterator[None]:
    """Held exclusively while the master folds a dead worker's file into an archive (the values are in
    both files for a moment) and shared while the /metrics process reads the directory, so no scrape
    counts them twice. Opened per use: a worker forked meanwhile must not inherit the lock."""
    # Read-only is enough for flock, and lets servers of other users share it; O_NOFOLLOW: the name is
    # predictable and the directory may be world-writable.
    fd = os.open(os.path.join(directory, MERGE_LOCK), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def usable_files(directory: str) -> list[str]:
    """The directory's metric files, without those a kill cut short before their header was written, and
    without other ``.db`` files (a user's SQLite database would break every scrape)."""
    return [
        path
        for path in glob.glob(os.path.join(directory, "*.db"))
        if is_metric_file(os.path.basename(path)) and _usable(path)
    ]


def _usable(path: str) -> bool:
    try:
        status = os.lstat(path)
    except OSError:
        return False  # removed between glob and stat by a merge
    # Not a symlink: the directory may be writable for the workers' user, and /metrics must not read
    # through a link they planted.
    return stat.S_ISREG(status.st_mode) and status.st_size >= _MIN_FILE


OTLP_ONLY_PREFIX = "gunicorn_insight_otlp_"
"""Families written for the OTLP export alone: /metrics leaves them out (see metrics_process.make_registry)."""
OTLP_DURATION = OTLP_ONLY_PREFIX + "request_duration_seconds"

BOOT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Family:
    """One metric as prometheus_client's multiprocess files store it: a file prefix and a key per sample."""

    def __init__(self, file_prefix: str, name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> None:
        self.file_prefix = file_prefix
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._keys: dict[tuple[str, tuple[str, ...]], str] = {}

    def key(self, sample: str, labelvalues: tuple[str, ...] = (), extra: tuple[tuple[str, str], ...] = ()) -> str:
        cache_key = (sample, labelvalues + tuple(value for _, value in extra) if extra else labelvalues)
        key = self._keys.get(cache_key)
        if key is None:
            labels = dict(zip(self.labelnames, labelvalues, strict=True))
            labels.update(extra)
            key = self._keys[cache_key] = sample_key(self.name, self.name + sample, labels, self.documentation)
        return key


def _counter(name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> _Family:
    return _Family("counter", name, documentation, labelnames)


def _gauge(name: str, documentation: str, labelnames: tuple[str, ...] = ()) -> _Family:
    # livesum: the master is the only writer, and its file goes away with it like a live gauge should.
    return _Family("gauge_livesum", name, documentation, labelnames)


def bucket_counts(bounds: Sequence[float], values: list[float], total: float) -> list[int]:
    """How many of ``values`` fall in each bucket (le = each bound, then +Inf): ``bisect_left(bounds, value)``
    of each, counted from one sort in C and a bisect per bound, not a bisect per value (a round carries one
    value per request; the drain hands over each slot's durations sorted, which the sort then takes in one
    pass). ``total`` is their sum: NaN says one is NaN, which no order places, so then each value
    is placed on its own, where bisect puts NaN (the first bucket)."""
    if isnan(total):
        counts = [0] * (len(bounds) + 1)
        for value in values:
            counts[bisect_left(bounds, value)] += 1
        return counts
    ordered = sorted(values)
    at_most = [bisect_right(ordered, bound) for bound in bounds]
    return [upper - lower for lower, upper in zip([0, *at_most], [*at_most, len(ordered)], strict=True)]


class _Histogram(_Family):
    """A histogram family: its bucket bounds and the label sets already written."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], bounds: tuple[float, ...]) -> None:
        super().__init__("histogram", name, documentation, labelnames)
        self.bounds = bounds
        self.les = (*(go_float(bound) for bound in bounds), "+Inf")
        self.seen: set[tuple[str, ...]] = set()


class PrometheusSink:
    """Writes each round into the master's own multiprocess files, in prometheus_client's format.

    The master writes the files directly instead of through Counter/Histogram objects: a histogram then
    costs one write per bucket per round instead of two locked writes per request, and forked workers
    inherit no metric objects (prometheus_client would re-create every inherited metric's files under
    each worker's pid).
    """

    def __init__(
        self,
        directory: str,
        buckets: tuple[float, ...],
        connections_limit: int,
        *,
        routes: bool = False,
        otlp: bool = False,
        rejects_seen: bool = False,
    ) -> None:
        self.directory = directory
        self._pid = os.getpid()
        self._archives: dict[str, tuple[MetricFile, set[str]]] = {}
        self._files: dict[str, MetricFile] = {}
        self._totals: dict[tuple[str, str], float] = {}
        self._routes = routes
        route = ("route",) if routes else ()
        self._requests = _counter(
            "gunicorn_requests", "Requests finished, by method and status.", ("method", "status", *route)
        )
        self._request_cpu = _counter(
            "gunicorn_request_cpu_seconds",
            "CPU seconds spent by requests, by method and status (per request on sync and gthread workers, "
            "the worker's CPU shared by duration elsewhere).",
            ("method", "status", *route),
        )
        self._client_closed = _counter(
            "gunicorn_requests_client_closed",
            "Requests whose client had gone before the response was written (nginx 499, platform timeouts).",
            ("method", *route),
        )
        self._duration = _Histogram(
            "gunicorn_request_duration_seconds",
            "Time from pre_request to post_request, by method.",
            ("method", *route),
            buckets,
        )
        # OTLP's http.server.request.duration carries the status code; Prometheus's histogram does not (its
        # series would multiply by the statuses), so OTLP gets a family of its own, from the same rounds.
        self._otlp_duration = (
            _Histogram(
                OTLP_DURATION,
                "Request durations by method, status and route, for OTLP.",
                ("method", "status", *route),
                buckets,
            )
            if otlp
            else None
        )
        self._queue = _Histogram(
            "gunicorn_request_queue_seconds",
            "Time from the proxy's X-Request-Start to a worker picking the request up.",
            (),
            QUEUE_BUCKETS,
        )
        self._queue_invalid = _counter(
            "gunicorn_request_queue_invalid", "X-Request-Start headers ignored: unparseable, in the future, or too old."
        )
        self._lost = _counter(
            "gunicorn_insight_lost_requests",
            "Finished requests the master could not read in time (a ring wrapped); stays 0.",
        )
        self._slow = _counter(
            "gunicorn_slow_requests", "Requests that ran past slow_request_timeout (logged with their stack)."
        )
        self._exits = _counter("gunicorn_worker_exits", "Worker exits by cause.", ("cause",))
        self._rejected = _counter(
            "gunicorn_requests_rejected",
            "Requests gunicorn's HTTP parser refused before the application (malformed, ambiguous framing), by reason.",
            ("reason",),
        )
        self._busy_seconds = _counter(
            "gunicorn_worker_busy_seconds",
            "Request-seconds spent by the workers of each slot (rate = busy fraction).",
            ("worker",),
        )
        self._cpu = _counter(
            "gunicorn_worker_cpu_seconds", "CPU seconds (user + system) of each slot's workers.", ("worker",)
        )
        self._overflows = _counter(
            "gunicorn_listen_overflows",
            "Connections the kernel dropped because an accept queue was full (whole "
            "network namespace, since gunicorn started).",
        )
        self._in_flight = _gauge("gunicorn_requests_in_flight", "Requests being served now.")
        self._workers = _gauge("gunicorn_workers", "Live worker processes.")
        self._busy = _gauge("gunicorn_workers_busy", "Workers with at least one request in flight.")
        self._capacity = _gauge("gunicorn_capacity", "Requests the live workers can run at once.")
        self._waiting = _gauge("gunicorn_requests_waiting", "gthread: connections accepted, waiting for a free thread.")
        self._connections = _gauge(
            "gunicorn_worker_connections", "Open client connections per worker slot.", ("worker",)
        )
        self._limit = _gauge(
            "gunicorn_worker_connections_limit",
            "Connections one worker accepts at most (worker_connections; 1 for sync).",
        )
        self._memory = _gauge(
            "gunicorn_worker_memory_bytes", "Resident memory of the worker in each slot.", ("worker",)
        )
        self._backlog = _gauge(
            "gunicorn_listen_backlog", "Connections waiting in a listener's accept queue.", ("listener",)
        )
        self._backlog_max = _gauge(
            "gunicorn_listen_backlog_max", "The accept queue's limit (backlog, capped by somaxconn).", ("listener",)
        )
        self._unserved = _gauge(
            "gunicorn_listen_unserved_seconds",
            "Seconds connections have waited in a listener's accept queue while no worker was in a request and "
            "none finished (0 while it is served or empty).",
            ("listener",),
        )
        self._time_wait = _gauge(
            "gunicorn_listen_time_wait",
            "A TCP listener's connections closed in the last 60 s, in TIME_WAIT on gunicorn's end or a local client's.",
            ("listener",),
        )
        self._drops = _counter(
            "gunicorn_listen_drops",
            "Packets the kernel dropped at a TCP listener since the master started, almost all of them connection "
            "attempts met by a full accept queue.",
            ("listener",),
        )
        self._lifecycle_families()
        self._pressure_families()
        self._fold_warned = False
        self.off = False
        """No room was left to grow the files: the plugin's Prometheus metrics are off until a restart."""
        try:
            for prefix in ("counter", "histogram", "gauge_livesum"):
                self._file(prefix)  # every file and its room now, while a shortage can still stop the start
            self._set(self._limit, self._limit.key(""), connections_limit)
            for family in (
                self._lost,
                self._slow,
                self._queue_invalid,
                self._overflows,
                self._stalls,
                self._crash_loops,
            ):
                self._add(family, family.key("_total"), 0)  # present from the start, so rate() sees the first one
            for cause in CAUSES:
                self._add(self._exits, self._exits.key("_total", (cause,)), 0)
            # Where the worker class parses requests with gunicorn's parser; elsewhere absent, not zero.
            for reason in REJECT_REASONS if rejects_seen else ():
                self._add(self._rejected, self._rejected.key("_total", (reason,)), 0)
        except OSError as error:
            if error.errno not in _NO_ROOM:
                raise
            self._discard()
            raise ConfigurationError(
                f"gunicorn-insight cannot reserve room for its Prometheus files in {directory} ({error.strerror}; "
                f"{free_space(directory)}; each file takes 64 KiB at first); give that filesystem more room "
                "(Docker: docker run --shm-size=256m), or set GUNICORN_INSIGHT_PROMETHEUS_DIR to a directory "
                "with room (on disk)"
            ) from None

    def _lifecycle_families(self) -> None:
        self._ready = _gauge("gunicorn_workers_ready", "Live workers that have loaded the application.")
        self._booting = _gauge("gunicorn_workers_booting", "Live workers still loading the application.")
        self._desired = _gauge(
            "gunicorn_workers_desired", "The number of workers gunicorn keeps (workers, moved by TTIN/TTOU)."
        )
        self._loop_stuck = _gauge(
            "gunicorn_master_loop_stuck_seconds",
            "Seconds since gunicorn's master loop was last seen waiting for signals; 0 while it goes round.",
        )
        self._boot = _Histogram(
            "gunicorn_worker_boot_duration_seconds",
            "Seconds from a worker's fork to its application loaded (post_worker_init).",
            (),
            BOOT_BUCKETS,
        )
        self._stalled = _gauge(
            "gunicorn_stalled_requests",
            "Requests in flight while the server is stalled (none finished for "
            "slow_request_timeout with demand waiting); 0 otherwise.",
        )
        self._stalls = _counter("gunicorn_stalls", "Stalls detected (each one is logged with its requests).")
        self._crash_loop = _gauge(
            "gunicorn_worker_crash_loop", "1 while workers keep dying soon after they boot, else 0."
        )
        self._crash_loops = _counter("gunicorn_worker_crash_loops", "Crash loops detected (each one is logged).")

    def _pressure_families(self) -> None:
        self._cpu_periods = _counter(
            "gunicorn_cgroup_cpu_periods", "CPU quota enforcement periods of the server's cgroup (cpu.stat nr_periods)."
        )
        self._throttled_periods = _counter(
            "gunicorn_cgroup_cpu_throttled_periods", "Periods in which the cgroup used up its CPU quota (nr_throttled)."
        )
        self._throttled_seconds = _counter(
            "gunicorn_cgroup_cpu_throttled_seconds", "Time the cgroup's tasks were held back by the CPU quota."
        )
        self._quota = _gauge(
            "gunicorn_cgroup_cpu_quota_cores",
            "The cgroup's CPU quota in cores (quota / period); absent without a quota.",
        )
        self._cgroup_memory = _gauge(
            "gunicorn_cgroup_memory_usage_bytes", "Memory charged to the server's cgroup, page cache included."
        )
        self._working_set = _gauge(
            "gunicorn_cgroup_memory_working_set_bytes", "Memory charged to the cgroup minus its inactive file cache."
        )
        self._memory_limit = _gauge(
            "gunicorn_cgroup_memory_limit_bytes",
            "The cgroup's memory limit (the smallest of its ancestors'); absent without one.",
        )
        self._cgroup_pids = _gauge(
            "gunicorn_cgroup_pids", "Processes and threads in the server's cgroup (pids.current)."
        )
        self._pids_limit = _gauge(
            "gunicorn_cgroup_pids_limit", "The cgroup's limit on processes and threads (pids.max); absent without one."
        )
        self._psi_some = _counter(
            "gunicorn_pressure_waiting_seconds",
            "Pressure stall information: time at least one task waited for the resource.",
            ("resource",),
        )
        self._psi_full = _counter(
            "gunicorn_pressure_stalled_seconds",
            "Pressure stall information: time every non-idle task was stalled on the resource.",
            ("resource",),
        )
        self._switches = _counter(
            "gunicorn_worker_context_switches",
            "Context switches of each slot's workers (involuntary: preempted, waiting for a CPU).",
            ("worker", "kind"),
        )
        self._swap = _gauge(
            "gunicorn_worker_swap_bytes", "Memory of the worker in each slot swapped out (VmSwap).", ("worker",)
        )
        self._open_fds = _gauge("gunicorn_worker_open_fds", "Open file descriptors of each slot's worker.", ("worker",))
        self._max_fds = _gauge(
            "gunicorn_worker_max_fds", "The soft limit on open file descriptors of each slot's worker.", ("worker",)
        )
        self._threads = _gauge("gunicorn_worker_threads", "Threads of each slot's worker.", ("worker",))

    def _publish_lifecycle(self, facts: Round) -> None:
        for family, value in (
            (self._ready, facts.ready_workers),
            (self._booting, facts.booting_workers),
            (self._stalled, facts.stalled_requests),
            (self._crash_loop, int(facts.crash_loop)),
        ):
            self._set(family, family.key(""), value)
        for family, amount in ((self._stalls, facts.stalls), (self._crash_loops, facts.crash_loops)):
            if amount:
                self._add(family, family.key("_total"), amount)
        if facts.boot_durations:
            self._observe(self._boot, (), facts.boot_durations)
        for family, reading in ((self._desired, facts.desired_workers), (self._loop_stuck, facts.master_loop_stuck)):
            if reading is not None:
                self._set(family, family.key(""), reading)

    def _publish_pressure(self, facts: Round) -> None:
        host = facts.host
        if host is not None:
            throttling = host.throttling
            if throttling is not None:
                self._set(self._cpu_periods, self._cpu_periods.key("_total"), throttling.periods)
                self._set(self._throttled_periods, self._throttled_periods.key("_total"), throttling.throttled_periods)
                self._set(self._throttled_seconds, self._throttled_seconds.key("_total"), throttling.throttled_seconds)
            for family, value in (
                (self._quota, host.quota_cores),
                (self._cgroup_memory, host.memory_usage),
                (self._working_set, host.memory_working_set),
                (self._memory_limit, host.memory_limit),
                (self._cgroup_pids, host.pids),
                (self._pids_limit, host.pids_limit),
            ):
                if value is not None:
                    self._set(family, family.key(""), value)
            for (resource, kind), seconds in host.pressure.items():
                psi = {"some": self._psi_some, "full": self._psi_full}.get(kind)
                if psi is not None:  # PSI has only these two lines today; a new one gets no name by accident
                    self._set(psi, psi.key("_total", (resource,)), seconds)
        for slot, (voluntary, involuntary) in facts.context_switches.items():
            worker = str(slot)
            self._set(self._switches, self._switches.key("_total", (worker, "voluntary")), voluntary)
            self._set(self._switches, self._switches.key("_total", (worker, "involuntary")), involuntary)
        for family, readings in (
            (self._swap, facts.swap),
            (self._open_fds, facts.open_fds),
            (self._max_fds, facts.fd_limits),
            (self._threads, facts.threads),
        ):
            for slot, value in readings.items():
                self._set(family, family.key("", (str(slot),)), value)
            for slot in facts.connections.keys() - facts.pids.keys():  # a slot whose worker is gone holds nothing
                key = family.key("", (str(slot),))
                if (family.file_prefix, key) in self._totals:
                    self._set(family, key, 0)

    def _file(self, prefix: str) -> MetricFile:
        found = self._files.get(prefix)
        if found is None:
            found = self._files[prefix] = MetricFile(os.path.join(self.directory, f"{prefix}_{self._pid}.db"))
        return found

    def _add(self, family: _Family, key: str, amount: float) -> None:
        before = self._totals.get((family.file_prefix, key))
        if before is not None and not amount:  # written already, and unchanged: as _set, no write
            return
        total = (before or 0.0) + amount
        self._totals[family.file_prefix, key] = total
        self._file(family.file_prefix).write(key, total)

    def _set(self, family: _Family, key: str, value: float) -> None:
        if self._totals.get((family.file_prefix, key)) != value:
            self._totals[family.file_prefix, key] = value
            self._file(family.file_prefix).write(key, value)

    def _observe(self, histogram: _Histogram, labels: tuple[str, ...], values: list[float]) -> None:
        """Many observations at once: one write per bucket that changed (multiprocess files keep buckets
        non-cumulative; the collector adds them up)."""
        total = sum(values)
        counts = bucket_counts(histogram.bounds, values, total)
        # Every bucket must exist in the file, or the collector's cumulative sums miss the +Inf bucket.
        new = labels not in histogram.seen
        histogram.seen.add(labels)
        for le, count in zip(histogram.les, counts, strict=True):
            if count or new:
                self._add(histogram, histogram.key("_bucket", labels, (("le", le),)), count)
        self._add(histogram, histogram.key("_sum", labels), total)

    def publish(self, facts: Round) -> None:
        if self.off:
            return
        try:
            self._publish(facts)
        except OSError as error:
            if error.errno not in _NO_ROOM:
                raise
            self._turn_off(error)

    def _turn_off(self, error: OSError) -> None:
        """Out of room: stop exporting, once and loudly, rather than serve figures that stopped moving.

        The master's own files are removed (their series disappear from /metrics, and the room they held
        goes back to the application); the archives of dead workers stay, they hold the application's counts.
        """
        self.off = True
        LOG.warning(
            "gunicorn-insight: no room to grow the Prometheus files in %s (%s; %s): the plugin's Prometheus "
            "metrics are off until gunicorn restarts; the application keeps serving. Give that filesystem more "
            "room (Docker: docker run --shm-size=256m) or set GUNICORN_INSIGHT_PROMETHEUS_DIR to a directory "
            "with room",
            self.directory,
            error.strerror,
            free_space(self.directory),
        )
        self._discard()

    def _discard(self) -> None:
        paths = [file.path for file in self._files.values()]
        self.close()
        for path in paths:
            with contextlib.suppress(OSError):
                os.remove(path)

    def _publish(self, facts: Round) -> None:
        requests = self._requests
        for (method, status, route), count in facts.requests.items():
            labels = (method, status_label(status), *((route or "none",) if self._routes else ()))
            self._add(requests, requests.key("_total", labels), count)
        self._publish_outcomes(facts)
        for (method, route), durations in facts.durations.items():
            self._observe(self._duration, (method, *((route or "none",) if self._routes else ())), durations)
        if self._otlp_duration is not None:
            for (method, status, route), durations in facts.status_durations.items():
                labels = (method, status_label(status), *((route or "none",) if self._routes else ()))
                self._observe(self._otlp_duration, labels, durations)
        if facts.queue_times:
            self._observe(self._queue, (), facts.queue_times)
        for family, amount in (
            (self._queue_invalid, facts.queue_invalid),
            (self._lost, facts.lost),
            (self._slow, facts.slow),
            (self._overflows, facts.listen_overflows),
        ):
            if amount:
                self._add(family, family.key("_total"), amount)
        for cause, count in facts.exits.items():
            self._add(self._exits, self._exits.key("_total", (cause,)), count)
        for family, value in (
            (self._in_flight, facts.in_flight),
            (self._workers, facts.workers),
            (self._busy, facts.busy_workers),
            (self._capacity, facts.capacity),
            (self._waiting, facts.waiting),
        ):
            self._set(family, family.key(""), value)
        for slot, connections in facts.connections.items():
            worker = (str(slot),)
            self._set(self._connections, self._connections.key("", worker), connections)
            self._set(self._memory, self._memory.key("", worker), facts.memory.get(slot, 0))
            self._set(self._busy_seconds, self._busy_seconds.key("_total", worker), facts.busy_seconds.get(slot, 0))
            self._set(self._cpu, self._cpu.key("_total", worker), facts.cpu_seconds.get(slot, 0))
        self._publish_listeners(facts)
        self._publish_lifecycle(facts)
        self._publish_pressure(facts)

    def _publish_listeners(self, facts: Round) -> None:
        for listener, (queued, limit) in facts.listeners.items():
            self._set(self._backlog, self._backlog.key("", (listener,)), queued)
            self._set(self._backlog_max, self._backlog_max.key("", (listener,)), limit)
        for listener, seconds in facts.unserved.items():
            self._set(self._unserved, self._unserved.key("", (listener,)), seconds)
        for listener, closed in facts.time_wait.items():
            self._set(self._time_wait, self._time_wait.key("", (listener,)), closed)
        for listener, dropped in facts.listen_drops.items():
            # added even when 0: the series exists from the listener's first round, so increase() sees a first drop
            # (later rounds' zeros write nothing)
            self._add(self._drops, self._drops.key("_total", (listener,)), dropped)

    def _publish_outcomes(self, facts: Round) -> None:
        """What the requests cost in CPU, which of them their clients left, and which gunicorn refused."""
        for reason, count in facts.rejected.items():
            self._add(self._rejected, self._rejected.key("_total", (reason,)), count)
        for (method, status, route), seconds in facts.request_cpu.items():
            labels = (method, status_label(status), *((route or "none",) if self._routes else ()))
            self._add(self._request_cpu, self._request_cpu.key("_total", labels), seconds)
        for (method, route), count in facts.client_closed.items():
            labels = (method, *((route or "none",) if self._routes else ()))
            self._add(self._client_closed, self._client_closed.key("_total", labels), count)

    def forget_process(self, pid: int) -> None:
        """Fold a dead worker's files into the archive files, then delete them."""
        if self.off:
            return  # its files stay and are still scraped, as they are: right, only not folded
        suffix = f"_{pid}.db"
        try:
            self._fold(pid, suffix)
        except OSError as error:
            if error.errno not in _NO_ROOM:
                raise
            if not self._fold_warned:
                self._fold_warned = True
                LOG.warning(
                    "gunicorn-insight: no room in %s (%s; %s) to fold dead workers' metric files into archives: "
                    "they stay as they are (counts stay right, each costs scrape time). Give that filesystem "
                    "more room (Docker: docker run --shm-size=256m)",
                    self.directory,
                    error.strerror,
                    free_space(self.directory),
                )

    def _fold(self, pid: int, suffix: str) -> None:
        with merge_lock(self.directory, shared=False):
            for path in glob.glob(os.path.join(self.directory, f"*{suffix}")):
                prefix = os.path.basename(path)[: -len(suffix)]
                if prefix.startswith("gauge_live"):
                    os.remove(path)  # what prometheus_client's mark_process_dead does
                    continue
                if prefix == "gauge_all":
                    continue  # one series per pid by the user's choice: nothing to merge into
                try:
                    values = read_file(path)
                except (OSError, UnicodeDecodeError, ValueError) as error:
                    report(f"reading {path}", error)
                    values = []
                archive, keys = self._archive(prefix)
                # Room first: a fold that stopped half way would count the merged values twice.
                archive.make_room(key for key, _, _ in values)
                for key, value, timestamp in values:
                    merged = (value, timestamp)
                    if key in keys:
                        old_value, old_timestamp = archive.read(key)
                        merged = _combine(prefix, old_value, old_timestamp, value, timestamp)
                    archive.write(key, *merged)
                    keys.add(key)
                os.remove(path)

    def _archive(self, prefix: str) -> tuple[MetricFile, set[str]]:
        found = self._archives.get(prefix)
        if found is None:
            # Per master: during a USR2 upgrade two masters fold dead workers into the same directory.
            archive = MetricFile(os.path.join(self.directory, f"{prefix}_archive-{self._pid}.db"))
            found = self._archives[prefix] = (archive, archive.keys())
        return found

    def close(self) -> None:
        """The master is going away: its live gauges go with it, its counters stay for the last scrape."""
        for file in [*self._files.values(), *(archive for archive, _ in self._archives.values())]:
            file.close()
        self._files.clear()
        self._archives.clear()
        with contextlib.suppress(OSError):
            os.remove(os.path.join(self.directory, f"gauge_livesum_{self._pid}.db"))


def _combine(prefix: str, old: float, old_ts: float, new: float, new_ts: float) -> tuple[float, float]:
    if prefix in _SUMMED:
        return old + new, 0.0
    if prefix == "gauge_max":
        return max(old, new), 0.0
    if prefix == "gauge_min":
        return min(old, new), 0.0
    # mostrecent: the later write wins
    return (new, new_ts) if new_ts >= old_ts else (old, old_ts)
