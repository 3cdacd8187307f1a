"""The worker's side: write what each request is doing into the worker's own scoreboard slot.

``pre_request`` and ``post_request`` here are the only code on the request path, so they do the least
they can: a clock read, a dict entry, three packed writes per request and nothing else. No metric
library, no I/O, no allocation beyond the few encoded strings; the master turns these plain numbers into
metrics. Each Python call level costs as much as a dozen lines here (see docs/performance.md), which is
why the two hooks are written out inline rather than as methods behind the hook functions.

These two are also the definition of what _speedups.c does in one C call each (``COMPILED``, installed
by default where the extension was built). A change here is a change there: tests/test_speedups.py
compares the bytes both write.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from time import monotonic, thread_time
from typing import Any

from .. import _scoreboard as sb
from .._report import LOG, report
from .keepalive import Dropped, dropped
from .routes import ROUTE_KEY

_DYING = sb.FLAG_ABORT_HANDLER | sb.FLAG_INT_HANDLER
_COUNTED = sb.ENTRY_COUNTED
# What another process reads is published with one store: pack_into zero-fills a field and then writes it
# byte by byte, so the master could read a head of 0. The head goes through a memoryview of 8-byte words (one
# aligned store, nothing allocated); elsewhere sb.store packs and assigns a slice. pack_into stays only where
# the reader waits for a later store: a ring record (read once the head passes it) and an entry's fields
# (read once its in-use byte, stored last, says so).
_pack_entry, _pack_record = sb.ENTRY.pack_into, sb.RING.pack_into
_METHOD_BYTES = {method: method.encode() for method in sb.METHODS}
# Module globals, not attributes of sb: one dictionary lookup each on the request path instead of two.
_method_index, _OTHER_METHOD, _RING_SIZE = sb.METHOD_INDEX.get, sb.OTHER_METHOD, sb.RING_SIZE
_NO_QUEUE_TIME, _NO_ROUTE = sb.NO_QUEUE_TIME, sb.NO_ROUTE
_NO_CPU = math.nan


InFlightRequest = tuple[float, int, Any, str, str, float]
"""start (monotonic), scoreboard entry's byte offset (-1: none free), thread ident or greenlet, method, display path,
the thread's CPU clock at the start (NaN where requests share a thread).

