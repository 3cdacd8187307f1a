"""Host pressure around the workers, read by the master every round from the kernel's own files.

* the CPU controller of the master's cgroup (the workers are forked into it): throttling from ``cpu.stat``
  (v2 ``nr_throttled``/``throttled_usec``, v1 ``nr_throttled``/``throttled_time`` in nanoseconds) and the
  quota as cores (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; the smallest quota of the
  group and its ancestors, since any of them caps the workers);
* the memory controller: usage, working set (usage minus inactive file cache, what the kubelet compares with
  the limit and the kernel reclaims last) and the limit (v1 ``hierarchical_memory_limit``; v2 the smallest
  ``memory.max`` of the group and its ancestors);
* pressure stall information: the cgroup v2 group's ``cpu.pressure``/``memory.pressure``/``io.pressure``,
  else the host's ``/proc/pressure/*``;
* per worker, from ``/proc/<pid>/status``: voluntary and involuntary context switches and ``VmSwap``.

A reading whose file is absent is None (or missing from its dict), never 0: the exporters then leave the
metric out, and :class:`HostReader` says once, at startup, what it cannot read and why.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource as process_limits  # not `resource`: the name of a PSI resource here
from dataclasses import dataclass
from typing import NamedTuple

from .. import _kernelfiles as kernelfiles
from .._cgroup import cgroup_dirs
from .._facts import CpuThrottling, HostPressure
from .._report import LOG

PSI_RESOURCES = ("cpu", "memory", "io")
UNLIMITED_V1 = 1 << 62
"""cgroup v1 reports "no limit" as the largest page-aligned 64-bit value; anything above this is no limit."""


def _read(path: str) -> str | None:
    """The whole of a small kernel file; None when it is absent or unreadable."""
    data = kernelfiles.read(path)
    return None if data is None else data.decode("ascii", "replace")


def _keyed(text: str | None) -> dict[str, int]:
    """``name value`` lines (cpu.stat, memory.stat, memory.events) as a dict; unparseable lines are skipped."""
    found: dict[str, int] = {}
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        try:
            found[name] = int(value)
        except ValueError:
            continue
    return found


def read_keyed(path: str) -> dict[str, int]:
    """A kernel file of ``name value`` lines as a dict (see _keyed); empty when it is absent or unreadable."""
    return _keyed(_read(path))


def parse_cpu_stat(text: str | None, version: int) -> CpuThrottling | None:
    stat = _keyed(text)
    if "nr_throttled" not in stat:
        return None  # v2 without the cpu controller enabled for the group: only usage_usec is there
    if version == 2:
        seconds = stat.get("throttled_usec", 0) / 1e6
    else:
        seconds = stat.get("throttled_time", 0) / 1e9
    return CpuThrottling(stat.get("nr_periods", 0), stat["nr_throttled"], seconds)


def parse_cpu_max(text: str | None) -> float | None:
    """v2 ``cpu.max`` ("max 100000" or "150000 100000") as cores; None without a quota or a file."""
    parts = (text or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs_quota(quota: str | None, period: str | None) -> float | None:
    """v1 ``cpu.cfs_quota_us`` (-1: none) over ``cpu.cfs_period_us`` as cores."""
    try:
        quota_us, period_us = int((quota or "").strip()), int((period or "").strip())
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def parse_psi(text: str | None) -> dict[str, float]:
    """``some avg10=.. avg60=.. avg300=.. total=N`` lines: kind -> seconds (total is in microseconds)."""
    found: dict[str, float] = {}
    for line in (text or "").splitlines():
        kind, *fields = line.split()
        for item in fields:
            name, _, value = item.partition("=")
            if name == "total":
                with contextlib.suppress(ValueError):
                    found[kind] = int(value) / 1e6
    return found


def _ancestors(directory: str, mount: str) -> list[str]:
    """The group's directory and each parent up to the hierarchy's mount point."""
    found = [directory]
    mount = os.path.normpath(mount)
    while os.path.normpath(directory) != mount and len(directory) > len(mount):
        directory = os.path.dirname(directory)
        found.append(directory)
    return found


@dataclass(frozen=True, slots=True)
class _Group:
    version: int
    directory: str
    mount: str


class HostReader:
    """Finds the files once, when the master starts; :meth:`read` reads them every round."""

    def __init__(
        self, proc_self_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup", proc: str = "/proc"
    ) -> None:
        self.missing: list[str] = []
        self._cpu = self._controller("cpu", proc_self_cgroup, root, "cpu.stat")
        self._memory = self._controller("memory", proc_self_cgroup, root, "memory.current", "memory.usage_in_bytes")
        self._pids = self._controller("pids", proc_self_cgroup, root, "pids.current")
        self._psi: dict[str, str] = {}
        unified = [directory for version, directory, _ in cgroup_dirs("", proc_self_cgroup, root) if version == 2]
        for resource in PSI_RESOURCES:
            candidates = [os.path.join(directory, f"{resource}.pressure") for directory in unified]
            candidates.append(os.path.join(proc, "pressure", resource))
            # A file that exists but cannot be read (PSI compiled in, disabled at boot: EOPNOTSUPP) is absent.
            path = next((path for path in candidates if _read(path) is not None), None)
            if path is not None:
                self._psi[resource] = path
        first = self.read()
        if first.throttling is None:
            self.missing.append(
                "CPU throttling (no cpu.stat with nr_throttled in this process's cpu cgroup"
                + (f" {self._cpu.directory}" if self._cpu else "")
                + ")"
            )
        if first.memory_usage is None:
            self.missing.append("cgroup memory usage (no memory cgroup found)")
        if first.pids is None:
            self.missing.append("cgroup process count (no pids cgroup with pids.current: the root group has none)")
        if not self._psi:
            self.missing.append(
                "pressure stall information (no cgroup v2 *.pressure, no /proc/pressure: kernel "
                "before 4.20 or booted without psi=1)"
            )
        self.sources = {
            "cpu": self._cpu.directory if self._cpu else None,
            "memory": self._memory.directory if self._memory else None,
            "pids": self._pids.directory if self._pids else None,
            "psi": os.path.dirname(next(iter(self._psi.values()))) if self._psi else None,
        }

    def describe(self) -> str:
        """Where the readings come from, for the master's startup line."""
        parts = [
            f"{name} cgroup {group.directory} (v{group.version})"
            for name, group in (("cpu", self._cpu), ("memory", self._memory), ("pids", self._pids))
            if group is not None
        ]
        if self.sources["psi"]:
            parts.append(f"PSI {self.sources['psi']}")
        return ", ".join(parts) or "nothing"

    def _controller(self, controller: str, proc_self_cgroup: str, root: str, *probes: str) -> _Group | None:
        for version, directory, mount in cgroup_dirs(controller, proc_self_cgroup, root):
            if any(os.path.exists(os.path.join(directory, probe)) for probe in probes):
                return _Group(version, directory, mount)
        return None

    def read(self) -> HostPressure:
        reading = HostPressure()
        cpu = self._cpu
        if cpu is not None:
            reading.throttling = parse_cpu_stat(_read(os.path.join(cpu.directory, "cpu.stat")), cpu.version)
            reading.quota_cores = self._quota(cpu)
        memory = self._memory
        if memory is not None:
            self._read_memory(memory, reading)
        pids = self._pids
        if pids is not None:
            current = (_read(os.path.join(pids.directory, "pids.current")) or "").strip()
            reading.pids = int(current) if current.isdigit() else None
            limits = [
                int(text)
                for ancestor in _ancestors(pids.directory, pids.mount)
                if (text := (_read(os.path.join(ancestor, "pids.max")) or "").strip()).isdigit()
            ]
            reading.pids_limit = min(limits) if limits else None
        for resource, path in self._psi.items():
            for kind, seconds in parse_psi(_read(path)).items():
                reading.pressure[resource, kind] = seconds
        return reading

    @staticmethod
    def _quota(group: _Group) -> float | None:
        quotas = []
        for directory in _ancestors(group.directory, group.mount):
            if group.version == 2:
                cores = parse_cpu_max(_read(os.path.join(directory, "cpu.max")))
            else:
                cores = parse_cfs_quota(
                    _read(os.path.join(directory, "cpu.cfs_quota_us")),
                    _read(os.path.join(directory, "cpu.cfs_period_us")),
                )
            if cores is not None:
                quotas.append(cores)
        return min(quotas) if quotas else None

    @staticmethod
    def _read_memory(group: _Group, reading: HostPressure) -> None:
        directory = group.directory
        if group.version == 2:
            usage_text = _read(os.path.join(directory, "memory.current"))
            inactive_key = "inactive_file"
        else:
            usage_text = _read(os.path.join(directory, "memory.usage_in_bytes"))
            inactive_key = "total_inactive_file"
        try:
            usage = int((usage_text or "").strip())
        except ValueError:
            return
        stat = read_keyed(os.path.join(directory, "memory.stat"))
        reading.memory_usage = usage
        if inactive_key in stat:
            reading.memory_working_set = max(0, usage - stat[inactive_key])
        if group.version == 1:
            limit = stat.get("hierarchical_memory_limit")
            reading.memory_limit = limit if limit is not None and limit < UNLIMITED_V1 else None
            return
        limits = []
        for ancestor in _ancestors(directory, group.mount):
            text = (_read(os.path.join(ancestor, "memory.max")) or "").strip()
            if text.isdigit():
                limits.append(int(text))
        reading.memory_limit = min(limits) if limits else None


