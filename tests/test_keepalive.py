"""An exiting gthread worker's idle keep-alive connections: counted, the requests waiting on them found without
taking a byte, and handed to the master as requests nobody answered."""

from __future__ import annotations

import io
import socket
from collections import deque
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._facts import NO_RESPONSE
from gunicorn_insight._master.drain import Drainer
from gunicorn_insight._master.forensics import keepalive_words
from gunicorn_insight._worker.keepalive import dropped
from gunicorn_insight._worker.recorder import RecorderOptions, RequestRecorder


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """Four TCP connections over loopback: (the worker's end, the client's end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        made = []
        for _ in range(4):
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            made.append((server, client))
    yield made
    for server, client in made:
        server.close()
        client.close()


def connection(sock: socket.socket, buffered: bytes = b"") -> SimpleNamespace:
    """Shaped like gunicorn's TConn: the socket, and the parser's buffer of bytes read past the last request."""
    return SimpleNamespace(sock=sock, parser=SimpleNamespace(unreader=SimpleNamespace(buf=io.BytesIO(buffered))))


def settle(sock: socket.socket, size: int) -> None:
    """Until the client's bytes have reached the worker's end (loopback delivers them at once; this makes sure)."""
    sock.settimeout(10)
    assert len(sock.recv(size, socket.MSG_PEEK | socket.MSG_WAITALL)) == size


def test_worker_classes_without_the_deque_are_not_judged() -> None:
    """sync, gevent, asgi: no keep-alive deque to read, so None (nothing claimed either way)."""
    assert dropped(SimpleNamespace(nr=3)) is None


@pytest.mark.parametrize("attribute", ["_keep", "keepalived_conns"])
def test_waiting_requests_are_found_and_left_unread(
    pairs: list[tuple[socket.socket, socket.socket]], attribute: str
) -> None:
    """gunicorn 23's _keep and 24+'s keepalived_conns: idle connections counted; a request already sent is found,
    its method bounded ("other" for an unknown one); a client that closed is no request; no byte is taken."""
    (post, post_client), (brew, brew_client), (idle, _), (gone, gone_client) = pairs
    request = b"POST /late HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    post_client.sendall(request)
    brew_client.sendall(b"BREW /pot HTTP/1.1\r\n\r\n")
    gone_client.close()
    settle(post, len(request))
    settle(brew, 4)
    worker = SimpleNamespace(**{attribute: deque(connection(sock) for sock in (post, brew, idle, gone))})
    found = dropped(worker)
    assert found is not None
    assert found.idle == 4
    assert sorted(request.method for request in found.unanswered) == ["POST", "other"]
    assert all(0.0 <= request.waited < 10 for request in found.unanswered)
    assert post.recv(len(request), socket.MSG_DONTWAIT) == request  # still there, whole


def test_a_pipelined_request_the_parser_already_read_is_waiting_too(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """Bytes gunicorn's parser read past the last request (a pipelined request) wait with nothing on the socket."""
    (sock, _), *_ = pairs
    found = dropped(SimpleNamespace(_keep=deque([connection(sock, b"DELETE /x HTTP/1.1\r\n")])))
    assert found is not None
    assert [request.method for request in found.unanswered] == ["DELETE"]


def test_closed_sockets_and_strangers_in_the_deque_are_skipped(pairs: list[tuple[socket.socket, object]]) -> None:
    """A socket already closed, or something that is not a connection, counts as idle and never raises."""
    (sock, _), *_ = pairs
    sock.close()
    found = dropped(SimpleNamespace(_keep=deque([connection(sock), object(), SimpleNamespace(sock=None)])))
    assert found is not None
    assert (found.idle, found.unanswered) == (3, ())


def test_the_master_counts_them_as_aborted_and_not_as_served(
    board: sb.Scoreboard, pairs: list[tuple[socket.socket, socket.socket]]
) -> None:
    """worker_exit writes one NO_RESPONSE ring record per waiting request (method kept), and the counts: the
    drain counts them aborted, served leaves them out, the exit line's words say both numbers."""
    drainer = Drainer(board)
    board.assign(0, 0.0)
    (get, get_client), (post, post_client), (idle, _), _ = pairs
    get_client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    post_client.sendall(b"POST / HTTP/1.1\r\n\r\n")
    settle(get, 4)
    settle(post, 5)
    worker = SimpleNamespace(_keep=deque(connection(sock) for sock in (get, post, idle)), nr=0, max_requests=1)
    rec = RequestRecorder(board, 0, worker, RecorderOptions(threaded=True))
    rec.exiting(worker)
    view = board.read(0)
    assert (view.keepalive_closed, view.keepalive_unanswered, view.served) == (3, 2, 0)
    assert keepalive_words(view) == [
        "closed 3 idle keep-alive connections, 2 with a request already sent (answered by no one: a proxy's 502)"
    ]
    facts = drainer.collect()
    assert facts.requests == {("GET", NO_RESPONSE, ""): 1, ("POST", NO_RESPONSE, ""): 1}
    assert facts.request_cpu == {("GET", NO_RESPONSE, ""): 0.0, ("POST", NO_RESPONSE, ""): 0.0}


def test_exit_words_without_waiting_requests_or_connections() -> None:
    """Idle connections with nothing waiting are said as such; a worker that held none adds nothing."""
    view = sb.SlotView(0, 1, 42, sb.READY, 0, 0, 0, 0, 0, 1.0, 2.0, 0, 0, 0, 0, 0, (0, 0, 0, 0), 0.0, "", ())
    assert keepalive_words(view) == []
    one = sb.SlotView(0, 1, 42, sb.READY, 0, 0, 0, 0, 0, 1.0, 2.0, 0, 0, 0, 0, 0, (0, 0, 0, 0), 0.0, "", (), 1, 0)
    assert keepalive_words(one) == ["closed 1 idle keep-alive connection, none with a request waiting"]


def test_a_new_worker_in_the_slot_starts_with_no_counts(board: sb.Scoreboard) -> None:
    """The master clears the exit counts when it gives the slot to the next worker."""
    board.assign(0, 0.0)
    sb.store(board.buffer, board.offset(0) + sb.OFF_KEEPALIVE, sb.KEEPALIVE, 5, 2)
    assert (board.read(0).keepalive_closed, board.read(0).keepalive_unanswered) == (5, 2)
    board.assign(0, 1.0)
    assert (board.read(0).keepalive_closed, board.read(0).keepalive_unanswered) == (0, 0)
