"""TIME_WAIT per TCP listener: a proxy that opens a connection per request leaves gunicorn's closed connections
in TIME_WAIT; the gauge counts them and doctor --pid says what to change. Keep-alive upstreams do not."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from harness import Gunicorn, start_gunicorn
from servers import Nginx, NginxFactory, ProcessFactory, wait_until
from test_doctor_live import doctor, findings


@contextmanager
def load(nginx: Nginx, requests: int) -> Iterator[None]:
    """``requests`` requests through nginx on one keep-alive client connection, then more in the background
    until the block ends (so the doctor's window sees traffic)."""
    port = int(nginx.url.rsplit(":", 1)[1])
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def one() -> None:
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status

    for _ in range(requests):
        one()
    stop = threading.Event()

    def more() -> None:
        while not stop.wait(0.004):
            one()

    background = threading.Thread(target=more, daemon=True)
    background.start()
    try:
        yield
    finally:
        stop.set()
        background.join(timeout=30)
        connection.close()


def time_wait(server: Gunicorn) -> float | None:
    return server.value("gunicorn_listen_time_wait", listener=f"http://127.0.0.1:{server.port}")


@pytest.mark.oldest
def test_a_connection_per_request_fills_time_wait_and_the_doctor_says_why(
    process_factory: ProcessFactory, nginx_factory: NginxFactory
) -> None:
    """nginx without upstream keep-alive in front of sync workers: each request's connection is closed by
    gunicorn, the gauge counts them (300 requests: at least 300), and doctor --pid reports live-time-wait with
    about one new connection per request and the fix (unix socket, or gthread with upstream keep-alive)."""
    server = start_gunicorn(process_factory, workers=2)
    nginx = nginx_factory(f"127.0.0.1:{server.port}")
    with load(nginx, 300):
        wait_until(
            lambda: (time_wait(server) or 0) >= 300,
            timeout=30,
            what="300 connections in TIME_WAIT on gunicorn's listener",
            dump=lambda: f"gauge {time_wait(server)}\n{server.process.describe()}",
        )
        _, document = doctor(server, "--window", "2")
    finding = findings(document).get("live-time-wait")
    assert finding is not None, json.dumps(document["measured"])
    assert finding["severity"] == "warning"
    assert "were closed in the last 60 s (in TIME_WAIT)" in finding["what"]
    assert "new connections per request" in finding["what"], finding
    listener = document["measured"]["time_wait"][f"http://127.0.0.1:{server.port}"]
    assert listener["count"] >= 300
    requests = document["measured"]["requests_in_window"]
    assert requests > 0
    assert listener["closed_in_window"] >= 0.8 * requests, document["measured"]
    assert "sync workers close every connection" in finding["why"]
    assert "unix socket" in finding["fix"]
    assert "keepalive 16;" in finding["fix"]


def test_keep_alive_upstream_connections_leave_no_time_wait(
    process_factory: ProcessFactory, nginx_factory: NginxFactory
) -> None:
    """nginx keeping upstream connections open to gthread workers: after 300 requests gunicorn closed almost
    no connection (the gauge is there and stays under 100) and doctor --pid finds nothing to say about it."""
    server = start_gunicorn(process_factory, worker_class="gthread", workers=1, args=["--keep-alive", "75"])
    nginx = nginx_factory(
        f"127.0.0.1:{server.port}",
        extra_upstream_directives="keepalive 16;",
        extra_location_directives='proxy_http_version 1.1;\nproxy_set_header Connection "";',
    )
    with load(nginx, 300):
        wait_until(lambda: server.total("gunicorn_requests_total") >= 300, timeout=30, what="300 requests counted")
        _, document = doctor(server, "--window", "2")
    gauge = time_wait(server)
    assert gauge is not None, server.metrics_text()
    assert gauge < 100
    assert "live-time-wait" not in findings(document), document
    listener = document["measured"]["time_wait"][f"http://127.0.0.1:{server.port}"]
    assert listener["closed_in_window"] == 0, document["measured"]
