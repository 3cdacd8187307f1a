"""uvicorn's two worker classes end to end, where they differ from the other ASGI classes: their own
max_requests recycling, SIGABRT at timeout, a blocked loop, keep-alive connections, limit_concurrency.
(Split from test_asgi_workers.py so that the two halves run in parallel.)"""

from __future__ import annotations

import http.client
import re

import pytest
from harness import APPS
from servers import ProcessFactory
from test_asgi_workers import UVICORN_CLASSES, start
from test_worker_death import EXITED, fire_and_forget


@pytest.mark.parametrize("worker_class", UVICORN_CLASSES)
def test_uvicorn_max_requests_recycles_are_counted_as_max_requests(
    worker_class: str, process_factory: ProcessFactory
) -> None:
    """uvicorn ends a worker after --max-requests itself; the exit is counted as max_requests, not graceful."""
    server = start(process_factory, worker_class, "asgi_app:app", args=["--max-requests", "3"])
    for recycled in (1, 2):
        # uvicorn looks at its count every 0.1 s: a request sent in between may still reach the old worker.
        for _ in range(3):
            assert server.get("/") == 201
        server.wait_for_value("gunicorn_worker_exits_total", recycled, cause="max_requests", timeout=60)
    assert server.total("gunicorn_worker_exits_total", cause="graceful") == 0
    assert server.total("gunicorn_requests_total") == 6


@pytest.mark.parametrize("worker_class", UVICORN_CLASSES)
def test_timed_out_uvicorn_worker_names_its_request_and_the_sigabrt(
    worker_class: str, process_factory: ProcessFactory
) -> None:
    """A uvicorn worker timed out with its loop blocked dies of the SIGABRT itself: the exit line says so (not
    SIGKILL) and names the request in flight; faulthandler wrote the blocked frame's stack before it died."""
    server = start(process_factory, worker_class, "asgi_app:app", args=["--timeout", "2"])
    fire_and_forget(server, "/stuck")
    match = server.process.wait_for_log(EXITED, timeout=60)
    assert (match["cause"], match["method"], match["path"]) == ("timeout_kill", "GET", "/stuck"), match[0]
    assert "died of that SIGABRT" in match["detail"]
    assert match["client"].startswith("127.0.0.1:")
    assert "SIGKILL" not in match["detail"] + (match["stack"] or "")
    server.wait_for_value("gunicorn_worker_exits_total", 1, cause="timeout_kill")
    output = server.process.output()
    assert "Fatal Python error: Aborted" in output
    assert re.search(r'File ".*asgi_app\.py", line \d+ in ', output), output


@pytest.mark.parametrize("worker_class", UVICORN_CLASSES)
def test_blocked_uvicorn_loop_reported_with_the_apps_frame(worker_class: str, process_factory: ProcessFactory) -> None:
    """uvicorn: a blocking call inside a coroutine stops the loop; the watchdog logs the loop thread's stack."""
    server = start(process_factory, worker_class, "asgi_app:app", env={"GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": "1"})
    fire_and_forget(server, "/block")
    blocked = server.process.wait_for_log(r"event loop blocked pid=\d+ slot=0 for [\d.]+s", timeout=30)
    assert re.search(r"asgi_app.py\", line \d+, in app\n\s+time\.sleep\(3\)", server.process.output()[blocked.end() :])


@pytest.mark.parametrize("worker_class", UVICORN_CLASSES)
def test_uvicorn_keep_alive_connections_are_counted(worker_class: str, process_factory: ProcessFactory) -> None:
    """Idle keep-alive connections count on their uvicorn worker (read from uvicorn's server) until they close."""
    server = start(process_factory, worker_class, "asgi_app:app", args=["--keep-alive", "30"])
    connections = []
    for _ in range(5):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", "/")
        connection.getresponse().read()
        connections.append(connection)  # kept open: uvicorn holds it in keep-alive
    server.wait_for_value("gunicorn_worker_connections", 5, worker="0")
    assert server.value("gunicorn_requests_in_flight") == 0
    for connection in connections:
        connection.close()
    server.wait_for_value("gunicorn_worker_connections", 0, worker="0")


def test_uvicorn_limit_concurrency_is_the_connections_limit(process_factory: ProcessFactory) -> None:
    """A uvicorn worker class with limit_concurrency reports that as its connections limit and capacity."""
    server = start(
        process_factory, "uvicorn_limited.LimitedWorker", "asgi_app:app", workers=2, env={"PYTHONPATH": str(APPS)}
    )
    assert server.value("gunicorn_worker_connections_limit") == 7
    assert server.value("gunicorn_capacity") == 14


def test_an_asgi2_application_declared_to_uvicorn_is_served_and_counted(process_factory: ProcessFactory) -> None:
    """uvicorn told interface="asgi2" calls what the worker serves as ASGI 2: the layer (always ASGI 3) is
    declared to it instead, so the application is still served, and its requests counted."""
    server = start(process_factory, "asgi2_app.Asgi2Worker", "asgi2_app:app", env={"PYTHONPATH": str(APPS)})
    for _ in range(3):
        assert server.get("/") == 203
    server.wait_for_value("gunicorn_requests_total", 3, status="203")