@dataclass(frozen=True, slots=True)
class ProcessReading:
    voluntary_switches: int | None
    involuntary_switches: int | None
    swap_bytes: int | None
    threads: int | None = None
    resident_bytes: int | None = None
    """VmRSS: what ps, top and the OOM killer's log show (statm's resident pages, not stat's, which can differ)."""


_STATUS_FIELDS = re.compile(
    rb"^(voluntary_ctxt_switches|nonvoluntary_ctxt_switches|VmSwap|VmRSS|Threads):\s+(\d+)", re.M
)


def read_process(pid: int, proc: str = "/proc") -> ProcessReading | None:
    """Context switches, swap, threads and resident memory of one process from /proc/<pid>/status; None when it
    is gone."""
    data = kernelfiles.read(f"{proc}/{pid}/status") if pid else None
    if data is None:
        return None
    values = {name.decode(): int(value) for name, value in _STATUS_FIELDS.findall(data)}
    swap, resident = values.get("VmSwap"), values.get("VmRSS")
    return ProcessReading(
        values.get("voluntary_ctxt_switches"),
        values.get("nonvoluntary_ctxt_switches"),
        None if swap is None else swap * 1024,
        values.get("Threads"),
        None if resident is None else resident * 1024,
    )


def read_descriptors(pid: int, proc: str = "/proc") -> tuple[int, int | None] | None:
    """(open file descriptors, the soft limit on them or None when unlimited) of one process; None when it is
    gone or its /proc entries cannot be read (another user's process, for a master that is not root)."""
    try:
        # procfs gives the count as the directory's size since Linux 6.2 (0 before): no listing of thousands
        # of connections a round. A tree other than the real /proc (tests) is always listed.
        opened = os.stat(f"{proc}/{pid}/fd").st_size if proc == "/proc" else 0
        if not opened:
            opened = len(os.listdir(f"{proc}/{pid}/fd"))
    except OSError:
        return None
    if proc == "/proc":
        # prlimit asks in one system call what /proc/<pid>/limits spells out in a table the kernel writes and
        # this would parse (0.7 µs against 9 here). Refused (another user's process without CAP_SYS_RESOURCE): the
        # table, which anyone who can list the descriptors may read.
        try:
            allowed = process_limits.prlimit(pid, process_limits.RLIMIT_NOFILE)[0]
            return opened, None if allowed == process_limits.RLIM_INFINITY else allowed
        except ProcessLookupError:
            return None
        except OSError:
            pass
    limits = _read(f"{proc}/{pid}/limits")
    if limits is None:
        return None
    for line in limits.splitlines():
        if line.startswith("Max open files"):
            soft = line[len("Max open files") :].split()[0]
            return opened, int(soft) if soft.isdigit() else None
    return None


