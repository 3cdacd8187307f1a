"""The worker's side: write what each request is doing into the worker's own scoreboard slot.

This is the only code on the request path, so it does the least it can: a clock read, a dict entry,
two ``pack_into`` calls per request and nothing else. No metric library, no I/O, no allocation beyond
the few encoded strings. The master turns these plain numbers into metrics.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from . import _scoreboard as sb

_PATH_BYTES = 176
_DYING = sb.FLAG_ABORT_HANDLER | sb.FLAG_INT_HANDLER
_CLIENT_BYTES = 48


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
        "_buffer", "_entries_offset", "_flags_offset", "_free", "_head", "_head_offset", "_in_flight", "_lock",
        "_mask", "_overflow", "_overflow_offset", "_redact", "_ring_offset", "_worker", "slot",
    )

    def __init__(self, board: sb.Scoreboard, slot: int, worker: Any, redact_query: bool) -> None:
        self.slot = slot
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
        self._in_flight: dict[int, tuple[float, int]] = {}
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
        self._in_flight[id(req)] = (now, entry)
        if entry < 0:
            return
        query = req.query
        path = req.path or ""
        if query:
            path = f"{path}?<redacted>" if self._redact else f"{path}?{query}"
        sb.ENTRY.pack_into(
            self._buffer,
            self._entries_offset + entry * sb.ENTRY_SIZE,
            1,
            now,
            threading.get_ident(),
            (req.method or "").encode("ascii", "replace"),
            describe_client(getattr(req, "peer_addr", None)).encode("utf-8", "replace")[:_CLIENT_BYTES],
            path.encode("utf-8", "replace")[:_PATH_BYTES],
        )

    def finished(self, req: Any, resp: Any) -> None:
        now = time.monotonic()
        started = self._in_flight.pop(id(req), None)
        if started is None:
            return  # pre_request never ran for it (a hook installed mid-flight); nothing to close
        start, entry = started
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

    def mark(self, flag: int) -> None:
        """Leave a mark for the master. Safe in a signal handler: one byte read, one byte written."""
        self._buffer[self._flags_offset] = self._buffer[self._flags_offset] | flag
