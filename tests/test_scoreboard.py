"""The shared-memory table: layout, slot ownership, ring reads across wrap-around."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gunicorn_insight import _scoreboard as sb


def test_attach_reads_what_create_wrote(board: sb.Scoreboard) -> None:
    """A reader (the CLI) sees the same geometry as the master that created the file."""
    reader = sb.Scoreboard.attach(board.path)
    assert (reader.slots, reader.entries, reader.ring, reader.master_pid) == (4, 3, 8, 1)
    reader.close()


def test_attach_refuses_other_files(tmp_path: Path) -> None:
    """A file that is not a scoreboard is refused with a clear error."""
    path = tmp_path / "other"
    path.write_bytes(b"x" * 128)
    with pytest.raises(ValueError, match="not a gunicorn-insight scoreboard"):
        sb.Scoreboard.attach(str(path))


def test_slots_are_whole_pages(board: sb.Scoreboard) -> None:
    """Each slot starts on its own page so two workers never write the same page."""
    assert board.slot_size % sb.PAGE == 0
    assert os.path.getsize(board.path) == sb.HEADER_SIZE + 4 * board.slot_size


def test_assign_and_release_keep_ring_head(board: sb.Scoreboard) -> None:
    """A new worker in a slot continues the ring count, so the master's cursor stays valid."""
    board.assign(2, now=5.0)
    sb.HEAD_CONNS.pack_into(board.buffer, board.offset(2) + sb.OFF_HEAD, 7, 0)
    board.release(2)
    board.assign(2, now=9.0)
    view = board.read(2)
    assert view.head == 7
    assert view.generation == 2
    assert view.state == sb.BOOTING
    assert view.spawned == 9.0
    board.release(2)
    assert board.read(2).state == sb.FREE


def test_read_ring_handles_wrap_around(board: sb.Scoreboard) -> None:
    """Records are read in order even when they straddle the end of the ring."""
    base = board.ring_offset(1)
    for count in range(10):  # records 0..9 in a ring of 8: 8 and 9 overwrite 0 and 1
        sb.RING.pack_into(board.buffer, base + (count % 8) * sb.RING_SIZE, float(count), 0.0, 200, 0, 0, 0, 0.0)
    durations = [record[0] for record in board.read_ring(1, 5, 10)]
    assert durations == [5.0, 6.0, 7.0, 8.0, 9.0]
    assert [record[0] for record in board.read_ring(1, 2, 10)] == [float(n) for n in range(2, 10)]
    assert list(board.read_ring(1, 4, 4)) == []
