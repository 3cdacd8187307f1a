"""ASGI worker classes end to end: uvicorn's two worker classes and gunicorn's asgi worker, serving FastAPI and
a plain ASGI application, recorded by the ASGI layer (gunicorn_insight._worker.asgi)."""

from __future__ import annotations

import contextlib
import http.client
import re
import threading

import pytest
from harness import APPS, GUNICORN_VERSION, Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until
from test_worker_death import fire_and_forget

from gunicorn_insight import _scoreboard as sb

UVICORN_CLASSES = ["uvicorn_worker.UvicornWorker", "uvicorn.workers.UvicornWorker"]
ASGI_CLASSES = [*UVICORN_CLASSES, "asgi"]
ROUTES: dict[str, str | None] = {"GUNICORN_INSIGHT_ROUTE_LABEL": "true"}
# uvicorn.workers warns that it is deprecated, on every import: not our business here.
QUIET = {"PYTHONWARNINGS": "ignore::DeprecationWarning"}


def start(
    process_factory: ProcessFactory,
    worker_class: str,
    app: str,
    *,
    workers: int = 1,
    args: list[str] | None = None,
    env: dict[str, str | None] | None = None,
) -> Gunicorn:
    if worker_class == "asgi" and GUNICORN_VERSION < (24, 0):
        pytest.fail("the asgi worker needs gunicorn >= 24; these tests are not marked oldest")
    return start_gunicorn(
        process_factory,
        app=app,
        worker_class=worker_class,
        cwd=APPS,
        workers=workers,
        args=args or [],
        env={**QUIET, **(env or {})},
    )


@pytest.mark.parametrize("compiled", ["true", "false"], ids=["compiled", "python"])
@pytest.mark.parametrize("worker_class", ASGI_CLASSES)
def test_fastapi_requests_counted_by_status_with_route_templates(
    worker_class: str, compiled: str, process_factory: ProcessFactory
) -> None:
    """Every FastAPI request is counted exactly by status, with a duration, and labelled with its route template
    (a mounted application's too), never the raw path; no access log needed; with either hooks."""
    env = {**ROUTES, "GUNICORN_INSIGHT_COMPILED_HOOKS": compiled}
    server = start(process_factory, worker_class, "fastapi_app:app", workers=2, env=env)
    hooks = "compiled" if compiled == "true" else "python"
    server.process.wait_for_log(rf"gunicorn-insight: .*\(worker class \S+, {hooks} request hooks", timeout=10)
    for item in range(12):
        assert server.get(f"/items/{item}") == 200
    for order in range(3):
        assert server.get(f"/users/u{order}/orders/{order}?token=secret") == 200
    for _ in range(4):
        assert server.get("/teapot") == 418
    for _ in range(2):
        assert server.get("/boom") == 500
    assert server.get("/nope") == 404
    assert server.get("/api/things/x") == 200

    assert server.total("gunicorn_requests_total") == 23
    assert server.value("gunicorn_requests_total", method="GET", status="200", route="/items/{item_id}") == 12
    assert (
        server.value("gunicorn_requests_total", method="GET", status="200", route="/users/{name}/orders/{order_id}")
        == 3
    )
    assert server.value("gunicorn_requests_total", method="GET", status="418", route="/teapot") == 4
    assert server.value("gunicorn_requests_total", method="GET", status="500", route="/boom") == 2
    assert server.value("gunicorn_requests_total", method="GET", status="404", route="none") == 1
    assert server.value("gunicorn_requests_total", method="GET", status="200", route="/api/things/{thing_id}") == 1
    assert server.total("gunicorn_request_duration_seconds_count") == 23
    assert server.total("gunicorn_request_duration_seconds_sum") > 0
    text = server.metrics_text()
    assert "/items/3" not in text
    assert "secret" not in text


@pytest.mark.parametrize("worker_class", ASGI_CLASSES)
def test_plain_asgi_app_statuses_without_an_access_log(worker_class: str, process_factory: ProcessFactory) -> None:
    """A plain ASGI application's statuses are recorded with gunicorn's access log off (the default)."""
    server = start(process_factory, worker_class, "asgi_app:app")
    for _ in range(7):
        assert server.get("/") == 201
    assert server.value("gunicorn_requests_total", method="GET", status="201") == 7
    assert server.total("gunicorn_requests_total") == 7


@pytest.mark.parametrize("worker_class", ASGI_CLASSES)
def test_request_in_flight_names_the_tcp_client(worker_class: str, process_factory: ProcessFactory) -> None:
    """A request in flight is in the scoreboard with its method, path and real TCP client (not "unix")."""
    server = start(process_factory, worker_class, "asgi_app:app", args=["--timeout", "60"])

    def send() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            server.get("/block?x=1", timeout=60)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()

    def in_flight() -> sb.InFlight | None:
        board = server.board()
        try:
            return next((request for view in board for request in view.requests), None)
        finally:
            board.close()

    request = wait_until(in_flight, timeout=30, what="the request in the scoreboard", dump=server.process.describe)
    assert (request.method, request.path) == ("GET", "/block?<redacted>")
    assert request.client.startswith("127.0.0.1:"), request.client
    # The request is left to the teardown's stop: the client thread ends with the server.


def test_worker_class_whose_requests_cannot_be_seen_is_named_once(process_factory: ProcessFactory) -> None:
    """A custom class that neither derives from a known one nor calls the request hooks gets one startup warning
    naming it and what will be missing, instead of silent zeros."""
    server = start_gunicorn(
        process_factory,
        app="app:app",
        worker_class="custom_worker.PlainWorker",
        env={"PYTHONPATH": str(APPS)},
        workers=2,
    )
    assert server.get("/") == 200
    output = server.process.output()
    assert output.count("worker class PlainWorker never calls gunicorn's pre_request/post_request hooks") == 1
    assert "request counts, durations, statuses" in output


@pytest.mark.parametrize("worker_class", ["sync", "gthread", *ASGI_CLASSES])
def test_classes_whose_requests_are_seen_get_no_warning(worker_class: str, process_factory: ProcessFactory) -> None:
    """No false alarm: the classes gunicorn-insight records start without the unseen-requests warning."""
    if worker_class in ASGI_CLASSES:
        server = start(process_factory, worker_class, "asgi_app:app")
    else:
        server = start_gunicorn(process_factory, worker_class=worker_class, workers=1)
    server.get("/")
    assert "never calls gunicorn's pre_request" not in server.process.output()


@pytest.mark.parametrize("worker_class", ASGI_CLASSES)
def test_slow_request_reported_with_its_tasks_stack(worker_class: str, process_factory: ProcessFactory) -> None:
    """A slow awaited request is reported with the stack of its asyncio task (the app's await), not without one."""
    server = start(process_factory, worker_class, "asgi_app:app", env={"GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": "1"})
    fire_and_forget(server, "/slow")
    slow = server.process.wait_for_log(
        r'slow request pid=\d+ slot=0 request="GET /slow" elapsed=[\d.]+s task=\S+', timeout=30
    )
    assert re.search(
        r"asgi_app.py\", line \d+, in app\n\s+await asyncio\.sleep\(3\)", server.process.output()[slow.end() :]
    ), server.process.output()[slow.start() :]
