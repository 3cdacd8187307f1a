"""Counting the requests gunicorn's parser rejects: the reason of each gunicorn error, the guarded wrapper of
handle_error, the slot counters and the drain. End to end: tests/integration/test_rejected_requests.py."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from gunicorn.http import errors

from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._master.drain import Drainer
from gunicorn_insight._report import RateLimitedLog
from gunicorn_insight._worker.loglines import rejected_counters
from gunicorn_insight._worker.rejected import RejectWatch, excerpt, reject_reason


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (errors.InvalidHeader("CONTENT-LENGTH"), "framing"),
        (errors.InvalidHeader("TRANSFER-ENCODING"), "framing"),
        (errors.InvalidHeader("bare LF as line terminator"), "invalid_header"),
        (errors.InvalidHeaderName("Bad Header"), "invalid_header_name"),
        (errors.InvalidRequestLine("GET"), "invalid_request_line"),
        (errors.InvalidRequestMethod("G@T"), "invalid_method"),
        (errors.UnsupportedTransferCoding("br"), "unsupported_transfer_coding"),
        (errors.InvalidChunkSize("zz"), "invalid_chunk_size"),
        (errors.LimitRequestLine(9000, 4094), "limit_request_line"),
        (errors.LimitRequestHeaders("too many"), "limit_request_headers"),
        (errors.ForbiddenProxyRequest("10.0.0.1"), "forbidden_proxy_request"),
    ],
)
def test_each_gunicorn_parser_error_has_its_reason(error: BaseException, reason: str) -> None:
    """gunicorn's own exception classes map to their reason; InvalidHeader on a framing header is "framing"."""
    assert reject_reason(error) == reason


def test_errors_that_are_not_the_clients_are_not_counted() -> None:
    """A header the application sent, gunicorn's SCRIPT_NAME problem and anything outside
    gunicorn.http.errors are not rejected requests; an unknown parser error is "other"."""
    if hasattr(errors, "InvalidResponseHeader"):  # gunicorn 24 and later
        assert reject_reason(errors.InvalidResponseHeader("X-Bad")) is None
    assert reject_reason(errors.ConfigurationProblem("SCRIPT_NAME")) is None
    assert reject_reason(RuntimeError("the application failed")) is None
    assert reject_reason(OSError(32, "Broken pipe")) is None

    class NewParserError(errors.ParseException):  # type: ignore[misc]  # gunicorn ships no type information
        pass

    NewParserError.__module__ = "gunicorn.http.errors"  # as a class gunicorn adds in a later version
    assert reject_reason(NewParserError()) == "other"


class FakeWorker:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[Any] = []
        self.fail = fail

    def handle_error(self, req: Any, client: Any, addr: Any, exc: Any) -> str:
        self.calls.append((req, client, addr, exc))
        if self.fail:
            raise OSError("writing the 400 failed")
        return "gunicorn's answer"


def test_the_wrapper_chains_gunicorns_method_and_counts_into_the_slot(
    board: sb.Scoreboard, caplog: pytest.LogCaptureFixture
) -> None:
    """gunicorn's handle_error still runs with the same arguments and its result; the slot's counter for the
    reason grows; one log line names the peer and reason, with gunicorn's text escaped and cut short."""
    worker = FakeWorker()
    log = RateLimitedLog(period=60.0)
    assert RejectWatch(rejected_counters(board.buffer, board.offset(3)).count, log).install(worker)
    error = errors.InvalidHeaderName("X\r\nInjected: " + "a" * 200)
    with caplog.at_level(logging.WARNING, logger="gunicorn.error"):
        assert worker.handle_error(None, "client", ("10.1.2.3", 4567), error) == "gunicorn's answer"
        worker.handle_error(None, "client", ("10.1.2.3", 4568), errors.InvalidHeader("CONTENT-LENGTH"))
        worker.handle_error(None, "client", ("10.1.2.3", 4569), RuntimeError("the application's"))
    assert len(worker.calls) == 3
    counts = dict(zip(sb.REJECT_REASONS, board.rejected(3), strict=True))
    assert counts["invalid_header_name"] == 1
    assert counts["framing"] == 1
    assert sum(counts.values()) == 2
    assert sum(board.rejected(2)) == 0
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1, lines  # rate-limited: one a minute
    assert "from 10.1.2.3:4567: reason=invalid_header_name" in lines[0]
    assert "\r" not in lines[0]
    assert "\n" not in lines[0]
    assert "a" * 100 not in lines[0]


def test_a_failing_count_never_reaches_gunicorn_and_a_failing_gunicorn_is_still_counted(board: sb.Scoreboard) -> None:
    """Our error is reported and swallowed; gunicorn's own exception propagates as before, counted."""

    def broken(_: int) -> None:
        raise ValueError("the plugin's bug")

    worker = FakeWorker()
    RejectWatch(broken, RateLimitedLog()).install(worker)
    assert worker.handle_error(None, None, None, errors.InvalidRequestLine("x")) == "gunicorn's answer"
    failing = FakeWorker(fail=True)
    RejectWatch(rejected_counters(board.buffer, board.offset(0)).count, RateLimitedLog()).install(failing)
    with pytest.raises(OSError, match="writing the 400 failed"):
        failing.handle_error(None, None, "", errors.InvalidRequestLine("x"))
    assert board.rejected(0)[sb.REJECT_REASONS.index("invalid_request_line")] == 1


def test_the_drain_reports_increases_by_reason_across_workers(board: sb.Scoreboard) -> None:
    """The counters outlive a worker; the drain adds what grew since its last round, ignores a torn read."""
    drainer = Drainer(board)
    framing = sb.REJECT_REASONS.index("framing")
    counter = rejected_counters(board.buffer, board.offset(1))
    counter.count(framing)
    counter.count(framing)
    assert drainer.collect().rejected == {"framing": 2}
    board.assign(1, 0.0)
    rejected_counters(board.buffer, board.offset(1)).count(sb.REJECT_REASONS.index("other"))
    assert drainer.collect().rejected == {"other": 1}
    sb.store(board.buffer, board.offset(1) + sb.OFF_REJECTED + 8 * framing, sb.COUNTER, 1)  # torn, smaller
    assert drainer.collect().rejected == {}


def test_excerpt_escapes_and_bounds_gunicorns_text() -> None:
    """Control characters are escaped, the text is cut at 80 characters and marked."""
    text = excerpt(errors.InvalidRequestLine("GET /\x00\x1b[31m" + "x" * 500))
    assert "\x00" not in text
    assert "\x1b" not in text
    assert text.endswith("...")
    assert len(text) < 120


@pytest.mark.parametrize(
    ("worker_class", "seen"),
    [
        ("gunicorn.workers.sync.SyncWorker", True),
        ("gunicorn.workers.gthread.ThreadWorker", True),
        ("gunicorn.workers.ggevent.GeventWorker", True),
        ("gunicorn.workers.ggevent.GeventPyWSGIWorker", False),
        ("uvicorn_worker.UvicornWorker", False),
    ],
)
def test_rejected_requests_are_seen_where_gunicorn_parses(worker_class: str, seen: bool) -> None:
    """Counted (and exposed at 0) only on classes that read requests with gunicorn's parser."""
    import importlib
    from types import SimpleNamespace

    from gunicorn_insight._gunicorn import parsed_by_gunicorn

    module, _, name = worker_class.rpartition(".")
    try:
        klass = getattr(importlib.import_module(module), name)
    except ImportError as error:
        pytest.skip(f"{worker_class}: {error}")
    assert parsed_by_gunicorn(SimpleNamespace(worker_class=klass)) is seen
