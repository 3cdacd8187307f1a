"""Prometheus export through prometheus_client's multiprocess files.

The master writes the plugin's metrics into the multiprocess directory, where the application's own
metrics (written by the workers) already are; the /metrics process (_http) serves both. Files of dead
workers are folded into one ``*_archive-<master pid>.db`` file per type so the directory, and therefore
scrape time, stays bounded however many workers have come and gone. This module never imports
prometheus_client: the master writes the format itself (_mmapfile).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import sys
from bisect import bisect_left
from collections.abc import Iterator

from ._drain import Round
from ._forensics import CAUSES
from ._mmapfile import MetricFile, go_float, read_file, sample_key
from ._safety import report
from .settings import ConfigurationError

_MIN_FILE = 8  # a file shorter than its own header was cut short by a kill and would break every scrape
_SUMMED = {"counter", "histogram", "summary", "gauge_sum"}
MERGE_LOCK = ".gunicorn-insight.lock"


def check_import_order(directory: str) -> None:
    """prometheus_client picks its storage when first imported: it must see the directory by then."""
    module = sys.modules.get("prometheus_client.values")
    if module is None:
        return
    if not getattr(module.ValueClass, "_multiprocess", False):
        raise ConfigurationError(
            "prometheus_client was imported before gunicorn-insight set PROMETHEUS_MULTIPROC_DIR, so its "
            "metrics live in process memory and cannot be shared between workers; call "
            "gunicorn_insight.install() before anything imports prometheus_client, or export "
            f"PROMETHEUS_MULTIPROC_DIR={directory} before starting gunicorn"
        )


def prepare_directory(directory: str, *, clear: bool) -> None:
    """Create the directory, prove it is writable, and drop files left by a previous run."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".gunicorn-insight-probe-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as error:
        raise ConfigurationError(
            f"prometheus_dir={directory!r} is not a writable directory ({error.strerror}); create it and "
            "give the gunicorn user write access, or point GUNICORN_INSIGHT_PROMETHEUS_DIR elsewhere"
        ) from None
    if clear:
        for path in glob.glob(os.path.join(directory, "*.db")):
            os.remove(path)


