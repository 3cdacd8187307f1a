"""Client hang-ups: requests whose client went away before the response, counted and named when slow."""

from __future__ import annotations

import http.client
import socket
import time

import pytest
from harness import APPS, start_gunicorn
from servers import NginxFactory, ProcessFactory

HANG_UP_LOG = (
    r"client closed the connection before the response pid=\d+ slot=\d+ "
    r'request="GET /slow\?<redacted>" duration=1\.\d+s'
)


def hang_up(port: int, path: str, after: float) -> None:
    """Send a request, then close the socket after ``after`` seconds, before any response has come."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        time.sleep(after)


def read_whole(port: int, path: str) -> None:
    """A client that reads the whole response, then closes at once: not a hang-up."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", path, headers={"Connection": "close"})
        response = connection.getresponse()
        assert response.status == 200
        response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent"])
def test_a_client_that_leaves_before_the_response_is_counted_and_named(
    process_factory: ProcessFactory, worker_class: str
) -> None:
    """Two hang-ups (one slow, one quick) counted by method, the slow one logged; full reads are not counted."""
    server = start_gunicorn(
        process_factory,
        app="pressure_app:app",
        cwd=APPS,
        worker_class=worker_class,
        workers=1,
        args=["--threads", "2"] if worker_class == "gthread" else [],
        env={"GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": "1"},
    )
    for _ in range(5):
        read_whole(server.port, "/fast")
    read_whole(server.port, "/slow?s=0.5")
    hang_up(server.port, "/slow?s=1.5", after=0.3)
    hang_up(server.port, "/slow?s=0.3", after=0.1)
    server.wait_for_value("gunicorn_requests_total", 8, timeout=60, method="GET", status="200")
    assert server.value("gunicorn_requests_client_closed_total", method="GET") == 2
    server.process.wait_for_log(HANG_UP_LOG, timeout=30)
    assert server.process.output().count("client closed the connection") == 1, "only the slow hang-up is named"


def test_nginx_giving_up_on_a_request_is_a_hang_up(
    process_factory: ProcessFactory, nginx_factory: NginxFactory
) -> None:
    """nginx (proxy_ignore_client_abort off) closes upstream when its client leaves (499): counted once;
    nginx reading whole responses over fresh upstream connections and closing them is never counted."""
    server = start_gunicorn(process_factory, app="pressure_app:app", cwd=APPS, workers=1)
    nginx = nginx_factory(f"127.0.0.1:{server.port}")
    port = int(nginx.url.rsplit(":", 1)[1])
    for _ in range(20):
        read_whole(port, "/fast")
    hang_up(port, "/slow?s=1.5", after=0.3)
    server.wait_for_value("gunicorn_requests_total", 21, timeout=60, method="GET", status="200")
    assert server.value("gunicorn_requests_client_closed_total", method="GET") == 1
    assert " 499 " in nginx.access_log_path.read_text()


def test_the_asgi_worker_says_once_that_it_cannot_see_hang_ups(process_factory: ProcessFactory) -> None:
    """No client socket reaches the hooks on the asgi worker: one startup line says so, the counter is absent."""
    server = start_gunicorn(process_factory, app="asgi_app:app", cwd=APPS, worker_class="asgi", workers=1)
    hang_up(server.port, "/slow", after=0.3)
    assert server.get("/") == 201
    server.wait_for_value("gunicorn_requests_total", 2, timeout=60, method="GET", status="201")
    assert server.process.output().count("clients that hang up before the response are not seen") == 1
    assert server.value("gunicorn_requests_client_closed_total", method="GET") is None
