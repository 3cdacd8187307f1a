"""Count the requests gunicorn's own HTTP parser rejects, by reason, and name one now and then in the error log.

A proxy and gunicorn that frame the same bytes differently (both Content-Length and Transfer-Encoding, a
Transfer-Encoding one of them ignores) is how request smuggling begins. gunicorn refuses such a request with
a 400 and one warning line, but counts nothing, and the request hooks never run for it: it is rejected while
its request line and headers are read, before ``pre_request``. A malformed chunked body is found later, while
the application reads it: that request was already counted by the hooks, and is counted here as well.

gunicorn's sync, gthread, gevent and eventlet workers hand every exception of a connection to
``worker.handle_error(req, client, addr, exc)``, the parser's (``gunicorn.http.errors``) included. The worker
gets a wrapper of its own as an instance attribute, in ``post_worker_init``: it calls gunicorn's method, then
counts into the slot (one deque append and one store: see _worker.loglines). Worker classes that parse
elsewhere (gunicorn's asgi worker, uvicorn's with h11 or httptools, tornado) never call it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .. import _scoreboard as sb
from .._report import RateLimitedLog, report
from ..settings import join_host_port

REASON_OF_CLASS = {
    "InvalidHeader": "invalid_header",
    "InvalidHeaderName": "invalid_header_name",
    "InvalidRequestLine": "invalid_request_line",
    "InvalidRequestMethod": "invalid_method",
    "InvalidHTTPVersion": "invalid_http_version",
    "UnsupportedTransferCoding": "unsupported_transfer_coding",
    "InvalidChunkSize": "invalid_chunk_size",
    "ChunkMissingTerminator": "chunk_missing_terminator",
    "InvalidChunkExtension": "invalid_chunk_extension",
    "LimitRequestLine": "limit_request_line",
    "LimitRequestHeaders": "limit_request_headers",
    "ObsoleteFolding": "obsolete_folding",
    "ExpectationFailed": "expectation_failed",
    "InvalidProxyLine": "invalid_proxy_line",
    "InvalidProxyHeader": "invalid_proxy_header",
    "ForbiddenProxyRequest": "forbidden_proxy_request",
    "InvalidSchemeHeaders": "invalid_scheme_headers",
    "InvalidH2CPreface": "invalid_h2c_preface",
    "ParseException": "other",  # the base class: a parser error of a gunicorn newer than this list
}
NOT_THE_REQUEST = frozenset({"InvalidResponseHeader", "InvalidResponseHeaderName", "ConfigurationProblem"})
"""Errors of that module that are not the client's: a header the application sent, a SCRIPT_NAME that does not
fit the path (gunicorn answers 500 for them)."""
FRAMING_HEADERS = frozenset({"CONTENT-LENGTH", "TRANSFER-ENCODING"})
"""gunicorn raises InvalidHeader naming one of these when it cannot tell where the body ends (both headers,
either twice, a length that is not a number, chunked not last or on HTTP/1.0): the desync signature."""
ERRORS_MODULE = "gunicorn.http.errors"
EXCERPT = 80
"""Characters of gunicorn's description of the error (it can quote the request) kept in the log line."""

assert set(REASON_OF_CLASS.values()) | {"framing"} == set(sb.REJECT_REASONS)
REASON_INDEX = {reason: index for index, reason in enumerate(sb.REJECT_REASONS)}


def reject_reason(error: BaseException) -> str | None:
    """The REJECT_REASONS entry for an exception gunicorn's parser raised; None for anything else."""
    for klass in type(error).__mro__:
        if klass.__module__ != ERRORS_MODULE:
            continue
        if klass.__name__ in NOT_THE_REQUEST:
            return None
        reason = REASON_OF_CLASS.get(klass.__name__)
        if reason == "invalid_header" and getattr(error, "hdr", None) in FRAMING_HEADERS:
            return "framing"
        if reason is not None:
            return reason
    return None


def describe_peer(addr: Any) -> str:
    """``host:port`` of the connection (the proxy, behind one), or what stands for a unix socket's peer."""
    if isinstance(addr, tuple) and len(addr) >= 2 and addr[0]:
        return join_host_port(str(addr[0]), int(addr[1]))
    return "a unix socket peer" if not addr or isinstance(addr, str) else repr(addr)[:EXCERPT]


def excerpt(error: BaseException) -> str:
    """gunicorn's own description of the error, cut short, control characters and quotes escaped."""
    try:
        text = str(error)
    except Exception:
        text = ""
    cut = text[:EXCERPT]
    return repr(cut)[1:-1] + ("..." if len(text) > EXCERPT else "")


REJECTED_LINE = RateLimitedLog(period=60.0)


class RejectWatch:
    """Counts what the worker's ``handle_error`` is given that gunicorn's parser raised (see the module)."""

    def __init__(self, count: Callable[[int], None], log: RateLimitedLog = REJECTED_LINE) -> None:
        self._count = count
        self._log = log

    def install(self, worker: Any) -> bool:
        """Wrap the worker's ``handle_error``; False where the worker has none to wrap."""
        original = getattr(worker, "handle_error", None)
        if not callable(original):
            return False

        def handle_error(req: Any, client: Any, addr: Any, exc: Any) -> Any:
            try:
                return original(req, client, addr, exc)
            finally:
                try:
                    self.rejected(exc, addr)
                except Exception as error:
                    report("counting a rejected request", error)

        worker.handle_error = handle_error
        return True

    def rejected(self, error: BaseException, addr: Any) -> str | None:
        reason = reject_reason(error)
        if reason is None:
            return None
        self._count(REASON_INDEX[reason])
        self._log(
            "rejected",
            logging.WARNING,
            f"gunicorn rejected a malformed request from {describe_peer(addr)}: reason={reason} "
            f"({type(error).__name__}: {excerpt(error)}); counted in gunicorn_requests_rejected_total. "
            + (
                "A body whose length is ambiguous means the proxy and gunicorn may not agree where requests "
                "end (request smuggling)"
                if reason in ("framing", "unsupported_transfer_coding")
                else "Many of them from the proxy's address mean it forwards requests gunicorn reads differently"
            ),
        )
        return reason
