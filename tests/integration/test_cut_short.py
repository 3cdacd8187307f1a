"""A request whose worker died under it is counted once, status "aborted", with its duration up to the death."""

from __future__ import annotations

import contextlib
import http.client
import threading

import pytest
from harness import Gunicorn, start_gunicorn
from servers import ProcessFactory, StatsdDaemon, wait_until

EXITED = r"gunicorn-insight: worker exited pid=\d+ slot=\d+ cause=(?P<cause>\w+) "


def fire_and_forget(server: Gunicorn, path: str) -> threading.Thread:
    def send() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):  # the connection dies with the worker
            server.get(path, timeout=60)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.oldest
def test_request_of_a_worker_killed_at_timeout_is_counted_once_as_aborted(process_factory: ProcessFactory) -> None:
    """Sync worker stuck in C past --timeout is SIGKILLed: its request is one "aborted", lasting >= timeout."""
    server = start_gunicorn(process_factory, workers=1, args=["--timeout", "2"])
    assert server.get("/") == 200
    fire_and_forget(server, "/stuck-c")
    match = server.process.wait_for_log(EXITED, timeout=60)
    assert match["cause"] == "timeout_kill"
    server.wait_for_value("gunicorn_requests_total", 1, status="aborted")
    server.wait_for_workers(1)
    assert server.get("/") == 200
    server.wait_for_value("gunicorn_requests_total", 3)
    assert server.total("gunicorn_requests_total", status="500") == 0
    assert server.total("gunicorn_request_duration_seconds_count") == 3
    # The two quick requests take milliseconds: the rest of the sum is the killed one, up to its death.
    assert server.total("gunicorn_request_duration_seconds_sum") >= 2.0
    assert server.total("gunicorn_requests_in_flight") == 0


@pytest.mark.oldest
def test_request_aborted_in_python_is_counted_once_with_gunicorns_500(process_factory: ProcessFactory) -> None:
    """Stuck in Python, the abort handler runs and gunicorn answers 500: counted once, as that 500."""
    server = start_gunicorn(
        process_factory, workers=1, args=["--timeout", "2"], env={"GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": "0"}
    )
    fire_and_forget(server, "/stuck")
    match = server.process.wait_for_log(EXITED, timeout=60)
    assert match["cause"] == "timeout"
    server.wait_for_workers(1)
    server.wait_for_value("gunicorn_requests_total", 1)
    assert server.total("gunicorn_requests_total", status="500") == 1
    assert server.total("gunicorn_requests_total", status="aborted") == 0


def test_statsd_receives_the_aborted_request(process_factory: ProcessFactory, statsd_daemon: StatsdDaemon) -> None:
    """The StatsD sink sends the killed worker's request as status "aborted" too."""
    host, port = statsd_daemon.udp_address
    server = start_gunicorn(
        process_factory,
        workers=1,
        args=["--timeout", "2"],
        metrics=False,
        env={"GUNICORN_INSIGHT_STATSD": f"{host}:{port}"},
    )
    fire_and_forget(server, "/stuck-c")
    server.process.wait_for_log(EXITED, timeout=60)
    wait_until(
        lambda: statsd_daemon.counters().get("gunicorn.request.status.aborted") == 1,
        timeout=30,
        what="gunicorn.request.status.aborted == 1 in statsd",
        dump=statsd_daemon.dump,
    )
    assert max(statsd_daemon.timers()["gunicorn.request.duration"]) >= 2000
