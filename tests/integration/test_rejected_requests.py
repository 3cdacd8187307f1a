"""Requests gunicorn's own HTTP parser rejects, counted by reason on /metrics and named in the error log."""

from __future__ import annotations

import socket

import pytest
from harness import GUNICORN_VERSION, Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until

# Each is one request on a fresh connection; gunicorn answers it with an error status and closes.
BOTH_LENGTHS = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
BAD_HEADER_NAME = b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n"
BAD_CHUNK_SIZE = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
GOOD = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def send_raw(server: Gunicorn, data: bytes) -> bytes:
    """Write ``data`` as it is on a new connection; returns what the server answered before closing."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


@pytest.mark.oldest
@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent"])
def test_malformed_requests_are_counted_by_reason(process_factory: ProcessFactory, worker_class: str) -> None:
    """Conflicting Content-Length/Transfer-Encoding (x3), a bad header name (x2) and a bad chunk size (x1) are
    counted under framing, invalid_header_name and invalid_chunk_size; valid requests count nothing. (Before
    gunicorn 27 a bad chunk size is an OSError to gunicorn, logged as a socket error, never handed to
    handle_error: not counted.)"""
    if worker_class == "gevent":
        pytest.importorskip("gevent")
    server = start_gunicorn(process_factory, worker_class=worker_class, workers=2)
    assert server.total("gunicorn_requests_rejected_total") == 0
    for _ in range(3):
        assert send_raw(server, BOTH_LENGTHS).startswith(b"HTTP/1.1 400")
    for _ in range(2):
        assert send_raw(server, BAD_HEADER_NAME).startswith(b"HTTP/1.1 400")
    send_raw(server, BAD_CHUNK_SIZE)
    for _ in range(4):
        assert send_raw(server, GOOD).startswith(b"HTTP/1.1 200")
    chunk_errors = 1 if GUNICORN_VERSION >= (27, 0) else 0
    server.wait_for_value("gunicorn_requests_rejected_total", 5 + chunk_errors)
    assert server.value("gunicorn_requests_rejected_total", reason="framing") == 3
    assert server.value("gunicorn_requests_rejected_total", reason="invalid_header_name") == 2
    assert server.value("gunicorn_requests_rejected_total", reason="invalid_chunk_size") == chunk_errors
    assert server.value("gunicorn_requests_rejected_total", reason="other") == 0
    log = server.process.output()
    assert "gunicorn rejected a malformed request from 127.0.0.1:" in log, server.process.describe()
    assert "gunicorn-insight: internal error" not in log, server.process.describe()


def test_asgi_workers_leave_the_rejected_counter_absent(process_factory: ProcessFactory) -> None:
    """uvicorn parses with h11/httptools, not gunicorn: the counter is absent rather than a misleading zero."""
    pytest.importorskip("uvicorn")
    from harness import APPS

    server = start_gunicorn(
        process_factory, app="asgi_app:app", cwd=APPS, worker_class="uvicorn.workers.UvicornWorker", workers=1
    )
    send_raw(server, BAD_HEADER_NAME)
    wait_until(lambda: "gunicorn_workers " in server.metrics_text(), timeout=30, what="a scrape")
    assert "gunicorn_requests_rejected_total" not in server.metrics_text()
    assert "gunicorn_requests_rejected_total stays absent" in server.process.output()
