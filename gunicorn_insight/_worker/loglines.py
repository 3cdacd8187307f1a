"""A worker's count of gunicorn's log lines by level, published in its scoreboard slot (see
_master.loglines for why and when).

A worker logs from several threads (gthread), and a signal handler can log while the code it interrupted
is counting, so the count is lock-free for the caller: each line is one deque append, and whichever caller
takes the publishing lock without waiting publishes every pending line, one store per counter. A caller
that finds the lock taken leaves its line to the holder, which looks at the queue again after releasing.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from .. import _scoreboard as sb


class SlotLogLines:
    def __init__(self, buffer: Any, slot_start: int) -> None:
        self._buffer = buffer
        self._start = slot_start + sb.OFF_LOG_LINES
        self._pending: deque[int] = deque()
        self._publishing = threading.Lock()

    def count(self, index: int) -> None:
        self._pending.append(index)
        while self._pending:
            if not self._publishing.acquire(blocking=False):
                return  # the holder publishes this line too: it checks the queue after it releases
            try:
                self._publish()
            finally:
                self._publishing.release()

    def _publish(self) -> None:
        added = [0] * len(sb.LOG_LEVELS)
        pending = self._pending
        while pending:
            added[pending.popleft()] += 1
        for index, count in enumerate(added):
            if count:
                offset = self._start + 8 * index
                (total,) = sb.LOG_LINES.unpack_from(self._buffer, offset)
                sb.store(self._buffer, offset, sb.LOG_LINES, total + count)
