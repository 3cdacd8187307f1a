"""Kernel files kept open and read from their start: current values each read, never a gone process's."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gunicorn_insight import _kernelfiles as kernelfiles
from gunicorn_insight._proc import cpu_seconds, stat_fields


def threads_now() -> int:
    data = kernelfiles.read(f"/proc/{os.getpid()}/status")
    assert data is not None
    return int(data.split(b"\nThreads:")[1].split()[0])


def test_a_kept_file_reads_the_current_values() -> None:
    """The second read of the same open file shows a thread started since, and a later one its end."""
    before = threads_now()
    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        assert threads_now() == before + 1
    finally:
        release.set()
        thread.join()
    deadline = time.monotonic() + 10  # join() returns before the kernel has counted the thread out
    while threads_now() != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads_now() == before
    assert f"/proc/{os.getpid()}/status" in kernelfiles._Kept.fds


def test_a_reaped_process_reads_as_gone_and_its_file_is_closed() -> None:
    """Once a process is reaped its kept file fails (ESRCH): None, and the descriptor is not kept."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    path = f"/proc/{child.pid}/stat"
    assert kernelfiles.read(path) is not None
    child.communicate(b"")
    assert kernelfiles.read(path) is None
    assert path not in kernelfiles._Kept.fds


def test_files_outside_proc_and_sys_are_opened_each_time(tmp_path: Path) -> None:
    """A file replaced by another (a test's fake tree) is read anew: only /proc and /sys files are kept."""
    fake = tmp_path / "stat"
    fake.write_bytes(b"one")
    assert kernelfiles.read(str(fake)) == b"one"
    replacement = tmp_path / "new"
    replacement.write_bytes(b"two")
    replacement.replace(fake)
    assert kernelfiles.read(str(fake)) == b"two"
    assert kernelfiles.read(str(tmp_path / "missing")) is None
    assert str(fake) not in kernelfiles._Kept.fds


def test_a_file_longer_than_one_read_is_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads go on while they come back full, so a file longer than the chunk is not cut."""
    monkeypatch.setattr(kernelfiles, "_CHUNK", 16)
    whole = Path(f"/proc/{os.getpid()}/limits").read_bytes()
    assert kernelfiles.read(f"/proc/{os.getpid()}/limits") == whole


def test_no_more_than_max_kept_files_stay_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the cap all are closed: the files of long-gone workers do not pile up."""
    kernelfiles._close_all()  # what the suite's earlier tests left open
    monkeypatch.setattr(kernelfiles._Kept, "cap", 2)
    for name in ("stat", "statm", "limits"):
        assert kernelfiles.read(f"/proc/{os.getpid()}/{name}") is not None
    assert kernelfiles.kept() <= 2


def test_a_forked_child_keeps_none_of_its_parents_files() -> None:
    """A worker forked from the master starts with no kept file, and reads its own."""
    assert kernelfiles.read(f"/proc/{os.getpid()}/stat") is not None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanup
        os.write(write_end, str(kernelfiles.kept()).encode())
        os._exit(0)
    os.close(write_end)
    try:
        assert os.read(read_end, 16) == b"0"
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


def test_out_of_descriptors_the_kept_files_give_theirs_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE while files are kept: they are closed and the read goes on, so a live process never reads as gone."""
    kernelfiles._close_all()  # what the suite's earlier tests left open
    assert kernelfiles.read(f"/proc/{os.getpid()}/statm") is not None
    real_open = os.open

    def no_descriptor_while_kept(path: str, flags: int, *args: int) -> int:
        if kernelfiles.kept():
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_descriptor_while_kept)
    assert kernelfiles.read(f"/proc/{os.getpid()}/limits") is not None
    assert kernelfiles.kept() == 0


def test_a_scan_of_many_processes_keeps_none_open() -> None:
    """stat_fields reads once unless asked to keep the file: a command line's scan of every /proc entry holds
    no descriptors afterwards; the master's repeated CPU reads keep theirs."""
    kernelfiles._close_all()
    assert stat_fields(os.getpid()) is not None
    assert kernelfiles.kept() == 0
    assert cpu_seconds(os.getpid()) is not None
    assert f"/proc/{os.getpid()}/stat" in kernelfiles._Kept.fds


def test_the_cap_follows_what_a_round_reads_within_half_the_descriptor_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A master with many worker slots keeps all their files (no close-all every round), never more than half
    of its descriptors, and never fewer than FEWEST_KEPT."""
    monkeypatch.setattr(kernelfiles._Kept, "cap", kernelfiles._Kept.cap)  # restored after the test
    monkeypatch.setattr(resource, "getrlimit", lambda which: (4096, 1 << 20))
    assert kernelfiles.keep_at_most(4 * 256 + 64) == 1088
    assert kernelfiles._Kept.cap == 1088
    assert kernelfiles.keep_at_most(10_000) == 2048
    assert kernelfiles.keep_at_most(3) == kernelfiles.FEWEST_KEPT
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY,) * 2)
    assert kernelfiles.keep_at_most(10_000) == 10_000
