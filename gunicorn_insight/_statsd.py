"""StatsD export from the master: one batched pipeline per round, never an exception into gunicorn.

The ``statsd`` package carries the datagrams (its pipeline packs lines into datagrams up to 1432 bytes);
this module adds DogStatsD tags, unix datagram sockets, name resolution that retries, and warnings that
are rate limited instead of a traceback per failed send.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import statsd

from ._drain import Round
from ._safety import RateLimitedLog

MAX_DATAGRAM = 1432
RESOLVE_EVERY = 60.0
_WARN = RateLimitedLog()


class _Pipeline(statsd.client.udp.Pipeline):  # type: ignore[misc]
    """A stat name may carry its tags after ``|#``; they belong after the type in the datagram."""

    def _prepare(self, stat: str, value: str, rate: float) -> str:
        name, _, tags = stat.partition("|#")
        line: str = super()._prepare(name, value, rate)
        return f"{line}|#{tags}" if tags else line


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
        clock: Any = time.monotonic,
    ) -> None:
        self.target = target
        self._prefix = f"{prefix.rstrip('.')}." if prefix else ""
        self._tags = ",".join(filter(None, (part.strip() for part in constant_tags.split(","))))
        self._tagged = tagged
        self._send_requests = send_request_metrics
        self._limit = connections_limit
        self._clock = clock
        self._client: _Client | None = None
        self._resolved_at = 0.0

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
        """A value per slot or per cause: a DogStatsD tag when tags are on, else a part of the name."""
        return self._name(tagged, f"{tag}:{value}") if self._tagged else self._name(dotted.format(value))

    def publish(self, facts: Round) -> None:
        client = self._ensure_client()
        if client is None:
            return
        pipe = client.pipeline()
        if self._send_requests:
            self._request_lines(pipe, facts)
        name, split = self._name, self._split
        if facts.slow:
            pipe.incr(name("gunicorn.slow_requests"), facts.slow)
        for cause, count in sorted(facts.exits.items()):
            pipe.incr(split("gunicorn.worker.exit.{}", "gunicorn.worker.exit", "cause", cause), count)
        pipe.gauge(name("gunicorn.workers"), facts.workers)
        pipe.gauge(name("gunicorn.requests_in_flight"), facts.in_flight)
        pipe.gauge(name("gunicorn.connections"), facts.total_connections)
        pipe.gauge(name("gunicorn.worker.connections_limit"), self._limit)
        for slot, connections in sorted(facts.connections.items()):
            pipe.gauge(split("gunicorn.worker.{}.connections", "gunicorn.worker.connections", "worker", slot),
                       connections)
            pipe.gauge(split("gunicorn.worker.{}.memory", "gunicorn.worker.memory", "worker", slot),
                       facts.memory.get(slot, 0))
        pipe.send()

    def _request_lines(self, pipe: Any, facts: Round) -> None:
        name = self._name
        total = facts.total_requests
        if total:
            pipe.incr(name("gunicorn.requests"), total)
        by_status: dict[int, int] = {}
        for (_method, status), count in facts.requests.items():
            by_status[status] = by_status.get(status, 0) + count
        for status, count in sorted(by_status.items()):
            pipe.incr(name(f"gunicorn.request.status.{status or 'unknown'}"), count)
        duration = name("gunicorn.request.duration")
        for durations in facts.durations.values():
            for seconds in durations:
                pipe.timing(duration, seconds * 1000.0)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
