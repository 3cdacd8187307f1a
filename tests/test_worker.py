"""The worker's recorder: what pre_request and post_request leave in the worker's slot."""

from __future__ import annotations

import math
import sys
import threading
import time

import pytest
from fakes import FakeRequest, FakeResponse, finish, start

from gunicorn_insight import _report
from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._worker.recorder import RecorderOptions, RequestRecorder, parse_status

pytestmark = pytest.mark.usefixtures("each_hook_implementation")


class FakeWorker:
    pass


class ThreadWorker:
    nr_conns = 5


def recorder(board: sb.Scoreboard, slot: int = 0, worker: object = None, **options: object) -> RequestRecorder:
    board.assign(slot, now=1.0)
    # A sync worker's recorder unless a test asks for gthread's: the compiled hooks hand a locked one to Python.
    options = {"threaded": False, **options}
    return RequestRecorder(board, slot, worker or FakeWorker(), RecorderOptions(**options))  # type: ignore[arg-type]


def test_request_in_flight_is_visible_with_redacted_query(board: sb.Scoreboard) -> None:
    """pre_request publishes method, path (query redacted), client and thread for the master to read."""
    rec = recorder(board)
    start(rec, FakeRequest("POST", "/login", query="password=hunter2"))
    (request,) = board.read(0).requests
    assert (request.method, request.path, request.client) == ("POST", "/login?<redacted>", "10.1.2.3:4567")
    assert request.thread == threading.get_ident()
    assert "hunter2" not in board.snapshot(0).decode("latin-1")


def test_query_kept_when_redaction_is_off(board: sb.Scoreboard) -> None:
    """redact_query=False keeps the query string (the operator's explicit choice)."""
    rec = recorder(board, redact_query=False)
    start(rec, FakeRequest(path="/search", query="q=x"))
    assert board.read(0).requests[0].path == "/search?q=x"


def test_path_that_utf8_cannot_encode_is_still_recorded(board: sb.Scoreboard) -> None:
    """A lone surrogate in the path is written with a replacement character; the request is not lost."""
    rec = recorder(board)
    req = FakeRequest(path="/caf\udce9")
    start(rec, req)
    assert board.read(0).requests[0].path == "/caf?"
    finish(rec, req, {}, FakeResponse("200 OK"))
    assert board.read(0).head == 1


def test_finished_request_lands_in_the_ring(board: sb.Scoreboard) -> None:
    """post_request frees the entry and writes duration, status and method into the ring."""
    rec = recorder(board)
    req = FakeRequest("DELETE", "/x")
    start(rec, req)
    finish(rec, req, {}, FakeResponse("404 Not Found"))
    view = board.read(0)
    assert view.requests == ()
    assert view.head == 1
    assert view.served == 1
    ((duration, queue, status, method, route, outcome, _),) = board.read_ring(0, 0, 1)
    assert 0 <= duration < 1
    assert math.isnan(queue)
    assert (status, sb.METHODS[method], route, outcome) == (404, "DELETE", 0, 0)


def test_unknown_methods_are_bounded(board: sb.Scoreboard) -> None:
    """A method outside the standard set is counted as 'other', never as a new label value."""
    rec = recorder(board)
    req = FakeRequest("BREW", "/pot")
    start(rec, req)
    finish(rec, req, {}, FakeResponse("418 I'm a teapot"))
    ((_, _, _, method, _, _, _),) = board.read_ring(0, 0, 1)
    assert sb.METHODS[method] == "other"


@pytest.mark.parametrize("threaded", [True, False])
def test_more_requests_than_entries_overflow_without_losing_counts(board: sb.Scoreboard, threaded: bool) -> None:
    """Beyond the slot's entries a request is still counted, as overflow, and all finish in the ring."""
    rec = recorder(board, threaded=threaded)
    requests = [FakeRequest(path=f"/{n}") for n in range(5)]
    for req in requests:
        start(rec, req)
    view = board.read(0)
    assert (len(view.requests), view.overflow, view.in_flight) == (3, 2, 5)
    for req in requests:
        finish(rec, req, {}, FakeResponse("200 OK"))
    view = board.read(0)
    assert (view.in_flight, view.head) == (0, 5)


