"""Host pressure from fake cgroup v1, v2 and hybrid trees and fake /proc files: parsing, and absent stays absent."""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gunicorn_insight._cgroup import cgroup_dirs
from gunicorn_insight._facts import CpuThrottling
from gunicorn_insight._master.pressure import (
    HostReader,
    WorkerReadings,
    parse_cfs_quota,
    parse_cpu_max,
    parse_cpu_stat,
    parse_psi,
    read_descriptors,
    read_process,
)

PSI_CPU = "some avg10=1.50 avg60=0.80 avg300=0.20 total=2500000\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
PSI_MEMORY = "some avg10=0.00 avg60=0.00 avg300=0.00 total=1500\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=700\n"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v1_tree(tmp_path: Path, *, quota: int = 150000, limit: int = 512 << 20) -> tuple[Path, Path]:
    """cpu,cpuacct and memory hierarchies with the process in /app (the parent /kubepods has no quota)."""
    cgroup = tmp_path / "cgroup"
    write(
        tmp_path / "self_cgroup",
        "12:memory:/kubepods/app\n8:pids:/kubepods/app\n4:cpu,cpuacct:/kubepods/app\n1:name=systemd:/x\n",
    )
    cpu = cgroup / "cpu,cpuacct" / "kubepods" / "app"
    write(cpu / "cpu.stat", "nr_periods 120\nnr_throttled 30\nthrottled_time 2500000000\n")
    write(cpu / "cpu.cfs_quota_us", f"{quota}\n")
    write(cpu / "cpu.cfs_period_us", "100000\n")
    write(cpu.parent / "cpu.cfs_quota_us", "-1\n")
    write(cpu.parent / "cpu.cfs_period_us", "100000\n")
    memory = cgroup / "memory" / "kubepods" / "app"
    write(memory / "memory.usage_in_bytes", f"{300 << 20}\n")
    write(memory / "memory.stat", f"cache 1000\ntotal_inactive_file {100 << 20}\nhierarchical_memory_limit {limit}\n")
    pids = cgroup / "pids" / "kubepods" / "app"
    write(pids / "pids.current", "17\n")
    write(pids / "pids.max", "max\n")
    write(pids.parent / "pids.max", "100\n")
    return cgroup, tmp_path / "self_cgroup"


def v2_tree(tmp_path: Path, *, hybrid: bool = False) -> tuple[Path, Path]:
    """A v2 group /pod/app with a 2-core quota on the group and a smaller memory limit on the parent."""
    cgroup = tmp_path / "cgroup"
    mount = cgroup / "unified" if hybrid else cgroup
    write(mount / "cgroup.controllers", "cpu memory io\n")
    write(tmp_path / "self_cgroup", "0::/pod/app\n")
    group = mount / "pod" / "app"
    write(group / "cpu.stat", "usage_usec 10\nnr_periods 50\nnr_throttled 5\nthrottled_usec 750000\n")
    write(group / "cpu.max", "200000 100000\n")
    write(group.parent / "cpu.max", "max 100000\n")
    write(group / "memory.current", f"{200 << 20}\n")
    write(group / "memory.stat", f"anon 1\ninactive_file {50 << 20}\n")
    write(group / "memory.max", "max\n")
    write(group / "pids.current", "9\n")
    write(group / "pids.max", "max\n")
    write(group.parent / "memory.max", f"{256 << 20}\n")
    write(group / "cpu.pressure", PSI_CPU)
    write(group / "memory.pressure", PSI_MEMORY)
    return cgroup, tmp_path / "self_cgroup"


def test_v1_throttling_quota_and_memory(tmp_path: Path) -> None:
    """v1: throttled_time in ns, quota/period as cores, working set = usage - total_inactive_file, the
    hierarchical limit; the pids count and the lowest pids.max of the group and its ancestors."""
    cgroup, self_cgroup = v1_tree(tmp_path)
    reader = HostReader(str(self_cgroup), str(cgroup), proc=str(tmp_path / "no-proc"))
    reading = reader.read()
    assert reading.throttling == CpuThrottling(periods=120, throttled_periods=30, throttled_seconds=2.5)
    assert reading.quota_cores == 1.5
    assert (reading.memory_usage, reading.memory_working_set, reading.memory_limit) == (300 << 20, 200 << 20, 512 << 20)
    assert (reading.pids, reading.pids_limit) == (17, 100)
    assert reading.pressure == {}
    assert any("pressure stall information" in line for line in reader.missing)


