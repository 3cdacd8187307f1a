"""Every scoreboard field another process reads is published with one store, never half written.

``struct.pack_into`` zero-fills a field and then writes it byte by byte, so a reader in another process can
catch 0 or half a number. These tests make the writers use a mapping that logs every store made by slice
or item assignment; each published field must arrive whole in exactly one of them (a field pack_into writes
does not show up at all).
"""

from __future__ import annotations

import mmap
from typing import Any

from fakes import FakeRequest, FakeResponse

from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._worker import recorder as _recorder
from gunicorn_insight._worker.recorder import RecorderOptions, RequestRecorder


class StoreSpy(mmap.mmap):
    """A second mapping of the scoreboard file that logs each store made through it as (start, stop, bytes).

    pack_into writes through the buffer protocol and bypasses ``__setitem__``: its writes are not logged, so a
    field written with it shows up as missing.
    """

    stores: list[tuple[int, int, bytes]]
    before: list[bytes]
    """Per store, the 256-byte block it falls in (a whole entry) as it was just before the store."""

    def __setitem__(self, key: Any, value: Any) -> None:
        block = (key.start if isinstance(key, slice) else key) // 256 * 256
        self.before.append(super().__getitem__(slice(block, block + 256)))
        super().__setitem__(key, value)
        if isinstance(key, slice):
            self.stores.append((key.start, key.stop, bytes(value)))
        else:
            self.stores.append((key, key + 1, bytes([value])))

    def covering(self, offset: int, size: int) -> list[bytes]:
        """The stores that wrote any byte of [offset, offset + size)."""
        return [data for start, stop, data in self.stores if start < offset + size and stop > offset]


def spy_on(board: sb.Scoreboard) -> StoreSpy:
    """From now on the board and whatever takes its buffer write through a spy."""
    with open(board.path, "r+b") as handle:
        spy = StoreSpy(handle.fileno(), 0)
    spy.stores, spy.before = [], []
    board.buffer = spy
    return spy


class Gthread:
    nr_conns = 7

    class tpool:
        class _work_queue:
            @staticmethod
            def qsize() -> int:
                return 3


def spied_recorder(board: sb.Scoreboard, worker: object) -> tuple[RequestRecorder, StoreSpy]:
    spy = spy_on(board)
    board.assign(0, now=1.0)
    rec = RequestRecorder(board, 0, worker, RecorderOptions(threaded=False))
    spy.stores.clear()
    spy.before.clear()
    _recorder.RECORDER = rec
    return rec, spy


class WordSpy:
    """Stands in for the recorder's memoryview of machine words; logs (index, value) per store."""

    def __init__(self, words: memoryview) -> None:
        self._words = words
        self.stores: list[tuple[int, int]] = []

    def __setitem__(self, index: int, value: int) -> None:
        self._words[index] = value
        self.stores.append((index, value))


def test_python_request_hooks_publish_entry_and_head_in_one_store_each(board: sb.Scoreboard) -> None:
    """pre_request's entry appears whole with its in-use byte; post_request's head and connections are one
    word store each, never zero-filled or written a byte at a time."""
    rec, spy = spied_recorder(board, Gthread())
    words, halfwords = WordSpy(rec._words), WordSpy(rec._halfwords)
    rec._words = words  # type: ignore[assignment]  # a spy stands in for the view
    rec._halfwords = halfwords  # type: ignore[assignment]  # a spy stands in for the view
    slot = board.offset(0)
    req = FakeRequest(path="/orders")
    _recorder.pre_request(None, req)
    (in_use,) = [store for store in spy.stores if store[0] == board.entries_offset(0)]
    assert in_use[2] == b"\x01"
    before = spy.before[spy.stores.index(in_use)]
    assert before[0] == 0  # not yet in use...
    assert b"/orders" in before  # ...and already complete
    assert b"10.1.2.3" in before
    spy.stores.clear()
    spy.before.clear()
    _recorder.post_request(None, req, {}, FakeResponse("200 OK"))
    assert spy.covering(slot + sb.OFF_HEAD, sb.HEAD_CONNS.size) == []
    assert words.stores == [((slot + sb.OFF_HEAD) // 8, 1)]
    assert halfwords.stores == [((slot + sb.OFF_CONNS) // 4, 7)]
    assert (board.read(0).head, board.read(0).connections, board.read(0).requests) == (1, 7, ())


def test_watchdog_and_lifecycle_fields_are_published_in_one_store(board: sb.Scoreboard) -> None:
    """Connections, waiting, slow count, boot state and exit fields each land whole in one store."""
    rec, spy = spied_recorder(board, Gthread())
    slot = board.offset(0)
    rec.refresh_connections()
    rec.count_slow()
    rec.booted()
    rec.add_overflow(1)
    expected = {
        sb.OFF_CONNS: sb.CONNS.pack(7),
        sb.OFF_WAITING: sb.WAITING.pack(3),
        sb.OFF_SLOW: sb.SLOW.pack(1),
        sb.OFF_STATE: sb.STATE.pack(sb.READY),
        sb.OFF_OVERFLOW: sb.OVERFLOW.pack(1),
    }
    for offset, packed in expected.items():
        assert spy.covering(slot + offset, len(packed)) == [packed], offset
    view = board.read(0)
    assert (view.connections, view.waiting, view.slow, view.state, view.overflow) == (7, 3, 1, sb.READY, 1)
    assert view.booted > 0


def test_master_slot_writes_are_single_stores(board: sb.Scoreboard) -> None:
    """assign, release and set_rss leave every header field whole (the master's writes read by tools)."""
    spy = spy_on(board)
    board.assign(1, 5.0)
    board.set_rss(1, 4096)
    board.release(1)
    slot = board.offset(1)
    assert spy.covering(slot + sb.OFF_RSS, 8) == [sb.RSS.pack(0), sb.RSS.pack(4096)]
    assert spy.covering(slot + sb.OFF_SPAWNED, 8) == [sb.SPAWNED.pack(5.0)]
    assert spy.covering(slot + sb.OFF_STATE, 1) == [sb.STATE.pack(sb.BOOTING), sb.STATE.pack(sb.FREE)]
