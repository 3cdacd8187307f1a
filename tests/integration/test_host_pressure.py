"""Host pressure read for real: this machine's cgroup and PSI files, and a child CPU cgroup with a quota
that a CPU-bound request runs into."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cgroups import child_cgroup
from harness import APPS, start_gunicorn
from servers import ProcessFactory, StatsdDaemon, wait_until
from test_oom import LIMIT as OOM_LIMIT
from test_oom import memory_cgroup  # noqa: F401 -- the fixture, found by name through request.getfixturevalue

from gunicorn_insight._cgroup import cgroup_dirs
from gunicorn_insight._master.pressure import HostReader

QUOTA_US, PERIOD_US = 20_000, 100_000
"""0.2 cores: one busy worker is throttled in most periods."""


def limited_cgroup(controller: str, limits: Callable[[int], dict[str, str]]) -> Iterator[Path]:
    """A child of this process's ``controller`` cgroup with ``limits(version)`` written into its files (in
    order); emptied and removed at teardown. Skips, saying why, where the machine cannot give one."""
    found = [(version, directory) for version, directory, _ in cgroup_dirs(controller)]
    if not found:
        pytest.skip(f"no {controller} cgroup in /proc/self/cgroup")
    version, parent = found[0]
    with child_cgroup(parent, version, controller) as group:
        try:
            for name, value in limits(version).items():
                (group / name).write_text(f"{value}\n")
        except OSError as error:  # v2: the parent does not delegate the controller to its children
            pytest.skip(f"cannot limit {controller} in {group} (v{version}): {error}")
        yield group


@pytest.fixture
def cpu_cgroup() -> Iterator[Path]:
    """A child of this process's cpu cgroup with a 0.2-core quota."""
    yield from limited_cgroup(
        "cpu",
        lambda version: (
            {"cpu.max": f"{QUOTA_US} {PERIOD_US}"}
            if version == 2
            else {"cpu.cfs_period_us": str(PERIOD_US), "cpu.cfs_quota_us": str(QUOTA_US)}
        ),
    )


def test_cpu_quota_throttling_is_counted(
    cpu_cgroup: Path, process_factory: ProcessFactory, statsd_daemon: StatsdDaemon
) -> None:
    """A CPU-bound request in a 0.2-core cgroup: throttled periods and seconds > 0 at /metrics and StatsD, the
    quota as 0.2 cores, and a startup warning that 2 workers exceed (2 x 0.2) + 1."""
    host, port = statsd_daemon.udp_address
    server = start_gunicorn(
        process_factory,
        app="pressure_app:app",
        cwd=APPS,
        workers=2,
        env={"GUNICORN_INSIGHT_STATSD": f"{host}:{port}"},
        launcher=[sys.executable, str(APPS / "in_cgroup.py"), str(cpu_cgroup)],
    )
    members = {int(pid) for pid in (cpu_cgroup / "cgroup.procs").read_text().split()}
    assert {server.pid, *server.worker_pids()} <= members, "gunicorn is not running inside the test cgroup"
    assert server.value("gunicorn_cgroup_cpu_quota_cores") == pytest.approx(QUOTA_US / PERIOD_US)
    assert server.get("/burn?s=2", timeout=60) == 200
    wait_until(
        lambda: server.total("gunicorn_cgroup_cpu_throttled_periods_total") > 0,
        timeout=30,
        what="throttled periods > 0",
        dump=server.process.describe,
    )
    assert server.total("gunicorn_cgroup_cpu_throttled_seconds_total") > 0
    periods = server.total("gunicorn_cgroup_cpu_periods_total")
    assert periods >= server.total("gunicorn_cgroup_cpu_throttled_periods_total")
    wait_until(
        lambda: statsd_daemon.counters().get("gunicorn.cgroup.cpu.throttled_periods", 0) > 0,
        timeout=30,
        what="gunicorn.cgroup.cpu.throttled_periods > 0 at StatsD",
        dump=lambda: repr(statsd_daemon.counters()),
    )
    assert "workers=2 share a CPU quota of 0.20 cores" in server.process.output()
    # The involuntary switches of the burning worker grow: it was preempted when the quota ran out.
    assert server.total("gunicorn_worker_context_switches_total", kind="involuntary") > 0


def test_this_machines_files_are_read_and_absent_ones_stay_absent(process_factory: ProcessFactory) -> None:
    """Real gunicorn on this machine: every reading the kernel offers (the test reads the same files) is at
    /metrics, per-worker switches and swap for each worker, and whatever the kernel lacks is no series."""
    expected = HostReader().read()
    server = start_gunicorn(process_factory, app="pressure_app:app", cwd=APPS, workers=2)
    assert server.get("/") == 200
    wait_until(
        lambda: len([key for key in server.samples() if key[0] == "gunicorn_worker_swap_bytes"]) == 2,
        timeout=30,
        what="swap series for both worker slots",
        dump=server.process.describe,
    )
    names = {name for name, _ in server.samples()}
    for name, present in (
        ("gunicorn_cgroup_cpu_throttled_periods_total", expected.throttling is not None),
        ("gunicorn_cgroup_cpu_quota_cores", expected.quota_cores is not None),
        ("gunicorn_cgroup_memory_usage_bytes", expected.memory_usage is not None),
        ("gunicorn_cgroup_memory_limit_bytes", expected.memory_limit is not None),
        ("gunicorn_pressure_waiting_seconds_total", bool(expected.pressure)),
        ("gunicorn_cgroup_pids", expected.pids is not None),
        ("gunicorn_cgroup_pids_limit", expected.pids_limit is not None),
    ):
        assert (name in names) == present, (name, present, expected)
    if os.path.exists("/proc/pressure/cpu"):
        assert server.total("gunicorn_pressure_waiting_seconds_total", resource="cpu") > 0
    for slot in ("0", "1"):
        assert server.value("gunicorn_worker_context_switches_total", worker=slot, kind="voluntary") is not None
    output = server.process.output()
    if expected.pressure and None not in (expected.memory_usage, expected.throttling, expected.pids):
        assert "gunicorn-insight: cannot read" not in output
    else:
        assert "gunicorn-insight: cannot read" in output