def test_signal_mark_keeps_the_interrupted_request(board: sb.Scoreboard) -> None:
    """After worker_abort marked the slot, the request stays in the table for the master's death report,
    marked as already counted."""
    rec = recorder(board)
    req = FakeRequest(path="/stuck")
    start(rec, req)
    rec.mark(sb.FLAG_ABORT_HANDLER)
    finish(rec, req, {}, FakeResponse(None))
    view = board.read(0)
    assert view.flags & sb.FLAG_ABORT_HANDLER
    assert [(r.path, r.counted) for r in view.requests] == [("/stuck", True)]  # the master must not recount it
    assert view.head == 1  # the 500 gunicorn sent is still counted


def test_new_worker_continues_the_slot_ring(board: sb.Scoreboard) -> None:
    """A replacement worker starts at the old head: served counts restart, the ring count does not."""
    rec = recorder(board)
    for _ in range(3):
        req = FakeRequest()
        start(rec, req)
        finish(rec, req, {}, FakeResponse("200 OK"))
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
    start(rec, req)
    finish(rec, req, {}, FakeResponse("200 OK"))
    assert board.read(0).connections_now == 2


def test_connections_fall_back_to_requests_in_flight(board: sb.Scoreboard) -> None:
    """sync/gevent have no nr_conns: connections are the requests the hooks see in flight."""
    rec = recorder(board)
    start(rec, FakeRequest())
    assert board.read(0).connections_now == 1


def test_parse_status_covers_wsgi_asgi_and_failures() -> None:
    """WSGI status strings, ASGI ints, a response that never started (500) and no response (0)."""
    assert parse_status(FakeResponse("503 Service Unavailable")) == 503
    assert parse_status(FakeResponse(204)) == 204
    assert parse_status(FakeResponse(None)) == 500
    assert parse_status(None) == 0
    assert parse_status(FakeResponse("garbage")) == 0


def test_status_gunicorn_parsed_is_taken_as_is(board: sb.Scoreboard) -> None:
    """gunicorn's WSGI response carries status_code already: the hook uses it, not the status text."""
    rec = recorder(board)
    req, resp = FakeRequest(), FakeResponse("garbage")
    resp.status_code = 201  # type: ignore[attr-defined]
    start(rec, req)
    finish(rec, req, {}, resp)
    ((_, _, status, _, _, _, _),) = board.read_ring(0, 0, 1)
    assert status == 201


@pytest.mark.parametrize(
    ("peer", "client"),
    [
        (("1.2.3.4", 80), "1.2.3.4:80"),
        (("::1", 80, 0, 0), "[::1]:80"),
        ("", "unix"),
        (b"", "unix"),
        (b"/run/app.sock", "/run/app.sock"),
    ],
)
def test_clients_read_back_unambiguously(board: sb.Scoreboard, peer: object, client: str) -> None:
    """IPv4, IPv6 (in brackets) and unix-socket peers read back as an operator would write them."""
    start(recorder(board), FakeRequest(peer=peer))
    assert board.read(0).requests[0].client == client


def test_long_path_and_client_are_cut_to_their_fields(board: sb.Scoreboard) -> None:
    """A path past 176 bytes and a host past 46 are cut there; a split UTF-8 character reads as U+FFFD."""
    rec = recorder(board)
    start(rec, FakeRequest(path="/" + "a" * 174 + "é" * 3, peer=("b" * 60, 1)))
    (request,) = board.read(0).requests
    assert request.path == "/" + "a" * 174 + "\ufffd"
    assert request.client == "b" * 46 + ":1"


def test_queue_time_is_read_from_the_environ(board: sb.Scoreboard) -> None:
    """post_request takes X-Request-Start from the environ gunicorn built, measured from the request's start."""
    rec = recorder(board)
    req = FakeRequest()
    start(rec, req)
    finish(rec, req, {"HTTP_X_REQUEST_START": f"t={time.time() - 0.25:.3f}"}, FakeResponse("200 OK"))
    ((_, queue, _, _, _, _, _),) = board.read_ring(0, 0, 1)
    assert 0.24 <= queue < 5


def test_queue_time_without_an_environ_comes_from_the_request_headers(board: sb.Scoreboard) -> None:
    """ASGI workers pass no environ without an access log: the request's own headers are used instead."""
    rec = recorder(board)
    req = FakeRequest(headers=[("HOST", "x"), ("X-QUEUE-START", f"t={time.time() - 0.25:.3f}")])
    start(rec, req)
    finish(rec, req, None, FakeResponse(200))
    ((_, queue, status, _, _, _, _),) = board.read_ring(0, 0, 1)
    assert (0.24 <= queue < 5, status) == (True, 200)


