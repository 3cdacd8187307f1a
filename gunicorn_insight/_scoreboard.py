"""The shared-memory scoreboard: one slot per worker, written by the worker, read by the master.

The file lives on tmpfs and is mapped by the master before it forks, so every worker inherits the same
pages. Writers never take a lock that crosses processes: a worker only writes its own slot, and the
master only writes a slot's ownership fields while no live process owns it.

Layout (little endian)::

    header   one page   magic, version, slots, entries per slot, ring size, master pid
    slot i   header 512 bytes, ``entries`` request entries of 256 bytes, the ring; padded to whole pages

The ring holds one 32-byte record per finished request. ``head`` counts records ever written to the
slot and survives worker replacement, so a reader's cursor stays valid across deaths: a request
finished by a worker that has since died is still read, never lost.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._space import free_space, mebibytes, reserve
from .settings import ConfigurationError, join_host_port

MAGIC = b"GINSIGHT"
VERSION = 7
PAGE = mmap.PAGESIZE

HEADER = struct.Struct("<8sIIIIII")  # magic, version, slots, entries, ring, master pid, routes
HEADER_SIZE = PAGE  # slots start on page boundaries

# Slot header fields, each at a fixed offset so the hot path can write one field with one call.
GENERATION = struct.Struct("<Q")  # +0: bumped by the master each time the slot gets a new worker
PID = struct.Struct("<I")  # +8
STATE = struct.Struct("<B")  # +12
FLAGS = struct.Struct("<B")  # +13: marks left by the worker's signal handlers
HEAD_CONNS = struct.Struct("<QI")  # +16: ring head, connections (when the worker class counts them)
CONNS = struct.Struct("<I")  # +24: the connections alone, written by the worker's monitor thread
OVERFLOW = struct.Struct("<I")  # +28: requests in flight that found no free entry
BASE = struct.Struct("<Q")  # +32: ring head when this worker started, so served = head - base
SPAWNED = struct.Struct("<d")  # +40: monotonic time the master forked it
BOOTED = struct.Struct("<d")  # +48: monotonic time the app was loaded (0 while booting)
EXIT_CODE = struct.Struct("<i")  # +56: the code the worker passed to sys.exit, when worker_exit ran in it
SLOW = struct.Struct("<I")  # +60: slow requests reported by the watchdog, ever, in this slot
RSS = struct.Struct("<Q")  # +64: resident memory in bytes, sampled by the master
WAITING = struct.Struct("<I")  # +72: gthread: accepted connections waiting for a free thread
ROUTES_USED = struct.Struct("<I")  # +76: entries filled in this slot's route table (it outlives workers)
# +80, +88, +96, +104: lines gunicorn's logger logged at each of LOG_LEVELS, ever, by this slot's workers (they
# outlive a worker as the ring head does). Only counted when the master asks (see _master.loglines).
COUNTER = struct.Struct("<Q")  # one of the slot's counters: the log lines here, the rejected requests at +256
LOG_LEVELS = ("critical", "error", "warning", "exception")
# +112: bumped by ``gunicorn-insight stacks`` and by the master (a listener nobody serves); the worker's watchdog
# answers each new value with a stacks file in the run directory. Two askers may bump it at once and one bump be
# lost: each waits for its number or a later one, and the watchdog answers the latest, so both get an answer.
# Kept across workers, like the ring head, so a number is never reused soon.
STACKS_ASKED = struct.Struct("<I")
# +116: written once by an exiting gthread worker (see _worker.keepalive): the idle keep-alive connections its exit
# closes, and how many of them already carry a request nobody will answer (also in the ring, as NO_RESPONSE records).
KEEPALIVE = struct.Struct("<HH")
BOOT_CPU = struct.Struct("<d")  # +120: the worker's CPU seconds (user + system) when it became ready
LAST_WORDS = struct.Struct("<128s")  # +128: why the worker is exiting (the boot exception), utf-8
SLOT_HEADER = struct.Struct("<QIBBxxQIIQddiIQII4Q4xHHd128s")  # the 4x: STACKS_ASKED, read on its own
# +256: requests gunicorn's HTTP parser rejected (its handle_error got one of gunicorn.http.errors), per
# REJECT_REASONS, ever, by this slot's workers (a COUNTER each); kept across workers like the log line counts (see
# _worker.rejected).
REJECT_REASONS = (
    "framing",
    "invalid_header",
    "invalid_header_name",
    "invalid_request_line",
    "invalid_method",
    "invalid_http_version",
    "unsupported_transfer_coding",
    "invalid_chunk_size",
    "chunk_missing_terminator",
    "invalid_chunk_extension",
    "limit_request_line",
    "limit_request_headers",
    "obsolete_folding",
    "expectation_failed",
    "invalid_proxy_line",
    "invalid_proxy_header",
    "forbidden_proxy_request",
    "invalid_scheme_headers",
    "invalid_h2c_preface",
    "other",
)
REJECT_ROOM = 24  # counters reserved: reasons can be added without moving the entries
SLOT_HEADER_SIZE = 512
OFF_PID, OFF_STATE, OFF_FLAGS, OFF_HEAD, OFF_CONNS, OFF_OVERFLOW, OFF_BASE, OFF_SPAWNED, OFF_BOOTED = (
    8,
    12,
    13,
    16,
    24,
    28,
    32,
    40,
    48,
)
(
    OFF_EXIT_CODE,
    OFF_SLOW,
    OFF_RSS,
    OFF_WAITING,
    OFF_ROUTES_USED,
    OFF_LOG_LINES,
    OFF_STACKS_ASKED,
    OFF_KEEPALIVE,
    OFF_BOOT_CPU,
    OFF_LAST_WORDS,
    OFF_REJECTED,
) = (
    56,
    60,
    64,
    72,
    76,
    80,
    112,
    116,
    120,
    128,
    256,
)

# In use, start (monotonic), thread, method, client host, client port (0: not TCP), path.
ENTRY = struct.Struct("<B7xdQ8s46sH176s")
ENTRY_SIZE = 256
ENTRY_IN_USE, ENTRY_COUNTED = 1, 2  # the first byte; COUNTED: finished and counted, kept for a death report
# duration s, queue s (NaN: none, negative: invalid), status, method, route, outcome (RECORD_* bits),
# CPU s of the request's thread (NaN: the worker class runs several requests on one thread).
RING = struct.Struct("<ddHHHHd")
# The drain reads the records as 8-byte words, the third as one number:
# status | method << 16 | route << 32 | outcome << 48.
RING_WORDS = RING.size // 8
RING_SIZE = RING.size
ROUTE = struct.Struct("<64s")  # one route template, utf-8; ring records refer to it as index + 1
ROUTE_SIZE = ROUTE.size
NO_ROUTE, OVER_ROUTE_CAP = 0, 0xFFFF
RECORD_CLIENT_CLOSED = 1  # the client had gone before the response was written (see _worker.recorder)
RING_NO_RESPONSE = 0xFFFF  # a record's status for a request no response was sent to (the master's NO_RESPONSE)

FREE, BOOTING, READY = 0, 1, 2
FLAG_ABORT_HANDLER = 1  # gunicorn's SIGABRT handler ran worker_abort (the timeout path it can see)
FLAG_INT_HANDLER = 2  # worker_int ran (SIGINT/SIGQUIT)
FLAG_COUNTS_CONNECTIONS = 4  # the worker class has nr_conns; the connections field is meaningful
FLAG_EXITED = 8  # worker_exit ran in the worker: it left through Python, with the exit code recorded
FLAG_MAX_REQUESTS = 16  # it was leaving because it reached max_requests
FLAG_BOOT_FAILED = 32  # it never finished loading the application
FLAG_REQUESTS_UNSEEN = 64  # it accepted connections and recorded no request: its class bypasses the hooks

METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "other")
METHOD_INDEX = {name: index for index, name in enumerate(METHODS)}
OTHER_METHOD = METHOD_INDEX["other"]

assert SLOT_HEADER.size == OFF_REJECTED
assert len(REJECT_REASONS) <= REJECT_ROOM
assert OFF_REJECTED + REJECT_ROOM * COUNTER.size <= SLOT_HEADER_SIZE
assert ENTRY.size == ENTRY_SIZE


@dataclass(frozen=True, slots=True)
class InFlight:
    """A request a worker was serving when the slot was read."""

    method: str
    path: str
    client: str
    started: float  # monotonic, comparable across processes on one host
    thread: int
    counted: bool = False
    """post_request already counted it (a signal handler had run: kept only for the master's death report)."""


@dataclass(frozen=True, slots=True)
class SlotView:
    """A consistent-enough copy of one slot's header and its requests in flight."""

    index: int
    generation: int
    pid: int
    state: int
    flags: int
    head: int
    connections: int
    overflow: int
    base: int
    spawned: float
    booted: float
    exit_code: int
    slow: int
    rss: int
    waiting: int
    routes_used: int
    log_lines: tuple[int, ...]
    """Per LOG_LEVELS, lines gunicorn's logger logged in this slot's workers, ever (0 unless counted)."""
    boot_cpu: float
    last_words: str
    requests: tuple[InFlight, ...]
    keepalive_closed: int = 0
    """Idle keep-alive connections the worker still held when it exited (its exit closed them)."""
    keepalive_unanswered: int = 0
    """Of those, the ones a request had already arrived on: in the ring as NO_RESPONSE records, never served."""

    @property
    def served(self) -> int:
        # The unanswered requests are ring records (so the drain counts them), not requests the worker served.
        return self.head - self.base - self.keepalive_unanswered

    @property
    def in_flight(self) -> int:
        return len(self.requests) + self.overflow

    @property
    def counts_connections(self) -> bool:
        return bool(self.flags & FLAG_COUNTS_CONNECTIONS)

    @property
    def connections_now(self) -> int:
        """nr_conns when the worker class keeps it, otherwise what the hooks see in flight."""
        return self.connections if self.counts_connections else self.in_flight


def store(buffer: Any, offset: int, layout: struct.Struct, *values: Any) -> None:
    """Publish a field another process reads with one store.

    ``struct.pack_into`` zero-fills the field and then writes it a byte at a time, so a reader in another
    process can see 0 or half a number for a moment; one slice assignment copies the finished bytes at once.
    """
    buffer[offset : offset + layout.size] = layout.pack(*values)


def client_address(host: str, port: int) -> str:
    """``host:port`` as a browser would write it (IPv6 in brackets); the host alone when not TCP."""
    return join_host_port(host, port) if port else host


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def parse_slot(index: int, data: bytes, entries: int) -> SlotView:
    (
        generation,
        pid,
        state,
        flags,
        head,
        conns,
        overflow,
        base,
        spawned,
        booted,
        exit_code,
        slow,
        rss,
        waiting,
        routes_used,
        *log_lines,
        keepalive_closed,
        keepalive_unanswered,
        boot_cpu,
        last_words,
    ) = SLOT_HEADER.unpack_from(data, 0)
    requests = []
    for n in range(entries):
        offset = SLOT_HEADER_SIZE + n * ENTRY_SIZE
        if data[offset]:
            in_use, started, thread, method, host, port, path = ENTRY.unpack_from(data, offset)
            requests.append(
                InFlight(
                    _text(method),
                    _text(path),
                    client_address(_text(host), port),
                    started,
                    thread,
                    in_use == ENTRY_COUNTED,
                )
            )
    requests.sort(key=lambda r: r.started)
    return SlotView(
        index,
        generation,
        pid,
        state,
        flags,
        head,
        conns,
        overflow,
        base,
        spawned,
        booted,
        exit_code,
        slow,
        rss,
        waiting,
        routes_used,
        tuple(log_lines),
        boot_cpu,
        _text(last_words),
        tuple(requests),
        keepalive_closed,
        keepalive_unanswered,
    )


class Scoreboard:
    """The mapped table. Construct with :meth:`create` (master) or :meth:`attach` (readers)."""

    def __init__(self, path: str, buffer: mmap.mmap) -> None:
        magic, version, slots, entries, ring, master_pid, routes = HEADER.unpack_from(buffer, 0)
        if magic != MAGIC or version != VERSION:
            raise ValueError(f"{path} is not a gunicorn-insight scoreboard (version {VERSION})")
        self.path = path
        self.buffer = buffer
        self.slots: int = slots
        self.entries: int = entries
        self.ring: int = ring
        self.master_pid: int = master_pid
        self.routes: int = routes
        self.slot_size = slot_size(entries, ring, routes)
        self._flag_slices: tuple[tuple[int, int, int], ...] | None = None
        self._no_flags = bytes(entries)  # every entry's in-use flag clear: an idle slot

    @classmethod
    def create(cls, path: str, slots: int, entries: int, ring: int, *, master_pid: int, routes: int = 0) -> Scoreboard:
        if ring & (ring - 1):
            raise ValueError("ring size must be a power of two")
        each = slot_size(entries, ring, routes)
        size = HEADER_SIZE + slots * each
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                # Every page now, before the first write: a worker forked into a slot later must never
                # meet a page the filesystem can no longer back (SIGBUS, on a full /dev/shm).
                reserve(fd, size)
            except OSError as error:
                os.unlink(path)
                raise ConfigurationError(no_room_message(path, size, slots, each, error)) from None
            buffer = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        HEADER.pack_into(buffer, 0, MAGIC, VERSION, slots, entries, ring, master_pid, routes)
        return cls(path, buffer)

    @classmethod
    def attach(cls, path: str, *, writable: bool = False) -> Scoreboard:
        """Map an existing scoreboard read-only (tools and tests that watch a running server); ``writable``
        only for ``gunicorn-insight stacks``, which writes nothing but the slots' STACKS_ASKED fields."""
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            protection = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            buffer = mmap.mmap(fd, 0, mmap.MAP_SHARED, protection)
        finally:
            os.close(fd)
        return cls(path, buffer)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a recorder's word views (see _worker.recorder): unmapped when they go
            self.buffer.close()

    def offset(self, index: int) -> int:
        return HEADER_SIZE + index * self.slot_size

    def entries_offset(self, index: int) -> int:
        return self.offset(index) + SLOT_HEADER_SIZE

    def ring_offset(self, index: int) -> int:
        return self.offset(index) + SLOT_HEADER_SIZE + self.entries * ENTRY_SIZE

    def routes_offset(self, index: int) -> int:
        return self.ring_offset(index) + self.ring * RING_SIZE

    def route_names(self, index: int, start: int = 0) -> list[str]:
        """The slot's route table from entry ``start`` on (only complete entries: ``routes_used`` is
        published after the entry is written)."""
        (used,) = ROUTES_USED.unpack_from(self.buffer, self.offset(index) + OFF_ROUTES_USED)
        base = self.routes_offset(index)
        return [
            _text(ROUTE.unpack_from(self.buffer, base + n * ROUTE_SIZE)[0])
            for n in range(start, min(used, self.routes))
        ]

    def snapshot(self, index: int) -> bytes:
        """Copy the slot's header and entries: a plain memory copy, safe inside a signal handler."""
        start = self.offset(index)
        return self.buffer[start : start + SLOT_HEADER_SIZE + self.entries * ENTRY_SIZE]

    def read(self, index: int) -> SlotView:
        return parse_slot(index, self.snapshot(index), self.entries)

    def __iter__(self) -> Iterator[SlotView]:
        return (self.read(index) for index in range(self.slots))

    # -- ownership, written by the master only --------------------------------------------------

    def assign(self, index: int, now: float) -> None:
        """Give the slot to a worker about to be forked. Ring head and slow count are kept on purpose."""
        start = self.offset(index)
        buffer = self.buffer
        (generation,) = GENERATION.unpack_from(buffer, start)
        store(buffer, start, GENERATION, generation + 1)
        store(buffer, start + OFF_PID, PID, 0)
        store(buffer, start + OFF_FLAGS, FLAGS, 0)
        store(buffer, start + OFF_OVERFLOW, OVERFLOW, 0)
        store(buffer, start + OFF_SPAWNED, SPAWNED, now)
        store(buffer, start + OFF_BOOTED, BOOTED, 0.0)
        store(buffer, start + OFF_EXIT_CODE, EXIT_CODE, 0)
        store(buffer, start + OFF_RSS, RSS, 0)
        store(buffer, start + OFF_WAITING, WAITING, 0)
        store(buffer, start + OFF_KEEPALIVE, KEEPALIVE, 0, 0)
        store(buffer, start + OFF_BOOT_CPU, BOOT_CPU, 0.0)
        store(buffer, start + OFF_LAST_WORDS, LAST_WORDS, b"")
        buffer[start + SLOT_HEADER_SIZE : self.ring_offset(index)] = bytes(self.entries * ENTRY_SIZE)
        store(buffer, start + OFF_STATE, STATE, BOOTING)

    def release(self, index: int) -> None:
        """The worker is gone. Its entries stay as they were until the next assign, for post-mortem reads."""
        start = self.offset(index)
        store(self.buffer, start + OFF_STATE, STATE, FREE)
        store(self.buffer, start + OFF_PID, PID, 0)

    def stacks_asked(self, index: int) -> int:
        return int(STACKS_ASKED.unpack_from(self.buffer, self.offset(index) + OFF_STACKS_ASKED)[0])

    def ask_stacks(self, index: int) -> int:
        """Ask the slot's worker for its stacks (see gunicorn_insight.cli.stacks); the number its answer carries."""
        asked = (self.stacks_asked(index) + 1) & 0xFFFFFFFF
        store(self.buffer, self.offset(index) + OFF_STACKS_ASKED, STACKS_ASKED, asked)
        return asked

    def slow(self, index: int) -> int:
        return int(SLOW.unpack_from(self.buffer, self.offset(index) + OFF_SLOW)[0])

    def log_lines(self, index: int) -> tuple[int, ...]:
        """The slot's log line counters, in LOG_LEVELS order."""
        return self._counters(index, OFF_LOG_LINES, len(LOG_LEVELS))

    def rejected(self, index: int) -> tuple[int, ...]:
        """The slot's rejected-request counters, in REJECT_REASONS order."""
        return self._counters(index, OFF_REJECTED, len(REJECT_REASONS))

    def _counters(self, index: int, at: int, count: int) -> tuple[int, ...]:
        """``count`` COUNTERs from ``at`` in the slot, in one unpack (the master reads every slot each round)."""
        return struct.unpack_from(f"<{count}{COUNTER.format[1:]}", self.buffer, self.offset(index) + at)

    def set_rss(self, index: int, rss: int) -> None:
        store(self.buffer, self.offset(index) + OFF_RSS, RSS, rss)

    def busy_workers(self) -> int:
        """Live slots with a request in flight right now, read straight from the entries (no master lag).

        Runs on the request path when access-log atoms are on: per slot one byte and one strided slice
        (the entries' in-use flags) compared against zeros, all in C.
        """
        buffer, idle = self.buffer, self._no_flags
        return sum(
            1
            for state, first, end in self.flag_slices()
            if buffer[state] == READY and buffer[first:end:ENTRY_SIZE] != idle
        )

    def flag_slices(self) -> tuple[tuple[int, int, int], ...]:
        """Per slot: the offsets of its state byte, its first entry (whose first byte is its in-use flag) and
        the end of its entries (the compiled hooks read busy workers from the same offsets)."""
        if self._flag_slices is None:
            self._flag_slices = tuple(
                (self.offset(index) + OFF_STATE, self.entries_offset(index), self.ring_offset(index))
                for index in range(self.slots)
            )
        return self._flag_slices

    def head(self, index: int) -> int:
        return int(HEAD_CONNS.unpack_from(self.buffer, self.offset(index) + OFF_HEAD)[0])

    def read_ring(self, index: int, start: int, stop: int) -> Iterator[tuple[float, float, int, int, int, int, float]]:
        """Records ``start`` to ``stop`` (absolute counts, at most one ring's worth)."""
        return RING.iter_unpack(self.ring_bytes(index, start, stop))

    def ring_bytes(self, index: int, start: int, stop: int) -> bytes:
        """The raw records ``start`` to ``stop``, in order, as one copy."""
        mask = self.ring - 1
        base = self.ring_offset(index)
        first, last = start & mask, stop & mask
        if stop - start == 0:
            return b""
        if first < last:
            return self.buffer[base + first * RING_SIZE : base + last * RING_SIZE]
        return (
            self.buffer[base + first * RING_SIZE : base + self.ring * RING_SIZE]
            + self.buffer[base : base + last * RING_SIZE]
        )


def no_room_message(path: str, size: int, slots: int, each: int, error: OSError) -> str:
    directory = os.path.dirname(path)
    return (
        f"gunicorn-insight cannot reserve {mebibytes(size)} for its scoreboard in {directory} "
        f"({error.strerror}; {free_space(os.path.dirname(directory) or directory)}); give that filesystem "
        "more room (Docker: docker run --shm-size=256m, Compose: shm_size, Kubernetes: an emptyDir with "
        f"medium: Memory at /dev/shm), or lower GUNICORN_INSIGHT_MAX_WORKERS ({slots} slots of "
        f"{each // 1024} KiB; it needs one per worker alive at once)"
    )


def slot_size(entries: int, ring: int, routes: int = 0) -> int:
    raw = SLOT_HEADER_SIZE + entries * ENTRY_SIZE + ring * RING_SIZE + routes * ROUTE_SIZE
    return -(-raw // PAGE) * PAGE  # whole pages: two workers never write the same page


NO_QUEUE_TIME = math.nan
