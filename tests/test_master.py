"""The master side without a server: the Plan, one round, the exit line, and the worker's watchdog tick."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeRequest, FakeResponse, finish, start
from gunicorn.config import Config

from gunicorn_insight import _kernelfiles as kernelfiles
from gunicorn_insight._master import arbiter
from gunicorn_insight._master.arbiter import Master
from gunicorn_insight._master.plan import Plan
from gunicorn_insight._runfiles import STATUS_FILE, StatusRecord, read_record
from gunicorn_insight._worker.recorder import RequestRecorder
from gunicorn_insight._worker.watchdog import Monitor
from gunicorn_insight.settings import Settings

NO_EXPORTER = Settings(metrics_bind="off")  # no /metrics process, no StatsD socket, no Prometheus files


def gunicorn_config(**values: Any) -> Config:
    cfg = Config()
    for name, value in values.items():
        cfg.set(name, value)
    return cfg


@pytest.mark.parametrize(
    ("worker_class", "threads", "capacity", "connections", "entries", "threaded"),
    [
        ("sync", 1, 1, 1, 1, False),
        ("gthread", 4, 4, 100, 4, True),
        ("gevent", 4, 100, 100, 64, False),  # the scoreboard names at most 64 requests per worker
    ],
)
def test_plan_counts_capacity_by_worker_class(
    worker_class: str, threads: int, capacity: int, connections: int, entries: int, threaded: bool
) -> None:
    """sync serves one request, gthread one per thread, the async classes up to worker_connections."""
    cfg = gunicorn_config(worker_class=worker_class, threads=threads, worker_connections=100)
    plan = Plan.resolve(NO_EXPORTER, cfg, None)
    assert (plan.worker_kind, plan.per_worker_capacity, plan.connections_limit, plan.entries) == (
        worker_class,
        capacity,
        connections,
        entries,
    )
    assert plan.recorder.threaded is threaded


def test_plan_takes_gunicorns_own_settings_where_ours_are_unset() -> None:
    """Slots from workers (at least 16), the slow threshold from timeout, StatsD from statsd_host and its tags."""
    cfg = gunicorn_config(
        workers=6, timeout=10, statsd_host="127.0.0.1:8125", statsd_prefix="web", dogstatsd_tags="env:prod"
    )
    plan = Plan.resolve(Settings(), cfg, None)
    assert (plan.slots, plan.slow_request_timeout) == (24, 8.0)
    assert (plan.statsd_target, plan.statsd_prefix, plan.statsd_tags, plan.statsd_tagged) == (
        ("127.0.0.1", 8125),
        "web",
        "env:prod",
        True,
    )
    small = Plan.resolve(Settings(max_workers=3, slow_request_timeout=0), gunicorn_config(workers=2), None)
    assert (small.slots, small.slow_request_timeout) == (3, 0)


class FakeWorker:
    """The attributes of gunicorn's Worker the master and the recorder read."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.aborted = False
        self.booted = True
        self.nr = 0
        self.max_requests = 1000


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Master]:
    """A master of two sync workers with no exporter, writing its files to tmp_path."""
    plan = Plan.resolve(NO_EXPORTER, gunicorn_config(workers=2), None)
    created = Master(plan, str(tmp_path), "test")
    yield created
    created.board.close()


def worker_of(master: Master, pid: int) -> tuple[FakeWorker, RequestRecorder]:
    """A worker the master assigned a slot to, with the recorder that worker would write through."""
    worker = FakeWorker(pid)
    master.assign_slot(worker)
    recorder = RequestRecorder(master.board, getattr(worker, arbiter.SLOT_ATTRIBUTE), worker)
    recorder.booted()
    return worker, recorder


def test_a_round_writes_what_the_workers_did(master: Master, tmp_path: Path) -> None:
    """One round: workers, capacity from the plan, requests in flight and the listener go into status.json."""
    _, first = worker_of(master, 101)
    _, second = worker_of(master, 102)
    done, running = FakeRequest("GET", "/done"), FakeRequest("POST", "/running")
    start(first, done)
    finish(first, done, {}, FakeResponse("200 OK"))
    start(second, running)
    master.run_round()
    status = read_record(StatusRecord, str(tmp_path / STATUS_FILE))
    assert (status.workers, status.capacity, status.busy_workers, status.in_flight, status.lost_requests) == (
        2,
        2,
        1,
        1,
        0,
    )
    assert status.recent_exits == ()


