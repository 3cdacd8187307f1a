"""What /proc/<pid>/stat says of one process (Linux), for every role that looks at another process: the
master (its workers' CPU), the command line (doctor, discovery), each from the same parser."""

from __future__ import annotations

import os

from . import _kernelfiles as kernelfiles

TICKS = os.sysconf("SC_CLK_TCK")
"""Clock ticks per second: the unit of utime, stime and starttime."""


def stat_fields(pid: int, proc: str = "/proc", *, keep_open: bool = False) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name, which may hold spaces and parentheses: ``[0]``
    is the state, ``[1]`` the parent's pid, ``[11]`` utime, ``[12]`` stime, ``[19]`` starttime, ``[21]`` the
    resident pages (proc(5) numbers them from 3). None when the process is gone or unreadable. ``keep_open``:
    for a caller that reads the same process again and again (see _kernelfiles), not for a scan of many."""
    path = f"{proc}/{pid}/stat"
    data = kernelfiles.read(path) if keep_open else kernelfiles.read_once(path)
    try:
        return None if data is None else data.rsplit(b")", 1)[1].split()
    except IndexError:
        return None


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process; None when it is gone (or pid is 0: no process)."""
    fields = stat_fields(pid, keep_open=True) if pid else None
    try:
        return None if fields is None else (int(fields[11]) + int(fields[12])) / TICKS
    except (IndexError, ValueError):
        return None