def test_v1_without_quota_or_limit_reports_none(tmp_path: Path) -> None:
    """quota -1 and v1's "unlimited" limit are no quota and no limit (None), not 0 and not 2^63."""
    cgroup, self_cgroup = v1_tree(tmp_path, quota=-1, limit=9223372036854771712)
    reading = HostReader(str(self_cgroup), str(cgroup), proc=str(tmp_path)).read()
    assert reading.quota_cores is None
    assert reading.memory_limit is None
    assert reading.memory_usage == 300 << 20


@pytest.mark.parametrize("hybrid", [False, True], ids=["v2", "hybrid"])
def test_v2_throttling_quota_memory_and_psi(tmp_path: Path, hybrid: bool) -> None:
    """v2: throttled_usec, cpu.max, the smallest memory.max of the ancestors, the group's own PSI files."""
    cgroup, self_cgroup = v2_tree(tmp_path, hybrid=hybrid)
    write(tmp_path / "proc" / "pressure" / "cpu", "some avg10=0 avg60=0 avg300=0 total=99\n")
    reader = HostReader(str(self_cgroup), str(cgroup), proc=str(tmp_path / "proc"))
    reading = reader.read()
    assert reading.throttling == CpuThrottling(periods=50, throttled_periods=5, throttled_seconds=0.75)
    assert reading.quota_cores == 2.0
    assert (reading.memory_usage, reading.memory_working_set, reading.memory_limit) == (200 << 20, 150 << 20, 256 << 20)
    assert (reading.pids, reading.pids_limit) == (9, None)  # "max" all the way up: no limit, not 0
    assert reading.pressure == {
        ("cpu", "some"): 2.5,
        ("cpu", "full"): 0.0,
        ("memory", "some"): 0.0015,
        ("memory", "full"): 0.0007,
    }  # the group's files win over /proc/pressure
    assert reader.missing == []


def test_v2_without_the_cpu_controller_has_no_throttling(tmp_path: Path) -> None:
    """A v2 cpu.stat with only usage (controller not enabled for the group) means throttling is unknown."""
    cgroup, self_cgroup = v2_tree(tmp_path)
    (cgroup / "pod" / "app" / "cpu.stat").write_text("usage_usec 10\nuser_usec 5\nsystem_usec 5\n")
    reader = HostReader(str(self_cgroup), str(cgroup), proc=str(tmp_path))
    assert reader.read().throttling is None
    assert any(line.startswith("CPU throttling") for line in reader.missing)


def test_psi_falls_back_to_proc_pressure(tmp_path: Path) -> None:
    """Without cgroup PSI files the host's /proc/pressure is read."""
    cgroup, self_cgroup = v1_tree(tmp_path)
    write(
        tmp_path / "proc" / "pressure" / "io",
        "some avg10=0 avg60=0 avg300=0 total=4000000\nfull avg10=0 avg60=0 avg300=0 total=1000000\n",
    )
    reader = HostReader(str(self_cgroup), str(cgroup), proc=str(tmp_path / "proc"))
    assert reader.read().pressure == {("io", "some"): 4.0, ("io", "full"): 1.0}
    assert reader.sources["psi"] == str(tmp_path / "proc" / "pressure")


def test_no_cgroup_at_all_is_absent_and_said(tmp_path: Path) -> None:
    """No /proc/self/cgroup: every reading None or empty, and each gap named once."""
    reader = HostReader(str(tmp_path / "missing"), str(tmp_path), proc=str(tmp_path))
    reading = reader.read()
    assert (reading.throttling, reading.quota_cores, reading.memory_usage, reading.memory_limit) == (
        None,
        None,
        None,
        None,
    )
    assert (reading.pids, reading.pids_limit) == (None, None)
    assert reading.pressure == {}
    assert len(reader.missing) == 4


def test_parsers_reject_garbage() -> None:
    """Unparseable kernel text is None (absent), never a made-up 0."""
    assert parse_cpu_stat("", 2) is None
    assert parse_cpu_stat("nr_throttled x\n", 1) is None
    assert parse_cpu_max("max 100000") is None
    assert parse_cpu_max("50000 100000\n") == 0.5
    assert parse_cpu_max("garbage") is None
    assert parse_cfs_quota("-1", "100000") is None
    assert parse_cfs_quota(None, "100000") is None
    assert parse_psi("some avg10=0 total=oops\n") == {}


