"""A gthread worker recycled by max_requests and its idle keep-alive connections: what each gunicorn does with a
request that arrives on one while the worker stops, and what gunicorn-insight says about it."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import threading
from pathlib import Path

import pytest
from harness import APPS, GUNICORN_VERSION, Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until

EXITED = (
    r"gunicorn-insight: worker exited pid=(?P<pid>\d+) slot=\d+ cause=(?P<cause>\w+) "
    r'detail="(?P<detail>[^"]*)" uptime=[\d.]+s served=(?P<served>\d+) '
)
IDLE = 4
"""Keep-alive connections the test opens and leaves idle; each carries one answered request, so the worker's
max_requests is IDLE + 1 and the request that recycles it is the next one."""


def recycling_server(process_factory: ProcessFactory, release: Path, compiled: str = "true") -> Gunicorn:
    return start_gunicorn(
        process_factory,
        app="gated_app:app",
        cwd=APPS,
        worker_class="gthread",
        workers=1,
        args=["--threads", "2", "--keep-alive", "30", "--max-requests", str(IDLE + 1)],
        env={"GATED_APP_RELEASE": str(release), "GUNICORN_INSIGHT_COMPILED_HOOKS": compiled},
    )


def idle_connections(server: Gunicorn) -> list[http.client.HTTPConnection]:
    """IDLE connections, one answered request each, kept open (HTTP/1.1 keep-alive) and idle."""
    connections = []
    for _ in range(IDLE):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        assert (response.status, response.will_close) == (200, False)
        connections.append(connection)
    return connections


def recycle(server: Gunicorn) -> tuple[threading.Thread, list[int]]:
    """The request that reaches max_requests, held in the application (/block) until the test releases it."""
    statuses: list[int] = []
    last = threading.Thread(target=lambda: statuses.append(server.get("/block", timeout=120)), daemon=True)
    last.start()
    wait_until(lambda: server.busy_workers() == 1, timeout=30, what="the last request in the worker")
    return last, statuses


def send_unread(connection: http.client.HTTPConnection, method: str) -> None:
    """Write a request on an idle connection and read nothing, as a proxy reusing an upstream connection does."""
    assert connection.sock is not None
    body = b"x=1" if method == "POST" else b""
    connection.sock.sendall(
        f"{method} /late HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )


def answer_of(connection: http.client.HTTPConnection) -> bytes:
    """What came back on the connection before it ended (b"" when nothing did: reset or closed unanswered)."""
    assert connection.sock is not None
    connection.sock.settimeout(30)
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := connection.sock.recv(65536):
            received += chunk
    return received


def wait_for_exit_detail(server: Gunicorn, expected: str) -> None:
    """The latest exit's detail in status.json (where an expected exit is kept even without a line)."""

    def latest() -> bool:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):  # not written yet, or being replaced
            exits = json.loads(Path(server.scoreboard_path).with_name("status.json").read_text())["recent_exits"]
            return bool(exits) and exits[-1]["detail"] == expected
        return False

    wait_until(
        latest, timeout=30, what=f"an exit with detail {expected!r} in status.json", dump=server.process.describe
    )


def has_poller(pid: int) -> bool:
    """gunicorn 23's gthread worker closes its poller when its run loop ends, before waiting for its requests."""
    fds = f"/proc/{pid}/fd"
    with contextlib.suppress(FileNotFoundError):
        return any(
            os.readlink(os.path.join(fds, fd)) == "anon_inode:[eventpoll]"
            for fd in os.listdir(fds)
            if os.path.exists(os.path.join(fds, fd))
        )
    return False


