"""Notice, at run time, a worker that serves connections while no request is recorded.

The startup check (_gunicorn.unseen_requests) trusts a class derived from one that calls the request hooks.
A subclass can still bypass them: a ``SyncWorker`` whose ``handle_request`` is its own answers every request
and records none. Such a worker accepts connections through gunicorn's listeners, so each worker counts the
connections it accepts until it records its first request: the counting wrapper sits on the listener
objects only until then, a handful of accepts on a class that calls the hooks. When enough connections were
accepted over long enough with no request recorded or started, the worker marks its slot
(``FLAG_REQUESTS_UNSEEN``) and takes the wrapper off; the master logs the first such mark once.

Connections that carry no request at all (a TCP health check that connects and closes) are counted too,
which is why the warning needs several of them and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic
from typing import Any

from .. import _scoreboard as sb
from .._report import report
from .recorder import RequestRecorder

ENOUGH_CONNECTIONS = 10
"""Accepted connections, with no request recorded or in flight, before the worker says so."""
AFTER_SECONDS = 1.0
"""...and at least this long after the first of them, so requests accepted together have had time to start."""


class AcceptWatch:
    """Counts the connections this worker accepts until its first request is recorded (see the module)."""

    def __init__(self, recorder: RequestRecorder, clock: Callable[[], float] = monotonic) -> None:
        self._recorder = recorder
        self._clock = clock
        self._listeners: list[Any] = []
        self.accepted = 0
        self._first = 0.0

    def install(self, listeners: list[Any]) -> int:
        """Count accepts on these listeners (gunicorn's socket objects); returns how many could be wrapped.

        Only an object that takes an attribute of its own can be wrapped (gunicorn's listener does; a plain
        ``socket.socket`` has slots): elsewhere nothing is counted and nothing is said."""
        for listener in listeners:
            accept = getattr(listener, "accept", None)
            if accept is None:
                continue
            try:
                listener.accept = self._counting(accept)
            except (AttributeError, TypeError):
                continue
            self._listeners.append(listener)
        return len(self._listeners)

    def _counting(self, accept: Callable[..., Any]) -> Callable[..., Any]:
        def counting_accept(*args: Any, **kwargs: Any) -> Any:
            connection = accept(*args, **kwargs)
            try:
                self.accepted_one()
            except Exception as error:
                report("counting accepted connections", error)
            return connection

        return counting_accept

    def accepted_one(self) -> None:
        recorder = self._recorder
        if recorder.recorded_any():
            self.remove()
            return
        now = self._clock()
        self.accepted += 1
        if self.accepted == 1:
            self._first = now
        elif self.accepted >= ENOUGH_CONNECTIONS and now - self._first >= AFTER_SECONDS:
            recorder.mark(sb.FLAG_REQUESTS_UNSEEN)
            self.remove()

    def remove(self) -> None:
        """Give the listeners their own ``accept`` back."""
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            try:
                del listener.accept
            except AttributeError:  # the worker replaced it itself meanwhile
                continue
