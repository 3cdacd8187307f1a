"""StatsD export from the master: one batched pipeline per round, never an exception into gunicorn.

The protocol is lines of ``name:value|type[|@rate][|#tags]``, packed into datagrams of at most 1432 bytes;
this module writes them itself (no StatsD client library, so no private API of one), with DogStatsD tags,
unix datagram sockets, name resolution off the exporter's path, and warnings that are rate limited instead
of a traceback per failed send.

``publish`` runs under the master's round lock, which every worker fork waits for, so it never looks a
name up, connects or blocks: a host name is resolved by :class:`Resolver` in a thread of its own, and
datagrams go out of a non-blocking socket to the last address it found.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import threading
from collections.abc import Sequence
from itertools import chain
from typing import Any

from .._facts import Round, status_label
from .._report import RateLimitedLog

MAX_DATAGRAM = 1432
_WIDEST_MS = 12  # "%.3f" of a duration under 27 hours, the newline, and the 4 of "%.3f" as slack
_MAX_NAMES = 10_000  # finished names a sink remembers (see StatsdSink._names)
RESOLVE_EVERY = 60.0
"""Seconds between two lookups of a name that resolved: a moved aggregator is followed within a minute."""
RETRY_FIRST = 1.0
RETRY_MAX = 60.0
"""A lookup that failed is retried after RETRY_FIRST seconds, doubling up to RETRY_MAX."""
_WARN = RateLimitedLog()
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_./-]")


_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def clean_tag(value: str) -> str:
    """Tag values must not carry the datagram's separators (``,|:#``) or spaces."""
    return _TAG_UNSAFE.sub("_", value)


def name_part(value: str) -> str:
    """One level of a dotted name: no dots (they would add Graphite levels) and no separators."""
    return _NAME_UNSAFE.sub("_", value).strip("_")


class _Pipeline:
    """StatsD lines collected for one round, sent packed into datagrams of at most MAX_DATAGRAM bytes.

    A stat name may carry its DogStatsD tags after ``|#``; they go after the type in the line.
    """

    def __init__(self, client: _Client) -> None:
        self._client = client
        self._stats: list[str] = []

    def _add(self, stat: str, value: str) -> None:
        name, _, tags = stat.partition("|#")
        self._stats.append(f"{name}:{value}|#{tags}" if tags else f"{name}:{value}")

    def incr(self, stat: str, count: float = 1) -> None:
        self._add(stat, f"{count}|c")

    def gauge(self, stat: str, value: float) -> None:
        """Every gauge of ours is 0 or more: a leading ``-`` would mean "change by" in the protocol."""
        self._add(stat, f"{value}|g")

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

    def send(self) -> None:
        """Lines joined by newlines, a new datagram before one would pass MAX_DATAGRAM bytes."""
        datagram = ""
        for stat in self._stats:
            if datagram and len(datagram) + 1 + len(stat) > MAX_DATAGRAM:
                self._client._send(datagram)
                datagram = stat
            else:
                datagram = f"{datagram}\n{stat}" if datagram else stat
        if datagram:
            self._client._send(datagram)
        self._stats.clear()


class _Client:
    """Datagrams to one numeric address from a non-blocking socket; send errors are counted and reported
    instead of silently dropped. Constructed from an address already found: it never looks a name up."""

    errors = 0

    def __init__(self, family: int, address: Any) -> None:
        self._addr = address
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.setblocking(False)  # a full send buffer drops a datagram instead of stalling the round

    def _send(self, data: str) -> None:
        try:
            self._sock.sendto(data.encode("ascii", "replace"), self._addr)
        except OSError as error:
            self.errors += 1
            _WARN("statsd-send", logging.WARNING, f"StatsD send to {self._addr} failed: {error}")

    def pipeline(self) -> _Pipeline:
        return _Pipeline(self)

    def close(self) -> None:
        self._sock.close()


