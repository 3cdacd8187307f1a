"""Counters a worker publishes in its scoreboard slot: gunicorn's log lines by level (see _master.loglines for
why and when), and the requests gunicorn's parser rejected by reason (see _worker.rejected).

A worker counts from several threads (gthread), and a signal handler can log while the code it interrupted
is counting, so counting is lock-free for the caller: each count is one deque append, and whichever caller
takes the publishing lock without waiting publishes every pending count, one store per counter. A caller
that finds the lock taken leaves its count to the holder, which looks at the queue again after releasing.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from .. import _scoreboard as sb


class SlotCounters:
    """``width`` 8-byte counters at ``start`` in the scoreboard; :meth:`count` adds one to counter ``index``."""

    def __init__(self, buffer: Any, start: int, width: int) -> None:
        self._buffer = buffer
        self._start = start
        self._width = width
        self._pending: deque[int] = deque()
        self._publishing = threading.Lock()

    def count(self, index: int) -> None:
        self._pending.append(index)
        while self._pending:
            if not self._publishing.acquire(blocking=False):
                return  # the holder publishes this count too: it checks the queue after it releases
            try:
                self._publish()
            finally:
                self._publishing.release()

    def _publish(self) -> None:
        added = [0] * self._width
        pending = self._pending
        while pending:
            added[pending.popleft()] += 1
        for index, count in enumerate(added):
            if count:
                offset = self._start + 8 * index
                (total,) = sb.COUNTER.unpack_from(self._buffer, offset)
                sb.store(self._buffer, offset, sb.COUNTER, total + count)


def log_line_counters(buffer: Any, slot_start: int) -> SlotCounters:
    """The slot's log line counters, one per LOG_LEVELS."""
    return SlotCounters(buffer, slot_start + sb.OFF_LOG_LINES, len(sb.LOG_LEVELS))


def rejected_counters(buffer: Any, slot_start: int) -> SlotCounters:
    """The slot's rejected-request counters, one per REJECT_REASONS."""
    return SlotCounters(buffer, slot_start + sb.OFF_REJECTED, len(sb.REJECT_REASONS))