@contextlib.contextmanager
def merge_lock(directory: str, *, shared: bool) -> Iterator[None]:
    """Held exclusively while the master folds a dead worker's file into an archive (the values are in
    both files for a moment) and shared while the /metrics process reads the directory, so no scrape
    counts them twice. Opened per use: a worker forked meanwhile must not inherit the lock."""
    fd = os.open(os.path.join(directory, MERGE_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def usable_files(directory: str) -> list[str]:
    """The directory's metric files, without those a kill cut short before their header was written."""
    return [path for path in glob.glob(os.path.join(directory, "*.db")) if _usable(path)]


def _usable(path: str) -> bool:
    try:
        return os.path.getsize(path) >= _MIN_FILE
    except OSError:
        return False  # removed between glob and stat by a merge


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
        cache_key = (sample, labelvalues + tuple(value for _, value in extra))
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
        self, directory: str, buckets: tuple[float, ...], connections_limit: int, *, routes: bool = False
    ) -> None:
        self.directory = directory
        self._pid = os.getpid()
        self._archives: dict[str, tuple[MetricFile, set[str]]] = {}
        self._files: dict[str, MetricFile] = {}
        self._totals: dict[tuple[str, str], float] = {}
        self._routes = routes
        route = ("route",) if routes else ()
        self._requests = _counter("gunicorn_requests", "Requests finished, by method and status.",
                                  ("method", "status", *route))
        self._duration = _Histogram("gunicorn_request_duration_seconds",
                                    "Time from pre_request to post_request, by method.", ("method", *route), buckets)
        self._queue = _Histogram("gunicorn_request_queue_seconds",
                                 "Time from the proxy's X-Request-Start to a worker picking the request up.", (),
                                 QUEUE_BUCKETS)
        self._queue_invalid = _counter("gunicorn_request_queue_invalid",
                                       "X-Request-Start headers ignored: unparseable, in the future, or too old.")
        self._lost = _counter("gunicorn_insight_lost_requests",
                              "Finished requests the master could not read in time (a ring wrapped); stays 0.")
        self._slow = _counter("gunicorn_slow_requests",
                              "Requests that ran past slow_request_timeout (logged with their stack).")
        self._exits = _counter("gunicorn_worker_exits", "Worker exits by cause.", ("cause",))
        self._busy_seconds = _counter("gunicorn_worker_busy_seconds",
                                      "Request-seconds spent by the workers of each slot (rate = busy fraction).",
                                      ("worker",))
        self._cpu = _counter("gunicorn_worker_cpu_seconds", "CPU seconds (user + system) of each slot's workers.",
                             ("worker",))
        self._overflows = _counter("gunicorn_listen_overflows",
                                   "Connections the kernel dropped because an accept queue was full (whole "
                                   "network namespace, since gunicorn started).")
        self._in_flight = _gauge("gunicorn_requests_in_flight", "Requests being served now.")
        self._workers = _gauge("gunicorn_workers", "Live worker processes.")
        self._busy = _gauge("gunicorn_workers_busy", "Workers with at least one request in flight.")
        self._capacity = _gauge("gunicorn_capacity", "Requests the live workers can run at once.")
        self._waiting = _gauge("gunicorn_requests_waiting",
                               "gthread: connections accepted, waiting for a free thread.")
        self._connections = _gauge("gunicorn_worker_connections", "Open client connections per worker slot.",
                                   ("worker",))
        self._limit = _gauge("gunicorn_worker_connections_limit",
                             "Connections one worker accepts at most (worker_connections; 1 for sync).")
        self._memory = _gauge("gunicorn_worker_memory_bytes", "Resident memory of the worker in each slot.",
                              ("worker",))
        self._backlog = _gauge("gunicorn_listen_backlog", "Connections waiting in a listener's accept queue.",
                               ("listener",))
        self._backlog_max = _gauge("gunicorn_listen_backlog_max", "The accept queue's limit (backlog, capped "
                                   "by somaxconn).", ("listener",))
        for family in (self._lost, self._slow, self._queue_invalid, self._overflows):
            self._add(family, family.key("_total"), 0)  # present from the start, so rate() sees the first one
        for cause in CAUSES:
            self._add(self._exits, self._exits.key("_total", (cause,)), 0)
        self._set(self._limit, self._limit.key(""), connections_limit)

    def _file(self, prefix: str) -> MetricFile:
        found = self._files.get(prefix)
        if found is None:
            found = self._files[prefix] = MetricFile(os.path.join(self.directory, f"{prefix}_{self._pid}.db"))
        return found

    def _add(self, family: _Family, key: str, amount: float) -> None:
        total = self._totals.get((family.file_prefix, key), 0.0) + amount
        self._totals[family.file_prefix, key] = total
        self._file(family.file_prefix).write(key, total)

    def _set(self, family: _Family, key: str, value: float) -> None:
        if self._totals.get((family.file_prefix, key)) != value:
            self._totals[family.file_prefix, key] = value
            self._file(family.file_prefix).write(key, value)

    def _observe(self, histogram: _Histogram, labels: tuple[str, ...], values: list[float]) -> None:
        """Many observations at once: one write per bucket that changed (multiprocess files keep buckets
        non-cumulative; the collector adds them up)."""
        counts = [0] * len(histogram.les)
        for value in values:
            counts[bisect_left(histogram.bounds, value)] += 1
        # Every bucket must exist in the file, or the collector's cumulative sums miss the +Inf bucket.
        new = labels not in histogram.seen
        histogram.seen.add(labels)
        for le, count in zip(histogram.les, counts, strict=True):
            if count or new:
                self._add(histogram, histogram.key("_bucket", labels, (("le", le),)), count)
        self._add(histogram, histogram.key("_sum", labels), sum(values))

    def publish(self, facts: Round) -> None:
        requests = self._requests
        for (method, status, route), count in facts.requests.items():
            labels = (method, str(status) if status else "unknown", *((route or "none",) if self._routes else ()))
            self._add(requests, requests.key("_total", labels), count)
        for (method, route), durations in facts.durations.items():
            self._observe(self._duration, (method, *((route or "none",) if self._routes else ())), durations)
        if facts.queue_times:
            self._observe(self._queue, (), facts.queue_times)
        for family, amount in ((self._queue_invalid, facts.queue_invalid), (self._lost, facts.lost),
                               (self._slow, facts.slow), (self._overflows, facts.listen_overflows)):
            if amount:
                self._add(family, family.key("_total"), amount)
        for cause, count in facts.exits.items():
            self._add(self._exits, self._exits.key("_total", (cause,)), count)
        for family, value in ((self._in_flight, facts.in_flight), (self._workers, facts.workers),
                              (self._busy, facts.busy_workers), (self._capacity, facts.capacity),
                              (self._waiting, facts.waiting)):
            self._set(family, family.key(""), value)
        for slot, connections in facts.connections.items():
            worker = (str(slot),)
            self._set(self._connections, self._connections.key("", worker), connections)
            self._set(self._memory, self._memory.key("", worker), facts.memory.get(slot, 0))
            self._set(self._busy_seconds, self._busy_seconds.key("_total", worker), facts.busy_seconds.get(slot, 0))
            self._set(self._cpu, self._cpu.key("_total", worker), facts.cpu_seconds.get(slot, 0))
        for listener, (queued, limit) in facts.listeners.items():
            self._set(self._backlog, self._backlog.key("", (listener,)), queued)
            self._set(self._backlog_max, self._backlog_max.key("", (listener,)), limit)

    def forget_process(self, pid: int) -> None:
        """Fold a dead worker's files into the archive files, then delete them."""
        suffix = f"_{pid}.db"
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