@dataclass(slots=True)
class _SlotSwitches:
    pid: int = 0
    base: tuple[int, int] = (0, 0)
    last: tuple[int, int] = (0, 0)
    seen: bool = False
    """A reading ever succeeded: until then the slot's switches are unknown, not 0."""


class WorkerFacts(NamedTuple):
    switches: dict[int, tuple[int, int]]
    """slot -> (voluntary, involuntary) context switches ever, for every slot seen."""
    swap: dict[int, int]
    """slot -> swapped bytes of its live worker."""
    open_fds: dict[int, int]
    """slot -> open file descriptors of its live worker."""
    fd_limits: dict[int, int]
    """slot -> its live worker's soft limit on open file descriptors (absent: unlimited, or unreadable)."""
    threads: dict[int, int]
    """slot -> threads of its live worker."""
    memory: dict[int, int]
    """slot -> resident bytes of its live worker (absent where none were read: gone, or a zombie)."""


class WorkerReadings:
    """Per-slot counters of context switches that keep what a slot's previous workers did (like CPU time),
    and each live worker's swap, memory, threads and descriptors: one read of its status a round."""

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._slots: dict[int, _SlotSwitches] = {}
        self._told_descriptors = False

    def read(self, pids: dict[int, int]) -> WorkerFacts:
        switches: dict[int, tuple[int, int]] = {}
        found = WorkerFacts(switches, {}, {}, {}, {}, {})
        for slot, pid in pids.items():
            state = self._slots.setdefault(slot, _SlotSwitches())
            if pid != state.pid:
                state.base = (state.base[0] + state.last[0], state.base[1] + state.last[1])
                state.pid, state.last = pid, (0, 0)
            reading = read_process(pid, self._proc)
            if reading is not None:
                if reading.voluntary_switches is not None and reading.involuntary_switches is not None:
                    state.last = (
                        max(state.last[0], reading.voluntary_switches),
                        max(state.last[1], reading.involuntary_switches),
                    )
                    state.seen = True
                if reading.swap_bytes is not None:
                    found.swap[slot] = reading.swap_bytes
                if reading.threads is not None:
                    found.threads[slot] = reading.threads
                if reading.resident_bytes:
                    found.memory[slot] = reading.resident_bytes
            descriptors = read_descriptors(pid, self._proc)
            if descriptors is not None:
                found.open_fds[slot], limit = descriptors
                if limit is not None:
                    found.fd_limits[slot] = limit
            elif reading is not None and not self._told_descriptors:  # alive, but its descriptors are hidden
                self._told_descriptors = True
                LOG.info(
                    "gunicorn-insight: cannot read the open files of worker pid %s (%s/%s/fd and limits: another "
                    "user's process, and this master is not root?); gunicorn_worker_open_fds and "
                    "gunicorn_worker_max_fds are absent, and descriptor leaks are not judged, where they cannot be "
                    "read",
                    pid,
                    self._proc,
                    pid,
                )
        for slot, state in self._slots.items():
            if state.seen:
                switches[slot] = (state.base[0] + state.last[0], state.base[1] + state.last[1])
        return found
