"""Stalls and crash loops, decided by the master from what each round saw.

A **stall**: requests are in flight, none has finished for ``after`` seconds (the rings' heads have not
moved), and there is demand the server is not meeting: every request slot is taken, gthread has
connections waiting for a thread, or connections wait in a listen queue. A lone slow request on an
otherwise idle server is not a stall (the watchdog reports it as a slow request).

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
