"""The worker's recorder: what pre_request and post_request leave in the worker's slot."""

from __future__ import annotations

import math
import threading

from fakes import FakeRequest, FakeResponse

from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._worker import RecorderOptions, RequestRecorder, describe_client, status_code


class FakeWorker:
    pass


class ThreadWorker:
    nr_conns = 5


def recorder(board: sb.Scoreboard, slot: int = 0, worker: object = None, **options: object) -> RequestRecorder:
    board.assign(slot, now=1.0)
    return RequestRecorder(board, slot, worker or FakeWorker(), RecorderOptions(**options))  # type: ignore[arg-type]


def test_request_in_flight_is_visible_with_redacted_query(board: sb.Scoreboard) -> None:
    """pre_request publishes method, path (query redacted), client and thread for the master to read."""
    rec = recorder(board)
    rec.started(FakeRequest("POST", "/login", query="password=hunter2"))
    (request,) = board.read(0).requests
    assert (request.method, request.path, request.client) == ("POST", "/login?<redacted>", "10.1.2.3:4567")
    assert request.thread == threading.get_ident()
    assert "hunter2" not in board.snapshot(0).decode("latin-1")


def test_query_kept_when_redaction_is_off(board: sb.Scoreboard) -> None:
    """redact_query=False keeps the query string (the operator's explicit choice)."""
    rec = recorder(board, redact_query=False)
    rec.started(FakeRequest(path="/search", query="q=x"))
    assert board.read(0).requests[0].path == "/search?q=x"


def test_finished_request_lands_in_the_ring(board: sb.Scoreboard) -> None:
    """post_request frees the entry and writes duration, status and method into the ring."""
    rec = recorder(board)
    req = FakeRequest("DELETE", "/x")
    rec.started(req)
    rec.finished(req, {}, FakeResponse("404 Not Found"))
    view = board.read(0)
    assert view.requests == ()
    assert view.head == 1
    assert view.served == 1
    ((duration, queue, status, method, route),) = board.read_ring(0, 0, 1)
    assert 0 <= duration < 1
    assert math.isnan(queue)
    assert (status, sb.METHODS[method], route) == (404, "DELETE", 0)


def test_unknown_methods_are_bounded(board: sb.Scoreboard) -> None:
    """A method outside the standard set is counted as 'other', never as a new label value."""
    rec = recorder(board)
    req = FakeRequest("BREW", "/pot")
    rec.started(req)
    rec.finished(req, {}, FakeResponse("418 I'm a teapot"))
    ((_, _, _, method, _),) = board.read_ring(0, 0, 1)
    assert sb.METHODS[method] == "other"


def test_more_requests_than_entries_overflow_without_losing_counts(board: sb.Scoreboard) -> None:
    """Beyond the slot's entries a request is still counted, as overflow, and all finish in the ring."""
    rec = recorder(board)
    requests = [FakeRequest(path=f"/{n}") for n in range(5)]
    for req in requests:
        rec.started(req)
    view = board.read(0)
    assert (len(view.requests), view.overflow, view.in_flight) == (3, 2, 5)
    for req in requests:
        rec.finished(req, {}, FakeResponse("200 OK"))
    view = board.read(0)
    assert (view.in_flight, view.head) == (0, 5)


def test_signal_mark_keeps_the_interrupted_request(board: sb.Scoreboard) -> None:
    """After worker_abort marked the slot, the request stays in the table for the master's death report."""
    rec = recorder(board)
    req = FakeRequest(path="/stuck")
    rec.started(req)
    rec.mark(sb.FLAG_ABORT_HANDLER)
    rec.finished(req, {}, FakeResponse(None))
    view = board.read(0)
    assert view.flags & sb.FLAG_ABORT_HANDLER
    assert [r.path for r in view.requests] == ["/stuck"]
    assert view.head == 1  # the 500 gunicorn sent is still counted


def test_new_worker_continues_the_slot_ring(board: sb.Scoreboard) -> None:
    """A replacement worker starts at the old head: served counts restart, the ring count does not."""
    rec = recorder(board)
    for _ in range(3):
        req = FakeRequest()
        rec.started(req)
        rec.finished(req, {}, FakeResponse("200 OK"))
    board.release(0)
    rec = recorder(board)
    view = board.read(0)
    assert (view.head, view.served) == (3, 0)


def test_connections_come_from_nr_conns_when_the_worker_has_it(board: sb.Scoreboard) -> None:
    """gthread/asgi expose nr_conns; the slot reports it, refreshed without requests too."""
    worker = ThreadWorker()
    rec = recorder(board, worker=worker)
    rec.refresh_connections()
    assert board.read(0).connections_now == 5
    worker.nr_conns = 2
    req = FakeRequest()
    rec.started(req)
    rec.finished(req, {}, FakeResponse("200 OK"))
    assert board.read(0).connections_now == 2


def test_connections_fall_back_to_requests_in_flight(board: sb.Scoreboard) -> None:
    """sync/gevent have no nr_conns: connections are the requests the hooks see in flight."""
    rec = recorder(board)
    rec.started(FakeRequest())
    assert board.read(0).connections_now == 1


def test_status_code_covers_wsgi_asgi_and_failures() -> None:
    """WSGI status strings, ASGI ints, a response that never started (500) and no response (0)."""
    assert status_code(FakeResponse("503 Service Unavailable")) == 503
    assert status_code(FakeResponse(204)) == 204
    assert status_code(FakeResponse(None)) == 500
    assert status_code(None) == 0
    assert status_code(FakeResponse("garbage")) == 0


def test_describe_client() -> None:
    """IPv4, IPv6 and unix-socket peers are rendered unambiguously."""
    assert describe_client(("1.2.3.4", 80)) == "1.2.3.4:80"
    assert describe_client(("::1", 80, 0, 0)) == "[::1]:80"
    assert describe_client("") == "unix"
    assert describe_client(b"") == "unix"


def test_long_path_and_client_are_cut_to_their_fields(board: sb.Scoreboard) -> None:
    """A path past 176 bytes and a client past 48 are cut there; a split UTF-8 character reads as U+FFFD."""
    rec = recorder(board)
    rec.started(FakeRequest(path="/" + "a" * 174 + "é" * 3, peer=("b" * 60, 1)))
    (request,) = board.read(0).requests
    assert request.path == "/" + "a" * 174 + "\ufffd"
    assert request.client == "b" * 48
