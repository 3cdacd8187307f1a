"""Saturation and queueing: busy workers, utilisation, listen backlog, queue time, routes, memory and CPU."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from pathlib import Path

import pytest
from harness import APPS, Gunicorn, start_gunicorn
from servers import Nginx, NginxFactory, ProcessFactory, wait_until

from gunicorn_insight._runfiles import StatusRecord, read_record


def slow_requests(server: Gunicorn, count: int, seconds: float) -> list[threading.Thread]:
    threads = [threading.Thread(target=server.get, args=(f"/slow?s={seconds}",), daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def nginx_answers(nginx: Nginx, status: int, error: str) -> None:
    """A request through nginx gets ``status``, and nginx's error log has ``error`` for it."""
    connection = http.client.HTTPConnection("127.0.0.1", int(nginx.url.rsplit(":", 1)[1]), timeout=30)
    connection.request("GET", "/")
    assert connection.getresponse().status == status
    connection.close()
    wait_until(lambda: error in nginx.dump(), timeout=10, what=f"nginx's error line {error!r}", dump=nginx.dump)


def occupy_the_worker(server: Gunicorn, client: socket.socket, address: str | tuple[str, int]) -> socket.socket:
    """``client`` connected to ``address`` with a 30 s request in flight on the server's one worker."""
    client.connect(address)
    client.sendall(b"GET /slow?s=30 HTTP/1.1\r\nHost: x\r\n\r\n")
    server.wait_for_value("gunicorn_requests_in_flight", 1)
    return client


def test_saturated_sync_workers_show_busy_and_tcp_backlog(process_factory: ProcessFactory) -> None:
    """Two sync workers each serving a slow request: busy == capacity == 2 and the rest wait in the TCP backlog."""
    server = start_gunicorn(process_factory, workers=2, args=["--backlog", "64"])
    threads = slow_requests(server, 6, 2)
    server.wait_for_value("gunicorn_workers_busy", 2)
    assert server.value("gunicorn_capacity") == 2
    listener = f"http://127.0.0.1:{server.port}"
    wait_until(
        lambda: (server.value("gunicorn_listen_backlog", listener=listener) or 0) > 0,
        timeout=20,
        what="a non-empty TCP accept queue",
        dump=server.metrics_text,
    )
    assert server.value("gunicorn_listen_backlog_max", listener=listener) == 64
    for thread in threads:
        thread.join()
    server.wait_for_value("gunicorn_listen_backlog", 0, listener=listener)
    # Six 2-second requests on two workers: about 12 request-seconds of busy time, none of it idle time.
    busy = server.total("gunicorn_worker_busy_seconds_total")
    assert 11.5 <= busy <= 15, busy


def test_unix_socket_backlog_is_measured(process_factory: ProcessFactory, short_tmp_path: object) -> None:
    """A unix-socket listener's queue depth comes from sock_diag, not only TCP's."""
    path = f"{short_tmp_path}/g.sock"
    server = start_gunicorn(process_factory, workers=1, args=["-b", f"unix:{path}", "--backlog", "32"])
    listener = f"unix:{path}"
    clients = []

    def slow_over_unix() -> None:
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.sendall(b"GET /slow?s=3 HTTP/1.1\r\nHost: x\r\n\r\n")
        clients.append(client)

    for _ in range(4):
        slow_over_unix()
    wait_until(
        lambda: (server.value("gunicorn_listen_backlog", listener=listener) or 0) >= 2,
        timeout=20,
        what="a non-empty unix accept queue",
        dump=server.metrics_text,
    )
    assert server.value("gunicorn_listen_backlog_max", listener=listener) == 32
    for client in clients:
        client.close()


