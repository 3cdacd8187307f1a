"""Turn the scoreboard into one round of facts. Every exporter reads the same :class:`Round`.

This is the single place where a number is computed: the StatsD and Prometheus sinks only format it.
"""

from __future__ import annotations

import logging
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from itertools import filterfalse
from math import isnan
from typing import Any

from .. import _scoreboard as sb
from .._facts import NO_RESPONSE, Round
from .._proc import cpu_seconds
from .._report import RateLimitedLog

_SWAP = sys.byteorder != "little"  # the ring is little-endian; arrays use the machine's order
# What workers write for "none" (no queue header, no CPU time of its own). Another NaN does not match it: the
# column is then read value by value, where isnan() tells any NaN.
_NAN = array("d", [sb.NO_QUEUE_TIME]).tobytes()


def _method_name(method: int) -> str:
    return sb.METHODS[method] if method < len(sb.METHODS) else "other"


def _status(key: int) -> int:
    """The status in a ring record's key (see sb.RING): RING_NO_RESPONSE is the request nobody answered."""
    status = key & 0xFFFF
    return NO_RESPONSE if status == sb.RING_NO_RESPONSE else status


def _group(key: int, label_of: dict[int, str]) -> tuple[str, int, str]:
    """(method, status, route label) of a ring record's key (see sb.RING)."""
    return (_method_name(key >> 16 & 0xFFFF), _status(key), label_of[key >> 32 & 0xFFFF])


def _each_is(values: array[Any], item: bytes) -> bool:
    """Whether every value of a ring column is ``item`` (its bytes): one comparison of bytes, where looking at
    each value boxes it."""
    return values.tobytes() == item * len(values)


def _tally(keys: array[int]) -> Counter[int]:
    """How many records carry each key; a slot's round usually has one key (one route, one status)."""
    if keys and _each_is(keys, keys[:1].tobytes()):
        return Counter({keys[0]: len(keys)})
    return Counter(keys)


