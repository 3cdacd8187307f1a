"""The kernel's OOM killer, for real: gunicorn in a memory-limited cgroup, a request allocating past the limit."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cgroups import child_cgroup
from harness import APPS, Gunicorn, start_gunicorn
from servers import ProcessFactory, StatsdDaemon, wait_until
from test_doctor_live import doctor, findings
from test_worker_death import EXITED, fire_and_forget

from gunicorn_insight._cgroup import memory_cgroup_dirs

LIMIT = 250 << 20
"""Room for the master, the /metrics process and a worker to boot (37 MiB charged to the group here)."""


def _limit_file(version: int) -> str:
    return "memory.max" if version == 2 else "memory.limit_in_bytes"


@pytest.fixture
def memory_cgroup() -> Iterator[Path]:
    """A child of this process's memory cgroup (v1 or v2) limited to LIMIT; emptied and removed at teardown."""
    found = memory_cgroup_dirs(include_root=False)
    if not found:
        pytest.skip("no memory cgroup in /proc/self/cgroup (neither v1 nor v2 memory controller)")
    version, parent = found[0]
    with child_cgroup(parent, version, "memory") as group:
        limit = group / _limit_file(version)
        try:
            limit.write_text(f"{LIMIT}\n")
        except OSError as error:  # v2: the parent does not delegate the memory controller to its children
            pytest.skip(f"cannot limit memory in {group} (v{version}): {error}")
        if version == 2 and (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0\n")  # swapping would postpone the OOM kill indefinitely
        yield group


def test_oom_kill_is_its_own_cause(
    memory_cgroup: Path, process_factory: ProcessFactory, statsd_daemon: StatsdDaemon
) -> None:
    """A worker the kernel OOM-kills is cause oom at /metrics, at StatsD and in the exit line naming its request."""
    host, port = statsd_daemon.udp_address
    server = start_gunicorn(
        process_factory,
        app="hungry_app:app",
        cwd=APPS,
        workers=1,
        env={"GUNICORN_INSIGHT_STATSD": f"{host}:{port}"},
        launcher=[sys.executable, str(APPS / "in_cgroup.py"), str(memory_cgroup)],
    )
    (worker,) = server.worker_pids()
    members = {int(pid) for pid in (memory_cgroup / "cgroup.procs").read_text().split()}
    assert {server.pid, worker} <= members, "gunicorn is not running inside the test cgroup"
    started = time.monotonic()
    fire_and_forget(server, "/grow")
    match = server.process.wait_for_log(EXITED, timeout=60)
    assert (int(match["pid"]), match["cause"], match["path"]) == (worker, "oom", "/grow")
    assert match["detail"] == "killed by the kernel's OOM killer (the cgroup's oom_kill count rose)"
    assert float(match["elapsed"]) <= time.monotonic() - started + 0.05  # the line rounds to a tenth
    assert re.search(rf"Worker \(pid:{worker}\) was sent SIGKILL", server.process.output())
    server.wait_for_value("gunicorn_worker_exits_total", 1, cause="oom")
    assert server.total("gunicorn_worker_exits_total", cause="killed") == 0
    wait_until(
        lambda: statsd_daemon.counters().get("gunicorn.worker.exit.oom") == 1,
        timeout=30,
        what="gunicorn.worker.exit.oom == 1 at StatsD",
        dump=lambda: repr(statsd_daemon.counters()),
    )
    assert "gunicorn.worker.exit.killed" not in statsd_daemon.counters()
    server.wait_for_workers(1)  # gunicorn replaced the worker, and the server kept serving
    assert server.get("/") == 200


def test_memory_near_the_limit_then_oom(memory_cgroup: Path, process_factory: ProcessFactory) -> None:
    """gunicorn in a 250 MiB cgroup: quiet at first; a worker holding 190 MiB makes live-memory a warning with
    the working set against the limit; once the OOM killer has killed a worker, an error naming the request."""
    server = start_gunicorn(
        process_factory,
        app="hungry_app:app",
        cwd=APPS,
        workers=1,
        launcher=[sys.executable, str(APPS / "in_cgroup.py"), str(memory_cgroup)],
    )
    _, before = doctor(server, "--window", "0.5")
    assert "live-memory" not in findings(before), before
    assert before["measured"]["memory_limit_bytes"] == LIMIT
    assert server.get("/hold?mb=190") == 200
    _, holding = doctor(server, "--window", "0.5")
    near = findings(holding)["live-memory"]
    assert near["severity"] == "warning", holding
    assert "of its 250 MiB limit" in near["what"]
    assert "set max_requests" in near["fix"]
    fire_and_forget(server, "/grow")
    server.process.wait_for_log(EXITED, timeout=60)
    server.wait_for_workers(1)
    wait_until(
        lambda: any(item.get("cause") == "oom" for item in status_exits(server)),
        timeout=30,
        what="the oom exit in status.json",
        dump=server.process.describe,
    )
    status, killed = doctor(server, "--window", "0.5")
    oom = findings(killed)["live-memory"]
    assert (status, oom["severity"]) == (1, "error")
    assert "the OOM killer killed 1 worker recently (last: GET /grow)" in oom["what"]


def status_exits(server: Gunicorn) -> list[dict[str, Any]]:
    run_dir = Path(server.scoreboard_path).parent
    try:
        exits = json.loads((run_dir / "status.json").read_text()).get("recent_exits")
    except (OSError, ValueError):
        return []
    return exits if isinstance(exits, list) else []
