"""The master's side: slots for workers, the exporter thread, death reports, the /metrics process.

One thread of ours runs in the master: the exporter, which runs a round every ``interval`` and whenever
the /metrics process (see _endpoint and _http) asks for one before a scrape. Every round (drain, metric
files, StatsD sends, logging) runs while holding ``_round_lock``. The fork handlers take that lock
before gunicorn forks a worker, so a child is never born while a round is half way through a write or a
log call; waiting is bounded by one round (milliseconds).

``pre_fork`` and ``child_exit`` run on gunicorn's main thread, and on gunicorn 23 ``child_exit`` runs
inside the SIGCHLD handler, so they take no lock and do no logging: they flip bytes in the scoreboard,
push to a heap and append to a deque (each atomic under the GIL), and the exporter does the rest.
"""

from __future__ import annotations

import heapq
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import _scoreboard as sb
from ._backlog import backlog, listen_overflows
from ._drain import Drainer, Round
from ._endpoint import MetricsEndpoint, wait_readable
from ._forensics import EXPECTED, OomCounter, ReapWatcher, classify
from ._prometheus import PrometheusSink
from ._safety import LOG, report
from ._statsd import StatsdSink
from ._status import StatusFiles
from ._watchdog import error_log_fd
from ._worker import RecorderOptions
from .settings import Settings

SLOT_ATTRIBUTE = "_gunicorn_insight_slot"
RING_RECORDS = 8192
_MAX_ENTRIES = 64


class Sink(Protocol):
    """An exporter the master feeds each round's facts to (Prometheus files, StatsD)."""

    def publish(self, facts: Round) -> None: ...


@dataclass(frozen=True, slots=True)
class Plan:
    """The settings resolved against gunicorn's own configuration, once, when the master starts."""

    settings: Settings
    worker_kind: str
    slots: int
    entries: int
    connections_limit: int
    statsd_target: tuple[str, int] | str | None
    statsd_prefix: str
    statsd_tags: str
    statsd_tagged: bool
    gunicorn_statsd_active: bool
    prometheus_dir: str | None
    slow_request_timeout: float
    successor: bool
    """Started by gunicorn's USR2 upgrade while the previous master still runs."""
    recorder: RecorderOptions
    per_worker_capacity: int
    """Requests one worker runs at once: 1 (sync), threads (gthread), worker_connections (async)."""

    @classmethod
    def resolve(cls, settings: Settings, cfg: Any, prometheus_dir: str | None) -> Plan:
        kind = worker_kind(cfg)
        threads = max(1, int(getattr(cfg, "threads", 1) or 1))
        worker_connections = int(getattr(cfg, "worker_connections", 1000) or 1000)
        # Requests one worker runs at once; the scoreboard names at most _MAX_ENTRIES of them.
        if kind == "sync":
            concurrency, limit = 1, 1
        elif kind == "gthread":
            concurrency, limit = threads, worker_connections
        else:
            concurrency, limit = worker_connections, worker_connections
        workers = max(1, int(getattr(cfg, "workers", 1) or 1))
        gunicorn_target = getattr(cfg, "statsd_host", None)
        return cls(
            settings=settings,
            worker_kind=kind,
            slots=settings.max_workers or max(16, 4 * workers),
            entries=min(concurrency, _MAX_ENTRIES),
            connections_limit=limit,
            statsd_target=settings.statsd_target or gunicorn_target,
            statsd_prefix=getattr(cfg, "statsd_prefix", "") or "",
            statsd_tags=getattr(cfg, "dogstatsd_tags", "") or "",
            statsd_tagged=settings.dogstatsd if settings.dogstatsd is not None
            else bool(getattr(cfg, "dogstatsd_tags", "")),
            gunicorn_statsd_active=gunicorn_target is not None and _uses_gunicorn_statsd(cfg),
            prometheus_dir=prometheus_dir,
            slow_request_timeout=_slow_after(settings, cfg),
            successor="GUNICORN_PID" in os.environ,
            recorder=RecorderOptions(
                redact_query=settings.redact_query,
                queue_time=settings.queue_time,
                exclude_paths=frozenset(settings.exclude_paths),
                routes=settings.route_label,
                route_resolver=settings.route_resolver,
                # The atoms cost a scan of the scoreboard per request: pay it only if an access log uses them.
                access_log_atoms=settings.access_log_atoms and bool(getattr(cfg, "accesslog", None)),
                threaded=kind not in ONE_THREAD_KINDS,
            ),
            per_worker_capacity=concurrency,
        )


def _slow_after(settings: Settings, cfg: Any) -> float:
    """Just before gunicorn's own timeout, so a stuck sync worker's stack is logged before the kill."""
    if settings.slow_request_timeout is not None:
        return settings.slow_request_timeout
    timeout = float(getattr(cfg, "timeout", 30) or 0)
    return round(0.8 * timeout, 3) if timeout > 0 else 30.0


# Worker classes that call pre_request and post_request from one OS thread (greenlets and coroutines never
# switch inside a hook): their recorder needs no lock. Custom classes are not assumed to be among them.
ONE_THREAD_KINDS = frozenset({"sync", "gevent", "eventlet", "tornado", "asgi"})