def test_cgroup_dirs_prefers_v1_and_finds_hybrid_v2(tmp_path: Path) -> None:
    """A v1 hierarchy under its joined name, then the v2 group mounted at unified/."""
    write(tmp_path / "self", "4:cpu,cpuacct:/a\n0::/b\n")
    (tmp_path / "root" / "cpu,cpuacct").mkdir(parents=True)
    write(tmp_path / "root" / "unified" / "cgroup.controllers", "\n")
    found = cgroup_dirs("cpu", str(tmp_path / "self"), str(tmp_path / "root"))
    root = str(tmp_path / "root")
    assert found == [(1, f"{root}/cpu,cpuacct/a", f"{root}/cpu,cpuacct"), (2, f"{root}/unified/b", f"{root}/unified")]


def test_process_status_switches_swap_and_memory(tmp_path: Path) -> None:
    """voluntary/nonvoluntary_ctxt_switches, VmSwap and VmRSS (kB) and Threads from /proc/<pid>/status; a gone pid
    is None."""
    write(
        tmp_path / "42" / "status",
        "Name:\tgunicorn\nVmHWM:\t   99999 kB\nVmRSS:\t   23456 kB\nVmSwap:\t    1024 kB\nThreads:\t5\n"
        "voluntary_ctxt_switches:\t17\nnonvoluntary_ctxt_switches:\t3\n",
    )
    reading = read_process(42, str(tmp_path))
    assert reading is not None
    assert (reading.voluntary_switches, reading.involuntary_switches, reading.swap_bytes) == (17, 3, 1 << 20)
    assert reading.threads == 5
    assert reading.resident_bytes == 23456 * 1024
    assert read_process(43, str(tmp_path)) is None


def test_resident_memory_is_what_statm_counts() -> None:
    """On this machine: VmRSS is statm's resident pages (what ps and the OOM killer's log show), read while the
    process's memory holds still (two statm reads around it agree)."""
    page = os.sysconf("SC_PAGE_SIZE")

    def statm(pid: int) -> int:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page

    with subprocess.Popen(["sleep", "30"]) as child:
        try:
            deadline = time.monotonic() + 10
            while True:  # sleep faults its pages in for a moment after exec
                before = statm(child.pid)
                reading = read_process(child.pid)
                if statm(child.pid) == before and b"sleep" in Path(f"/proc/{child.pid}/comm").read_bytes():
                    break
                assert time.monotonic() < deadline, "the process's memory never held still"
                time.sleep(0.01)
            assert reading is not None
            assert reading.resident_bytes == before
        finally:
            child.kill()


def test_worker_switches_survive_replacement(tmp_path: Path) -> None:
    """A slot's counter keeps its dead worker's switches when a new worker takes the slot; swap is per live
    worker; a slot never read is absent, not 0."""

    def status(pid: int, voluntary: int, involuntary: int, swap_kb: int) -> None:
        write(
            tmp_path / str(pid) / "status",
            f"VmSwap:\t{swap_kb} kB\nvoluntary_ctxt_switches:\t{voluntary}\n"
            f"nonvoluntary_ctxt_switches:\t{involuntary}\n",
        )

    readings = WorkerReadings(str(tmp_path))
    status(100, 10, 1, 0)
    assert readings.read({0: 100, 1: 999})[:2] == ({0: (10, 1)}, {0: 0})
    status(100, 25, 4, 8)
    assert readings.read({0: 100})[:2] == ({0: (25, 4)}, {0: 8192})
    os.remove(tmp_path / "100" / "status")
    status(101, 5, 2, 0)
    assert readings.read({0: 101})[:2] == ({0: (30, 6)}, {0: 0})


LIMITS = """Limit                     Soft Limit           Hard Limit           Units
Max cpu time              unlimited            unlimited            seconds
Max open files            {soft}                 {hard}               files
Max processes             63643                63643                processes
"""


