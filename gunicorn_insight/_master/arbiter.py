"""The master's side: slots for workers, the exporter thread and its rounds, the sinks and the /metrics
process. A worker's exit is handed to forensics.ExitReports, which judges it in the next round.

One thread of ours runs in the master: the exporter, which runs a round every ``interval`` and sooner when
the /metrics process (see _export.metrics_link) asks for one before a scrape, but never two rounds less than
``min(interval, SCRAPE_ROUND_GAP)`` apart: a scrape waits at most that long for a round that starts after it
asked, and a scrape flood cannot make the master run more rounds (the StatsD sink's host name is looked up
by a thread of its own, see _export.statsd). Every round (drain, metric files, StatsD sends, logging)
runs while holding ``_round_lock``; nothing in it waits on the network. The fork handlers take that lock
before gunicorn forks a worker, so a child is never born while a round is half way through a write or a
log call; waiting is bounded by one round (milliseconds).

``pre_fork`` and ``child_exit`` run on gunicorn's main thread, and on gunicorn 23 ``child_exit`` runs
inside the SIGCHLD handler, so they take no lock and do no logging: they flip bytes in the scoreboard,
push to a heap and append to a deque (each atomic under the GIL), and the exporter does the rest.
"""

from __future__ import annotations

import heapq
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import _kernelfiles as kernelfiles
from .. import _scoreboard as sb
from .._export.metrics_link import EXIT_WAIT, MetricsEndpoint, MetricsPortTaken, wait_readable
from .._export.prometheus import PrometheusSink
from .._export.statsd import StatsdSink
from .._facts import Round, Sink
from .._report import LOG, error_log_fd, report
from .._runfiles import StatusFiles
from .._worker.unseen import ENOUGH_CONNECTIONS
from .backlog import ListenerDrops, backlog, listen_overflows, listener_time_wait, unix_listener
from .binds import SocketFiles
from .drain import Drainer
from .forensics import Death, ExitReports
from .growth import GrowthWatch, HeldMemoryWatch, log_growth
from .lifecycle import StallWatch, UnservedWatch
from .loglines import LogLineWatch
from .mainloop import MainLoopWatch
from .mainthreads import ANSWER_WAIT, MainThreadQuestions
from .plan import Plan, otlp_arguments
from .pressure import HostReader, WorkerReadings

SLOT_ATTRIBUTE = "_gunicorn_insight_slot"
RING_RECORDS = 8192
SCRAPE_ROUND_GAP = 1.0
"""Seconds at least between two rounds when interval is longer: a scrape waits at most this long."""
LOOP_UNKNOWN_AFTER = 60.0  # seconds of rounds without seeing gunicorn's loop wait before saying it is not measured
# The kernel files a round reads per worker and keeps open: stat, status, and limits where prlimit is refused
# (another user's worker, a master without CAP_SYS_RESOURCE).
WORKER_FILES = 3