def test_a_full_unix_queue_is_nginxs_resource_temporarily_unavailable(
    process_factory: ProcessFactory, nginx_factory: NginxFactory, short_tmp_path: object
) -> None:
    """nginx gets EAGAIN (its 502 "11: Resource temporarily unavailable") when the unix accept queue is full:
    the backlog gauge shows the queue at its limit meanwhile."""
    path = f"{short_tmp_path}/full.sock"
    listener = f"unix:{path}"
    server = start_gunicorn(process_factory, workers=1, args=["-b", listener, "--backlog", "2"])
    nginx = nginx_factory(listener)
    clients = [socket.socket(socket.AF_UNIX)]
    try:
        occupy_the_worker(server, clients[0], path)
        while True:  # fill the queue the worker no longer takes from, until the kernel refuses one more
            waiting = socket.socket(socket.AF_UNIX)
            waiting.setblocking(False)
            clients.append(waiting)
            try:
                waiting.connect(path)
            except BlockingIOError:
                break
            assert len(clients) < 100, "the unix accept queue never filled"
        limit = server.value("gunicorn_listen_backlog_max", listener=listener)
        assert limit is not None
        wait_until(  # a unix listener holds one connection more than its backlog before it refuses
            lambda: (server.value("gunicorn_listen_backlog", listener=listener) or 0) >= limit,
            timeout=20,
            what="the unix accept queue at its limit",
            dump=server.metrics_text,
        )
        nginx_answers(nginx, 502, "(11: Resource temporarily unavailable) while connecting to upstream")
    finally:
        for client in clients:
            client.close()


def test_a_full_tcp_queue_drops_at_gunicorns_listener_and_is_nginxs_connect_timeout(
    process_factory: ProcessFactory, nginx_factory: NginxFactory
) -> None:
    """A full TCP accept queue drops connection attempts: counted at gunicorn's own listener (the metric and
    status.json), while nginx waits out proxy_connect_timeout and answers 504 "110: Connection timed out"."""
    server = start_gunicorn(process_factory, workers=1, args=["--backlog", "1"])
    listener = f"http://127.0.0.1:{server.port}"
    nginx = nginx_factory(f"127.0.0.1:{server.port}", extra_location_directives="proxy_connect_timeout 1s;")
    server.wait_for_value("gunicorn_listen_drops_total", 0, listener=listener)  # present from the first round
    clients = [socket.socket()]
    try:
        occupy_the_worker(server, clients[0], ("127.0.0.1", server.port))
        for _ in range(4):  # the queue holds backlog + 1 = 2; the others' SYNs are dropped (and retried)
            waiting = socket.socket()
            waiting.setblocking(False)
            clients.append(waiting)
            waiting.connect_ex(("127.0.0.1", server.port))
        wait_until(
            lambda: (server.value("gunicorn_listen_drops_total", listener=listener) or 0) > 0,
            timeout=20,
            what="drops counted at gunicorn's listener",
            dump=server.metrics_text,
        )
        nginx_answers(nginx, 504, "(110: Connection timed out) while connecting to upstream")
        status_path = Path(server.scoreboard_path).parent / "status.json"
        wait_until(
            lambda: any(
                item.name == listener and (item.drops or 0) > 0
                for item in read_record(StatusRecord, str(status_path)).listeners
            ),
            timeout=10,
            what="the drops in status.json",
            dump=status_path.read_text,
        )
    finally:
        for client in clients:
            client.close()


def test_a_stop_while_saturated_says_what_a_failing_health_check_saw(process_factory: ProcessFactory) -> None:
    """TERM to a master whose only worker is busy and whose queue holds a connection (what a liveness probe
    through the workers would wait behind): one line says demand was unmet, for how long, the oldest request,
    and where /healthz answers without a worker."""
    server = start_gunicorn(process_factory, workers=1, args=["--graceful-timeout", "2"])
    listener = f"http://127.0.0.1:{server.port}"
    clients = [socket.socket(), socket.socket()]
    try:
        occupy_the_worker(server, clients[0], ("127.0.0.1", server.port))
        clients[1].connect(("127.0.0.1", server.port))  # waits in the accept queue behind the busy worker
        server.wait_for_value("gunicorn_listen_backlog", 1, listener=listener)
        server.process.stop()
    finally:
        for client in clients:
            client.close()
    output = server.process.output()
    (line,) = [line for line in output.splitlines() if "is stopping while demand was unmet" in line]
    assert f": requests in flight 1 of a capacity of 1, connections waiting at {listener} 1; " in line
    assert '; the oldest request in flight: "GET /slow?<redacted>" for ' in line  # redact_query's default
    assert f"point it at http://127.0.0.1:{server.metrics_port}/healthz" in line


