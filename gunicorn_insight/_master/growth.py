"""What a worker's memory, descriptors and threads grow with, decided by the master from its rounds.

**Memory held per request in flight** (:class:`HeldMemoryWatch`). Each round the master reads every
worker's resident memory (RSS) and its requests in flight. Over the last ``WINDOW_ROUNDS`` rounds of one
worker, the least-squares slope of RSS against requests in flight is the memory each request held open
costs. It is reported only when the window shows it: requests in flight varied by at least
``MIN_SPREAD``, RSS follows them closely (correlation at least ``MIN_CORRELATION``) and the slope explains
at least ``MIN_EFFECT`` bytes across that spread, so page-level noise is never mistaken for a cost. A worker
whose requests never overlap (sync), or whose load does not move, gets no estimate at all. The last
estimate a worker earned is kept for its life, with when it was measured: memory that the allocator keeps
after the requests finish (common with glibc) breaks the correlation afterwards, not the measurement.

**Growth with requests served** (:class:`GrowthWatch`). When a worker becomes ready the master notes its
open file descriptors, threads and RSS; afterwards it samples them again each round the worker is idle (no
request in flight) and has served more requests since the last sample. A resource *grows* when, across at
least ``MIN_IDLE_SAMPLES`` idle samples spanning ``MIN_SERVED`` requests, it rose by at least its
``MIN_GROWTH``, follows the requests served (correlation at least ``MIN_CORRELATION``) and was still
rising over the later half of them (at least a quarter of the growth): a pool that fills up once, or a
cache that warms and stops, is not growth. Idle samples only, so what requests hold while they run is not
counted: what grows is what a finished request left behind.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from .._report import LOG
from .._runfiles import Growth, HeldMemory

WINDOW_ROUNDS = 120
MIN_ROUNDS = 8
MIN_SPREAD = 4
"""Requests in flight must vary by at least this much in the window for a slope to mean anything."""
MIN_CORRELATION = 0.8
MIN_EFFECT = 8 << 20
"""Bytes the slope must explain across the window's spread: well above RSS noise."""

MIN_IDLE_SAMPLES = 5
MIN_SERVED = 200
MAX_IDLE_SAMPLES = 256
MIN_GROWTH = {"open_fds": 20, "threads": 20, "memory_bytes": 64 << 20}
RESOURCES = ("open_fds", "threads", "memory_bytes")
STILL_RISING = 0.25
"""Share of the growth that must come in the later half of the requests served: a leak keeps going."""
KINDS_EVERY = 30.0
"""Seconds between two listings of a leaking worker's descriptors by kind."""


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """(slope, correlation) of the least-squares line through the points; None when either coordinate does
    not vary."""
    count = len(xs)
    mean_x, mean_y = sum(xs) / count, sum(ys) / count
    sxx = sum((x - mean_x) ** 2 for x in xs)
    syy = sum((y - mean_y) ** 2 for y in ys)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / sxx, sxy / math.sqrt(sxx * syy)


class _Window:
    """The last WINDOW_ROUNDS points (requests in flight, RSS) of one worker, with running sums, so a round
    costs the same whatever the window's length (exact: Python's integers)."""

    __slots__ = ("estimate", "pid", "sx", "sxx", "sxy", "sy", "syy", "xs", "ys")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.xs: deque[int] = deque()
        self.ys: deque[int] = deque()
        self.sx = self.sy = self.sxx = self.syy = self.sxy = 0
        self.estimate: HeldMemory | None = None

    def add(self, x: int, y: int) -> None:
        self.xs.append(x)
        self.ys.append(y)
        self._count(x, y, 1)
        if len(self.xs) > WINDOW_ROUNDS:
            self._count(self.xs.popleft(), self.ys.popleft(), -1)

    def _count(self, x: int, y: int, sign: int) -> None:
        self.sx += sign * x
        self.sy += sign * y
        self.sxx += sign * x * x
        self.syy += sign * y * y
        self.sxy += sign * x * y


class HeldMemoryWatch:
    """Per slot: the memory one request in flight holds, from the rounds' (requests in flight, RSS)."""

    def __init__(self) -> None:
        self._slots: dict[int, _Window] = {}

    def observe(self, slot: int, pid: int, in_flight: int, rss: int | None) -> None:
        window = self._slots.get(slot)
        if window is None or window.pid != pid:
            window = self._slots[slot] = _Window(pid)
        if rss is None:
            return  # not read this round: a gap, never a 0
        window.add(in_flight, rss)
        estimate = self._estimate(slot, window)
        if estimate is not None:
            window.estimate = estimate

    def forget(self, live_slots: set[int]) -> None:
        for slot in self._slots.keys() - live_slots:
            del self._slots[slot]

    def estimates(self) -> tuple[HeldMemory, ...]:
        return tuple(window.estimate for _, window in sorted(self._slots.items()) if window.estimate is not None)

    @staticmethod
    def _estimate(slot: int, window: _Window) -> HeldMemory | None:
        count = len(window.xs)
        if count < MIN_ROUNDS:
            return None
        low, high = min(window.xs), max(window.xs)
        if high - low < MIN_SPREAD:
            return None
        # count times the (co)variances, in exact integers: a flat RSS is exactly 0, never rounding noise.
        sxx = count * window.sxx - window.sx * window.sx
        syy = count * window.syy - window.sy * window.sy
        sxy = count * window.sxy - window.sx * window.sy
        if sxx <= 0 or syy <= 0:
            return None
        slope = sxy / sxx
        correlation = sxy / math.sqrt(sxx * syy)
        if correlation < MIN_CORRELATION or slope * (high - low) < MIN_EFFECT:
            return None
        return HeldMemory(
            slot=slot,
            pid=window.pid,
            bytes_per_request=round(slope),
            idle_bytes=max(0, round((window.sy - slope * window.sx) / count)),
            requests_low=low,
            requests_high=high,
            rounds=count,
            correlation=round(correlation, 3),
            measured=time.time(),
        )


