"""eventlet (gunicorn 23 to 26): requests counted, and the watchdog on a real OS thread sees the request's
greenlet, whether it waits cooperatively or spins on the CPU."""

from __future__ import annotations

import importlib.util
import re

import pytest
from harness import GUNICORN_VERSION, Gunicorn, start_gunicorn
from servers import ProcessFactory
from test_worker_death import SLOW, fire_and_forget

pytestmark = [
    pytest.mark.oldest,
    pytest.mark.skipif(GUNICORN_VERSION >= (27, 0), reason="gunicorn 27 dropped the eventlet worker"),
    pytest.mark.skipif(importlib.util.find_spec("eventlet") is None, reason="eventlet is not installed here"),
]
# eventlet announces its own deprecation on import, in every worker: not our business here.
QUIET = {"PYTHONWARNINGS": "ignore"}


def start(process_factory: ProcessFactory, *, args: list[str] | None = None, slow_after: str = "1") -> Gunicorn:
    return start_gunicorn(
        process_factory,
        worker_class="eventlet",
        workers=1,
        args=args or [],
        env={**QUIET, "GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": slow_after},
    )


def stack_after(server: Gunicorn, report: re.Match[str]) -> str:
    """The stack lines logged right after a slow-request report, up to the next log line."""
    rest = server.process.output()[report.end() :]
    end = re.search(r"^\[\d{4}-", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def test_eventlet_requests_counted_exactly_by_status(process_factory: ProcessFactory) -> None:
    """-k eventlet: every request is counted once, by status, with a duration."""
    server = start(process_factory, slow_after="30")
    for _ in range(7):
        assert server.get("/") == 200
    for _ in range(3):
        assert server.get("/status/404") == 404
    server.wait_for_value("gunicorn_requests_total", 7, status="200")
    server.wait_for_value("gunicorn_requests_total", 3, status="404")
    assert server.total("gunicorn_requests_total") == 10
    assert server.total("gunicorn_request_duration_seconds_count") == 10


def test_eventlet_slow_cooperative_request_reported_with_the_apps_frame(process_factory: ProcessFactory) -> None:
    """A request sleeping cooperatively is reported with its own greenlet's stack (the app's frame), not the
    watchdog's."""
    server = start(process_factory)
    fire_and_forget(server, "/slow?s=4")
    report = server.process.wait_for_log(SLOW + r" greenlet=0x[0-9a-f]+", timeout=30)
    stack = stack_after(server, report)
    assert re.search(r'app\.py", line \d+, in app\n\s+time\.sleep\(seconds\)', stack), stack
    assert "watchdog.py" not in stack, stack
    assert server.get("/") == 200  # the worker still serves meanwhile


def test_eventlet_cpu_stuck_greenlet_reported(process_factory: ProcessFactory) -> None:
    """A greenlet spinning on the CPU never yields: the watchdog, a real thread, still reports it with its stack."""
    server = start(process_factory, args=["--timeout", "5"])
    fire_and_forget(server, "/stuck")
    report = server.process.wait_for_log(SLOW + r" greenlet=0x[0-9a-f]+", timeout=30)
    stack = stack_after(server, report)
    # Caught anywhere in the spin loop: on its sum() or on the jump back to its `while True:`.
    assert re.search(r'app\.py", line \d+, in app\n\s+(?:sum\(range\(1000\)\)|while True:)', stack), stack