@pytest.mark.oldest
@pytest.mark.skipif(GUNICORN_VERSION >= (24, 0), reason="gunicorn 23's behaviour; 27's is pinned below")
@pytest.mark.parametrize("compiled", ["true", "false"])  # the ring head both request hooks move
def test_requests_waiting_on_idle_keepalive_at_recycle_are_counted_on_gunicorn_23(
    process_factory: ProcessFactory, tmp_path: Path, compiled: str
) -> None:
    """gunicorn 23: requests sent on idle keep-alive connections after the recycling worker stopped polling are
    never answered; the exit line names them and they count as status="aborted" with their method."""
    release = tmp_path / "release"
    server = recycling_server(process_factory, release, compiled)
    (pid,) = server.worker_pids()
    connections = idle_connections(server)
    last, statuses = recycle(server)
    # The run loop ends within its 1 s poll once the worker stopped: from then on nothing reads these sockets.
    wait_until(
        lambda: not has_poller(pid), timeout=30, what="the worker's run loop to end", dump=server.process.describe
    )
    send_unread(connections[0], "GET")
    send_unread(connections[1], "POST")
    release.touch()
    last.join(timeout=60)
    assert statuses == [200]
    match = server.process.wait_for_log(EXITED, timeout=30)
    assert (int(match["pid"]), match["cause"], int(match["served"])) == (pid, "max_requests", IDLE + 1)
    assert match["detail"] == (
        f"recycled after max_requests; closed {IDLE} idle keep-alive connections, 2 with a request already sent "
        "(answered by no one: a proxy's 502)"
    )
    assert (answer_of(connections[0]), answer_of(connections[1])) == (b"", b"")  # what the proxy turns into 502
    server.wait_for_value("gunicorn_requests_total", 1, method="GET", status="aborted")
    assert server.total("gunicorn_requests_total", method="POST", status="aborted") == 1
    assert server.total("gunicorn_requests_total") == IDLE + 1 + 2
    assert server.total("gunicorn_request_duration_seconds_count") == IDLE + 1 + 2
    server.wait_for_value("gunicorn_worker_exits_total", 1, cause="max_requests")


@pytest.mark.skipif(GUNICORN_VERSION < (27, 0), reason="gunicorn 27's linger; 23's drop is pinned above")
def test_gunicorn_27_answers_requests_on_idle_keepalive_while_recycling(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """gunicorn 27: a request on an idle keep-alive connection of a recycling worker is answered (Connection:
    close) and the rest are closed before worker_exit, so nothing is counted aborted and no exit line is logged."""
    release = tmp_path / "release"
    server = recycling_server(process_factory, release)
    connections = idle_connections(server)
    last, statuses = recycle(server)
    send_unread(connections[0], "GET")
    answer = answer_of(connections[0])
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b"Connection: close" in answer, answer
    release.touch()
    last.join(timeout=60)
    assert statuses == [200]
    server.wait_for_value("gunicorn_worker_exits_total", 1, cause="max_requests")
    assert all(answer_of(connection) == b"" for connection in connections[1:])  # closed by the worker itself
    assert server.total("gunicorn_requests_total", status="aborted") == 0
    assert server.total("gunicorn_requests_total") == IDLE + 2
    assert "worker exited" not in server.process.output()


@pytest.mark.skipif(not (24, 0) <= GUNICORN_VERSION < (27, 0), reason="gunicorn 24 to 26's graceful loop")
def test_gunicorn_24_to_26_leaves_idle_keepalive_to_the_exit_when_graceful_timeout_ends(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """gunicorn 24 to 26: a recycling worker answers requests on idle keep-alive connections until graceful_timeout
    (5 s, shorter than keepalive), then leaves the rest to its exit: counted as closed, none waiting, no line."""
    server = recycling_server(process_factory, tmp_path / "release")
    connections = idle_connections(server)
    assert server.get("/") == 200  # the request that reaches max_requests
    send_unread(connections[0], "GET")
    answer = answer_of(connections[0])
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert b"Connection: close" in answer, answer
    server.wait_for_value("gunicorn_worker_exits_total", 1, cause="max_requests")
    assert all(answer_of(connection) == b"" for connection in connections[1:])
    wait_for_exit_detail(
        server,
        f"recycled after max_requests; closed {IDLE - 1} idle keep-alive connections, none with a request waiting",
    )
    assert server.total("gunicorn_requests_total", status="aborted") == 0
    assert "worker exited" not in server.process.output()


@pytest.mark.oldest
def test_recycle_without_idle_connections_says_nothing(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """A gthread worker recycled with no idle keep-alive connection logs no exit line and counts nothing aborted."""
    server = recycling_server(process_factory, tmp_path / "release")
    for _ in range(IDLE + 1):
        assert server.get("/") == 200  # each on a connection the client closes at once
    server.wait_for_value("gunicorn_worker_exits_total", 1, cause="max_requests")
    assert server.total("gunicorn_requests_total", status="aborted") == 0
    assert server.total("gunicorn_requests_total") == IDLE + 1
    wait_for_exit_detail(server, "recycled after max_requests")
    assert "worker exited" not in server.process.output()