class Drainer:
    """Keeps a read cursor per slot; each :meth:`collect` returns what is new since the last one."""

    def __init__(self, board: sb.Scoreboard, max_routes: int = 0, *, by_status: bool = False) -> None:
        self._board = board
        self._by_status = by_status
        slots = range(board.slots)
        self._cursors = [board.head(index) for index in slots]
        self._slow_cursors = [board.slow(index) for index in slots]
        self._log_cursors = [board.log_lines(index) for index in slots]
        self._reject_cursors = [board.rejected(index) for index in slots]
        self._seen: set[int] = set()
        # Free slots drained since they became free, and the generation they were in then: nothing more to read.
        self._drained_free: dict[int, int] = {}
        self._completed = [0.0 for _ in slots]
        self._busy = [0.0 for _ in slots]
        self._cpu_base = [0.0 for _ in slots]
        self._cpu_pid = [0 for _ in slots]
        self._cpu_last = [0.0 for _ in slots]
        self._cpu_seen: list[float | None] = [None for _ in slots]  # the slot's CPU seconds at the last round
        self._cpu_seen_pid = [0 for _ in slots]  # the worker whose ready moment _cpu_seen started from
        self._unshared: list[dict[tuple[str, int, str], float]] = [{} for _ in slots]
        self._route_names: list[list[str]] = [[] for _ in slots]
        self._boot_seen = [0 for _ in slots]  # the generation whose boot duration was reported
        self._labels: set[str] = set()
        self._max_routes = max_routes

    def drained(self) -> int:
        """Records read from every slot's ring so far: it grows exactly when a request finished somewhere."""
        return sum(self._cursors)

    def collect(self) -> Round:
        board = self._board
        result = Round(at=time.monotonic())
        for index in range(board.slots):
            # Read before the counters: a free slot has no worker left to write to it, so once drained it has
            # nothing new until the master gives it to another worker, which bumps its generation (between two
            # rounds a worker can come and go). Idle slots, most of them (spares for restarts), then cost a
            # round two small reads each.
            start = board.offset(index)
            free = board.buffer[start + sb.OFF_STATE] == sb.FREE
            generation = sb.GENERATION.unpack_from(board.buffer, start)[0] if free else None
            if generation is None or self._drained_free.get(index) != generation:
                self._drain_counters(index, result)
            if generation is not None:
                self._drained_free[index] = generation
                if index in self._seen:
                    self._departed(index, result)
                continue
            self._drained_free.pop(index, None)
            view = board.read(index)
            if view.state == sb.FREE:
                self._departed(index, result)
                continue
            self._seen.add(index)
            result.workers += 1
            self._lifecycle(index, view, result)
            result.in_flight += view.in_flight
            result.slot_in_flight[index] = view.in_flight
            result.served[index] = view.served
            result.waiting += view.waiting
            result.busy_workers += 1 if view.in_flight else 0
            result.connections[index] = view.connections_now
            running = sum(result.at - request.started for request in view.requests)
            result.busy_seconds[index] = self._busy[index] = max(self._busy[index], self._completed[index] + running)
            result.cpu_seconds[index] = used = self._cpu(index, view.pid)
            self._share_worker_cpu(index, used, result, busy=view.in_flight > 0, worker=(view.pid, view.boot_cpu))
        return result

    def _drain_counters(self, index: int, result: Round) -> None:
        """What the slot's workers counted since the last round: requests (the ring), slow requests, log lines and
        rejected requests."""
        board = self._board
        self._drain_ring(index, result)
        slow = board.slow(index)
        if slow > self._slow_cursors[index]:  # a count only grows: a smaller one is a torn read, ignored
            result.slow += slow - self._slow_cursors[index]
            self._slow_cursors[index] = slow
        self._count_increases(board.log_lines(index), self._log_cursors, index, sb.LOG_LEVELS, result.log_lines)
        self._count_increases(board.rejected(index), self._reject_cursors, index, sb.REJECT_REASONS, result.rejected)

    @staticmethod
    def _count_increases(
        totals: tuple[int, ...], cursors: list[tuple[int, ...]], index: int, names: Sequence[str], into: Counter[str]
    ) -> None:
        """Add each of slot ``index``'s counters' increase since the last round to ``into`` under its name. A count
        only grows, across the slot's workers: a smaller one is a torn read, ignored."""
        seen = cursors[index]
        if totals == seen:  # most rounds of most slots: told by one comparison, where the loop costs a call
            return
        kept = list(seen)
        for number, (total, before) in enumerate(zip(totals, seen, strict=True)):
            if total > before:
                into[names[number]] += total - before
                kept[number] = total
        cursors[index] = tuple(kept)

    def _lifecycle(self, index: int, view: sb.SlotView, result: Round) -> None:
        result.pids[index] = view.pid
        if view.state != sb.READY:
            result.booting_workers += 1
            return
        result.ready_workers += 1
        if view.generation != self._boot_seen[index] and view.booted and view.spawned:
            self._boot_seen[index] = view.generation
            result.boot_durations.append(max(0.0, view.booted - view.spawned))

    def _drain_ring(self, index: int, result: Round) -> None:
        board = self._board
        head = board.head(index)
        cursor = self._cursors[index]
        if head <= cursor:
            # Nothing new, or a head read while a writer was storing it (a torn read can show 0 or part of the
            # number): the cursor never moves backwards, so nothing is counted twice or reported lost.
            return
        if head - cursor > board.ring:
            result.lost += head - cursor - board.ring
            cursor = head - board.ring
        # Column-wise: the records are read as arrays of 8-byte words and counted with C-level iteration.
        # A round can carry thousands of records per slot, and a Python loop over them (a tuple of five
        # objects each) was the master's largest per-request cost.
        raw = board.ring_bytes(index, cursor, head)
        doubles, words = array("d", raw), array("Q", raw)
        if _SWAP:
            doubles.byteswap()
            words.byteswap()
        step = sb.RING_WORDS
        keys = words[2::step]  # status | method << 16 | route << 32 | outcome << 48: see sb.RING
        durations = doubles[0::step]
        counts = _tally(keys)
        label_of = self._count(index, counts, result)
        groups = {key >> 16 & 0xFFFFFFFF for key in counts}
        if len(groups) == 1:
            (group,) = groups
            # Sorted once here: the histograms' bucket counts sort each list again, which takes one pass over
            # runs already in order (a list holds one run per slot).
            chunk = durations.tolist()
            chunk.sort()
            self._durations(result, group, label_of).extend(chunk)
        else:
            chunk = None
            for key, duration in zip(keys, durations, strict=True):
                self._durations(result, key >> 16 & 0xFFFFFFFF, label_of).append(duration)
        if self._by_status:
            self._status_durations(result, counts, keys, durations, label_of, chunk=chunk)
        completed = sum(durations)
        self._request_cpu(
            self._unshared[index],
            result,
            counts=counts,
            keys=keys,
            durations=durations,
            total=completed,
            cpus=doubles[3::step],
            label_of=label_of,
        )
        queues = doubles[1::step]
        if not _each_is(queues, _NAN):  # NaN: the request carried no queue header
            for queue in filterfalse(isnan, queues):
                if queue >= 0:
                    result.queue_times.append(queue)
                else:
                    result.queue_invalid += 1
        self._completed[index] += completed
        self._cursors[index] = head

    def _count(self, index: int, counts: Counter[int], result: Round) -> dict[int, str]:
        """Add the records' counts by key to the round; returns the route label of each route number seen."""
        label_of: dict[int, str] = {}
        for key, count in counts.items():
            route = key >> 32 & 0xFFFF
            label = label_of.get(route)
            if label is None:
                label = label_of[route] = self._route_label(index, route) if route else ""
            method = _method_name(key >> 16 & 0xFFFF)
            result.requests[method, _status(key), label] += count
            if key >> 48 & sb.RECORD_CLIENT_CLOSED:
                result.client_closed[method, label] += count
        return label_of

    @staticmethod
    def _request_cpu(
        share: dict[tuple[str, int, str], float],
        result: Round,
        *,
        counts: Counter[int],
        keys: array[int],
        durations: array[float],
        total: float,
        cpus: array[float],
        label_of: dict[int, str],
    ) -> None:
        """CPU seconds by (method, status, route): the records' own where they carry one. A worker class that runs
        many requests on one thread writes NaN; those requests share the worker's CPU time of the round in
        proportion to their durations, once the round has read it (_share_worker_cpu). ``total``: the sum of
        ``durations``."""
        request_cpu = result.request_cpu
        if len(counts) == 1:  # the usual round of a slot: one key, so sums in C (NaN: no CPU of their own)
            (key,) = counts
            group = _group(key, label_of)
            if _each_is(cpus, _NAN) or isnan(cpu := sum(cpus)):
                share[group] = share.get(group, 0.0) + total
            else:
                request_cpu[group] = request_cpu.get(group, 0.0) + cpu
            return
        for key, cpu, duration in zip(keys, cpus, durations, strict=True):
            group = _group(key, label_of)
            if isnan(cpu):
                share[group] = share.get(group, 0.0) + duration
            else:
                request_cpu[group] = request_cpu.get(group, 0.0) + cpu

    def _share_worker_cpu(
        self, index: int, used: float, result: Round, *, busy: bool, worker: tuple[int, float] | None = None
    ) -> None:
        """Give the slot's CPU time since it was last given (or idle) to the requests it finished without a CPU
        time of their own. While requests are in flight and none finishes, the CPU waits for them; a worker
        with nothing to serve lets it go (its idle loop is no request's), and so does a new worker's boot:
        ``worker`` is (pid, CPU seconds when it became ready, 0.0 while booting)."""
        share = self._unshared[index]
        if worker is not None and worker[0] != self._cpu_seen_pid[index] and worker[1] > 0:
            # The first reading of a ready worker: count from the moment it was ready, even when the first
            # round comes while a request is already running.
            self._cpu_seen_pid[index] = worker[0]
            self._cpu_seen[index] = self._cpu_base[index] + worker[1]
        if not share:
            if not busy:
                self._cpu_seen[index] = used
            return
        previous, self._cpu_seen[index] = self._cpu_seen[index], used
        total = sum(share.values())
        spent = max(0.0, used - previous) if previous is not None else 0.0
        for group, duration in share.items():
            portion = spent * duration / total if total > 0 else spent / len(share)
            result.request_cpu[group] = result.request_cpu.get(group, 0.0) + portion
        share.clear()

    @staticmethod
    def _durations(result: Round, group: int, label_of: dict[int, str]) -> list[float]:
        """The round's list of durations for a (method | route << 16) group."""
        key = (_method_name(group & 0xFFFF), label_of[group >> 16 & 0xFFFF])
        found = result.durations.get(key)
        if found is None:
            found = result.durations[key] = []
        return found

    @staticmethod
    def _status_durations(
        result: Round,
        counts: Counter[int],
        keys: array[int],
        durations: array[float],
        label_of: dict[int, str],
        *,
        chunk: list[float] | None,
    ) -> None:
        """Durations grouped by the whole key (status, method, route); one list lookup per distinct key.
        ``chunk``: the durations as a list already made (sorted), where they are one (method, route) group."""
        lists = {}
        for key in counts:
            group = _group(key, label_of)
            lists[key] = result.status_durations.setdefault(group, [])
        if len(lists) == 1 and chunk is not None:  # one key is one (method, route) group: listed already
            next(iter(lists.values())).extend(chunk)
            return
        for key, duration in zip(keys, durations, strict=True):
            lists[key].append(duration)

    def count_cut_short(self, index: int, requests: tuple[sb.InFlight, ...], died: float, result: Round) -> int:
        """The requests a worker died under, read from its last snapshot: each is counted once, with status
        NO_RESPONSE and its duration up to the death. One post_request already counted (a signal handler had
        run, see _worker.recorder) is not counted again. Returns how many were counted."""
        counted = 0
        for request in requests:
            if request.counted:
                continue
            method = request.method if request.method in sb.METHOD_INDEX else "other"
            duration = max(0.0, died - request.started)
            result.requests[method, NO_RESPONSE, ""] += 1
            found = result.durations.get((method, ""))
            if found is None:
                found = result.durations[method, ""] = []
            found.append(duration)
            if self._by_status:
                result.status_durations.setdefault((method, NO_RESPONSE, ""), []).append(duration)
            self._completed[index] += duration
            counted += 1
        return counted

    def _departed(self, index: int, result: Round) -> None:
        """A slot without a live worker keeps its counters and reports no connections."""
        result.connections[index] = 0
        result.busy_seconds[index] = self._busy[index] = max(self._busy[index], self._completed[index])
        result.cpu_seconds[index] = used = self._cpu_base[index] + self._cpu_last[index]
        self._share_worker_cpu(index, used, result, busy=False)

    def _cpu(self, index: int, pid: int) -> float:
        if pid != self._cpu_pid[index]:
            # A new worker in the slot: what its predecessor used stays in the slot's counter.
            self._cpu_base[index] += self._cpu_last[index]
            self._cpu_pid[index], self._cpu_last[index] = pid, 0.0
        used = cpu_seconds(pid)
        if used is not None:
            self._cpu_last[index] = max(self._cpu_last[index], used)
        return self._cpu_base[index] + self._cpu_last[index]

    def _route_label(self, index: int, number: int) -> str:
        names = self._route_names[index]
        if number > len(names) and number != sb.OVER_ROUTE_CAP:
            names.extend(self._board.route_names(index, len(names)))
        if number > len(names):  # past the worker's own table (OVER_ROUTE_CAP), or never written
            return self._over_cap("a route the worker could not store")
        name = names[number - 1]
        if name not in self._labels:
            if len(self._labels) >= self._max_routes:
                return self._over_cap(repr(name))
            self._labels.add(name)
        return name

    def _over_cap(self, example: str) -> str:
        ROUTE_CAP_WARNING(
            "route-cap",
            logging.WARNING,
            f"more than max_routes={self._max_routes} distinct routes; the rest are counted as "
            f'route="{OTHER_ROUTE}" (e.g. {example}). Raise GUNICORN_INSIGHT_MAX_ROUTES if '
            "these are real templates, or check that the resolver returns templates, not raw paths",
        )
        return OTHER_ROUTE


OTHER_ROUTE = "other"
ROUTE_CAP_WARNING = RateLimitedLog(period=3600.0)