def test_memory_limit_and_usage_of_a_limited_cgroup(
    request: pytest.FixtureRequest, process_factory: ProcessFactory
) -> None:
    """gunicorn in a memory cgroup limited to 250 MiB: the limit, the usage and the working set at /metrics."""
    group: Path = request.getfixturevalue("memory_cgroup")
    server = start_gunicorn(
        process_factory,
        app="pressure_app:app",
        cwd=APPS,
        workers=1,
        launcher=[sys.executable, str(APPS / "in_cgroup.py"), str(group)],
    )
    wait_until(
        lambda: server.value("gunicorn_cgroup_memory_limit_bytes") is not None,
        timeout=30,
        what="gunicorn_cgroup_memory_limit_bytes",
        dump=server.process.describe,
    )
    assert server.value("gunicorn_cgroup_memory_limit_bytes") == OOM_LIMIT
    samples = server.samples()  # one scrape: both values from the same round
    usage = samples.get(("gunicorn_cgroup_memory_usage_bytes", ()))
    working_set = samples.get(("gunicorn_cgroup_memory_working_set_bytes", ()))
    assert usage is not None
    assert working_set is not None
    assert 0 < working_set <= usage < OOM_LIMIT


def _psi_total(path: Path) -> float:
    """The ``some`` total of a PSI file, in seconds."""
    first = path.read_text().splitlines()[0]
    return int(first.rsplit("total=", 1)[1]) / 1e6


@pytest.fixture
def unified_cgroup() -> Iterator[Path]:
    """A child of this process's cgroup v2 group (on a hybrid host, under unified/), with its own PSI files."""
    found = [directory for version, directory, _ in cgroup_dirs("") if version == 2]
    if not found:
        pytest.skip("no cgroup v2 group in /proc/self/cgroup (neither v2 nor hybrid)")
    with child_cgroup(found[0], 2, "psi") as group:
        if not (group / "cpu.pressure").exists():
            pytest.skip(f"{group} has no cpu.pressure: the kernel keeps no PSI per cgroup")
        yield group


def test_psi_comes_from_the_servers_own_v2_group(unified_cgroup: Path, process_factory: ProcessFactory) -> None:
    """gunicorn in a v2 group of its own: PSI is read from that group's files (said at startup), not from the
    whole host's /proc/pressure, so the CPU pressure at /metrics is the group's."""
    server = start_gunicorn(
        process_factory,
        app="pressure_app:app",
        cwd=APPS,
        workers=2,
        launcher=[sys.executable, str(APPS / "in_cgroup.py"), str(unified_cgroup)],
    )
    assert f"PSI {unified_cgroup}" in server.process.output()
    assert server.get("/burn?s=1", timeout=60) == 200
    exported = server.total("gunicorn_pressure_waiting_seconds_total", resource="cpu")
    group_total = _psi_total(unified_cgroup / "cpu.pressure")
    # The group's total only grows, so what was exported before it was read cannot exceed it; the host's
    # /proc/pressure total (everything the machine ever waited) would.
    assert exported <= group_total, (exported, group_total, Path("/proc/pressure/cpu").read_text())


def test_open_descriptors_against_the_workers_limit(process_factory: ProcessFactory) -> None:
    """A worker leaking descriptors under `ulimit -n 256` shows them against that limit, per slot."""
    server = start_gunicorn(
        process_factory,
        app="pressure_app:app",
        cwd=APPS,
        workers=1,
        launcher=["prlimit", "--nofile=256:256", "--"],
    )
    wait_until(
        lambda: server.value("gunicorn_worker_max_fds", worker="0") == 256,
        timeout=30,
        what="gunicorn_worker_max_fds == 256",
        dump=server.process.describe,
    )
    before = server.value("gunicorn_worker_open_fds", worker="0")
    assert before is not None
    assert 0 < before < 50, before
    assert server.get("/hold?n=200") == 200
    wait_until(
        lambda: (server.value("gunicorn_worker_open_fds", worker="0") or 0) >= before + 200,
        timeout=30,
        what=f"gunicorn_worker_open_fds >= {before} + 200",
        dump=lambda: f"{server.value('gunicorn_worker_open_fds', worker='0')}\n{server.process.describe()}",
    )


PIDS_LIMIT = 64


@pytest.fixture
def pids_cgroup() -> Iterator[Path]:
    """A child of this process's pids cgroup limited to PIDS_LIMIT tasks."""
    yield from limited_cgroup("pids", lambda _: {"pids.max": str(PIDS_LIMIT)})


def test_tasks_against_the_cgroups_pids_limit(pids_cgroup: Path, process_factory: ProcessFactory) -> None:
    """In a cgroup with pids.max=64: the limit, and a count of tasks that covers at least the master, the
    workers and the /metrics process."""
    server = start_gunicorn(
        process_factory,
        workers=2,
        launcher=[sys.executable, str(APPS / "in_cgroup.py"), str(pids_cgroup)],
    )
    server.wait_for_value("gunicorn_cgroup_pids_limit", PIDS_LIMIT)
    counted = server.value("gunicorn_cgroup_pids")
    assert counted is not None
    assert 4 <= counted <= PIDS_LIMIT, counted
    assert server.process.output().count("cgroup process count") == 0, server.process.describe()