class BrokenRequest(FakeRequest):
    @property
    def method(self) -> str:
        raise RuntimeError("a request object that breaks when read")

    @method.setter
    def method(self, value: str) -> None:
        pass


@pytest.mark.parametrize("threaded", [True, False])
def test_a_failing_hook_is_reported_never_raised(
    board: sb.Scoreboard, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, threaded: bool
) -> None:
    """An error inside the hooks is logged and swallowed, and a thread-safe recorder's lock is released."""
    monkeypatch.setattr(_report, "ERRORS", _report.RateLimitedLog())  # earlier tests' reports are not held back
    rec = recorder(board, threaded=threaded)
    req = BrokenRequest()
    start(rec, req)
    finish(rec, req, {}, FakeResponse("200 OK"))
    assert "internal error in pre_request" in caplog.text
    if threaded:
        assert rec.lock is not None
        assert not rec.lock.locked()
    else:
        assert rec.lock is None


def test_threads_sharing_a_recorder_lose_no_record(board: sb.Scoreboard) -> None:
    """gthread: every request of every thread lands in the ring once, and the head counts them all."""
    rec = recorder(board, threaded=True)

    def serve_many() -> None:
        for _ in range(300):
            req = FakeRequest()
            start(rec, req)
            finish(rec, req, {}, FakeResponse("200 OK"))

    threads = [threading.Thread(target=serve_many) for _ in range(6)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can, inside the hooks too
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    view = board.read(0)
    assert (view.head, view.in_flight) == (1800, 0)
    assert [status for _, _, status, _, _, _, _ in board.read_ring(0, 1800 - 8, 1800)] == [200] * 8


def test_the_monitor_thread_never_moves_the_ring_head(board: sb.Scoreboard) -> None:
    """refresh_connections writes the connection count alone, so it cannot publish a stale head."""
    rec = recorder(board, worker=ThreadWorker())
    req = FakeRequest()
    start(rec, req)
    finish(rec, req, {}, FakeResponse("200 OK"))
    sb.HEAD_CONNS.pack_into(board.buffer, board.offset(0) + sb.OFF_HEAD, 7, 0)  # as if more had finished since
    rec.refresh_connections()
    assert (board.read(0).head, board.read(0).connections) == (7, 5)


def test_a_crash_after_boot_leaves_its_exception_as_last_words(board: sb.Scoreboard) -> None:
    """worker_exit inside gunicorn's `except Exception: sys.exit(-1)` records the exception, not only on boot."""
    rec = recorder(board)
    worker = FakeWorker()
    worker.booted = True  # type: ignore[attr-defined]
    try:
        try:
            raise ConnectionError("database went away\nsecond line")
        except ConnectionError:
            sys.exit(-1)
    except SystemExit:
        assert rec.exiting(worker) is None  # not a boot error
    view = board.read(0)
    assert (view.exit_code, view.last_words) == (-1, "ConnectionError: database went away")
    assert view.flags & sb.FLAG_EXITED
    assert not view.flags & sb.FLAG_BOOT_FAILED


def test_a_clean_exit_leaves_no_last_words(board: sb.Scoreboard) -> None:
    """sys.exit(0) after an exception was handled is a graceful exit: nothing recorded as last words."""
    rec = recorder(board)
    worker = FakeWorker()
    worker.booted = True  # type: ignore[attr-defined]
    try:
        try:
            raise ValueError("handled")
        except ValueError:
            sys.exit(0)
    except SystemExit:
        rec.exiting(worker)
    assert board.read(0).last_words == ""


def test_an_exit_after_the_servers_own_request_count_reached_max_requests_is_marked(board: sb.Scoreboard) -> None:
    """exiting(served=N) judges max_requests by the server's own count (uvicorn's), not gunicorn's worker.nr."""
    worker = FakeWorker()
    worker.max_requests = 5  # type: ignore[attr-defined]
    worker.nr = 0  # type: ignore[attr-defined]  # uvicorn's workers never count in it
    for served, marked in ((4, False), (5, True)):
        board.assign(0, now=1.0)
        recorder(board).exiting(worker, served=served)
        assert bool(board.read(0).flags & sb.FLAG_MAX_REQUESTS) == marked, served