def worker_kind(cfg: Any) -> str:
    """sync, gthread, gevent, eventlet, tornado, asgi, or the class name of a custom worker."""
    try:
        worker_class = cfg.worker_class
    except Exception:
        return "unknown"
    names = {
        "SyncWorker": "sync", "ThreadWorker": "gthread", "GeventWorker": "gevent",
        "GeventPyWSGIWorker": "gevent", "EventletWorker": "eventlet", "TornadoWorker": "tornado",
        "ASGIWorker": "asgi",
    }
    for klass in worker_class.__mro__:
        if klass.__name__ in names:
            return names[klass.__name__]
    return str(worker_class.__name__)


def _uses_gunicorn_statsd(cfg: Any) -> bool:
    from gunicorn.instrument.statsd import Statsd

    try:
        return issubclass(cfg.logger_class, Statsd)
    except Exception:
        return False


@dataclass(frozen=True, slots=True)
class Death:
    """A worker exit as child_exit saw it, kept until the next round judges its cause."""

    pid: int
    slot: int
    snapshot: bytes
    at: float
    aborted: bool
    shutdown: bool = False


class Master:
    """The plugin in gunicorn's master: the scoreboard's owner, its rounds, worker exits and exporters."""

    def __init__(self, plan: Plan, run_dir: str, title: str) -> None:
        self.plan = plan
        self.pid = os.getpid()
        self.board = sb.Scoreboard.create(
            os.path.join(run_dir, "scoreboard"), plan.slots, plan.entries, RING_RECORDS, master_pid=self.pid,
            routes=plan.settings.max_routes if plan.settings.route_label else 0,
        )
        self._free_slots = list(range(plan.slots))
        self._deaths: deque[Death] = deque()
        self._round_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drainer = Drainer(self.board, plan.settings.max_routes)
        self._listeners: Callable[[], list[Any]] = list
        self._overflows = listen_overflows()
        self._sinks: list[Sink] = []
        self.prometheus: PrometheusSink | None = None
        self.statsd: StatsdSink | None = None
        self.endpoint: MetricsEndpoint | None = None
        settings = plan.settings
        if plan.prometheus_dir is not None:
            self.prometheus = PrometheusSink(plan.prometheus_dir, settings.buckets, plan.connections_limit,
                                             routes=settings.route_label)
            self._sinks.append(self.prometheus)
            if settings.serves_metrics:
                self.endpoint = MetricsEndpoint(settings.metrics_address, plan.prometheus_dir,
                                                successor=plan.successor, error_fd=error_log_fd(), title=title)
        if plan.statsd_target is not None:
            self.statsd = StatsdSink(
                plan.statsd_target,
                prefix=plan.statsd_prefix,
                constant_tags=plan.statsd_tags,
                tagged=plan.statsd_tagged,
                send_request_metrics=not plan.gunicorn_statsd_active,
                connections_limit=plan.connections_limit,
                timers_per_second=settings.statsd_timers_per_second,
                interval=settings.interval,
            )
            self._sinks.append(self.statsd)
        self.in_child = False
        self.reaps = ReapWatcher()
        self._oom = OomCounter()
        self.status = StatusFiles(run_dir)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gunicorn-insight-exporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Last round (so nothing finished before shutdown is lost), then close everything."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.queue_unreaped_exits()
        self.run_round()
        if self.endpoint is not None:
            self.endpoint.close()
        if self.statsd is not None:
            self.statsd.close()
        if self.prometheus is not None:
            self.prometheus.close()

    def _run(self) -> None:
        interval = self.plan.settings.interval
        next_round = time.monotonic() + interval
        while not self._stop.is_set():
            wait_readable(self.endpoint, max(0.0, next_round - time.monotonic()))
            if self._stop.is_set():
                return
            if self.endpoint is not None:
                self.endpoint.serve_requests(self.run_round)
                with self._round_lock:
                    self.endpoint.restart_if_gone()
            if time.monotonic() >= next_round:
                self.run_round()
                next_round = time.monotonic() + interval

    def run_round(self) -> None:
        with self._round_lock:
            try:
                facts = self._drainer.collect()
                facts.capacity = facts.workers * self.plan.per_worker_capacity
                self._sample_listeners(facts)
            except Exception as error:
                report("reading the scoreboard", error)
                return
            self._oom.poll()
            while self._deaths:
                death = self._deaths.popleft()
                try:
                    facts.exits[self._bury(death)] += 1
                except Exception as error:
                    report("reporting a worker exit", error)
            for sink in self._sinks:
                try:
                    sink.publish(facts)
                except Exception as error:
                    report(f"{type(sink).__name__}.publish", error)
            try:
                self.status.write_round(facts)
            except Exception as error:
                report("writing status.json", error)

    def watch_logger(self, log: Any) -> None:
        self.reaps.watch(log)

    def watch_listeners(self, listeners: Callable[[], list[Any]]) -> None:
        """gunicorn's listening sockets, re-read every round (a HUP can replace them)."""
        self._listeners = listeners

    def _sample_listeners(self, facts: Round) -> None:
        for listener in self._listeners():
            sock = getattr(listener, "sock", None)
            measured = backlog(sock) if sock is not None else None
            if measured is not None:
                facts.listeners[str(listener)] = measured
        overflows = listen_overflows()
        if overflows is not None and self._overflows is not None:
            facts.listen_overflows = max(0, overflows - self._overflows)
        self._overflows = overflows

    # -- slots (gunicorn's main thread) ---------------------------------------------------------

    def assign_slot(self, worker: Any) -> None:
        try:
            slot = heapq.heappop(self._free_slots)
        except IndexError:
            LOG.warning(
                "gunicorn-insight: all %d scoreboard slots are taken; this worker is not tracked. "
                "Raise GUNICORN_INSIGHT_MAX_WORKERS above the largest worker count you scale to.",
                self.plan.slots,
            )
            return
        self.board.assign(slot, time.monotonic())
        setattr(worker, SLOT_ATTRIBUTE, slot)

    def worker_gone(self, worker: Any) -> None:
        """Signal-handler safe: copy the slot, free it, queue the report for the exporter."""
        slot = getattr(worker, SLOT_ATTRIBUTE, None)
        if slot is None:
            return
        setattr(worker, SLOT_ATTRIBUTE, None)  # worker_exit after child_exit must not free it twice
        snapshot = self.board.snapshot(slot)
        self.board.release(slot)
        heapq.heappush(self._free_slots, slot)
        pid = worker.pid if isinstance(worker.pid, int) else 0
        self._deaths.append(Death(pid, slot, snapshot, time.monotonic(), bool(getattr(worker, "aborted", False))))

    def _bury(self, death: Death) -> str:
        """Classify one exit, log it if it needs a human, tidy its files. Returns the cause."""
        if self.prometheus is not None and death.pid:
            self.prometheus.forget_process(death.pid)
        view = sb.parse_slot(death.slot, death.snapshot, self.board.entries)
        signal, exit_code = self.reaps.take(death.pid)
        verdict = classify(view, aborted=death.aborted, signal=signal, exit_code=exit_code,
                           oom=signal == "SIGKILL" and not death.aborted and self._oom.claim(),
                           shutdown=death.shutdown)
        uptime = death.at - view.spawned if view.spawned else 0.0
        oldest = view.requests[0] if view.requests else None
        self.status.record_exit(
            pid=death.pid, slot=death.slot, cause=verdict.cause, detail=verdict.detail, uptime=round(uptime, 3),
            served=view.served, rss=view.rss,
            request=None if oldest is None else f"{oldest.method} {oldest.path}",
            elapsed=None if oldest is None else round(death.at - oldest.started, 3),
        )
        if verdict.cause in EXPECTED and oldest is None:
            return verdict.cause
        request = "none"
        if oldest is not None:
            others = len(view.requests) - 1 + view.overflow
            request = (f'"{oldest.method} {oldest.path}" client={oldest.client} '
                       f"elapsed={death.at - oldest.started:.1f}s thread={oldest.thread}"
                       + (f" more_in_flight={others}" if others else ""))
        LOG.error(
            'gunicorn-insight: worker exited pid=%s slot=%s cause=%s detail="%s" uptime=%.1fs served=%d rss=%s '
            "request=%s%s",
            death.pid, death.slot, verdict.cause, verdict.detail, uptime, view.served, _megabytes(view.rss),
            request, f' stack="{verdict.stack_note}"' if verdict.stack_note else "",
        )
        return verdict.cause

    def queue_unreaped_exits(self) -> None:
        """Exits gunicorn never passed to child_exit, found in the board when the master stops: a boot
        failure (gunicorn halts on exit code 3 or 4) and workers SIGKILLed when graceful_timeout ran out."""
        for view in self.board:
            if view.state == sb.FREE or not view.pid:
                continue
            snapshot = self.board.snapshot(view.index)
            self.board.release(view.index)
            known = bool(view.flags & sb.FLAG_BOOT_FAILED) or view.pid in self.reaps.exit_codes
            self._deaths.append(Death(view.pid, view.index, snapshot, time.monotonic(), False, shutdown=not known))

    # -- fork safety ----------------------------------------------------------------------------

    def before_fork(self) -> None:
        self._round_lock.acquire()

    def after_fork_in_parent(self) -> None:
        self._round_lock.release()

    def after_fork_in_child(self) -> None:
        self._round_lock.release()
        self.in_child = True
        if self.endpoint is not None:
            self.endpoint.close_in_child()
        if self.statsd is not None:
            self.statsd.close()


def _megabytes(rss: int) -> str:
    return f"{rss / 1048576:.1f}MiB" if rss else "unknown"


CURRENT: Master | None = None


def _before_fork() -> None:
    if CURRENT is not None and os.getpid() == CURRENT.pid:
        CURRENT.before_fork()


def _after_fork_in_parent() -> None:
    if CURRENT is not None and os.getpid() == CURRENT.pid:
        CURRENT.after_fork_in_parent()


def _after_fork_in_child() -> None:
    if CURRENT is not None and not CURRENT.in_child:
        CURRENT.after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
