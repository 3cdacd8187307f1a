"""Stalls and crash loops, decided by the master from what each round saw.

A **stall**: requests are in flight, none has finished for ``after`` seconds (the rings' heads have not
moved), and there is demand the server is not meeting: every request slot is taken, gthread has
connections waiting for a thread, or connections wait in a listen queue. A lone slow request on an
otherwise idle server is not a stall (the watchdog reports it as a slow request).

**Unserved listener**: connections wait in a listener's accept queue while no worker is in a request and none
has finished for ``after`` seconds: the workers are alive but none accepts.

A **crash loop**: ``count`` or more workers died of an unexpected cause within ``young`` seconds of their
fork, all within the last ``window`` seconds. gunicorn replaces each one, so the server looks up while it
serves little or nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StallChange:
    started: bool
    """True: a stall began this round; False: the one in progress ended."""
    quiet_for: float
    """Seconds since a request last finished (at the start) or the stall's length (at the end)."""
    resumed: bool = False
    """At the end: a request finished (True), or none is in flight any more without one finishing (False)."""


class StallWatch:
    def __init__(self, after: float) -> None:
        self.after = after
        self.stalled = False
        self._heads = -1
        self._quiet_since: float | None = None
        self._stalled_at = 0.0

    def observe(self, now: float, heads: int, in_flight: int, unmet_demand: bool) -> StallChange | None:
        """``heads``: requests ever finished, summed over the slots (it never moves backwards)."""
        moved = heads != self._heads
        self._heads = heads
        if in_flight == 0 or moved:
            self._quiet_since = now if in_flight else None
            if self.stalled:
                self.stalled = False
                return StallChange(started=False, quiet_for=now - self._stalled_at, resumed=moved)
            return None
        if self._quiet_since is None:
            self._quiet_since = now
        quiet = now - self._quiet_since
        if not self.stalled and unmet_demand and quiet >= self.after:
            self.stalled = True
            self._stalled_at = self._quiet_since
            return StallChange(started=True, quiet_for=quiet)
        return None

    @property
    def stalled_since(self) -> float | None:
        """When the stall in progress began (the last request finished; monotonic), None when not stalled."""
        return self._stalled_at if self.stalled else None


@dataclass(frozen=True, slots=True)
class EarlyDeath:
    at: float
    pid: int
    slot: int
    cause: str
    detail: str
    uptime: float


class CrashLoopWatch:
    def __init__(self, young: float = 60.0, window: float = 300.0, count: int = 3) -> None:
        self.young = young
        self.window = window
        self.count = count
        self.looping = False
        self.deaths: deque[EarlyDeath] = deque()

    def exited(self, death: EarlyDeath, *, expected: bool) -> bool:
        """Record one exit; True when it makes a crash loop begin."""
        if expected or death.uptime >= self.young:
            return False
        self.deaths.append(death)
        self._expire(death.at)
        if not self.looping and len(self.deaths) >= self.count:
            self.looping = True
            return True
        return False

    def tick(self, now: float) -> bool:
        """Forget deaths older than the window; True when that ends the crash loop."""
        self._expire(now)
        if self.looping and len(self.deaths) < self.count:
            self.looping = False
            return True
        return False

    def _expire(self, now: float) -> None:
        while self.deaths and now - self.deaths[0].at > self.window:
            self.deaths.popleft()


@dataclass(frozen=True, slots=True)
class UnservedEnd:
    listener: str
    seconds: float
    """How long the listener's queue went unserved."""


class UnservedWatch:
    """Connections queued on a listener while no worker is in a request and none finished: the workers are up
    but none of them accepts (each is blocked outside any request, or the ready ones are all gone).

    With a request in flight the same picture is a stall (StallWatch); here nothing is in flight, so nothing
    names a request, and only the workers' main threads can say where they are."""

    def __init__(self, after: float) -> None:
        self.after = after
        self._heads = -1
        self._since: dict[str, float] = {}
        self._reported: set[str] = set()

    def observe(
        self, now: float, heads: int, in_flight: int, listeners: dict[str, tuple[int, int]]
    ) -> tuple[dict[str, float], list[UnservedEnd]]:
        """Per listener, seconds its queue has gone unserved (0 while served or empty), and the episodes that
        were reported and ended this round. ``heads``: requests ever finished, summed over the slots."""
        moved = heads != self._heads
        self._heads = heads
        ended = []
        unserved = {}
        holding = set()
        for name, (queued, _limit) in listeners.items():
            if queued > 0 and in_flight == 0 and not moved:
                holding.add(name)
                unserved[name] = now - self._since.setdefault(name, now)
            else:
                unserved[name] = 0.0
        for name in [name for name in self._since if name not in holding]:
            since = self._since.pop(name)
            if name in self._reported:
                self._reported.discard(name)
                ended.append(UnservedEnd(name, now - since))
        return unserved, ended

    @property
    def unserved(self) -> bool:
        """A queue has gone unserved for at least one round."""
        return bool(self._since)

    def due(self, now: float) -> list[tuple[str, float]]:
        """Listeners unserved for ``after`` seconds and not reported yet in this episode, with their seconds."""
        return [
            (name, now - since)
            for name, since in self._since.items()
            if name not in self._reported and now - since >= self.after
        ]

    def reported(self, name: str) -> None:
        self._reported.add(name)