def test_gthread_requests_waiting_for_a_thread(process_factory: ProcessFactory) -> None:
    """gthread with one thread: requests accepted beyond it wait inside the worker and are counted."""
    server = start_gunicorn(process_factory, worker_class="gthread", workers=1, args=["--threads", "1"])
    threads = slow_requests(server, 4, 1.5)  # two or more wait for the thread during the first 3 s
    server.wait_for_value("gunicorn_workers_busy", 1)
    wait_until(
        lambda: (server.value("gunicorn_requests_waiting") or 0) >= 2,
        timeout=20,
        what="connections waiting for a thread",
        dump=server.metrics_text,
    )
    assert server.value("gunicorn_capacity") == 1
    for thread in threads:
        thread.join()


@pytest.mark.parametrize("over_unix", [False, True], ids=["tcp", "unix"])
def test_queue_time_from_nginx(
    over_unix: bool, process_factory: ProcessFactory, nginx_factory: NginxFactory, short_tmp_path: object
) -> None:
    """nginx stamps X-Request-Start; requests queued behind a busy worker show the wait in the histogram."""
    args = ["-b", f"unix:{short_tmp_path}/q.sock"] if over_unix else []
    server = start_gunicorn(process_factory, workers=1, args=args)
    upstream = f"unix:{short_tmp_path}/q.sock" if over_unix else f"127.0.0.1:{server.port}"
    nginx = nginx_factory(upstream, extra_location_directives='proxy_set_header X-Request-Start "t=${msec}";')
    port = int(nginx.url.rsplit(":", 1)[1])

    def through_nginx(path: str) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", path)
        connection.getresponse().read()
        connection.close()

    blocker = threading.Thread(target=through_nginx, args=("/slow?s=2",))
    blocker.start()
    server.wait_for_value("gunicorn_requests_in_flight", 1)
    through_nginx("/")  # waits behind the slow request for about 2 s
    blocker.join()
    server.wait_for_value("gunicorn_request_queue_seconds_count", 2)
    assert server.total("gunicorn_request_queue_seconds_sum") >= 1.0
    assert server.value("gunicorn_request_queue_seconds_bucket", le="0.5") == 1  # the first was not queued
    assert server.value("gunicorn_request_queue_invalid_total") == 0


def test_bad_queue_headers_are_counted_never_used(process_factory: ProcessFactory) -> None:
    """Garbage, future and ancient X-Request-Start values are counted as invalid and produce no observation."""
    server = start_gunicorn(process_factory, workers=1)
    future = f"t={time.time() + 60:.3f}"
    for value in ("garbage", future, "t=1000000000.000", "t=-5"):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("GET", "/", headers={"X-Request-Start": value})
        assert connection.getresponse().status == 200
        connection.close()
    assert server.total("gunicorn_requests_total") == 4
    assert server.value("gunicorn_request_queue_invalid_total") == 4
    assert server.total("gunicorn_request_queue_seconds_count") == 0