class ClosedMidRound:
    """A gunicorn listener its main thread closes while a round reads it: its name asks the closed socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def __str__(self) -> str:
        raise AttributeError("'NoneType' object has no attribute 'getsockname'")


class OpenListener:
    """A gunicorn TCP listener still open, named as gunicorn names it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def __str__(self) -> str:
        host, port = self.sock.getsockname()
        return f"http://{host}:{port}"


@pytest.fixture
def open_listener() -> Iterator[OpenListener]:
    """A TCP listener on a free loopback port, open for the whole test."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(7)
        yield OpenListener(listening)


def test_a_listener_closed_during_the_round_costs_only_its_own_sample(
    master: Master, tmp_path: Path, open_listener: OpenListener
) -> None:
    """gunicorn closing a listener mid-round (shutdown, reload) leaves that listener out; the other listeners
    are sampled and the round goes on."""
    _, recorder = worker_of(master, 101)
    start(recorder, FakeRequest("GET", "/running"))
    with socket.socket() as closing:
        master.watch_listeners(lambda: [ClosedMidRound(closing), open_listener])
        master.run_round()
    name = str(open_listener)
    status = read_record(StatusRecord, str(tmp_path / STATUS_FILE))
    assert (status.workers, status.in_flight, status.rounds) == (1, 1, 1)
    assert [listener.name for listener in status.listeners] == [name]


def test_a_halt_with_no_worker_ready_is_no_stop_while_busy(
    master: Master, caplog: pytest.LogCaptureFixture, open_listener: OpenListener
) -> None:
    """gunicorn halting with connections queued and no worker ready (a failed boot) is not a stop behind busy
    workers: no line."""
    with socket.create_connection(open_listener.sock.getsockname()):  # queued, and no worker to take it
        listeners = [open_listener]
        master.watch_listeners(lambda: list(listeners))
        with caplog.at_level(logging.WARNING):
            master.run_round()
            listeners.clear()
            master.run_round()
    assert "is stopping" not in caplog.text


@pytest.mark.parametrize("busy", [True, False], ids=["saturated", "idle"])
def test_a_stop_while_demand_is_unmet_is_said_once_with_the_oldest_request(
    busy: bool, master: Master, caplog: pytest.LogCaptureFixture, open_listener: OpenListener
) -> None:
    """gunicorn's stop closes its listeners first: the round that finds none after a saturated one says so once,
    with how long and the oldest request in flight; an idle server stops without a line."""
    _, first = worker_of(master, 101)
    _, second = worker_of(master, 102)
    if busy:
        start(first, FakeRequest("POST", "/slow"))
        start(second, FakeRequest("GET", "/report"))
    listeners = [open_listener]
    master.watch_listeners(lambda: list(listeners))
    with caplog.at_level(logging.WARNING):
        master.run_round()
        master.run_round()
        listeners.clear()  # what gunicorn's stop() does first
        master.run_round()
        master.run_round()
    lines = [record.getMessage() for record in caplog.records if "is stopping" in record.getMessage()]
    if not busy:
        assert lines == []
        return
    (line,) = lines
    assert line.startswith("gunicorn-insight: gunicorn is stopping while demand was unmet for ")
    assert "s: requests in flight 2 of a capacity of 2; the oldest" in line
    assert '; the oldest request in flight: "POST /slow" for ' in line
    assert f"(slot 0 pid {os.getpid()})" in line  # the pid the recording process wrote
    assert "a Kubernetes liveness probe" in line
    assert "serve it from gunicorn-insight's /healthz (set metrics_bind), which needs no worker" in line


def test_an_exit_with_a_request_in_flight_is_one_line_naming_it(
    master: Master, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker SIGKILLed mid-request: one 'worker exited' line with cause, request and client; one recent exit."""
    worker, recorder = worker_of(master, 4242)
    start(recorder, FakeRequest("GET", "/report", query="id=7"))
    master.exits.reaps.observe("Worker (pid:%s) was sent SIGKILL! Perhaps out of memory?", (4242,))
    master.worker_gone(worker)
    with caplog.at_level(logging.ERROR):
        master.run_round()
    (line,) = [record.getMessage() for record in caplog.records if "worker exited" in record.getMessage()]
    assert line.startswith('gunicorn-insight: worker exited pid=4242 slot=0 cause=killed detail="killed by SIGKILL')
    assert 'request="GET /report?<redacted>" client=10.1.2.3:4567 elapsed=' in line
    (exit_,) = read_record(StatusRecord, str(tmp_path / STATUS_FILE)).recent_exits
    assert (exit_.pid, exit_.cause, exit_.request) == (4242, "killed", "GET /report?<redacted>")
    master.run_round()  # reported once: the next round has nothing left to bury
    assert sum("worker exited" in record.getMessage() for record in caplog.records) == 1