class Master:
    """The plugin in gunicorn's master: the scoreboard's owner, its rounds, worker exits and exporters."""

    def __init__(self, plan: Plan, run_dir: str, title: str) -> None:
        self.plan = plan
        self.pid = os.getpid()
        self.board = sb.Scoreboard.create(
            os.path.join(run_dir, "scoreboard"),
            plan.slots,
            plan.entries,
            RING_RECORDS,
            master_pid=self.pid,
            routes=plan.settings.max_routes if plan.settings.route_label else 0,
        )
        self._free_slots = list(range(plan.slots))
        self._round_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # stop() writes a byte here: the exporter, waiting up to a whole interval, ends at once.
        self._wake_read = self._wake_write = -1
        self._drainer = Drainer(self.board, plan.settings.max_routes, by_status=plan.settings.otlp_enabled)
        kernelfiles.keep_at_most(WORKER_FILES * plan.slots + kernelfiles.FEWEST_KEPT)
        self._listeners: Callable[[], list[Any]] = list
        self._desired: Callable[[], int] | None = None
        self._socket_files = SocketFiles()
        self._overflows = listen_overflows()
        self._time_wait: dict[str, tuple[float, int]] = {}  # listener -> (when read, its TIME_WAIT count)
        self._drops = ListenerDrops()
        self._listening = False  # gunicorn had listeners at the last round (see _watch_stopping)
        self._before_stop: Round | None = None  # the last round with listeners
        self._unmet_since: float | None = None  # since when demand has been unmet, while it is
        self._sinks: list[Sink] = []
        self.prometheus: PrometheusSink | None = None
        self.statsd: StatsdSink | None = None
        self.endpoint: MetricsEndpoint | None = None
        settings = plan.settings
        if plan.prometheus_dir is not None:
            self.prometheus = PrometheusSink(
                plan.prometheus_dir,
                settings.buckets,
                plan.connections_limit,
                routes=settings.route_label,
                otlp=settings.otlp_enabled,
                rejects_seen=plan.rejects_seen,
            )
            self._sinks.append(self.prometheus)
            if settings.serves_prometheus or settings.otlp_enabled:
                try:
                    self.endpoint = MetricsEndpoint(
                        settings.metrics_address if settings.serves_prometheus else None,
                        plan.prometheus_dir,
                        successor=plan.successor,
                        error_fd=error_log_fd(),
                        title=title,
                        run_dir=run_dir,
                        optional=settings.metrics_bind is None,
                        extra_args=otlp_arguments(plan, self.pid),
                    )
                except MetricsPortTaken as taken:
                    LOG.warning("gunicorn-insight: %s", taken)
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
        # gunicorn.log.*: gunicorn's statsd logger counts its log lines itself; without it, we do.
        self.log_lines = LogLineWatch() if self.statsd is not None and not plan.gunicorn_statsd_active else None
        self.in_child = False
        self.status = StatusFiles(run_dir)
        self.exits = ExitReports(self.board, self._drainer, self.status, self._sinks)
        self._host = _host_reader(plan)
        self._worker_readings = WorkerReadings()
        self._held = HeldMemoryWatch()
        self._growth = GrowthWatch()
        # A stall is judged against the slow-request threshold: the watchdogs have logged each stuck
        # request's stack by the time the master names the stall.
        self._stall = StallWatch(plan.slow_request_timeout if plan.slow_request_timeout > 0 else 30.0)
        # The same threshold for a queue nobody serves while no request is in flight: "nothing moves".
        self._unserved = UnservedWatch(self._stall.after)
        self._main_threads = MainThreadQuestions(self.board, run_dir, plan.connections_limit)
        self._told_unseen = False
        self._main_loop = MainLoopWatch(threading.main_thread().ident or 0)
        self._started = time.monotonic()
        self._told_loop_unknown = False

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._run, name="gunicorn-insight-exporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Last round (so nothing finished before shutdown is lost), then close everything."""
        self._stop.set()
        if self._wake_write >= 0:
            os.write(self._wake_write, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._close_wake()
        self.exits.queue_unreaped()
        self.run_round()
        if self.endpoint is not None:
            self.endpoint.close(wait=EXIT_WAIT)
        for sink in self._sinks:
            sink.close()

    def _run(self) -> None:
        interval = self.plan.settings.interval
        gap = min(interval, SCRAPE_ROUND_GAP)
        endpoint = self.endpoint
        last_round = time.monotonic()
        next_round = last_round + interval
        while not self._stop.is_set():
            due = min(next_round, last_round + gap) if endpoint is not None and endpoint.pending else next_round
            wait_readable(endpoint, max(0.0, due - time.monotonic()), self._wake_read)
            if self._stop.is_set():
                return
            if endpoint is not None:
                endpoint.take_requests()
                endpoint.restart_if_gone(self._round_lock)
            now = time.monotonic()
            asked = endpoint.pending if endpoint is not None else 0
            if now >= next_round or (asked and now >= last_round + gap):
                self.run_round()
                last_round, next_round = now, now + interval
                if endpoint is not None:
                    endpoint.answer(asked)  # only scrapes that asked before this round began

    def run_round(self) -> None:
        with self._round_lock:
            try:
                facts = self._drainer.collect()
                if self.log_lines is not None:
                    facts.log_lines.update(self.log_lines.take())
                facts.capacity = facts.ready_workers * self.plan.per_worker_capacity  # booting ones serve nothing
                if self._desired is not None:
                    facts.desired_workers = self._desired()
            except Exception as error:
                report("reading the scoreboard", error)
                return
            # Each step guarded on its own: one that fails costs its own part of the round, never the requests
            # the round drained, which the sinks still publish.
            _guarded("sampling the listen queues", self._sample_listeners, facts)
            _guarded("reading host pressure", self._read_host, facts)
            _guarded("reading the workers' /proc files", self._read_workers, facts)
            _guarded("watching what the workers' memory, descriptors and threads grow with", self._watch_growth, facts)
            self.exits.judge(facts)
            if not self._told_unseen:
                self._tell_requests_unseen()
            heads, unmet = self._drainer.drained(), _unmet(facts)
            _guarded("watching for stalls and crash loops", self._watch_stall, facts, heads, unmet)
            _guarded("watching for a stop while demand was unmet", self._watch_stopping, facts, unmet)
            _guarded("watching for listeners nobody serves", self._watch_unserved, facts, heads)
            _guarded("watching gunicorn's master loop", self._watch_main_loop, facts)
            for sink in self._sinks:
                _guarded(f"{type(sink).__name__}.publish", sink.publish, facts)
            _guarded("writing status.json", self.status.write_round, facts)

    def _tell_requests_unseen(self) -> None:
        """Once per server: a worker accepted connections and recorded no request (see _worker.unseen)."""
        board = self.board
        for index in range(board.slots):
            if board.buffer[board.offset(index) + sb.OFF_FLAGS] & sb.FLAG_REQUESTS_UNSEEN:
                self._told_unseen = True
                LOG.warning(
                    "gunicorn-insight: worker pid=%s slot=%s accepted %d connections and recorded no request: "
                    "worker class %s does not call gunicorn's pre_request/post_request hooks around its "
                    "requests (a subclass whose handle_request is its own?), so its request counts, durations, "
                    "statuses, routes, requests in flight and slow-request reports are missing (absent, not "
                    "zero). Call self.cfg.pre_request(self, req) before and self.cfg.post_request(self, req, "
                    "environ, resp) after each request, as gunicorn's classes do. (Connections that carry no "
                    "request, such as TCP health checks, count too.) Said once",
                    board.read(index).pid,
                    index,
                    ENOUGH_CONNECTIONS,
                    self.plan.worker_class_name,
                )
                return

    def _read_host(self, facts: Round) -> None:
        if self._host is not None:
            facts.host = self._host.read()

    def _read_workers(self, facts: Round) -> None:
        readings = self._worker_readings.read(facts.pids)
        facts.context_switches, facts.swap, facts.open_fds = readings.switches, readings.swap, readings.open_fds
        facts.fd_limits, facts.threads, facts.memory = readings.fd_limits, readings.threads, readings.memory
        for slot, rss in readings.memory.items():
            self.board.set_rss(slot, rss)

    def _watch_growth(self, facts: Round) -> None:
        """Memory held per request in flight, and what grows with requests served (see growth)."""
        live = set(facts.pids)
        self._held.forget(live)
        self._growth.forget(live)
        for slot, pid in facts.pids.items():
            rss = facts.memory.get(slot)
            in_flight = facts.slot_in_flight.get(slot, 0)
            self._held.observe(slot, pid, in_flight, rss)
            readings = {
                "open_fds": facts.open_fds.get(slot),
                "threads": facts.threads.get(slot),
                "memory_bytes": rss,
            }
            ready = self.board.buffer[self.board.offset(slot) + sb.OFF_STATE] == sb.READY
            served = facts.served.get(slot, 0)
            for growth in self._growth.observe(
                slot, pid, ready=ready, served=served, in_flight=in_flight, readings=readings
            ):
                log_growth(growth, self.plan.max_requests, facts.fd_limits.get(slot))
        self.status.held_memory = self._held.estimates()
        self.status.growth = self._growth.found()

    def _watch_stall(self, facts: Round, heads: int, unmet: bool) -> None:
        change = self._stall.observe(facts.at, heads, facts.in_flight, unmet)
        since = self._stall.stalled_since
        if since is not None:
            facts.stalled_requests = facts.in_flight
            facts.stalled_for = facts.at - since
        if change is None:
            return
        if not change.started:
            LOG.warning(
                "gunicorn-insight: stall over after %.1fs: %s",
                change.quiet_for,
                "requests finish again"
                if change.resumed
                else "no request in flight any more, none finished (see the worker exits above)",
            )
            return
        facts.stalls += 1
        named = self._requests_by_age(facts.at)
        requests = "; ".join(
            f'slot={view.index} pid={view.pid} "{request.method} {request.path}" elapsed={elapsed:.1f}s '
            f"thread={request.thread}"
            for elapsed, view, request in named[:_STALL_NAMED]
        )
        more = len(named) - _STALL_NAMED
        LOG.error(
            "gunicorn-insight: stalled: %d requests in flight, none finished for %.1fs, %d of %d workers busy, "
            'capacity %d, waiting %d, listen queue %d; requests: %s%s. Their stacks: the "slow request" lines '
            "each worker logged above",
            facts.in_flight,
            change.quiet_for,
            facts.busy_workers,
            facts.workers,
            facts.capacity,
            facts.waiting,
            sum(queued for queued, _ in facts.listeners.values()),
            requests or "none readable",
            f"; and {more} more" if more > 0 else "",
        )

    def _requests_by_age(self, now: float) -> list[tuple[float, sb.SlotView, sb.InFlight]]:
        """(seconds in flight, slot, request) of every request in flight, the oldest first."""
        return sorted(
            (
                (now - request.started, view, request)
                for view in self.board
                if view.state != sb.FREE
                for request in view.requests
            ),
            key=lambda item: -item[0],
        )

    def _watch_stopping(self, facts: Round, unmet: bool) -> None:
        """gunicorn's stop() closes its listeners before anything else (a TERM, INT or QUIT, or a halt): the first
        round without any, after rounds with some, is the stop. Said once, when demand was unmet at the round
        before: what an orchestrator whose health check goes through the workers saw just then."""
        if self._listening:
            # Only with a worker ready: a stop with none (gunicorn halting after a failed boot) has its own lines,
            # and no worker was busy.
            if not unmet or not facts.ready_workers:
                self._unmet_since = None
            elif self._unmet_since is None:
                self._unmet_since = facts.at
            self._before_stop = facts
            return
        before, since = self._before_stop, self._unmet_since
        self._before_stop = self._unmet_since = None
        if before is None or since is None:
            return
        queued = [(name, queued) for name, (queued, _) in sorted(before.listeners.items()) if queued]
        parts = [f"requests in flight {before.in_flight} of a capacity of {before.capacity}"]
        parts += [f"connections waiting at {name} {count}" for name, count in queued]
        if before.waiting:
            parts.append(f"accepted connections waiting for a thread {before.waiting}")
        oldest = self._requests_by_age(facts.at)[:1]
        url = self.endpoint.url if self.endpoint is not None else ""
        check = (
            f"point it at {url.rsplit('/', 1)[0]}/healthz, which gunicorn-insight answers without a worker"
            if url
            else "serve it from gunicorn-insight's /healthz (set metrics_bind), which needs no worker"
        )
        LOG.warning(
            "gunicorn-insight: gunicorn is stopping while demand was unmet for %.1fs: %s%s. If an orchestrator "
            "stopped it because a health check failed (a Kubernetes liveness probe, a load balancer's check), "
            "that check waited behind busy workers: %s, or add capacity",
            before.at - since,
            ", ".join(parts),
            "".join(
                f'; the oldest request in flight: "{request.method} {request.path}" for {elapsed:.1f}s (slot '
                f"{view.index} pid {view.pid})"
                for elapsed, view, request in oldest
            ),
            check,
        )

    def _watch_unserved(self, facts: Round, heads: int) -> None:
        """Connections queued while no worker is in a request: ask each ready worker's watchdog for its main
        thread's stack while it lasts, and once it has lasted the threshold, log the listener with them.

        Not judged where the worker class's requests are not recorded: nothing in flight and no head moving
        would then be the normal picture of a busy server (the metric stays absent; the startup line and the
        requests-unseen line say why)."""
        if self.plan.requests_unseen is not None or self._told_unseen:
            return
        facts.unserved, ended = self._unserved.observe(facts.at, heads, facts.in_flight, facts.listeners)
        for end in ended:
            LOG.warning("gunicorn-insight: listener %s is served again after %.1fs", end.listener, end.seconds)
        if not self._unserved.unserved:
            self._main_threads.clear()
            return
        views = [view for view in self.board if view.state != sb.FREE and view.pid]
        self._main_threads.ask(facts.at, views)
        due = self._unserved.due(facts.at)
        if not due:
            return
        answers, waiting = self._main_threads.answers(facts.at, views)
        if waiting and min(seconds for _, seconds in due) < self._unserved.after + ANSWER_WAIT:
            return  # a watchdog ticks once a second: give each worker the time `stacks` gives it
        workers = self._main_threads.describe(facts.at, views, answers)
        ready = sum(1 for view in views if view.state == sb.READY)
        for name, seconds in due:
            self._unserved.reported(name)
            queued, limit = facts.listeners[name]
            LOG.error(
                "gunicorn-insight: listener %s not served: %d connections waiting in its accept queue (limit %d) "
                "for %.1fs while no worker is in a request and none finished; %d of %d workers ready (gunicorn "
                "keeps %s), none accepting. What each worker does instead:\n%s",
                name,
                queued,
                limit,
                seconds,
                ready,
                len(views),
                "?" if facts.desired_workers is None else facts.desired_workers,
                workers or "  no live worker at all (see the worker exits above)",
            )

    def _watch_main_loop(self, facts: Round) -> None:
        now = time.monotonic()
        facts.master_loop_stuck, change = self._main_loop.observe(now, sys._current_frames())
        if not self._main_loop.recognised and not self._told_loop_unknown and now - self._started > LOOP_UNKNOWN_AFTER:
            self._told_loop_unknown = True
            LOG.info(
                "gunicorn-insight: gunicorn's master loop was never seen waiting for signals (in Arbiter.sleep or "
                "wait_for_signals) in %.0fs, so whether it goes round is not measured: "
                "gunicorn_master_loop_stuck_seconds stays absent",
                LOOP_UNKNOWN_AFTER,
            )
        if change is None:
            return
        if change.blocked:
            LOG.error(
                "gunicorn-insight: gunicorn's master loop has not gone round for %.1fs: meanwhile no signal is "
                "handled, and no worker is killed for its timeout or replaced when it dies; the master's main "
                "thread, most recent call last:\n%s",
                change.seconds,
                change.stack,
            )
        else:
            LOG.warning("gunicorn-insight: gunicorn's master loop goes round again after %.1fs", change.seconds)

    def watch_logger(self, log: Any) -> None:
        self.exits.reaps.watch(log)
        if self.log_lines is not None:
            self.log_lines.watch(log)

    def watch_desired(self, desired: Callable[[], int]) -> None:
        """The worker count gunicorn's arbiter keeps, re-read every round (TTIN and TTOU move it)."""
        self._desired = desired

    def watch_listeners(self, listeners: Callable[[], list[Any]]) -> None:
        """gunicorn's listening sockets, re-read every round (a HUP can replace them)."""
        self._listeners = listeners

    def _sample_listeners(self, facts: Round) -> None:
        listeners = self._listeners()
        self._listening = bool(listeners)
        for listener in listeners:
            sock = getattr(listener, "sock", None)
            if sock is None:
                continue
            try:
                name = str(listener)  # gunicorn's name for it asks the socket (getsockname)
            except (AttributeError, OSError):
                continue  # closed meanwhile by gunicorn's main thread (shutdown, reload): nothing to sample
            if sock.family == socket.AF_UNIX:  # one sock_diag query for the queue and the socket's file
                measured, bound = unix_listener(sock)
                path = getattr(listener, "cfg_addr", None)
                if bound is not None and isinstance(path, str):
                    try:
                        self._socket_files.check(path, bound)
                    except Exception as error:
                        report("checking the unix socket files", error)
            else:
                measured = backlog(sock)
                closed = self._listener_time_wait(facts.at, name, sock)
                if closed is not None:
                    facts.time_wait[name] = closed
                dropped = self._drops.rise(name, sock)
                if dropped is not None:
                    facts.listen_drops[name] = dropped
            if measured is not None:
                facts.listeners[name] = measured
        overflows = listen_overflows()
        if overflows is not None and self._overflows is not None:
            facts.listen_overflows = max(0, overflows - self._overflows)
        self._overflows = overflows

    def _listener_time_wait(self, now: float, name: str, sock: socket.socket) -> int | None:
        """The listener's TIME_WAIT count, asked of the kernel at most every TIME_WAIT_EVERY seconds: the dump
        walks the namespace's every TIME_WAIT socket (milliseconds with tens of thousands), and the count
        spans the last 60 s anyway."""
        last = self._time_wait.get(name)
        if last is not None and now - last[0] < TIME_WAIT_EVERY:
            return last[1]
        closed = listener_time_wait(sock)
        if closed is None:
            self._time_wait.pop(name, None)
        else:
            self._time_wait[name] = (now, closed)
        return closed

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

    def worker_gone(self, worker: Any, *, shutting_down: bool = False) -> None:
        """Signal-handler safe: copy the slot, free it, queue the report for the exporter. ``shutting_down``:
        gunicorn is stopping, so a SIGKILL is its own, sent when graceful_timeout ran out."""
        slot = getattr(worker, SLOT_ATTRIBUTE, None)
        if slot is None:
            return
        setattr(worker, SLOT_ATTRIBUTE, None)  # worker_exit after child_exit must not free it twice
        snapshot = self.board.snapshot(slot)
        self.board.release(slot)
        heapq.heappush(self._free_slots, slot)
        pid = worker.pid if isinstance(worker.pid, int) else 0
        self.exits.queue(
            Death(
                pid, slot, snapshot, time.monotonic(), bool(getattr(worker, "aborted", False)), shutdown=shutting_down
            )
        )

    def _close_wake(self) -> None:
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read = self._wake_write = -1

    # -- fork safety ----------------------------------------------------------------------------

    def before_fork(self) -> None:
        self._round_lock.acquire()

    def after_fork_in_parent(self) -> None:
        self._round_lock.release()

    def after_fork_in_child(self) -> None:
        self._round_lock.release()
        self.in_child = True
        self._close_wake()
        if self.endpoint is not None:
            self.endpoint.close_in_child()
        if self.statsd is not None:
            self.statsd.close()


def _guarded(place: str, step: Callable[..., None], *args: Any) -> None:
    """One step of a round; its failure is reported (rate-limited) and the round goes on."""
    try:
        step(*args)
    except Exception as error:
        report(place, error)


def _unmet(facts: Round) -> bool:
    """Demand the workers did not meet this round: every one of them full, or connections waiting."""
    return (
        facts.in_flight >= facts.capacity > 0
        or facts.waiting > 0
        or any(queued for queued, _ in facts.listeners.values())
    )


_STALL_NAMED = 20
TIME_WAIT_EVERY = 10.0
"""Seconds between two TIME_WAIT dumps of a listener (see Master._listener_time_wait)."""


def _host_reader(plan: Plan) -> HostReader | None:
    """Find the host's files once, and say once what cannot be read (those metrics are absent)."""
    try:
        reader = HostReader()
    except Exception as error:
        report("finding the cgroup and PSI files", error)
        return None
    LOG.info("gunicorn-insight: host readings from %s", reader.describe())
    if reader.missing:
        LOG.info("gunicorn-insight: cannot read %s; those metrics are absent", "; ".join(reader.missing))
    quota = reader.read().quota_cores
    if quota is not None and plan.workers > 2 * quota + 1:
        LOG.warning(
            "gunicorn-insight: workers=%d share a CPU quota of %.2f cores (cgroup %s): the workers will be "
            "throttled whenever more than %.2f of them run at once; gunicorn's rule of thumb is (2 x cores) + 1 "
            "= %d workers (watch gunicorn_cgroup_cpu_throttled_seconds_total)",
            plan.workers,
            quota,
            reader.sources["cpu"],
            quota,
            int(2 * quota + 1),
        )
    return reader


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
