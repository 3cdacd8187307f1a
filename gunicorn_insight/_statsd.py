"""StatsD export from the master: one batched pipeline per round, never an exception into gunicorn.

The ``statsd`` package carries the datagrams (its pipeline packs lines into datagrams up to 1432 bytes);
this module adds DogStatsD tags, unix datagram sockets, name resolution that retries, and warnings that
are rate limited instead of a traceback per failed send.
"""

from __future__ import annotations

import logging
import random
import re
import socket
import time
from collections.abc import Sequence
from itertools import chain
from typing import Any

import statsd

from ._drain import Round
from ._safety import RateLimitedLog

MAX_DATAGRAM = 1432
_WIDEST_MS = 12  # "%.3f" of a duration under 27 hours, the newline, and the 4 of "%.3f" as slack
RESOLVE_EVERY = 60.0
_WARN = RateLimitedLog()
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_./-]")


_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def clean_tag(value: str) -> str:
    """Tag values must not carry the datagram's separators (``,|:#``) or spaces."""
    return _TAG_UNSAFE.sub("_", value)


def name_part(value: str) -> str:
    """One level of a dotted name: no dots (they would add Graphite levels) and no separators."""
    return _NAME_UNSAFE.sub("_", value).strip("_")


class _Pipeline(statsd.client.udp.Pipeline):  # type: ignore[misc]
    """A stat name may carry its tags after ``|#``; they belong after the type in the datagram."""

    def _prepare(self, stat: str, value: str, rate: float) -> str:
        name, _, tags = stat.partition("|#")
        line: str = super()._prepare(name, value, rate)
        return f"{line}|#{tags}" if tags else line

    def timings(self, stat: str, seconds: Sequence[float], limit: int = 0) -> None:
        """Timer lines for many values, a datagram's worth at a time: one ``%`` formatting per datagram
        instead of a string per value. A round can carry thousands of values, one per request.

        Past ``limit`` values (0: none), ``limit`` of them are sent: a uniform random sample plus the
        fastest and the slowest, each line marked ``|@rate`` with rate = limit / values, so that an
        aggregator's count (values / rate) is the exact number of requests.
        """
        name, _, tags = stat.replace("%", "%%").partition("|#")
        rate = ""
        if 2 <= limit < len(seconds):
            rate = "|@" + f"{limit / len(seconds):.9f}".rstrip("0")  # plain digits: statsd reads no exponent
            seconds = [*random.sample(seconds, limit - 2), min(seconds), max(seconds)]
        line = f"{name}:%.3f|ms{rate}|#{tags}" if tags else f"{name}:%.3f|ms{rate}"
        per_datagram = max(1, MAX_DATAGRAM // (len(line) + _WIDEST_MS))
        template = "\n".join([line] * per_datagram)
        milliseconds = [value * 1000.0 for value in seconds]
        for start in range(0, len(milliseconds), per_datagram):
            chunk = tuple(milliseconds[start : start + per_datagram])
            self._stats.append((template if len(chunk) == per_datagram else "\n".join([line] * len(chunk))) % chunk)


class _Client(statsd.StatsClient):  # type: ignore[misc]
    """UDP client whose send errors are counted and reported instead of silently dropped."""

    errors = 0

    def _send(self, data: str) -> None:
        try:
            self._sock.sendto(data.encode("ascii", "replace"), self._addr)
        except OSError as error:
            self.errors += 1
            _WARN("statsd-send", logging.WARNING, f"StatsD send to {self._addr} failed: {error}")

    def pipeline(self) -> _Pipeline:
        return _Pipeline(self)


class _UnixClient(_Client):
    """The statsd package's client sending to a unix datagram socket."""

    def __init__(self, path: str) -> None:  # the package's unix client is a stream socket; we need datagrams
        self._addr = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._prefix = None
        self._maxudpsize = MAX_DATAGRAM


def _connect(target: tuple[str, int] | str) -> _Client:
    if isinstance(target, str):
        return _UnixClient(target)
    host, port = target
    return _Client(host, port, maxudpsize=MAX_DATAGRAM, ipv6=":" in host)


class StatsdSink:
    """Formats a :class:`Round` as StatsD lines. Names follow gunicorn's own instrumentation."""

    def __init__(
        self,
        target: tuple[str, int] | str,
        *,
        prefix: str,
        constant_tags: str,
        tagged: bool,
        send_request_metrics: bool,
        connections_limit: int,
        timers_per_second: int = 0,
        interval: float = 0.5,
        clock: Any = time.monotonic,
    ) -> None:
        self.target = target
        self._prefix = f"{prefix.rstrip('.')}." if prefix else ""
        self._tags = ",".join(filter(None, (part.strip() for part in constant_tags.split(","))))
        self._tagged = tagged
        self._send_requests = send_request_metrics
        self._limit = connections_limit
        self._timers_per_second = timers_per_second
        self._interval = interval
        self._last_round_at: float | None = None
        self._clock = clock
        self._client: _Client | None = None
        self._resolved_at = 0.0
        self._last_busy: float | None = None

    def _name(self, name: str, tags: str = "") -> str:
        tags = ",".join(filter(None, (tags, self._tags)))
        return f"{self._prefix}{name}|#{tags}" if tags else f"{self._prefix}{name}"

    def _ensure_client(self) -> _Client | None:
        now = self._clock()
        if self._client is not None and now - self._resolved_at < RESOLVE_EVERY:
            return self._client
        try:
            client = _connect(self.target)
        except OSError as error:
            _WARN("statsd-resolve", logging.WARNING,
                  f"cannot reach StatsD at {self.target!r} ({error}); metrics are dropped until it resolves")
            return self._client  # keep using the last good address if we ever had one
        if self._client is not None:
            self._client.close()
        self._client, self._resolved_at = client, now
        return client

    def _split(self, dotted: str, tagged: str, tag: str, value: object) -> str:
        """A value per slot, cause or listener: a DogStatsD tag when tags are on, else one level of the name."""
        text = str(value)
        if self._tagged:
            return self._name(tagged, f"{tag}:{clean_tag(text)}")
        return self._name(dotted.format(name_part(text)))

    def publish(self, facts: Round) -> None:
        client = self._ensure_client()
        if client is None:
            return
        pipe = client.pipeline()
        elapsed = self._since_last_round(facts)
        timers = self._timer_limit(elapsed)
        if self._send_requests:
            self._request_lines(pipe, facts, timers)
        name, split = self._name, self._split
        for metric, count in (("gunicorn.slow_requests", facts.slow),
                              ("gunicorn.request.queue_invalid", facts.queue_invalid),
                              ("gunicorn.listen_overflows", facts.listen_overflows)):
            if count:
                pipe.incr(name(metric), count)
        pipe.timings(name("gunicorn.request.queue"), facts.queue_times, timers)
        for cause, count in sorted(facts.exits.items()):
            pipe.incr(split("gunicorn.worker.exit.{}", "gunicorn.worker.exit", "cause", cause), count)
        for metric, value in (("gunicorn.workers", facts.workers), ("gunicorn.workers_busy", facts.busy_workers),
                              ("gunicorn.capacity", facts.capacity), ("gunicorn.requests_in_flight", facts.in_flight),
                              ("gunicorn.requests_waiting", facts.waiting),
                              ("gunicorn.connections", facts.total_connections),
                              ("gunicorn.worker.connections_limit", self._limit),
                              ("gunicorn.utilization", self._utilization(facts, elapsed))):
            pipe.gauge(name(metric), value)
        for listener, (queued, limit) in sorted(facts.listeners.items()):
            pipe.gauge(split("gunicorn.listener.{}.backlog", "gunicorn.listen_backlog", "listener", listener), queued)
            pipe.gauge(split("gunicorn.listener.{}.backlog_max", "gunicorn.listen_backlog_max", "listener", listener),
                       limit)
        for slot, connections in sorted(facts.connections.items()):
            pipe.gauge(split("gunicorn.worker.{}.connections", "gunicorn.worker.connections", "worker", slot),
                       connections)
            pipe.gauge(split("gunicorn.worker.{}.memory", "gunicorn.worker.memory", "worker", slot),
                       facts.memory.get(slot, 0))
        pipe.send()

    def _since_last_round(self, facts: Round) -> float | None:
        """Seconds since the previous round (a scrape can start one early); None for the first one."""
        previous, self._last_round_at = self._last_round_at, facts.at
        return facts.at - previous if previous is not None and facts.at > previous else None

    def _utilization(self, facts: Round, elapsed: float | None) -> float:
        """Busy request-seconds per second of capacity since the last round: the StatsD view of
        rate(gunicorn_worker_busy_seconds_total) / gunicorn_capacity."""
        busy = sum(facts.busy_seconds.values())
        previous, self._last_busy = self._last_busy, busy
        if elapsed is None or previous is None or not facts.capacity:
            return 0.0
        return round(max(0.0, busy - previous) / (elapsed * facts.capacity), 4)

    def _timer_limit(self, elapsed: float | None) -> int:
        """Values per timer metric this round may carry: the per-second cap times the round's length.
        0: no cap."""
        if not self._timers_per_second:
            return 0
        return max(2, round(self._timers_per_second * (self._interval if elapsed is None else elapsed)))

    def _request_lines(self, pipe: Any, facts: Round, timers: int) -> None:
        name = self._name
        if self._tagged:
            for (method, status, route), count in sorted(facts.requests.items()):
                pipe.incr(name("gunicorn.requests", self._request_tags(method, status, route)), count)
            for (method, route), durations in facts.durations.items():
                pipe.timings(name("gunicorn.request.duration", self._request_tags(method, None, route)), durations,
                             timers)
            return
        total = facts.total_requests
        if total:
            pipe.incr(name("gunicorn.requests"), total)
        by_status: dict[int, int] = {}
        for (_method, status, _route), count in facts.requests.items():
            by_status[status] = by_status.get(status, 0) + count
        for status, count in sorted(by_status.items()):
            pipe.incr(name(f"gunicorn.request.status.{status or 'unknown'}"), count)
        duration = name("gunicorn.request.duration")
        # One timer for every method and route: their durations are one population to sample from.
        pipe.timings(duration, list(chain.from_iterable(facts.durations.values())), timers)

    @staticmethod
    def _request_tags(method: str, status: int | None, route: str) -> str:
        tags = [f"method:{clean_tag(method)}"]
        if status is not None:
            tags.append(f"status:{status or 'unknown'}")
        if route:
            tags.append(f"route:{clean_tag(route)}")
        return ",".join(tags)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
