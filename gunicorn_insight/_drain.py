"""Turn the scoreboard into one round of facts. Every exporter reads the same :class:`Round`.

This is the single place where a number is computed: the StatsD and Prometheus sinks only format it.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field

from . import _scoreboard as sb


@dataclass(slots=True)
class Round:
    """What happened since the previous round (counts, durations) and how things are now (gauges)."""

    requests: Counter[tuple[str, int]] = field(default_factory=Counter)
    """(method, status) -> requests finished this round."""
    durations: dict[str, list[float]] = field(default_factory=dict)
    """method -> durations in seconds of the requests finished this round."""
    lost: int = 0
    """Records overwritten before they were read (a ring lapped between two rounds)."""
    workers: int = 0
    in_flight: int = 0
    connections: dict[int, int] = field(default_factory=dict)
    """slot -> open connections, for every slot that has ever had a worker (0 once it is gone)."""
    memory: dict[int, int] = field(default_factory=dict)
    """slot -> resident bytes of its live worker, read from /proc by the master this round."""
    slow: int = 0
    """Requests the workers' watchdogs reported slow this round."""
    exits: Counter[str] = field(default_factory=Counter)
    """cause -> workers that exited this round (filled in by the master after the drain)."""
    slots: list[sb.SlotView] = field(default_factory=list)
    at: float = 0.0

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def total_connections(self) -> int:
        return sum(self.connections.values())


_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(pid: int) -> int:
    """RSS from /proc/<pid>/statm (one small read); 0 when the process is gone or not ours to read."""
    if not pid:
        return 0
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class Drainer:
    """Keeps a read cursor per slot; each :meth:`collect` returns what is new since the last one."""

    def __init__(self, board: sb.Scoreboard) -> None:
        self._board = board
        self._cursors = [board.head(index) for index in range(board.slots)]
        self._slow_cursors = [board.slow(index) for index in range(board.slots)]
        self._seen: set[int] = set()

    def collect(self) -> Round:
        board = self._board
        result = Round(at=time.monotonic())
        requests = result.requests
        durations = result.durations
        methods = sb.METHODS
        for index in range(board.slots):
            head = board.head(index)
            cursor = self._cursors[index]
            if head != cursor:
                if head - cursor > board.ring:
                    result.lost += head - cursor - board.ring
                    cursor = head - board.ring
                for duration, _queue, status, method, _route in board.read_ring(index, cursor, head):
                    name = methods[method] if method < len(methods) else "other"
                    requests[name, status] += 1
                    bucket = durations.get(name)
                    if bucket is None:
                        bucket = durations[name] = []
                    bucket.append(duration)
                self._cursors[index] = head
            slow = board.slow(index)
            result.slow += slow - self._slow_cursors[index]
            self._slow_cursors[index] = slow
            if board.buffer[board.offset(index) + sb.OFF_STATE] == sb.FREE:
                if index in self._seen:
                    result.connections[index] = 0
                continue
            view = board.read(index)
            if view.state != sb.FREE:
                self._seen.add(index)
                result.workers += 1
                result.in_flight += view.in_flight
                result.slots.append(view)
                rss = resident_bytes(view.pid)
                if rss:
                    board.set_rss(index, rss)
                    result.memory[index] = rss
            if index in self._seen:
                result.connections[index] = view.connections_now if view.state != sb.FREE else 0
        return result
