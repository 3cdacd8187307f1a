"""The worker's side: write what each request is doing into the worker's own scoreboard slot.

This is the only code on the request path, so it does the least it can: a clock read, a dict entry,
two ``pack_into`` calls per request and nothing else. No metric library, no I/O, no allocation beyond
the few encoded strings. The master turns these plain numbers into metrics.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from math import isnan
from typing import Any

from . import _scoreboard as sb
from ._routes import ROUTE_KEY

_DYING = sb.FLAG_ABORT_HANDLER | sb.FLAG_INT_HANDLER
_METHOD_BYTES = {method: method.encode() for method in sb.METHODS}


InFlightRequest = tuple[float, int, Any, str, str, float]
"""start (monotonic), scoreboard entry (-1: none free), thread ident or greenlet, method, display path,
queue time (NaN: no header, negative: an unusable header)."""

QUEUE_HEADERS = frozenset({"X-REQUEST-START", "X-QUEUE-START"})
_MAX_QUEUE = 3600.0
_SKEW_TOLERANCE = 0.005


def request_queue_time(headers: Any, now: float | None = None) -> float:
    """Seconds between the proxy stamping X-Request-Start / X-Queue-Start and now.

    Accepts nginx's ``t=1700000000.123``, Apache's ``t=1700000000123456`` (microseconds), and plain
    seconds, milliseconds or microseconds. Returns NaN when there is no header, -1.0 when there is one
    that cannot be right (garbage, in the future, more than an hour old), so it is counted, never used.
    """
    for name, value in headers:
        if name in QUEUE_HEADERS:
            return parse_request_start(value, time.time() if now is None else now)
    return sb.NO_QUEUE_TIME


def parse_request_start(value: str, now: float) -> float:
    text = value.strip()
    if text.startswith("t="):
        text = text[2:]
    try:
        stamp = float(text)
    except ValueError:
        return -1.0
    if isnan(stamp) or stamp <= 0:
        return -1.0
    for divisor in (1e9, 1e6, 1e3):  # nanoseconds, microseconds, milliseconds since the epoch
        if stamp > 1e11 * divisor / 1e3:
            stamp /= divisor
            break
    queued = now - stamp
    if -_SKEW_TOLERANCE <= queued < 0.0:
        return 0.0  # millisecond stamps and NTP-disciplined clocks a few ms apart: not skew worth discarding
    return queued if 0.0 <= queued <= _MAX_QUEUE else -1.0


def default_route(environ: Any) -> str | None:
    """The route template the framework (see _routes) or the application put in the environ."""
    route = environ.get(ROUTE_KEY)
    return str(route) if route else None


def summarize(error: BaseException | None) -> str:
    """``Type: first line of the message``: what an operator needs in a one-line log entry."""
    if error is None:
        return "unknown error"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def status_code(resp: Any) -> int:
    """The HTTP status of a finished request; 0 when gunicorn does not tell (ASGI without access log)."""
    if resp is None:
        return 0
    code = getattr(resp, "status_code", None)  # gunicorn's WSGI Response parses it once already
    if type(code) is int:
        return code
    status = resp.status
    if isinstance(status, int):
        return status
    if not status:
        # The application raised before start_response: gunicorn answers 500.
        return 500
    try:
        return int(str(status)[:3])
    except ValueError:
        return 0


def describe_client(peer: Any) -> str:
    if type(peer) is tuple and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    if isinstance(peer, bytes):
        return peer.decode("utf-8", "replace") or "unix"
    return str(peer) if peer else "unix"


@dataclass(frozen=True, slots=True)
class RecorderOptions:
    """The per-request switches, resolved once in the master before it forks."""

    redact_query: bool = True
    queue_time: bool = True
    exclude_paths: frozenset[str] = frozenset()
    routes: bool = False
    route_resolver: Callable[[Any], str | None] | None = None
    access_log_atoms: bool = False


class RequestRecorder:
    """Owns one slot for the lifetime of one worker process."""

    __slots__ = (
        "_atoms", "_board", "_buffer", "_current", "_entries_offset", "_excluded", "_flags_offset", "_free",
        "_head", "_head_offset", "_lock", "_mask", "_max_routes", "_overflow", "_overflow_offset", "_queue",
        "_redact", "_resolve", "_resolves_by_key", "_ring_offset", "_route_ids", "_routes", "_routes_offset",
        "_routes_used", "_start", "_worker", "in_flight", "slot",
    )

    def __init__(
        self, board: sb.Scoreboard, slot: int, worker: Any, options: RecorderOptions = RecorderOptions(),
        current: Callable[[], Any] = threading.get_ident,
    ) -> None:
        self.slot = slot
        self._board = board
        self._current = current
        self._buffer = board.buffer
        self._start = start = board.offset(slot)
        self._head_offset = start + sb.OFF_HEAD
        self._overflow_offset = start + sb.OFF_OVERFLOW
        self._flags_offset = start + sb.OFF_FLAGS
        self._entries_offset = board.entries_offset(slot)
        self._ring_offset = board.ring_offset(slot)
        self._routes_offset = board.routes_offset(slot)
        self._mask = board.ring - 1
        self._head = board.head(slot)
        # pop() and append() on a list are atomic under the GIL, so gthread's pool threads share it safely.
        self._free = list(range(board.entries - 1, -1, -1))
        self.in_flight: dict[int, InFlightRequest] = {}
        self._overflow = 0
        # Only ring and route-table writes need ordering between threads; uncontended this is ~0.1 us.
        self._lock = threading.Lock()
        self._redact = options.redact_query
        self._queue = options.queue_time
        self._excluded = options.exclude_paths
        self._atoms = options.access_log_atoms
        self._routes = options.routes and board.routes > 0
        self._resolve = options.route_resolver or default_route
        self._resolves_by_key = options.route_resolver is None
        self._max_routes = board.routes
        # The route table belongs to the slot, not the worker: keep the numbers a predecessor gave out.
        self._route_ids = {name: n + 1 for n, name in enumerate(board.route_names(slot))}
        self._routes_used = len(self._route_ids)
        self._worker = worker if hasattr(worker, "nr_conns") else None
        flags = sb.FLAG_COUNTS_CONNECTIONS if self._worker is not None else 0
        sb.BASE.pack_into(self._buffer, start + sb.OFF_BASE, self._head)
        sb.FLAGS.pack_into(self._buffer, start + sb.OFF_FLAGS, flags)
        sb.PID.pack_into(self._buffer, start + sb.OFF_PID, os.getpid())

    def booted(self) -> None:
        start = self._start
        sb.BOOTED.pack_into(self._buffer, start + sb.OFF_BOOTED, time.monotonic())
        sb.STATE.pack_into(self._buffer, start + sb.OFF_STATE, sb.READY)

    def started(self, req: Any) -> None:
        now = time.monotonic()
        path = req.path or ""
        excluded = self._excluded
        if excluded and path in excluded:
            return
        queue = request_queue_time(req.headers) if self._queue else sb.NO_QUEUE_TIME
        try:
            entry = self._free.pop()
        except IndexError:
            entry = -1
            self._overflow += 1
            sb.OVERFLOW.pack_into(self._buffer, self._overflow_offset, self._overflow)
        query = req.query
        if query:
            path = f"{path}?<redacted>" if self._redact else f"{path}?{query}"
        method = req.method or ""
        current = self._current()
        self.in_flight[id(req)] = (now, entry, current, method, path, queue)
        if entry >= 0:
            sb.ENTRY.pack_into(
                self._buffer,
                self._entries_offset + entry * sb.ENTRY_SIZE,
                1,
                now,
                current if type(current) is int else id(current),
                _METHOD_BYTES.get(method) or method.encode("ascii", "replace"),
                # struct's "s" truncates to the field's width; the reader decodes with errors="replace".
                describe_client(getattr(req, "peer_addr", None)).encode("utf-8", "replace"),
                path.encode("utf-8", "replace"),
            )
        if self._atoms:
            self._add_log_atoms(req, queue)

    def finished(self, req: Any, environ: Any, resp: Any) -> None:
        now = time.monotonic()
        started = self.in_flight.pop(id(req), None)
        if started is None:
            return  # not recorded: an excluded path, or pre_request never ran for it
        start, entry, queue = started[0], started[1], started[5]
        method = sb.METHOD_INDEX.get(req.method, sb.OTHER_METHOD)
        route = self._route(environ) if self._routes else sb.NO_ROUTE
        conns = self._worker.nr_conns if self._worker is not None else 0
        with self._lock:
            head = self._head
            sb.RING.pack_into(
                self._buffer,
                self._ring_offset + (head & self._mask) * sb.RING_SIZE,
                now - start,
                queue,
                status_code(resp),
                method,
                route,
            )
            self._head = head + 1
            # Publishing the head after the record is what makes the record visible to the master.
            sb.HEAD_CONNS.pack_into(self._buffer, self._head_offset, head + 1, conns)
        if entry >= 0:
            if self._buffer[self._flags_offset] & _DYING:
                return  # the request was cut short by a signal: keep it visible for the master's report
            self._buffer[self._entries_offset + entry * sb.ENTRY_SIZE] = 0
            self._free.append(entry)
        else:
            self._overflow -= 1
            sb.OVERFLOW.pack_into(self._buffer, self._overflow_offset, self._overflow)

    def _route(self, environ: Any) -> int:
        """The route's number in this slot's table: 0 when unknown, OVER_ROUTE_CAP past max_routes."""
        if not environ:
            return sb.NO_ROUTE
        if self._resolves_by_key:
            # A route this slot has seen, put in the environ by the framework hook: one dict lookup.
            key = environ.get(ROUTE_KEY)
            known = self._route_ids.get(key) if type(key) is str else None
            if known is not None:
                return known
        try:
            name = self._resolve(environ)
        except Exception as error:  # a user's resolver must not cost the request its record
            from ._safety import report

            report("the route resolver", error)
            return sb.NO_ROUTE
        if not name:
            return sb.NO_ROUTE
        number = self._route_ids.get(name)
        if number is not None:
            return number
        with self._lock:
            number = self._route_ids.get(name)
            if number is None:
                if self._routes_used >= self._max_routes:
                    number = sb.OVER_ROUTE_CAP
                else:
                    sb.ROUTE.pack_into(self._buffer, self._routes_offset + self._routes_used * sb.ROUTE_SIZE,
                                       str(name).encode("utf-8", "replace")[: sb.ROUTE_SIZE])
                    self._routes_used += 1
                    number = self._routes_used
                    sb.ROUTES_USED.pack_into(self._buffer, self._start + sb.OFF_ROUTES_USED,
                                             self._routes_used)
                self._route_ids[name] = number
        return number

    def _add_log_atoms(self, req: Any, queue: float) -> None:
        """Make busy workers and queue time usable in access_log_format as %({x-gunicorn-busy}i)s etc."""
        busy = self._board.busy_workers()
        queue_ms = f"{queue * 1000:.1f}" if queue >= 0 else "-"
        req.headers.append(("X-GUNICORN-BUSY", str(busy)))
        req.headers.append(("X-GUNICORN-QUEUE-MS", queue_ms))

    def refresh_connections(self) -> None:
        """Called by the worker's monitor thread, so idle keep-alive connections and gthread's queue of
        connections waiting for a thread are seen even when no request starts or ends."""
        worker = self._worker
        if worker is None:
            return
        with self._lock:
            sb.HEAD_CONNS.pack_into(self._buffer, self._head_offset, self._head, worker.nr_conns)
        queue = getattr(getattr(worker, "tpool", None), "_work_queue", None)  # gthread's ThreadPoolExecutor
        if queue is not None:
            sb.WAITING.pack_into(self._buffer, self._start + sb.OFF_WAITING, queue.qsize())

    def count_slow(self) -> None:
        """One more slow request (only the watchdog thread calls this, so the count needs no lock)."""
        offset = self._start + sb.OFF_SLOW
        (slow,) = sb.SLOW.unpack_from(self._buffer, offset)
        sb.SLOW.pack_into(self._buffer, offset, slow + 1)

    def exiting(self, worker: Any) -> BaseException | None:
        """worker_exit ran in the worker: record how it is leaving. Returns the boot error, if that is why."""
        start = self._start
        error = sys.exc_info()[1]
        code = 0
        if isinstance(error, SystemExit):
            code = error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
            error = error.__context__  # gunicorn turns every failure into sys.exit(...) inside its except
        flags = sb.FLAG_EXITED
        boot_error = None
        if not getattr(worker, "booted", True):
            flags |= sb.FLAG_BOOT_FAILED
            boot_error = error
            sb.LAST_WORDS.pack_into(self._buffer, start + sb.OFF_LAST_WORDS, summarize(error).encode()[:128])
        if getattr(worker, "nr", 0) >= getattr(worker, "max_requests", sys.maxsize):
            flags |= sb.FLAG_MAX_REQUESTS
        sb.EXIT_CODE.pack_into(self._buffer, start + sb.OFF_EXIT_CODE, code)
        self.mark(flags)
        return boot_error

    def mark(self, flag: int) -> None:
        """Leave a mark for the master. Safe in a signal handler: one byte read, one byte written."""
        self._buffer[self._flags_offset] = self._buffer[self._flags_offset] | flag
