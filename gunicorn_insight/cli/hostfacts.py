"""Facts about this host that ``doctor`` compares a configuration with: CPUs, memory (the cgroup's
limit included), somaxconn, mounts."""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass

from .._cgroup import memory_cgroup_dirs

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
