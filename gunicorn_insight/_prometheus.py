"""Prometheus export through prometheus_client's multiprocess files.

The master writes the plugin's metrics into the multiprocess directory, where the application's own
metrics (written by the workers) already are, and serves both. Files of dead workers are folded into
one ``*_archive.db`` file per type so the directory, and therefore scrape time, stays bounded however
many workers have come and gone.
"""

from __future__ import annotations

import glob
import os
import struct
import sys
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ._drain import Round
from ._safety import report
from .settings import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

_MIN_FILE = 8  # a file shorter than its own header was cut short by a kill and would break every scrape
_SUMMED = {"counter", "histogram", "summary", "gauge_sum"}


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


class DirectoryCollector:
    """Like prometheus_client's MultiProcessCollector, but a truncated file is skipped, not fatal."""

    def __init__(self, directory: str, lock: threading.Lock) -> None:
        self._directory = directory
        self._lock = lock

    def collect(self) -> Iterable[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        with self._lock:
            files = [path for path in glob.glob(os.path.join(self._directory, "*.db")) if _usable(path)]
            return list(MultiProcessCollector.merge(files, accumulate=True))


def _usable(path: str) -> bool:
    try:
        return os.path.getsize(path) >= _MIN_FILE
    except OSError:
        return False  # removed between glob and stat by a merge


def _read_values(path: str) -> list[tuple[str, float, float, int]]:
    from prometheus_client.mmap_dict import MmapedDict

    return list(MmapedDict.read_all_values_from_file(path)) if _usable(path) else []


def make_registry(directory: str, lock: threading.Lock) -> CollectorRegistry:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DirectoryCollector(directory, lock))
    return registry


class PrometheusSink:
    """Writes each round into the master's own multiprocess files."""

    def __init__(self, directory: str, buckets: tuple[float, ...], connections_limit: int) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.directory = directory
        self.files_lock = threading.Lock()
        self._archives: dict[str, tuple[Any, set[str]]] = {}
        self._requests = Counter(
            "gunicorn_requests", "Requests finished, by method and status.", ["method", "status"], registry=None
        )
        self._duration = Histogram(
            "gunicorn_request_duration_seconds",
            "Time from pre_request to post_request, by method.",
            ["method"],
            buckets=buckets,
            registry=None,
        )
        self._in_flight = Gauge(
            "gunicorn_requests_in_flight", "Requests being served now.", multiprocess_mode="livesum", registry=None
        )
        self._connections = Gauge(
            "gunicorn_worker_connections",
            "Open client connections per worker slot.",
            ["worker"],
            multiprocess_mode="livesum",
            registry=None,
        )
        self._connections_limit = Gauge(
            "gunicorn_worker_connections_limit",
            "Connections one worker accepts at most (worker_connections; 1 for sync).",
            multiprocess_mode="livesum",
            registry=None,
        )
        self._workers = Gauge(
            "gunicorn_workers", "Live worker processes.", multiprocess_mode="livesum", registry=None
        )
        self._lost = Counter(
            "gunicorn_insight_lost_requests",
            "Finished requests the master could not read in time (the ring wrapped); should stay 0.",
            registry=None,
        )
        self._connections_limit.set(connections_limit)
        self._lost.inc(0)
        self._histograms: dict[str, Any] = {}
        self._counters: dict[tuple[str, int], Any] = {}
        self._conn_children: dict[int, Any] = {}

    def publish(self, facts: Round) -> None:
        for key, count in facts.requests.items():
            child = self._counters.get(key)
            if child is None:
                method, status = key
                child = self._counters[key] = self._requests.labels(method, str(status) if status else "unknown")
            child.inc(count)
        for method, durations in facts.durations.items():
            histogram = self._histograms.get(method)
            if histogram is None:
                histogram = self._histograms[method] = self._duration.labels(method)
            for duration in durations:
                histogram.observe(duration)
        if facts.lost:
            self._lost.inc(facts.lost)
        self._in_flight.set(facts.in_flight)
        self._workers.set(facts.workers)
        for slot, connections in facts.connections.items():
            gauge = self._conn_children.get(slot)
            if gauge is None:
                gauge = self._conn_children[slot] = self._connections.labels(str(slot))
            gauge.set(connections)

    def forget_process(self, pid: int) -> None:
        """Fold a dead worker's files into the archive files, then delete them."""
        suffix = f"_{pid}.db"
        with self.files_lock:
            for path in glob.glob(os.path.join(self.directory, f"*{suffix}")):
                prefix = os.path.basename(path)[: -len(suffix)]
                if prefix.startswith("gauge_live"):
                    os.remove(path)  # what prometheus_client's mark_process_dead does
                    continue
                if prefix == "gauge_all":
                    continue  # one series per pid by the user's choice: nothing to merge into
                try:
                    values = _read_values(path)
                except (OSError, struct.error, UnicodeDecodeError, ValueError) as error:
                    report(f"reading {path}", error)
                    values = []
                archive, keys = self._archive(prefix)
                for key, value, timestamp, _ in values:
                    merged = (value, timestamp)
                    if key in keys:
                        old_value, old_timestamp = archive.read_value(key)
                        merged = _combine(prefix, old_value, old_timestamp, value, timestamp)
                    archive.write_value(key, *merged)
                    keys.add(key)
                os.remove(path)

    def _archive(self, prefix: str) -> tuple[Any, set[str]]:
        from prometheus_client.mmap_dict import MmapedDict

        found = self._archives.get(prefix)
        if found is None:
            archive = MmapedDict(os.path.join(self.directory, f"{prefix}_archive.db"))
            found = self._archives[prefix] = (archive, {key for key, _, _ in archive.read_all_values()})
        return found

    def close(self) -> None:
        for archive, _ in self._archives.values():
            archive.close()
        self._archives.clear()


def _combine(prefix: str, old: float, old_ts: float, new: float, new_ts: float) -> tuple[float, float]:
    if prefix in _SUMMED:
        return old + new, 0.0
    if prefix == "gauge_max":
        return max(old, new), 0.0
    if prefix == "gauge_min":
        return min(old, new), 0.0
    # mostrecent: the later write wins
    return (new, new_ts) if new_ts >= old_ts else (old, old_ts)