def _numeric(host: str, port: int) -> tuple[int, Any] | None:
    """The address of an IP literal, found without any lookup; None for a name."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST)[
            0
        ]
    except (OSError, IndexError):
        return None
    return family, address


class Resolver:
    """Looks a StatsD host name up in a thread of its own and keeps the last address that worked.

    The exporter reads :attr:`address` (one attribute, replaced whole) and never waits for a lookup. A
    lookup can hang for as long as the system resolver's timeouts (``options timeout:`` and ``attempts:``
    in resolv.conf), which is why it must not run where a fork waits.

    Fork safety: the thread holds no lock of ours and does no logging; it only calls ``getaddrinfo`` and
    assigns attributes. A forked worker never uses it (the sink is closed in the child), and a process
    forked from the master (gunicorn's ``--daemon``) starts its own thread at its next :meth:`poke`.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.address: tuple[int, Any] | None = None
        """(family, sockaddr) of the last successful lookup."""
        self.error: str | None = None
        """Why the last lookup failed; None after a success."""
        self.lookups = 0
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._owner = 0

    def poke(self) -> None:
        """Make sure a lookup thread runs in this process (cheap; called every round)."""
        if self._stopped or (self._owner == os.getpid() and self._thread is not None and self._thread.is_alive()):
            return
        self._owner = os.getpid()
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._wake,), name="gunicorn-insight-statsd-dns", daemon=True
        )
        self._thread.start()

    def _run(self, wake: threading.Event) -> None:
        backoff = RETRY_FIRST
        owner = os.getpid()
        while not self._stopped and owner == os.getpid():
            self.lookups += 1
            try:
                family, _, _, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
            except (OSError, IndexError, UnicodeError) as error:
                self.error = str(error) or type(error).__name__
                wait, backoff = backoff, min(RETRY_MAX, backoff * 2)
            else:
                self.address, self.error = (family, address), None
                wait, backoff = RESOLVE_EVERY, RETRY_FIRST
            if wake.wait(wait):
                return

    def stop(self) -> None:
        """Never waits: a thread stuck in a lookup is a daemon thread and ends with the process."""
        self._stopped = True
        self._wake.set()


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
        self._client: _Client | None = None
        self._last_busy: float | None = None
        self._totals: dict[str, float] = {}
        # Finished names by what they are made of: a round sends the same few hundred (several per worker slot),
        # and formatting them again was a third of the round's StatsD work with 80 workers.
        self._names: dict[tuple[object, ...], str] = {}
        self.dropped_rounds = 0
        """Rounds not sent because the host name has never resolved."""
        self.resolver: Resolver | None = None
        if isinstance(target, str):
            self._client = _Client(socket.AF_UNIX, target)  # the package's unix client is a stream socket
        else:
            numeric = _numeric(*target)
            if numeric is not None:
                self._client = _Client(*numeric)
            else:
                self.resolver = Resolver(*target)
                self.resolver.poke()

    def _name(self, name: str, tags: str = "") -> str:
        found = self._names.get((name, tags))
        return self._remember((name, tags), self._format(name, tags)) if found is None else found

    def _format(self, name: str, tags: str) -> str:
        joined = ",".join(filter(None, (tags, self._tags)))
        plain = f"{self._prefix}{name}"
        return f"{plain}|#{joined}" if joined else plain

    def _remember(self, key: tuple[object, ...], name: str) -> str:
        # The parts come from bounded sets (slots, causes, listeners, routes under max_routes); a cap all the same.
        if len(self._names) >= _MAX_NAMES:
            self._names.clear()
        self._names[key] = name
        return name

    def _ensure_client(self) -> _Client | None:
        """The client for the resolver's latest address; never waits for a lookup."""
        resolver = self.resolver
        if resolver is None:
            return self._client
        resolver.poke()
        found = resolver.address
        if found is None:
            self.dropped_rounds += 1
            why = resolver.error or "the first lookup has not answered yet"
            _WARN(
                "statsd-resolve",
                logging.WARNING,
                f"cannot reach StatsD at {resolver.host}:{resolver.port}: the name does not resolve ({why}); "
                f"metrics are dropped until it does ({self.dropped_rounds} rounds so far). Check the name "
                "and the DNS server in /etc/resolv.conf, or give statsd an IP address",
            )
            return None
        if resolver.error is not None:
            _WARN(
                "statsd-re-resolve",
                logging.WARNING,
                f"looking up StatsD host {resolver.host} fails ({resolver.error}); still sending to its last "
                f"address {found[1][0]}",
            )
        if self._client is None or self._client._addr != found[1]:
            if self._client is not None:
                self._client.close()
            self._client = _Client(*found)
        return self._client

    def _split(self, dotted: str, tagged: str, tag: str, value: object) -> str:
        """A value per slot, cause or listener: a DogStatsD tag when tags are on, else one level of the name."""
        key = (dotted, tagged, tag, value)
        found = self._names.get(key)
        if found is None:
            text = str(value)
            found = self._remember(
                key,
                self._format(tagged, f"{tag}:{clean_tag(text)}")
                if self._tagged
                else self._format(dotted.format(name_part(text)), ""),
            )
        return found

    def publish(self, facts: Round) -> None:
        client = self._ensure_client()
        if client is None:
            return
        pipe = client.pipeline()
        elapsed = self._since_last_round(facts)
        timers = self._timer_limit(elapsed)
        if self._send_requests:  # else gunicorn's statsd logger sends these, and gunicorn.log.*, itself
            self._request_lines(pipe, facts, timers)
            for level, count in sorted(facts.log_lines.items()):
                pipe.incr(self._name(f"gunicorn.log.{level}"), count)
        name, split = self._name, self._split
        for metric, count in (
            ("gunicorn.slow_requests", facts.slow),
            ("gunicorn.request.queue_invalid", facts.queue_invalid),
            ("gunicorn.listen_overflows", facts.listen_overflows),
        ):
            if count:
                pipe.incr(name(metric), count)
        pipe.timings(name("gunicorn.request.queue"), facts.queue_times, timers)
        for cause, count in sorted(facts.exits.items()):
            pipe.incr(split("gunicorn.worker.exit.{}", "gunicorn.worker.exit", "cause", cause), count)
        for reason, count in sorted(facts.rejected.items()):
            pipe.incr(split("gunicorn.request.rejected.{}", "gunicorn.request.rejected", "reason", reason), count)
        if self._tagged and self._send_requests:
            self._worker_states(pipe, facts)
        else:  # gunicorn's statsd logger sends the name untagged: a tagged pair beside it would double a sum
            pipe.gauge(name("gunicorn.workers"), facts.workers)
        for metric, value in (
            ("gunicorn.workers_busy", facts.busy_workers),
            ("gunicorn.capacity", facts.capacity),
            ("gunicorn.requests_in_flight", facts.in_flight),
            ("gunicorn.requests_waiting", facts.waiting),
            ("gunicorn.connections", facts.total_connections),
            ("gunicorn.worker.connections_limit", self._limit),
            ("gunicorn.utilization", self._utilization(facts, elapsed)),
        ):
            pipe.gauge(name(metric), value)
        self._listener_lines(pipe, facts)
        self._lifecycle_lines(pipe, facts, timers)
        self._pressure_lines(pipe, facts)
        for slot, connections in sorted(facts.connections.items()):
            pipe.gauge(
                split("gunicorn.worker.{}.connections", "gunicorn.worker.connections", "worker", slot), connections
            )
            pipe.gauge(
                split("gunicorn.worker.{}.memory", "gunicorn.worker.memory", "worker", slot), facts.memory.get(slot, 0)
            )
        pipe.send()

    def _listener_lines(self, pipe: Any, facts: Round) -> None:
        split = self._split
        for listener, (queued, limit) in sorted(facts.listeners.items()):
            pipe.gauge(split("gunicorn.listener.{}.backlog", "gunicorn.listen_backlog", "listener", listener), queued)
            pipe.gauge(
                split("gunicorn.listener.{}.backlog_max", "gunicorn.listen_backlog_max", "listener", listener), limit
            )
        for listener, seconds in sorted(facts.unserved.items()):
            pipe.gauge(
                split(
                    "gunicorn.listener.{}.unserved_seconds", "gunicorn.listen_unserved_seconds", "listener", listener
                ),
                seconds,
            )
        for listener, closed in sorted(facts.time_wait.items()):
            pipe.gauge(
                split("gunicorn.listener.{}.time_wait", "gunicorn.listen_time_wait", "listener", listener), closed
            )
        for listener, dropped in sorted(facts.listen_drops.items()):
            if dropped:
                pipe.incr(split("gunicorn.listener.{}.drops", "gunicorn.listen_drops", "listener", listener), dropped)

    def _lifecycle_lines(self, pipe: Any, facts: Round, timers: int) -> None:
        name = self._name
        for metric, count in (("gunicorn.stalls", facts.stalls), ("gunicorn.worker.crash_loops", facts.crash_loops)):
            if count:
                pipe.incr(name(metric), count)
        for metric, value in (
            ("gunicorn.workers_ready", facts.ready_workers),
            ("gunicorn.workers_booting", facts.booting_workers),
            ("gunicorn.stalled_requests", facts.stalled_requests),
            ("gunicorn.worker.crash_loop", int(facts.crash_loop)),
        ):
            pipe.gauge(name(metric), value)
        pipe.timings(name("gunicorn.worker.boot_duration"), facts.boot_durations, timers)
        if facts.desired_workers is not None:
            pipe.gauge(name("gunicorn.workers_desired"), facts.desired_workers)
        if facts.master_loop_stuck is not None:
            pipe.gauge(name("gunicorn.master.loop_stuck_ms"), round(facts.master_loop_stuck * 1000))

    def _increase(self, key: str, total: float) -> float:
        """What a kernel counter (an absolute total) gained since the previous round; 0 the first time."""
        previous = self._totals.get(key)
        self._totals[key] = total
        return max(0.0, total - previous) if previous is not None else 0.0

    def _pressure_lines(self, pipe: Any, facts: Round) -> None:
        """Kernel counters as StatsD counters (what they gained this round); absent readings send nothing."""
        name, split, increase = self._name, self._split, self._increase
        host = facts.host
        if host is not None:
            throttling = host.throttling
            if throttling is not None:
                pipe.incr(name("gunicorn.cgroup.cpu.periods"), int(increase("periods", throttling.periods)))
                pipe.incr(
                    name("gunicorn.cgroup.cpu.throttled_periods"),
                    int(increase("throttled_periods", throttling.throttled_periods)),
                )
                pipe.incr(
                    name("gunicorn.cgroup.cpu.throttled_ms"),
                    round(increase("throttled", throttling.throttled_seconds) * 1000),
                )
            for metric, value in (
                ("gunicorn.cgroup.cpu.quota_cores", host.quota_cores),
                ("gunicorn.cgroup.memory.usage", host.memory_usage),
                ("gunicorn.cgroup.memory.working_set", host.memory_working_set),
                ("gunicorn.cgroup.memory.limit", host.memory_limit),
                ("gunicorn.cgroup.pids", host.pids),
                ("gunicorn.cgroup.pids_limit", host.pids_limit),
            ):
                if value is not None:
                    pipe.gauge(name(metric), value)
            for (resource, kind), seconds in sorted(host.pressure.items()):
                dotted = {"some": "waiting", "full": "stalled"}.get(kind)
                if dotted is None:
                    continue
                pipe.incr(
                    split(
                        f"gunicorn.pressure.{{}}.{dotted}_ms", f"gunicorn.pressure.{dotted}_ms", "resource", resource
                    ),
                    round(increase(f"psi.{resource}.{kind}", seconds) * 1000),
                )
        self._worker_process_lines(pipe, facts)

    def _worker_process_lines(self, pipe: Any, facts: Round) -> None:
        """What /proc says of each worker: context switches gained this round, swap and file descriptors."""
        for slot, (voluntary, involuntary) in sorted(facts.context_switches.items()):
            for kind, total in (("voluntary", voluntary), ("involuntary", involuntary)):
                gained = int(self._increase(f"switches.{slot}.{kind}", total))
                if not gained:
                    continue
                if self._tagged:
                    pipe.incr(self._name("gunicorn.worker.context_switches", f"worker:{slot},kind:{kind}"), gained)
                else:
                    pipe.incr(self._name(f"gunicorn.worker.{slot}.context_switches.{kind}"), gained)
        for metric, readings in (
            ("swap", facts.swap),
            ("open_fds", facts.open_fds),
            ("max_fds", facts.fd_limits),
            ("threads", facts.threads),
        ):
            for slot, value in sorted(readings.items()):
                pipe.gauge(
                    self._split(f"gunicorn.worker.{{}}.{metric}", f"gunicorn.worker.{metric}", "worker", slot), value
                )

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
                pipe.timings(
                    name("gunicorn.request.duration", self._request_tags(method, None, route)), durations, timers
                )
            for (method, route), count in sorted(facts.client_closed.items()):
                pipe.incr(name("gunicorn.requests.client_closed", self._request_tags(method, None, route)), count)
            for (method, status, route), seconds in sorted(facts.request_cpu.items()):
                pipe.incr(
                    name("gunicorn.request.cpu_ms", self._request_tags(method, status, route)), round(seconds * 1000)
                )
            self._status_lines(pipe, facts)
            return
        total = facts.total_requests
        if total:
            pipe.incr(name("gunicorn.requests"), total)
        closed = sum(facts.client_closed.values())
        if closed:
            pipe.incr(name("gunicorn.requests.client_closed"), closed)
        cpu = round(sum(facts.request_cpu.values()), 6)
        if cpu:
            pipe.incr(name("gunicorn.request.cpu"), cpu)
        self._status_lines(pipe, facts)
        duration = name("gunicorn.request.duration")
        # One timer for every method and route: their durations are one population to sample from.
        pipe.timings(duration, list(chain.from_iterable(facts.durations.values())), timers)

    def _status_lines(self, pipe: Any, facts: Round) -> None:
        """``gunicorn.request.status.<code>``: gunicorn's own name, which Datadog's gunicorn integration and
        its dashboard read. In DogStatsD mode too, with only the constant tags: the status is in the name."""
        by_status: dict[int, int] = {}
        for (_method, status, _route), count in facts.requests.items():
            by_status[status] = by_status.get(status, 0) + count
        for status, count in sorted(by_status.items()):
            pipe.incr(self._name(f"gunicorn.request.status.{status_label(status)}"), count)

    def _worker_states(self, pipe: Any, facts: Round) -> None:
        """DogStatsD mode: ``gunicorn.workers`` tagged ``state:working`` and ``state:idle``, the form Datadog's
        gunicorn integration documents (its dashboard sums them by state; their sum is the live workers)."""
        pipe.gauge(self._name("gunicorn.workers", "state:working"), facts.busy_workers)
        pipe.gauge(self._name("gunicorn.workers", "state:idle"), max(0, facts.workers - facts.busy_workers))

    @staticmethod
    def _request_tags(method: str, status: int | None, route: str) -> str:
        tags = [f"method:{clean_tag(method)}"]
        if status is not None:
            tags.append(f"status:{status_label(status)}")
        if route:
            tags.append(f"route:{clean_tag(route)}")
        return ",".join(tags)

    def forget_process(self, pid: int) -> None:
        """StatsD keeps nothing per process: a dead worker leaves nothing to fold."""

    def close(self) -> None:
        if self.resolver is not None:
            self.resolver.stop()
        if self._client is not None:
            self._client.close()
            self._client = None
