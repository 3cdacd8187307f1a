"""Facts about this host that ``doctor`` compares a configuration with: CPUs, memory (the cgroup's
limit included), somaxconn, mounts."""

from __future__ import annotations

import itertools
import os
import re
import tempfile
from dataclasses import dataclass

from .._cgroup import memory_cgroup_dirs
from .._proc import stat_fields

MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})


_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge page-aligned number


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str


@dataclass(frozen=True)
class System:
    """Facts about this host that the checks compare the configuration with (faked in tests)."""

    cpus: int
    mem_available: int | None
    """Bytes: MemAvailable, or what the cgroup memory limit leaves when that is less."""
    somaxconn: int | None
    mounts: tuple[Mount, ...]
    tempdir: str

    @classmethod
    def current(cls) -> System:
        try:
            cpus = len(os.sched_getaffinity(0))  # CPUs this process may run on, not all the host has
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        return cls(
            cpus, _available_memory(), _read_int("/proc/sys/net/core/somaxconn"), _read_mounts(), tempfile.gettempdir()
        )

    def filesystem(self, path: str) -> str | None:
        """The type of the filesystem ``path`` (or its nearest existing parent) lives on."""
        real = os.path.realpath(path)
        best: Mount | None = None
        for mount in self.mounts:
            point = mount.point.rstrip("/") or "/"
            inside = real == point or real.startswith(point + "/") or point == "/"
            # The longest mount point wins; for equal ones the last listed, which is mounted on top.
            if inside and (best is None or len(point) >= len(best.point.rstrip("/") or "/")):
                best = mount
        return best.fstype if best is not None else None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_mounts(path: str = "/proc/mounts") -> tuple[Mount, ...]:
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return ()
    mounts = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            # /proc/mounts escapes spaces and a few other bytes as \ooo octal.
            point = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), parts[1])
            mounts.append(Mount(point, parts[2]))
    return tuple(mounts)


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom(proc_self_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes the memory cgroup still allows: in a container MemAvailable shows the whole host."""
    for version, base in memory_cgroup_dirs(proc_self_cgroup, root):
        names = ("memory.max", "memory.current") if version == 2 else ("memory.limit_in_bytes", "memory.usage_in_bytes")
        limit, usage = _read_int(os.path.join(base, names[0])), _read_int(os.path.join(base, names[1]))
        if limit is not None and usage is not None and limit < _UNLIMITED:
            return max(0, limit - usage)
    return None


def _available_memory() -> int | None:
    values = [value for value in (_meminfo_available(), _cgroup_headroom()) if value is not None]
    return min(values) if values else None


def meminfo(path: str = "/proc/meminfo") -> tuple[int, int] | None:
    """(MemTotal, MemAvailable) of the host in bytes; None where the file lacks either."""
    found: dict[str, int] = {}
    try:
        with open(path) as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    found[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if len(found) < 2:
        return None
    return found["MemTotal"], found["MemAvailable"]


@dataclass(frozen=True)
class GunicornOnHost:
    """Every gunicorn server this user can see on the host, instrumented or not."""

    servers: int
    processes: int
    rss: int
    """Resident bytes of all their processes (masters, workers and their other children)."""


def _is_gunicorn(arguments: list[str]) -> bool:
    """gunicorn's master or worker by its command line: ``gunicorn ...``, ``python .../gunicorn ...``,
    ``python -m gunicorn ...``, or the title setproctitle gives (``gunicorn: worker [app]``)."""
    names = [os.path.basename(argument) for argument in arguments[:2]]
    if any(name.startswith("gunicorn") and not name.startswith("gunicorn-insight") for name in names):
        return True
    return any(first == "-m" and second == "gunicorn" for first, second in itertools.pairwise(arguments))


def _process(proc: str, pid: int) -> tuple[list[str], int, int] | None:
    """(command line, parent pid, resident bytes) of one /proc entry; None when gone or unreadable."""
    fields = stat_fields(pid, proc)
    if fields is None:
        return None
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as handle:
            arguments = [part.decode("utf-8", "replace") for part in handle.read().split(b"\0") if part]
        return arguments, int(fields[1]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def gunicorn_on_host(proc: str = "/proc") -> GunicornOnHost:
    """Servers: gunicorn processes whose parent is not one; each counts with all its children."""
    processes: dict[int, tuple[int, int, bool]] = {}  # pid -> (parent, rss, gunicorn)
    for entry in os.scandir(proc):
        if entry.name.isdigit():
            found = _process(proc, int(entry.name))
            if found is not None:
                arguments, parent, rss = found
                processes[int(entry.name)] = (parent, rss, _is_gunicorn(arguments))
    masters = {
        pid for pid, (parent, _, ours) in processes.items() if ours and not processes.get(parent, (0, 0, False))[2]
    }
    members = {pid for pid, (parent, _, ours) in processes.items() if ours or parent in masters}
    return GunicornOnHost(len(masters), len(members), sum(processes[pid][1] for pid in members))
