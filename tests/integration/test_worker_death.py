"""WORKER TIMEOUT names the request: the master reads the dead worker's slot, whatever killed it."""

from __future__ import annotations

import contextlib
import http.client
import threading

import pytest
from harness import Gunicorn, start_gunicorn
from servers import ProcessFactory

NAMED = (
    r"gunicorn-insight: worker pid=(?P<pid>\d+) slot=(?P<slot>\d+) died while serving "
    r"GET (?P<path>\S+) from 127\.0\.0\.1:\d+, in flight for (?P<elapsed>[\d.]+)s; (?P<why>.*)$"
)


def fire_and_forget(server: Gunicorn, path: str) -> threading.Thread:
    """Send a request whose answer we do not wait for (the worker will die serving it)."""

    def send() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):  # the connection dies with the worker
            server.get(path, timeout=30)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.oldest
def test_request_stuck_in_c_code_is_named_after_sigkill(process_factory: ProcessFactory) -> None:
    """A sync worker stuck in C never runs its abort handler; it is SIGKILLed and still the request is named."""
    server = start_gunicorn(process_factory, workers=1, args=["--timeout", "2"])
    fire_and_forget(server, "/stuck-c?token=hunter2")
    match = server.process.wait_for_log(NAMED, timeout=30)
    output = server.process.output()
    assert "SIGKILL" in output  # gunicorn's own line: the handler could not run
    assert match["path"] == "/stuck-c?<redacted>"
    assert float(match["elapsed"]) >= 2
    assert "WORKER TIMEOUT" in match["why"]
    assert "hunter2" not in output


@pytest.mark.oldest
def test_request_stuck_in_python_is_named_after_abort(process_factory: ProcessFactory) -> None:
    """A sync worker stuck in Python gets SIGABRT; its request is kept visible through post_request and named."""
    server = start_gunicorn(process_factory, workers=1, args=["--timeout", "2"])
    fire_and_forget(server, "/stuck")
    match = server.process.wait_for_log(NAMED, timeout=30)
    assert match["path"] == "/stuck"
    assert "WORKER TIMEOUT" in match["why"]
    assert "SIGKILL" not in server.process.output()


def test_externally_killed_worker_names_its_request(process_factory: ProcessFactory) -> None:
    """kill -9 from outside (an OOM killer, an operator) still leaves a line naming the request."""
    import os
    import signal

    server = start_gunicorn(process_factory, workers=1)
    fire_and_forget(server, "/slow?s=20")
    server.wait_for_value("gunicorn_requests_in_flight", 1)
    (pid,) = server.worker_pids()
    os.kill(pid, signal.SIGKILL)
    match = server.process.wait_for_log(NAMED, timeout=30)
    assert (int(match["pid"]), match["path"]) == (pid, "/slow?<redacted>")
    assert "exited or was killed" in match["why"]


def test_idle_worker_death_is_not_reported_as_a_request(process_factory: ProcessFactory) -> None:
    """A worker recycled between requests (max_requests) produces no 'died while serving' line."""
    server = start_gunicorn(process_factory, workers=1, args=["--max-requests", "1"])
    for _ in range(3):
        assert server.get("/") == 200
    server.wait_for_value("gunicorn_requests_total", 3)
    server.wait_for_workers(1)
    assert "died while serving" not in server.process.output()