def test_flask_routes_label_templates_and_health_is_excluded(process_factory: ProcessFactory) -> None:
    """Flask's url_rule becomes the route label (never the raw path); /health is left out entirely."""
    server = start_gunicorn(
        process_factory,
        app="flask_app:app",
        cwd=APPS,
        workers=2,
        env={"GUNICORN_INSIGHT_ROUTE_LABEL": "true", "GUNICORN_INSIGHT_EXCLUDE_PATHS": "/health"},
    )
    for item in range(20):
        assert server.get(f"/items/{item}") == 200
    for _ in range(5):
        assert server.get("/health") == 200
    assert server.get("/nope") == 404
    assert server.value("gunicorn_requests_total", method="GET", status="200", route="/items/<int:item_id>") == 20
    assert server.value("gunicorn_requests_total", method="GET", status="404", route="none") == 1
    assert server.total("gunicorn_requests_total") == 21
    assert "/items/3" not in server.metrics_text()


def test_route_cap_counts_the_rest_as_other(process_factory: ProcessFactory) -> None:
    """A resolver returning raw paths is held to max_routes distinct values; the rest is 'other', warned once."""
    server = start_gunicorn(
        process_factory,
        app="flask_app:app",
        cwd=APPS,
        workers=1,
        env={
            "GUNICORN_INSIGHT_ROUTE_LABEL": "1",
            "GUNICORN_INSIGHT_MAX_ROUTES": "3",
            "GUNICORN_INSIGHT_ROUTE_RESOLVER": "flask_app:raw_path",
        },
    )
    for item in range(10):
        server.get(f"/items/{item}")
    routes = {dict(labels)["route"] for (name, labels) in server.samples() if name == "gunicorn_requests_total"}
    assert len(routes) == 4  # three real values and "other"
    assert "other" in routes
    assert server.total("gunicorn_requests_total", route="other") == 7
    assert server.process.output().count("distinct routes") == 1


def test_memory_and_cpu_per_worker(process_factory: ProcessFactory) -> None:
    """Each live worker slot reports its resident memory, and CPU seconds that grow with work."""
    server = start_gunicorn(process_factory, workers=2)
    for worker in ("0", "1"):
        assert (server.value("gunicorn_worker_memory_bytes", worker=worker) or 0) > 5_000_000
    before = server.total("gunicorn_worker_cpu_seconds_total")
    for _ in range(300):
        server.get("/")
    wait_until(
        lambda: server.total("gunicorn_worker_cpu_seconds_total") > before,
        timeout=20,
        what="worker CPU seconds to grow",
        dump=server.metrics_text,
    )


def test_access_log_shows_busy_workers_and_queue_time(process_factory: ProcessFactory, tmp_path: object) -> None:
    """With access_log_atoms, %({x-gunicorn-busy}i)s and %({x-gunicorn-queue-ms}i)s fill gunicorn's access log."""
    log = f"{tmp_path}/access.log"
    server = start_gunicorn(
        process_factory,
        workers=2,
        env={"GUNICORN_INSIGHT_ACCESS_LOG_ATOMS": "true"},
        args=[
            "--access-logfile",
            log,
            "--access-logformat",
            "%(U)s busy=%({x-gunicorn-busy}i)s q=%({x-gunicorn-queue-ms}i)s",
        ],
    )
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("GET", "/", headers={"X-Request-Start": f"t={time.time() - 0.25:.3f}"})
    connection.getresponse().read()
    connection.close()
    # The client has the response before the worker logs it and leaves its slot: without this wait the second
    # request can land on the other worker while the first still counts as busy (busy=2), or log first.
    wait_until(lambda: len(Path(log).read_text().splitlines()) == 1, timeout=10, what="the first access log line")
    board = server.board()
    try:
        wait_until(lambda: board.busy_workers() == 0, timeout=10, what="the first request to leave its worker")
    finally:
        board.close()
    server.get("/status/204")
    wait_until(lambda: len(Path(log).read_text().splitlines()) == 2, timeout=10, what="two access log lines")
    first, second = Path(log).read_text().splitlines()
    assert first.startswith("/ busy=1 q=2")  # about 250 ms
    assert second == "/status/204 busy=1 q=-"
