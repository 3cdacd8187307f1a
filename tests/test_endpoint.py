"""The /metrics process, spawned for real by the master's handle on it (no gunicorn needed)."""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gunicorn_insight._export import metrics_link
from gunicorn_insight._export.metrics_link import MetricsEndpoint
from gunicorn_insight._export.mmapfile import MetricFile, sample_key
from gunicorn_insight.settings import ConfigurationError

DEADLINE = 20.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _until(predicate: Callable[[], bool], what: str) -> None:
    give_up = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"not within {DEADLINE}s: {what}")
        time.sleep(0.02)


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


class _Exporter:
    """Plays the master's exporter thread: answers scrapes by running a 'round' that bumps a counter."""

    def __init__(self, endpoint: MetricsEndpoint, directory: Path) -> None:
        self.endpoint = endpoint
        self.rounds = 0
        self.round_seconds = 0.0  # a slow master: a scrape that did not wait would miss the round
        self._file = MetricFile(str(directory / "counter_1.db"))
        self._key = sample_key("rounds", "rounds_total", {}, "rounds run")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _round(self) -> None:
        time.sleep(self.round_seconds)
        self.rounds += 1
        self._file.write(self._key, float(self.rounds))

    def _run(self) -> None:
        while not self._stop.is_set():
            metrics_link.wait_readable(self.endpoint, 0.05)
            self.endpoint.take_requests()
            asked = self.endpoint.pending
            if asked:
                self._round()
                self.endpoint.answer(asked)
            self.endpoint.restart_if_gone()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.endpoint.close()


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[_Exporter]:
    endpoint = MetricsEndpoint(("127.0.0.1", _free_port()), str(tmp_path), successor=False, error_fd=2, title="")
    running = _Exporter(endpoint, tmp_path)
    yield running
    running.stop()
    _until(lambda: _reaped(endpoint.pid), "the /metrics process exits once its socket closes")


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _serves(url: str) -> bool:
    try:
        return "rounds_total" in _scrape(url)
    except OSError:
        return False


def test_each_scrape_waits_for_a_fresh_round(exporter: _Exporter) -> None:
    """A scrape shows the round the master ran for it, even a slow one: two scrapes, two rounds."""
    exporter.round_seconds = 0.5
    assert "rounds_total 1.0" in _scrape(exporter.endpoint.url)
    assert "rounds_total 2.0" in _scrape(exporter.endpoint.url)
    assert exporter.rounds == 2


def test_a_killed_process_is_restarted_on_the_same_port(exporter: _Exporter, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL the /metrics process: the master notices the socket close and starts a new one."""
    monkeypatch.setattr(metrics_link, "RESTART_EVERY", 0.0)
    first = exporter.endpoint.pid
    os.kill(first, 9)
    _until(lambda: _reaped(first), "the killed process is reaped")
    _until(lambda: _serves(exporter.endpoint.url), "a new /metrics process serves")
    assert exporter.endpoint.pid != first


def test_port_in_use_is_a_startup_error_naming_the_setting(tmp_path: Path) -> None:
    """Binding a taken port fails at startup with metrics_bind, the address and the fix in the message."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            ConfigurationError,
            match=rf"metrics_bind=127\.0\.0\.1:{port} cannot be bound.*"
            rf"ss -ltnp 'sport = :{port}'.*GUNICORN_INSIGHT_METRICS_BIND",
        ):
            MetricsEndpoint(("127.0.0.1", port), str(tmp_path), successor=False, error_fd=2, title="")


def test_default_port_in_use_is_reported_apart_from_errors(tmp_path: Path) -> None:
    """metrics_bind not set (optional): a taken port is MetricsPortTaken, whose message is the warning."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(
            metrics_link.MetricsPortTaken,
            match=rf"/metrics is not served: the default metrics_bind "
            rf"127\.0\.0\.1:{port} is in use",
        ):
            MetricsEndpoint(("127.0.0.1", port), str(tmp_path), successor=False, error_fd=2, title="", optional=True)


def test_a_port_freed_within_the_retries_is_bound(tmp_path: Path) -> None:
    """A port still held for a moment (the previous run's process exiting) is retried, not an error."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    threading.Timer(1.0, taken.close).start()
    endpoint = MetricsEndpoint(("127.0.0.1", port), str(tmp_path), successor=False, error_fd=2, title="")
    running = _Exporter(endpoint, tmp_path)
    try:
        assert _serves(endpoint.url)
    finally:
        running.stop()
        _until(lambda: _reaped(endpoint.pid), "the /metrics process exits once its socket closes")


def test_a_successor_waits_for_the_port_and_then_serves(tmp_path: Path) -> None:
    """During a USR2 upgrade the new process waits for the old master's port instead of failing."""
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    endpoint = MetricsEndpoint(("127.0.0.1", port), str(tmp_path), successor=True, error_fd=2, title="")
    running = _Exporter(endpoint, tmp_path)
    try:
        taken.close()
        _until(lambda: _serves(endpoint.url), "the successor's process binds the freed port")
    finally:
        running.stop()
        _until(lambda: _reaped(endpoint.pid), "the /metrics process exits once its socket closes")
