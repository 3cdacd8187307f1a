"""The plugin's own failures: logged now and then, never raised into gunicorn or the application."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

LOG = logging.getLogger("gunicorn.error")
"""gunicorn configures this logger in the master and in every worker: our lines land in its error log."""


class RateLimitedLog:
    """One line per ``key`` per ``period`` seconds; the next line says how many were held back."""

    def __init__(self, period: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._period = period
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str, level: int, message: str, *, exc_info: bool = False) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._period:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        suffix = f" ({held} similar messages suppressed in the last {self._period:.0f}s)" if held else ""
        LOG.log(level, "gunicorn-insight: %s%s", message, suffix, exc_info=exc_info)
        return True


ERRORS = RateLimitedLog()


def report(where: str, error: BaseException) -> None:
    """Log a plugin error once a minute per place; swallow anything the logging itself raises."""
    with contextlib.suppress(Exception):  # a broken log handler must not take the server down either
        ERRORS(where, logging.ERROR, f"internal error in {where} (the server keeps running): {error!r}", exc_info=True)


def error_log_fd() -> int:
    """The file descriptor gunicorn's error log writes to (stderr unless --error-logfile says otherwise)."""
    for handler in logging.getLogger("gunicorn.error").handlers:
        stream = getattr(handler, "stream", None)
        try:
            if stream is not None:
                return int(stream.fileno())
        except (OSError, ValueError, AttributeError):
            continue
    return 2