def test_an_idle_worker_recycled_is_counted_without_a_line(
    master: Master, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An expected exit (max_requests) of an idle worker is a recent exit but never an error line."""
    worker, recorder = worker_of(master, 4343)
    worker.nr = worker.max_requests
    recorder.exiting(worker)
    master.worker_gone(worker)
    master.run_round()
    assert "worker exited" not in caplog.text
    (exit_,) = read_record(StatusRecord, str(tmp_path / STATUS_FILE)).recent_exits
    assert exit_.cause == "max_requests"


def test_watchdog_tick_reports_a_slow_request_once(master: Master, caplog: pytest.LogCaptureFixture) -> None:
    """Past slow_request_timeout a request is logged once, with its stack, and counted; later ticks stay quiet."""
    _, recorder = worker_of(master, os.getpid())
    monitor = Monitor(recorder, FakeWorker(os.getpid()), slow_after=0.05)
    start(recorder, FakeRequest("GET", "/slow"))
    monitor.tick()
    assert "slow request" not in caplog.text
    time.sleep(0.1)
    monitor.tick()
    monitor.tick()
    (line,) = [record.getMessage() for record in caplog.records if "slow request" in record.getMessage()]
    assert 'request="GET /slow" elapsed=' in line
    assert "in test_watchdog_tick_reports_a_slow_request_once" in line  # this thread's stack
    assert master.board.read(recorder.slot).slow == 1


def test_stop_ends_the_exporter_without_waiting_out_the_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() wakes the exporter thread sleeping between rounds (60 s here): the thread has ended when stop()
    goes on to its last round, instead of stop() giving up its join after 5 s with the thread still asleep."""
    plan = Plan.resolve(Settings(metrics_bind="off", interval=60), gunicorn_config(workers=1), None)
    master = Master(plan, str(tmp_path), "test")
    try:
        master.start()
        thread = master._thread
        assert thread is not None
        alive_at_last_round: list[bool] = []
        queue_unreaped = master.exits.queue_unreaped

        def last_round_begins() -> None:
            alive_at_last_round.append(thread.is_alive())
            queue_unreaped()

        monkeypatch.setattr(master.exits, "queue_unreaped", last_round_begins)
        master.stop()
        assert alive_at_last_round == [False]
    finally:
        master.board.close()


class UnixListener:
    """What the master reads of gunicorn's listener: its socket, its path and its name."""

    def __init__(self, sock: socket.socket, path: str) -> None:
        self.sock = sock
        self.cfg_addr = path

    def __str__(self) -> str:
        return f"unix:{self.cfg_addr}"


@pytest.fixture
def queued_listener(tmp_path: Path) -> Iterator[UnixListener]:
    """A listening unix socket with two connections in its accept queue that nobody accepts."""
    path = str(tmp_path / "app.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(path)
        listening.listen(8)
        clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
        for client in clients:
            client.connect(path)
        yield UnixListener(listening, path)
        for client in clients:
            client.close()


def unserved_master(tmp_path: Path, listener: UnixListener, **plan_changes: Any) -> tuple[Master, Monitor]:
    """A master of one sync worker (this process, its watchdog ticked by hand) watching ``listener``."""
    settings = Settings(metrics_bind="off", slow_request_timeout=0.2)
    plan = dataclasses.replace(Plan.resolve(settings, gunicorn_config(workers=1), None), **plan_changes)
    master = Master(plan, str(tmp_path), "test")
    worker, recorder = worker_of(master, os.getpid())
    master.watch_listeners(lambda: [listener])
    return master, Monitor(recorder, worker, 0, stacks_dir=str(tmp_path))


def rounds_until(master: Master, monitor: Monitor, caplog: pytest.LogCaptureFixture, seconds: float) -> list[str]:
    """Master rounds and watchdog ticks for ``seconds`` (or until the line): the 'not served' lines logged."""
    deadline = time.monotonic() + seconds
    while True:
        master.run_round()
        monitor.tick()
        lines = [record.getMessage() for record in caplog.records if " not served: " in record.getMessage()]
        if lines or time.monotonic() >= deadline:
            return lines
        time.sleep(0.05)


def test_a_queue_nobody_serves_is_logged_with_the_workers_main_thread(
    tmp_path: Path, queued_listener: UnixListener, caplog: pytest.LogCaptureFixture
) -> None:
    """Two connections queued, nothing in flight: one error line naming the listener, the queue and the stack
    the worker's watchdog gave for its main thread (here: this test's loop)."""
    master, monitor = unserved_master(tmp_path, queued_listener)
    try:
        with caplog.at_level(logging.ERROR):
            (line,) = rounds_until(master, monitor, caplog, seconds=20)
    finally:
        master.board.close()
    assert line.startswith(
        f"gunicorn-insight: listener unix:{queued_listener.cfg_addr} not served: 2 connections waiting in its "
        "accept queue (limit 8) for "
    ), line
    assert f"slot=0 pid={os.getpid()} connections=0/1 served=0: main thread, most recent call last:" in line
    assert "in rounds_until\n" in line, line


def test_a_queue_is_not_judged_where_the_worker_class_records_no_request(
    tmp_path: Path, queued_listener: UnixListener, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker class that calls no request hooks: nothing in flight is no evidence, so no line."""
    master, monitor = unserved_master(tmp_path, queued_listener, requests_unseen="no hooks")
    try:
        with caplog.at_level(logging.ERROR):
            assert rounds_until(master, monitor, caplog, seconds=2) == []
    finally:
        master.board.close()


def test_time_wait_is_asked_of_the_kernel_at_most_every_ten_seconds(
    master: Master, monkeypatch: pytest.MonkeyPatch, open_listener: OpenListener
) -> None:
    """A listener's TIME_WAIT dump (milliseconds with many sockets in the namespace) runs once per
    TIME_WAIT_EVERY; the rounds between repeat its count."""
    asked: list[int] = []

    def count(sock: socket.socket) -> int:
        asked.append(sock.fileno())
        return 100 + len(asked)

    monkeypatch.setattr(arbiter, "listener_time_wait", count)
    sock = open_listener.sock
    seen = [master._listener_time_wait(at, "http://x", sock) for at in (100.0, 101.0, 109.9, 110.0, 115.0)]
    assert seen == [101, 101, 101, 102, 102]
    assert len(asked) == 2


def test_the_master_keeps_as_many_kernel_files_as_its_slots_need(tmp_path: Path) -> None:
    """Three files per worker slot and some of its own: 256 slots keep 832 open, where a fixed 256 made the
    master close and reopen them every round past about 60 workers."""
    settings = Settings.build({"max_workers": 256, "metrics_bind": "off"})
    plan = Plan.resolve(settings, gunicorn_config(workers=64), None)
    created = Master(plan, str(tmp_path), "test")
    try:
        assert kernelfiles._Kept.cap == 3 * 256 + kernelfiles.FEWEST_KEPT
    finally:
        created.board.close()


def test_a_round_step_that_fails_costs_only_its_part(
    master: Master, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step of the round raising (here the listen queues' sampling) is reported; the round still writes what
    it drained."""

    def broken() -> int:
        raise OSError("netstat unreadable")

    _, recorder = worker_of(master, 101)
    start(recorder, FakeRequest("GET", "/running"))
    monkeypatch.setattr(arbiter, "listen_overflows", broken)
    master.run_round()
    status = read_record(StatusRecord, str(tmp_path / STATUS_FILE))
    assert (status.workers, status.in_flight, status.rounds) == (1, 1, 1)
