"""Room on the filesystem of a file that is mapped: tmpfs kills a process that writes a page it cannot
back (SIGBUS), so every mapped file gets its pages before it is touched."""

from __future__ import annotations

import errno
import os


def reserve(fd: int, size: int) -> None:
    """Give the first ``size`` bytes of the file real pages now (the file grows to ``size`` if shorter).

    A page of a sparse file that tmpfs cannot back when it is first written kills the writer with SIGBUS;
    reserved pages can be written whatever happens to the filesystem afterwards. Raises OSError (ENOSPC
    when the filesystem is full) and leaves the mapping to the caller.
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno != errno.EOPNOTSUPP:
            raise
        # A filesystem without fallocate (glibc emulates it on most): write the zeros ourselves.
        current = os.fstat(fd).st_size
        if current < size:
            os.pwrite(fd, bytes(size - current), current)


def mebibytes(size: int) -> str:
    return f"{size / 1048576:.1f} MiB"


def free_space(directory: str) -> str:
    try:
        stats = os.statvfs(directory)
    except OSError:
        return "free space unknown"
    return f"{mebibytes(stats.f_bavail * stats.f_frsize)} free of {mebibytes(stats.f_blocks * stats.f_frsize)}"