def test_open_descriptors_and_their_limit(tmp_path: Path) -> None:
    """Entries of /proc/<pid>/fd and the soft "Max open files"; unlimited is no limit, a gone pid nothing."""
    for pid, soft in ((42, "1024"), (43, "unlimited")):
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        for fd in range(5):
            (tmp_path / str(pid) / "fd" / str(fd)).touch()
        write(tmp_path / str(pid) / "limits", LIMITS.format(soft=soft, hard="4096"))
    assert read_descriptors(42, str(tmp_path)) == (5, 1024)
    assert read_descriptors(43, str(tmp_path)) == (5, None)
    assert read_descriptors(44, str(tmp_path)) is None
    facts = WorkerReadings(str(tmp_path)).read({0: 42, 1: 43, 2: 44})
    assert (facts.open_fds, facts.fd_limits) == ({0: 5, 1: 5}, {0: 1024})


def test_open_descriptors_of_another_process() -> None:
    """On this machine, for a child that holds a known set of descriptors: what its /proc/<pid>/fd lists, and
    the soft RLIMIT_NOFILE it inherited."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    with subprocess.Popen(
        [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=True,
    ) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"  # started: its descriptors no longer change
            reading = read_descriptors(child.pid)
            assert reading is not None
            assert reading[0] == len(os.listdir(f"/proc/{child.pid}/fd"))
            assert reading[1] == (None if soft == resource.RLIM_INFINITY else soft)
        finally:
            assert child.stdin is not None
            child.stdin.close()


@pytest.mark.parametrize("asked", ["prlimit", "limits table"])
def test_a_workers_own_descriptor_limit_is_read_both_ways(asked: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A limit the process set itself is what is read: through prlimit, or through /proc/<pid>/limits where
    prlimit is refused (another user's process)."""
    if asked == "limits table":

        def refused(pid: int, which: int) -> tuple[int, int]:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(resource, "prlimit", refused)
    code = (
        "import resource, sys; hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (777, hard)); print('ready', flush=True); sys.stdin.read()"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            reading = read_descriptors(child.pid)
            assert reading is not None
            assert reading[1] == 777
        finally:
            assert child.stdin is not None
            child.stdin.close()


def test_real_machine_readings() -> None:
    """On this machine: whatever the kernel offers is read, whatever it lacks is named."""
    reader = HostReader()
    reading = reader.read()
    if os.path.exists("/proc/pressure/cpu"):
        assert ("cpu", "some") in reading.pressure
    else:
        assert any("pressure" in line for line in reader.missing)
    if reading.memory_usage is None:
        assert any("memory" in line for line in reader.missing)
    assert read_process(os.getpid()) is not None


def test_status_json_carries_the_readings_it_has(tmp_path: Path) -> None:
    """status.json (read by the doctor) holds the host readings and lifecycle gauges; absent ones are left out."""
    import json

    from gunicorn_insight._facts import HostPressure, Round
    from gunicorn_insight._runfiles import StatusFiles

    facts = Round(
        ready_workers=1,
        booting_workers=1,
        swap={0: 4096},
        crash_loop=True,
        host=HostPressure(
            throttling=CpuThrottling(10, 2, 0.5),
            memory_usage=300,
            memory_working_set=200,
            pressure={("memory", "some"): 1.5},
        ),
    )
    StatusFiles(str(tmp_path)).write_round(facts)
    status = json.loads((tmp_path / "status.json").read_text())
    assert (status["workers_ready"], status["workers_booting"], status["crash_loop"]) == (1, 1, True)
    assert status["host"] == {
        "memory_usage_bytes": 300,
        "memory_working_set_bytes": 200,
        "cpu_periods": 10,
        "cpu_throttled_periods": 2,
        "cpu_throttled_seconds": 0.5,
        "pressure_seconds": {"memory_some": 1.5},
        "swap_bytes": 4096,
    }


def test_descriptors_that_cannot_be_read_are_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A live worker (its status readable) whose fd directory is not: no reading, and one line saying so."""
    write(tmp_path / "42" / "status", "voluntary_ctxt_switches:\t1\nnonvoluntary_ctxt_switches:\t1\n")
    readings = WorkerReadings(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="gunicorn.error"):
        for _ in range(3):
            facts = readings.read({0: 42})
            assert (facts.open_fds, facts.fd_limits) == ({}, {})
    assert caplog.text.count("cannot read the open files of worker pid 42") == 1
