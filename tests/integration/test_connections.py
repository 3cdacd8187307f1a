"""Active connections per worker from gthread's nr_conns, against the worker_connections limit."""

from __future__ import annotations

import http.client

from harness import start_gunicorn
from servers import ProcessFactory


def test_keep_alive_connections_raise_the_worker_gauge_and_fall_back(process_factory: ProcessFactory) -> None:
    """Idle keep-alive connections count on their worker (even with no request running) until they close."""
    server = start_gunicorn(
        process_factory,
        worker_class="gthread",
        workers=1,
        args=["--threads", "2", "--worker-connections", "50", "--keep-alive", "30"],
    )
    connections = []
    for _ in range(6):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", "/")
        connection.getresponse().read()
        connections.append(connection)  # kept open: the worker holds it in keep-alive
    server.wait_for_value("gunicorn_worker_connections", 6, worker="0")
    assert server.value("gunicorn_worker_connections_limit") == 50
    assert server.value("gunicorn_requests_in_flight") == 0
    for connection in connections:
        connection.close()
    server.wait_for_value("gunicorn_worker_connections", 0, worker="0")
