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
from typing import Any

from . import _scoreboard as sb

_PATH_BYTES = 176
_DYING = sb.FLAG_ABORT_HANDLER | sb.FLAG_INT_HANDLER
_CLIENT_BYTES = 48


InFlightRequest = tuple[float, int, Any, str, str]
"""start (monotonic), scoreboard entry (-1: none free), thread ident or greenlet, method, display path."""


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
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    if isinstance(peer, bytes):
        return peer.decode("utf-8", "replace") or "unix"
    return str(peer) if peer else "unix"


class RequestRecorder:
    """Owns one slot for the lifetime of one worker process."""

    __slots__ = (
        "_buffer", "_current", "_entries_offset", "_flags_offset", "_free", "_head", "_head_offset", "_lock",
        "_mask", "_overflow", "_overflow_offset", "_redact", "_ring_offset", "_worker", "in_flight", "slot",
    )

    def __init__(
        self, board: sb.Scoreboard, slot: int, worker: Any, redact_query: bool,
        current: Callable[[], Any] = threading.get_ident,
    ) -> None:
        self.slot = slot
        self._current = current
        self._buffer = board.buffer
        start = board.offset(slot)
        self._head_offset = start + sb.OFF_HEAD
        self._overflow_offset = start + sb.OFF_OVERFLOW
        self._flags_offset = start + sb.OFF_FLAGS
        self._entries_offset = board.entries_offset(slot)
        self._ring_offset = board.ring_offset(slot)
        self._mask = board.ring - 1
        self._head = board.head(slot)
        # pop() and append() on a list are atomic under the GIL, so gthread's pool threads share it safely.
        self._free = list(range(board.entries - 1, -1, -1))
        self.in_flight: dict[int, InFlightRequest] = {}
        self._overflow = 0
        # Only ring writes need ordering between threads; uncontended this costs about 0.1 us.
        self._lock = threading.Lock()
        self._redact = redact_query
        self._worker = worker if hasattr(worker, "nr_conns") else None
        flags = sb.FLAG_COUNTS_CONNECTIONS if self._worker is not None else 0
        sb.BASE.pack_into(self._buffer, start + sb.OFF_BASE, self._head)
        sb.FLAGS.pack_into(self._buffer, start + sb.OFF_FLAGS, flags)
        sb.PID.pack_into(self._buffer, start + sb.OFF_PID, os.getpid())

    def booted(self) -> None:
        start = self._head_offset - sb.OFF_HEAD
        sb.BOOTED.pack_into(self._buffer, start + sb.OFF_BOOTED, time.monotonic())
        sb.STATE.pack_into(self._buffer, start + sb.OFF_STATE, sb.READY)

    def started(self, req: Any) -> None:
        now = time.monotonic()
        try:
            entry = self._free.pop()
        except IndexError:
            entry = -1
            self._overflow += 1
            sb.OVERFLOW.pack_into(self._buffer, self._overflow_offset, self._overflow)
        query = req.query
        path = req.path or ""
        if query:
            path = f"{path}?<redacted>" if self._redact else f"{path}?{query}"
        method = req.method or ""
        current = self._current()
        self.in_flight[id(req)] = (now, entry, current, method, path)
        if entry < 0:
            return
        sb.ENTRY.pack_into(
            self._buffer,
            self._entries_offset + entry * sb.ENTRY_SIZE,
            1,
            now,
            current if type(current) is int else id(current),
            method.encode("ascii", "replace"),
            describe_client(getattr(req, "peer_addr", None)).encode("utf-8", "replace")[:_CLIENT_BYTES],
            path.encode("utf-8", "replace")[:_PATH_BYTES],
        )

    def finished(self, req: Any, resp: Any) -> None:
        now = time.monotonic()
        started = self.in_flight.pop(id(req), None)
        if started is None:
            return  # pre_request never ran for it (a hook installed mid-flight); nothing to close
        start, entry = started[0], started[1]
        method = sb.METHOD_INDEX.get(req.method, sb.OTHER_METHOD)
        conns = self._worker.nr_conns if self._worker is not None else 0
        with self._lock:
            head = self._head
            sb.RING.pack_into(
                self._buffer,
                self._ring_offset + (head & self._mask) * sb.RING_SIZE,
                now - start,
                sb.NO_QUEUE_TIME,
                status_code(resp),
                method,
                0,
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

    def refresh_connections(self) -> None:
        """Called by the worker's sampler thread so idle keep-alive connections are seen too."""
        if self._worker is not None:
            with self._lock:
                sb.HEAD_CONNS.pack_into(self._buffer, self._head_offset, self._head, self._worker.nr_conns)

    def count_slow(self) -> None:
        """One more slow request (only the watchdog thread calls this, so the count needs no lock)."""
        offset = self._head_offset - sb.OFF_HEAD + sb.OFF_SLOW
        (slow,) = sb.SLOW.unpack_from(self._buffer, offset)
        sb.SLOW.pack_into(self._buffer, offset, slow + 1)

    def exiting(self, worker: Any) -> BaseException | None:
        """worker_exit ran in the worker: record how it is leaving. Returns the boot error, if that is why."""
        start = self._head_offset - sb.OFF_HEAD
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