@dataclass(slots=True)
class _Worker:
    pid: int
    base: tuple[int, dict[str, int | None]] | None = None
    """(requests served, readings) when the master first saw the worker ready."""
    idle: list[tuple[int, dict[str, int | None]]] = field(default_factory=list)
    told: set[str] = field(default_factory=set)
    found: dict[str, Growth] = field(default_factory=dict)
    kinds: str = ""
    kinds_at: float = -KINDS_EVERY
    """When the descriptors' kinds were last listed: one readlink per descriptor, so not every round."""


class GrowthWatch:
    """Per slot: what the worker holds more of with each request it served, kept while it is idle."""

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._slots: dict[int, _Worker] = {}

    def observe(
        self, slot: int, pid: int, *, ready: bool, served: int, in_flight: int, readings: dict[str, int | None]
    ) -> list[Growth]:
        """One round of one worker; returns what was found growing for the first time (to be logged)."""
        state = self._slots.get(slot)
        if state is None or state.pid != pid:
            state = self._slots[slot] = _Worker(pid)
        if not ready:
            return []
        if state.base is None:
            state.base = (served, dict(readings))
            return []
        if in_flight or (state.idle and served <= state.idle[-1][0]) or served <= state.base[0]:
            return []
        state.idle.append((served, dict(readings)))
        if len(state.idle) > MAX_IDLE_SAMPLES:
            # Keep the span of requests served, at half the density: the first sample stays.
            state.idle = state.idle[::2] + ([state.idle[-1]] if len(state.idle) % 2 == 0 else [])
        new = []
        for resource in RESOURCES:
            growth = self._judge(slot, state, resource)
            if growth is None:
                state.found.pop(resource, None)  # it stopped growing: a warm-up after all, not a leak
                continue
            state.found[resource] = growth
            if resource not in state.told:
                state.told.add(resource)
                new.append(growth)
        return new

    def forget(self, live_slots: set[int]) -> None:
        for slot in self._slots.keys() - live_slots:
            del self._slots[slot]

    def found(self) -> tuple[Growth, ...]:
        return tuple(growth for _, state in sorted(self._slots.items()) for _, growth in sorted(state.found.items()))

    def _judge(self, slot: int, state: _Worker, resource: str) -> Growth | None:
        assert state.base is not None
        base_served, base_readings = state.base
        base = base_readings.get(resource)
        last_served, last_readings = state.idle[-1]
        last = last_readings.get(resource)
        # The cheap tests first: most rounds of most workers end here, before any pass over the samples.
        if base is None or last is None or len(state.idle) < MIN_IDLE_SAMPLES:
            return None
        served = last_served - base_served
        grown = last - base
        if served < MIN_SERVED or grown < MIN_GROWTH[resource]:
            return None
        samples = [(at, value) for at, readings in state.idle if (value := readings.get(resource)) is not None]
        if len(samples) < MIN_IDLE_SAMPLES:
            return None
        points = [(base_served, base), *samples]
        fitted = _fit([float(x) for x, _ in points], [float(y) for _, y in points])
        if fitted is None or fitted[1] < MIN_CORRELATION or fitted[0] <= 0:
            return None
        middle = base_served + served / 2
        at_middle = min(points, key=lambda point: abs(point[0] - middle))
        if last - at_middle[1] < STILL_RISING * grown:
            return None
        return Growth(
            slot=slot,
            pid=state.pid,
            resource=resource,
            at_ready=base,
            now=last,
            served=served,
            per_1000=round(grown / served * 1000, 1),
            kinds=self._kinds(state) if resource == "open_fds" else "",
        )

    def _kinds(self, state: _Worker) -> str:
        now = time.monotonic()
        if now - state.kinds_at >= KINDS_EVERY:
            state.kinds, state.kinds_at = descriptor_kinds(state.pid, self._proc), now
        return state.kinds


def descriptor_kinds(pid: int, proc: str = "/proc") -> str:
    """What a process's open descriptors are, counted by kind ("310 files, 12 sockets, 2 pipes"); "" when
    they cannot be read."""
    kinds: Counter[str] = Counter()
    try:
        names = os.listdir(f"{proc}/{pid}/fd")
    except OSError:
        return ""
    for name in names:
        try:
            target = os.readlink(f"{proc}/{pid}/fd/{name}")
        except OSError:
            continue  # closed since the listing
        if target.startswith("socket:"):
            kinds["sockets"] += 1
        elif target.startswith("pipe:"):
            kinds["pipes"] += 1
        elif target.startswith("anon_inode:"):
            kinds["anonymous (eventfd, epoll, timerfd)"] += 1
        elif target.startswith("/dev/"):
            kinds["devices"] += 1
        else:
            kinds["files"] += 1
    return ", ".join(
        f"{count} {kind if count != 1 else _ONE.get(kind, kind)}"
        for kind, count in sorted(kinds.items(), key=lambda item: (-item[1], item[0]))
    )


_ONE = {"sockets": "socket", "pipes": "pipe", "devices": "device", "files": "file"}


def log_growth(growth: Growth, max_requests: int, fd_limit: int | None) -> None:
    """Said once per worker and resource, when the master first finds it growing."""
    LOG.warning("gunicorn-insight: %s: a leak. To %s", growth.what(), growth.fix(max_requests, fd_limit))
