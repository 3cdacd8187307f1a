"""Small kernel files (/proc, /sys) read again and again, each opened once and read from its start each time.

The master reads a few dozen every round (cgroup and PSI files, /proc/net/netstat, each worker's stat and
status, and limits where prlimit is refused). Opening one costs several times reading it: 7 to 40 µs against
1 to 30 µs here. A kept file reads the kernel's current values at every read, as a fresh open would. A
process's files stay bound to that process: once it is gone and reaped they fail (ESRCH), and are opened again
by path, for whatever process has the pid now. Files elsewhere (the test suite's fake trees, which tests
replace between reads) are opened each time, and so is anything read through :func:`read_once` (a command
line's scan of every process, which reads each file once). A forked child closes what it inherited: its reads
open files of its own.
"""

from __future__ import annotations

import errno
import os
import resource
import threading
from typing import ClassVar

KEPT_UNDER = ("/proc/", "/sys/")
FEWEST_KEPT = 64

_CHUNK = 65536


class _Kept:
    fds: ClassVar[dict[str, int]] = {}  # path -> its open file
    # Open files kept at most (see keep_at_most); past it all are closed (the files of workers long gone among
    # them) and reopened as they are read.
    cap: ClassVar[int] = 256
    lock = threading.Lock()  # the exporter thread reads; the main thread reads at startup and forks


def read(path: str) -> bytes | None:
    """The whole file; None when it is absent or cannot be read."""
    if not path.startswith(KEPT_UNDER):
        return read_once(path)
    kept = _Kept.fds
    with _Kept.lock:
        fd = kept.get(path)
        if fd is not None:
            try:
                return _read_from_start(fd)
            except OSError:  # its process is gone, its cgroup removed: the path may name another one now
                del kept[path]
                os.close(fd)
        if len(kept) >= _Kept.cap:
            _close_all()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            # Out of descriptors: the kept files give theirs back rather than make a live process read as gone.
            if error.errno not in (errno.EMFILE, errno.ENFILE) or not kept:
                return None
            _close_all()
            return read_once(path)
        try:
            data = _read_from_start(fd)
        except OSError:
            os.close(fd)
            return None
        kept[path] = fd
        return data


def keep_at_most(files: int) -> int:
    """Keep up to ``files`` open (what the master reads each round: a few per worker it may have, and its own),
    within half of the process's descriptor limit, so gunicorn keeps room for its own; at least FEWEST_KEPT.
    Fewer than a round reads would close and reopen them all every round. Returns the cap now in force."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = files if soft == resource.RLIM_INFINITY else min(files, soft // 2)
    _Kept.cap = max(FEWEST_KEPT, room)
    return _Kept.cap


def kept() -> int:
    """How many files are open now."""
    return len(_Kept.fds)


def read_once(path: str) -> bytes | None:
    """The whole file, opened for this read only; None when it is absent or cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_from_start(fd)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_from_start(fd: int) -> bytes:
    """Until a read comes back short: the kernel fills a read of these files as far as they go, and one more
    read past their end would have it generate them again to find that out."""
    chunks = [os.pread(fd, _CHUNK, 0)]
    while len(chunks[-1]) == _CHUNK:
        chunks.append(os.pread(fd, _CHUNK, _CHUNK * len(chunks)))
    return b"".join(chunks)


def _close_all() -> None:
    for fd in _Kept.fds.values():
        os.close(fd)
    _Kept.fds.clear()


def _forget_in_child() -> None:
    """A forked child's copies are the parent's: closed without taking the lock, which the fork may have caught
    held by another thread of the parent (the parent's forks are made while its exporter thread is paused)."""
    _Kept.lock = threading.Lock()
    _close_all()


os.register_at_fork(after_in_child=_forget_in_child)