``in_flight`` maps gunicorn's request object itself to one of these: hashing it is a pointer hash, where
``id(req)`` would cost an audit event and an int allocation per request. A request of the compiled ASGI layer
(``_speedups.Recording``) is its own record: it indexes and unpacks as this tuple, with no tuple made, and is
kept at its entry's place in ``_entry_requests`` instead, with no dict insertion and deletion per request.
:meth:`RequestRecorder.requests_in_flight` reads both."""

_REQUEST_START_KEY, _QUEUE_START_KEY = "HTTP_X_REQUEST_START", "HTTP_X_QUEUE_START"  # in a WSGI environ
_MAX_QUEUE = 3600.0
_SKEW_TOLERANCE = 0.005


def request_queue_time(headers: Any, now: float | None = None) -> float:
    """Seconds between the proxy stamping X-Request-Start / X-Queue-Start and now.

    Accepts nginx's ``t=1700000000.123``, Apache's ``t=1700000000123456`` (microseconds), and plain
    seconds, milliseconds or microseconds. Returns NaN when there is no header, -1.0 when there is one
    that cannot be right (garbage, in the future, more than an hour old), so it is counted, never used.
    """
    stamp = queue_header(headers)
    return sb.NO_QUEUE_TIME if stamp is None else parse_request_start(stamp, time.time() if now is None else now)


def queue_header(headers: Any) -> str | None:
    """X-Request-Start's value among raw request headers, else X-Queue-Start's, like the environ lookup."""
    queue_start = None
    for name, value in headers:
        if name == "X-REQUEST-START":
            return str(value)
        if name == "X-QUEUE-START" and queue_start is None:
            queue_start = str(value)
    return queue_start


def parse_request_start(value: str, now: float) -> float:
    text = value[2:] if value.startswith("t=") else value
    try:
        stamp = float(text)  # float() ignores surrounding whitespace itself
    except ValueError:
        # A repeated header (gunicorn's environ joins the values with ","), spaces before "t=", or garbage.
        first = value.partition(",")[0].strip()
        return parse_request_start(first, now) if first != value else -1.0
    if not stamp > 0.0:  # also NaN
        return -1.0
    if stamp > 1e11:  # not seconds: milliseconds, microseconds or nanoseconds since the epoch
        for divisor in (1e9, 1e6, 1e3):
            if stamp > 1e11 * divisor / 1e3:
                stamp /= divisor
                break
    queued = now - stamp
    if -_SKEW_TOLERANCE <= queued < 0.0:
        return 0.0  # millisecond stamps and NTP-disciplined clocks a few ms apart: not skew worth discarding
    return queued if 0.0 <= queued <= _MAX_QUEUE else -1.0


def default_route(environ: Any) -> str | None:
    """The route template the framework (see routes) or the application put in the environ."""
    route = environ.get(ROUTE_KEY)
    return str(route) if route else None


def summarize(error: BaseException | None) -> str:
    """``Type: first line of the message``: what an operator needs in a one-line log entry."""
    if error is None:
        return "unknown error"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def parse_status(resp: Any) -> int:
    """The HTTP status of a finished request whose status gunicorn did not parse: an int (ASGI), a
    ``"404 Not Found"`` string, 500 when the application raised before start_response (gunicorn answers
    500), 0 when there is no response to ask (ASGI without an access log)."""
    if resp is None:
        return 0
    status = resp.status
    if isinstance(status, int):
        return status
    if not status:
        return 500
    try:
        return int(str(status)[:3])
    except ValueError:
        return 0


_HUNG_UP = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)
_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux only: elsewhere only a failed write is seen
_TCP_CLOSE_WAIT, _TCP_CLOSE = 8, 7  # linux/tcp_states.h
_TCP_INFO_BYTES = 28  # up to tcpi_unacked (u32 at byte 24)
# The TCP state is asked only of requests that took at least this long (seconds). The question costs a system
# call and a Python call for the socket's descriptor, about 1 us: 1% of a fast request, and a client that gives
# up (nginx's 499, a platform's timeout) has waited far longer than this. A failed write counts at any duration.
# _speedups.c's HANG_UP_CHECK_AFTER is the same number (a test compares them).
HANG_UP_CHECK_AFTER = 0.001


def client_closed(req: Any, resp: Any, duration: float) -> int:
    """RECORD_CLIENT_CLOSED when the client had gone before the response reached it, else 0.

    Exact for TCP on Linux and for unix sockets, for requests of at least HANG_UP_CHECK_AFTER; it sees nothing
    where the response has no socket (ASGI: an exception in flight there is the application's own, from a
    connection of its own, never the server's write). Called in post_request, which gunicorn runs in a
    ``finally`` after writing the response:

    - the write failed (EPIPE, ECONNRESET): the exception is still in flight here;
    - the client reset the connection (TCP state CLOSE): its kernel refused the response;
    - the client closed (CLOSE_WAIT) while part of the response is still unacknowledged: it stopped
      before taking the response. A client (or nginx) that read the whole response and then closed has
      acknowledged every byte, so it is not counted, however fast it closed.
    """
    in_flight = sys.exc_info()[1]
    if in_flight is not None and isinstance(in_flight, _HUNG_UP):
        return 0 if getattr(resp, "sock", None) is None else sb.RECORD_CLIENT_CLOSED
    # Only a TCP peer (an address tuple) has a TCP state: asking a unix socket would raise, at ten times the cost.
    asked = duration >= HANG_UP_CHECK_AFTER and type(getattr(req, "peer_addr", None)) is tuple
    sock = getattr(resp, "sock", None) if asked else None
    if sock is None or _TCP_INFO is None:
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_BYTES)
    except (OSError, AttributeError, TypeError):  # not TCP (a unix socket: a closed peer fails the write), closed
        return 0
    if len(info) < _TCP_INFO_BYTES:
        return 0
    state = info[0]
    if state == _TCP_CLOSE or (state == _TCP_CLOSE_WAIT and int.from_bytes(info[24:28], sys.byteorder)):
        return sb.RECORD_CLIENT_CLOSED
    return 0


def describe_peer(peer: Any) -> bytes:
    """The client of a request that did not come over TCP: the unix socket's name, if it has one."""
    if isinstance(peer, bytes):
        return peer or b"unix"
    return str(peer).encode("utf-8", "replace") if peer else b"unix"


@dataclass(frozen=True, slots=True)
class RecorderOptions:
    """The per-request switches, resolved once in the master before it forks."""

    redact_query: bool = True
    queue_time: bool = True
    exclude_paths: frozenset[str] = frozenset()
    routes: bool = False
    route_resolver: Callable[[Any], str | None] | None = None
    access_log_atoms: bool = False
    threaded: bool = True  # the worker class runs requests on several OS threads (gthread, unknown classes)
    slow_after: float = 0.0  # a request the client left after this many seconds is logged; 0: none is
    thread_cpu: bool = False  # each request owns its OS thread (sync, gthread): its CPU is the thread's CPU clock
    # The worker's nr_conns changes only at the watchdog's tick, which publishes it (uvicorn's, copied there from
    # its server): the hooks do not read it again for each request.
    connections_at_tick: bool = False


class RequestRecorder:
    """Owns one slot for the lifetime of one worker process: the state the two request hooks share.

    sync, gevent, eventlet, tornado and asgi workers call the hooks from one thread, and a greenlet or
    a coroutine never switches inside them, so the ring and the route table need no lock there; other
    worker classes get ``lock``. The monitor thread writes only fields of its own (connections,
    waiting, slow).
    """

    __slots__ = (
        "_atoms",
        "_board",
        "_buffer",
        "_busy_layout",
        "_conns_index",
        "_conns_offset",
        "_current",
        "_entries_offset",
        "_entry_requests",
        "_excluded",
        "_first_head",
        "_flags_offset",
        "_free",
        "_halfwords",
        "_head",
        "_head_index",
        "_head_offset",
        "_mask",
        "_max_routes",
        "_overflow",
        "_overflow_offset",
        "_queue",
        "_redact",
        "_request_worker",
        "_resolve",
        "_resolves_by_key",
        "_ring_offset",
        "_route_ids",
        "_routes",
        "_routes_offset",
        "_routes_used",
        "_slow_after",
        "_start",
        "_thread_cpu",
        "_words",
        "_worker",
        "dying",
        "in_flight",
        "lock",
        "slot",
    )

    def __init__(
        self,
        board: sb.Scoreboard,
        slot: int,
        worker: Any,
        options: RecorderOptions = RecorderOptions(),
        current: Callable[[], Any] = threading.get_ident,
    ) -> None:
        self.slot = slot
        self._board = board
        self._current = current
        self._buffer = board.buffer
        self._start = start = board.offset(slot)
        self._head_offset = start + sb.OFF_HEAD
        self._conns_offset = start + sb.OFF_CONNS
        # The slot's head and connections as machine words: storing one is a single aligned store.
        self._words, self._head_index = memoryview(self._buffer).cast("Q"), self._head_offset // 8
        self._halfwords, self._conns_index = memoryview(self._buffer).cast("I"), self._conns_offset // 4
        self._overflow_offset = start + sb.OFF_OVERFLOW
        self._flags_offset = start + sb.OFF_FLAGS
        self._ring_offset = board.ring_offset(slot)
        self._routes_offset = board.routes_offset(slot)
        self._mask = board.ring - 1
        self._head = self._first_head = board.head(slot)
        self._entries_offset = board.entries_offset(slot)
        # Byte offsets of the free entries. pop() and append() on a list are atomic under the GIL, so
        # gthread's pool threads share it safely.
        self._free = [self._entries_offset + n * sb.ENTRY_SIZE for n in range(board.entries - 1, -1, -1)]
        self.in_flight: dict[Any, InFlightRequest] = {}
        self._entry_requests: list[Any] = [None] * board.entries  # by entry: the compiled ASGI layer's requests
        self.dying = False  # a signal handler (worker_int, worker_abort) ran: requests cut short stay visible
        self._overflow = 0
        # Ring records and route numbers are handed out in order under it, so the head the master reads
        # never passes a record another thread is still writing.
        self.lock = threading.Lock() if options.threaded else None
        self._redact = options.redact_query
        self._queue = options.queue_time
        self._excluded = options.exclude_paths
        self._atoms = options.access_log_atoms
        self._busy_layout = (sb.READY, board.flag_slices())  # for the compiled hooks' access-log atoms
        self._routes = options.routes and board.routes > 0
        self._resolve = options.route_resolver or default_route
        self._resolves_by_key = options.route_resolver is None
        self._max_routes = board.routes
        self._slow_after = options.slow_after
        self._thread_cpu = options.thread_cpu
        # The route table belongs to the slot, not the worker: keep the numbers a predecessor gave out.
        self._route_ids = {name: n + 1 for n, name in enumerate(board.route_names(slot))}
        self._routes_used = len(self._route_ids)
        self._worker = worker if hasattr(worker, "nr_conns") else None
        self._request_worker = None if options.connections_at_tick else self._worker
        flags = sb.FLAG_COUNTS_CONNECTIONS if self._worker is not None else 0
        sb.store(self._buffer, start + sb.OFF_BASE, sb.BASE, self._head)
        sb.store(self._buffer, start + sb.OFF_FLAGS, sb.FLAGS, flags)
        sb.store(self._buffer, start + sb.OFF_PID, sb.PID, os.getpid())

    def booted(self) -> None:
        start = self._start
        sb.store(self._buffer, start + sb.OFF_BOOTED, sb.BOOTED, monotonic())
        # What loading the application cost is no request's CPU (see _master.drain, _share_worker_cpu).
        sb.store(self._buffer, start + sb.OFF_BOOT_CPU, sb.BOOT_CPU, time.process_time())
        sb.store(self._buffer, start + sb.OFF_STATE, sb.STATE, sb.READY)

    def recorded_any(self) -> bool:
        """This worker has recorded a request, or has one in flight (the slot's head, which the compiled hooks
        move too, not ``_head``, which only the Python hooks keep)."""
        return (
            self._words[self._head_index] != self._first_head
            or bool(self.in_flight)
            or any(request is not None for request in self._entry_requests)
        )

    def requests_in_flight(self) -> dict[Any, InFlightRequest]:
        """Every request in flight now, by request: a copy, which another thread (the watchdog's) reads while
        the hooks go on."""
        found = self.in_flight.copy()
        for request in self._entry_requests.copy():
            if request is not None:
                found[request] = request
        return found

    def route_number(self, environ: Any) -> int:
        """A route post_request did not find by key: resolve it and give it the next number in this
        slot's table (OVER_ROUTE_CAP past max_routes, 0 when there is no route)."""
        if not environ:
            return sb.NO_ROUTE
        try:
            name = self._resolve(environ)
        except Exception as error:  # a user's resolver must not cost the request its record
            report("the route resolver", error)
            return sb.NO_ROUTE
        if not name:
            return sb.NO_ROUTE
        number = self._route_ids.get(name)
        if number is None:
            if self._routes_used >= self._max_routes:
                number = sb.OVER_ROUTE_CAP
            else:
                # Read by the master only once routes_used below says it is there.
                sb.ROUTE.pack_into(
                    self._buffer,
                    self._routes_offset + self._routes_used * sb.ROUTE_SIZE,
                    str(name).encode("utf-8", "replace")[: sb.ROUTE_SIZE],
                )
                self._routes_used += 1
                number = self._routes_used
                sb.store(self._buffer, self._start + sb.OFF_ROUTES_USED, sb.ROUTES_USED, self._routes_used)
            self._route_ids[name] = number
        return number

    def client_gone(self, method: str, path: str, duration: float) -> None:
        """The client of a finished request had gone: name the request when it was slow (counted anyway)."""
        try:
            if self._slow_after and duration >= self._slow_after:
                LOG.warning(
                    'gunicorn-insight: client closed the connection before the response pid=%s slot=%s request="%s %s" '
                    "duration=%.1fs (the worker kept serving a request nobody was waiting for; a proxy or platform "
                    "timeout shorter than the request, or an impatient client)",
                    os.getpid(),
                    self.slot,
                    method,
                    path,
                    duration,
                )
        except Exception as error:
            report("the client-closed log", error)

    def add_overflow(self, change: int) -> None:
        """Requests in flight without an entry of their own (more at once than the slot has entries)."""
        self._overflow += change
        sb.store(self._buffer, self._overflow_offset, sb.OVERFLOW, self._overflow)

    def add_log_atoms(self, req: Any) -> None:
        """Make busy workers and queue time usable in access_log_format as %({x-gunicorn-busy}i)s etc."""
        if type(getattr(req, "headers", None)) is not list:  # the ASGI layer's request: no gunicorn access log
            return
        busy = self._board.busy_workers()
        queue = request_queue_time(req.headers)
        queue_ms = f"{queue * 1000:.1f}" if queue >= 0 else "-"
        req.headers.append(("X-GUNICORN-BUSY", str(busy)))
        req.headers.append(("X-GUNICORN-QUEUE-MS", queue_ms))

    def refresh_connections(self) -> None:
        """Called by the worker's monitor thread, so idle keep-alive connections and gthread's queue of
        connections waiting for a thread are seen even when no request starts or ends."""
        worker = self._worker
        if worker is None:
            return
        sb.store(self._buffer, self._conns_offset, sb.CONNS, worker.nr_conns)
        queue = getattr(getattr(worker, "tpool", None), "_work_queue", None)  # gthread's ThreadPoolExecutor
        if queue is not None:
            sb.store(self._buffer, self._start + sb.OFF_WAITING, sb.WAITING, queue.qsize())

    def stacks_asked(self) -> int:
        """How many times ``gunicorn-insight stacks`` has asked this slot for its stacks (see _worker.watchdog)."""
        return self._board.stacks_asked(self.slot)

    def count_slow(self) -> None:
        """One more slow request (only the watchdog thread calls this, so the count needs no lock)."""
        offset = self._start + sb.OFF_SLOW
        (slow,) = sb.SLOW.unpack_from(self._buffer, offset)
        sb.store(self._buffer, offset, sb.SLOW, slow + 1)

    def exiting(self, worker: Any, *, served: int | None = None) -> BaseException | None:
        """worker_exit ran in the worker: record how it is leaving. Returns the boot error, if that is why.

        ``served``: the requests the worker's server counted itself (uvicorn's), else gunicorn's ``worker.nr``."""
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
            sb.store(self._buffer, start + sb.OFF_LAST_WORDS, sb.LAST_WORDS, summarize(error).encode()[:128])
        elif code and error is not None:
            # A crash after boot: the exception gunicorn turned into sys.exit(-1), for the master's exit line.
            sb.store(self._buffer, start + sb.OFF_LAST_WORDS, sb.LAST_WORDS, summarize(error).encode()[:128])
        if (getattr(worker, "nr", 0) if served is None else served) >= getattr(worker, "max_requests", sys.maxsize):
            flags |= sb.FLAG_MAX_REQUESTS
        sb.store(self._buffer, start + sb.OFF_EXIT_CODE, sb.EXIT_CODE, code)
        try:
            self._record_dropped(dropped(worker))
        except Exception as failure:  # the exit facts above are kept whatever happens here
            report("counting the idle keep-alive connections at exit", failure)
        self.mark(flags)
        return boot_error

    def _record_dropped(self, found: Dropped | None) -> None:
        """The requests waiting on idle keep-alive connections this exit closes: one ring record each, status
        RING_NO_RESPONSE, so the master counts them as it counts every request; then how many connections and
        requests, for its exit line. The counts are stored first: until the head moves, ``served`` reads
        lower by the unanswered requests, never higher."""
        if found is None:
            return
        lock = self.lock
        # A pool thread still in post_request (graceful_timeout ran out) holds it a moment; never wait long.
        if lock is not None and not lock.acquire(timeout=1.0):
            LOG.warning(
                "gunicorn-insight: worker pid=%s could not count the requests waiting on its %d idle keep-alive "
                "connections (its request hooks were busy)",
                os.getpid(),
                found.idle,
            )
            return
        try:
            unanswered = found.unanswered[: self._mask + 1]
            sb.store(self._buffer, self._start + sb.OFF_KEEPALIVE, sb.KEEPALIVE, found.idle, len(unanswered))
            head = self._words[self._head_index]  # not _head: the compiled hooks move only the slot's head
            for request in unanswered:
                _pack_record(
                    self._buffer,
                    self._ring_offset + (head & self._mask) * _RING_SIZE,
                    request.waited,
                    _NO_QUEUE_TIME,
                    sb.RING_NO_RESPONSE,
                    _method_index(request.method, _OTHER_METHOD),
                    _NO_ROUTE,
                    0,
                    0.0,  # no CPU was spent on it
                )
                head += 1
            self._head = head
            self._words[self._head_index] = head
        finally:
            if lock is not None:
                lock.release()

    def unmark(self, flag: int) -> None:
        """Take a mark back (not from a signal handler: a worker's own setup)."""
        self._buffer[self._flags_offset] = self._buffer[self._flags_offset] & ~flag

    def mark(self, flag: int) -> None:
        """Leave a mark for the master. Safe in a signal handler: one byte read, one byte written, and
        for a signal handler's mark one attribute set, which post_request reads instead of the byte."""
        self._buffer[self._flags_offset] = self._buffer[self._flags_offset] | flag
        if flag & _DYING:
            self.dying = True


RECORDER: RequestRecorder | None = None
"""This worker's recorder, set by post_fork; None in the master and when the plugin is off."""


def pre_request(worker: Any, req: Any) -> None:
    rec = RECORDER
    if rec is None:
        return
    try:
        now = monotonic()
        path = req.path or ""
        excluded = rec._excluded
        if excluded and path in excluded:
            return
        try:
            entry = rec._free.pop()
        except IndexError:
            entry = -1
            with rec.lock or nullcontext():  # post_request takes it back under the lock
                rec.add_overflow(1)
        query = req.query
        if query:
            path = f"{path}?<redacted>" if rec._redact else f"{path}?{query}"
        method = req.method or ""
        current = rec._current()
        rec.in_flight[req] = (now, entry, current, method, path, thread_time() if rec._thread_cpu else _NO_CPU)
        if entry >= 0:
            peer = getattr(req, "peer_addr", None)
            try:
                encoded_path = path.encode()  # no arguments: CPython's fast path for UTF-8
            except UnicodeEncodeError:  # a lone surrogate
                encoded_path = path.encode("utf-8", "replace")
            if type(peer) is tuple:  # (host, port), or IPv6's (host, port, flowinfo, scope_id)
                host, port = peer[0].encode(), peer[1]
            else:
                host, port = describe_peer(peer), 0
            # The fields go in while the in-use byte is still 0 (the entry is free); the byte stored after them
            # publishes the request whole.
            _pack_entry(
                rec._buffer,
                entry,
                0,
                now,
                current if type(current) is int else id(current),
                _METHOD_BYTES.get(method) or method.encode("ascii", "replace"),
                # struct's "s" truncates to the field's width; the reader decodes with errors="replace".
                host,
                port,
                encoded_path,
            )
            rec._buffer[entry] = 1
        if rec._atoms:
            rec.add_log_atoms(req)
    except Exception as error:
        report("pre_request", error)


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:  # noqa: PLR0912 -- inline on purpose: every helper call would cost more than its branches
    rec = RECORDER
    if rec is None:
        return
    lock = rec.lock
    if lock is not None:
        lock.acquire()
    try:
        now = monotonic()
        started = rec.in_flight.pop(req, None)
        if started is None:
            return  # not recorded: an excluded path, or pre_request never ran for it
        start, entry, _, method, path, cpu_start = started
        cpu = thread_time() - cpu_start if rec._thread_cpu else _NO_CPU
        queue = _NO_QUEUE_TIME
        if rec._queue:
            # Looked up here, not in pre_request: the environ has the headers hashed already. ASGI workers
            # pass no environ when there is no access log.
            stamp = (
                environ.get(_REQUEST_START_KEY) or environ.get(_QUEUE_START_KEY)
                if environ
                else queue_header(getattr(req, "headers", ()))
            )
            if stamp:
                queue = parse_request_start(stamp, time.time() - (now - start))
        status = getattr(resp, "status_code", None)  # gunicorn's WSGI Response parses it once already
        if type(status) is not int:
            status = parse_status(resp)
        route = _NO_ROUTE
        if rec._routes:
            # A route this slot has seen, put in the environ by a framework hook: one dict lookup.
            key = environ.get(ROUTE_KEY) if environ and rec._resolves_by_key else None
            known = rec._route_ids.get(key) if type(key) is str else None
            route = rec.route_number(environ) if known is None else known
        closed = client_closed(req, resp, now - start)
        if closed:
            rec.client_gone(method, path, now - start)
        head = rec._head
        _pack_record(
            rec._buffer,
            rec._ring_offset + (head & rec._mask) * _RING_SIZE,
            now - start,
            queue,
            status,
            _method_index(method, _OTHER_METHOD),
            route,
            closed,
            cpu,
        )
        rec._head = head = head + 1
        # Publishing the head after the record is what makes the record visible to the master.
        rec._words[rec._head_index] = head
        if rec._request_worker is not None:
            rec._halfwords[rec._conns_index] = rec._request_worker.nr_conns
        if entry >= 0:
            if rec.dying:
                # Cut short by a signal: keep it visible for the master's report, marked as counted here so
                # the master does not count it again as a request its worker died under.
                rec._buffer[entry] = _COUNTED
                return
            rec._buffer[entry] = 0
            rec._free.append(entry)
        else:
            rec.add_overflow(-1)
    except Exception as error:
        report("post_request", error)
    finally:
        if lock is not None:
            lock.release()


def _compiled() -> tuple[Callable[..., None], Callable[..., None]] | None:
    """The same two hooks from the C extension (_speedups.c), bound to this module; None where it was not
    built (no compiler at install time, a big-endian machine, another Python implementation), and on a
    free-threaded Python, where the C code's reliance on the GIL would not hold (importing it there would
    turn the GIL back on for the whole process)."""
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return None
    try:
        from . import _speedups

        # Refuses (ImportError) a scoreboard layout other than the one _speedups.c writes: a stale build.
        _speedups.bind(
            globals(),
            pre_request,
            post_request,
            report,
            describe_peer,
            parse_status,
            parse_request_start,
            queue_header,
            sb.METHOD_INDEX,
            sb.OTHER_METHOD,
            ROUTE_KEY,
            _REQUEST_START_KEY,
            _QUEUE_START_KEY,
            HANG_UP_CHECK_AFTER,
            (sb.ENTRY.format, sb.RING.format, sb.HEAD_CONNS.format, _DYING),
        )
    except ImportError:
        return None
    return _speedups.pre_request, _speedups.post_request


COMPILED = _compiled()
"""(pre_request, post_request) in C, or None: see _compiled."""
