"""Counting gunicorn's log lines by level (``gunicorn.log.*``) when gunicorn's own statsd logger does not.

gunicorn's statsd logger counts each call of its logger object's ``critical``, ``error``, ``warning`` and
``exception`` methods, whatever the log level lets through. With gunicorn-insight's StatsD sink in its
place, :class:`LogLineWatch` wraps the same four methods of gunicorn's logger object in the master, so the
same calls are counted. The workers inherit the wrapped object at fork; each worker then counts into its
scoreboard slot (see _worker.loglines), and the master's round adds the slots' increases (see drain).

The master logs some of these lines inside its SIGCHLD handler, so counting takes no lock and calls no
logging: one deque append, drained by the exporter round.
"""

from __future__ import annotations

import contextlib
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from .._scoreboard import LOG_LEVELS

MARK = "__gunicorn_insight_log_lines__"
"""Set on our wrappers, so a second watch (a reload's new master object) does not count a call twice."""


class LogLineWatch:
    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self.counting: Callable[[int], None] = self._pending.append
        """Where a counted line goes: the master's queue; a worker points it at its slot after fork."""

    def watch(self, log: Any) -> None:
        """Wrap gunicorn's logger object's four counted methods (an instance attribute each, as the reap
        watcher's wrappers are; they chain)."""
        for index, level in enumerate(LOG_LEVELS):
            original = getattr(log, level, None)
            if original is None or getattr(original, MARK, False):
                continue
            setattr(log, level, self._counted(original, index))

    def _counted(self, original: Callable[..., Any], index: int) -> Callable[..., Any]:
        def counted(msg: Any, *args: Any, **kwargs: Any) -> Any:
            logged = original(msg, *args, **kwargs)
            with contextlib.suppress(Exception):  # counted after the line, as gunicorn's statsd logger does
                self.counting(index)
            return logged

        setattr(counted, MARK, True)
        return counted

    def take(self) -> Counter[str]:
        """level -> lines the master logged since the last call (the exporter round is the one reader)."""
        taken: Counter[str] = Counter()
        pending = self._pending
        while pending:
            try:
                taken[LOG_LEVELS[pending.popleft()]] += 1
            except IndexError:  # emptied between the test and the pop: nothing else reads it, but be safe
                break
        return taken

    def in_worker(self, counting: Callable[[int], None]) -> None:
        """After fork, in a worker: lines go to ``counting``; the master's queue copy is dropped."""
        self.counting = counting
        self._pending.clear()
