"""Worker lifecycle on real gunicorn: a stall named while every worker is blocked, a crash loop named, the
exception a crashing worker left in its exit line, boot durations and ready workers."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
from harness import APPS, start_gunicorn
from servers import ProcessFactory, wait_until
from test_worker_death import EXITED, fire_and_forget

STALLED = (
    r"gunicorn-insight: stalled: (?P<in_flight>\d+) requests in flight, none finished for (?P<quiet>[\d.]+)s, "
    r"(?P<busy>\d+) of (?P<workers>\d+) workers busy.*; requests: (?P<requests>.*)\. Their stacks"
)
CRASH_LOOP = (
    r"gunicorn-insight: crash loop: (?P<count>\d+) workers died within 60s of starting in the last 300s "
    r'\((?P<causes>[^)]*)\); last: pid=\d+ slot=\d+ cause=crash detail="(?P<detail>[^"]*)"'
)


def test_every_worker_blocked_is_a_stall_named_with_its_requests(process_factory: ProcessFactory) -> None:
    """Two sync workers both sleeping and a third request queued: one stall line naming both requests, the
    stall gauge and counter, then "stall over" once they finish."""
    server = start_gunicorn(
        process_factory, app="pressure_app:app", cwd=APPS, workers=2, env={"GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": "1"}
    )
    for _ in range(3):
        fire_and_forget(server, "/slow?s=6")
    match = server.process.wait_for_log(STALLED, timeout=30)
    assert (match["in_flight"], match["busy"], match["workers"]) == ("2", "2", "2")
    assert float(match["quiet"]) >= 1
    assert match["requests"].count('"GET /slow?<redacted>"') == 2, match["requests"]
    assert server.value("gunicorn_stalled_requests") == 2
    assert server.value("gunicorn_stalls_total") == 1
    server.process.wait_for_log(
        r"gunicorn-insight: stall over after [\d.]+s: requests finish again", timeout=30, since=match.end()
    )
    server.wait_for_value("gunicorn_stalled_requests", 0)
    assert server.process.output().count("gunicorn-insight: stalled:") == 1
    assert " not served: " not in server.process.output()  # requests were in flight: a stall, not that


def test_a_lone_slow_request_is_no_stall(process_factory: ProcessFactory) -> None:
    """One worker of two sleeping, nothing waiting: a slow request, never a stall."""
    server = start_gunicorn(
        process_factory, app="pressure_app:app", cwd=APPS, workers=2, env={"GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": "1"}
    )
    assert server.get("/slow?s=3", timeout=30) == 200
    server.wait_for_value("gunicorn_slow_requests_total", 1)
    assert "gunicorn-insight: stalled" not in server.process.output()
    assert server.value("gunicorn_stalls_total") == 0


def test_workers_dying_after_boot_are_a_crash_loop(process_factory: ProcessFactory) -> None:
    """A worker class that raises soon after boot, every time: each exit line carries the exception, one crash
    loop line names it, and the crash-loop gauge and counter say so."""
    server = start_gunicorn(
        process_factory,
        app="pressure_app:app",
        cwd=APPS,
        workers=1,
        args=["-k", "pressure_app.CrashingWorker"],
        wait=False,
    )
    match = server.process.wait_for_log(CRASH_LOOP, timeout=60)
    assert int(match["count"]) >= 3
    assert match["causes"].startswith("crash=")
    assert match["detail"] == "exited with code -1: RuntimeError: lost the database connection pool"
    exits = list(re.finditer(EXITED, server.process.output(), re.MULTILINE))
    assert len(exits) >= 3
    for exit_line in exits:
        assert exit_line["cause"] == "crash"
        assert exit_line["detail"] == "exited with code -1: RuntimeError: lost the database connection pool"
    assert server.process.output().count("gunicorn-insight: crash loop:") == 1
    wait_until(
        lambda: server.value("gunicorn_worker_crash_loop") == 1,
        timeout=30,
        what="gunicorn_worker_crash_loop == 1",
        dump=server.process.describe,
    )
    assert server.value("gunicorn_worker_crash_loops_total") == 1
    assert server.total("gunicorn_worker_exits_total", cause="crash") >= 3


def test_boot_duration_and_ready_workers(process_factory: ProcessFactory) -> None:
    """Two workers booted: two boot durations observed, both ready, none booting, capacity from ready ones."""
    server = start_gunicorn(process_factory, app="pressure_app:app", cwd=APPS, workers=2)
    server.wait_for_value("gunicorn_worker_boot_duration_seconds_count", 2)
    assert 0 < server.total("gunicorn_worker_boot_duration_seconds_sum") < 60
    assert (server.value("gunicorn_workers_ready"), server.value("gunicorn_workers_booting")) == (2, 0)
    assert server.value("gunicorn_capacity") == 2


def test_a_worker_importing_its_app_is_booting_and_adds_no_capacity(process_factory: ProcessFactory) -> None:
    """While the application takes 3 s to import, the worker is live but booting and capacity is 0; then it
    is ready, capacity 1, and its boot duration covers the import."""
    server = start_gunicorn(
        process_factory,
        app="pressure_app:app",
        cwd=APPS,
        workers=1,
        env={"PRESSURE_APP_IMPORT_SECONDS": "3"},
        wait=False,
    )
    server.process.wait_for_port(server.port, timeout=30)
    wait_until(
        lambda: server.value("gunicorn_workers_booting") == 1,
        timeout=30,
        what="one booting worker",
        dump=server.process.describe,
    )
    assert (server.value("gunicorn_workers"), server.value("gunicorn_workers_ready")) == (1, 0)
    assert server.value("gunicorn_capacity") == 0
    server.wait_for_value("gunicorn_workers_ready", 1)
    assert server.value("gunicorn_capacity") == 1
    assert server.total("gunicorn_worker_boot_duration_seconds_sum") >= 3


BLOCKING_RELOAD_CONFIG = """
import time

import gunicorn_insight


def on_reload(server):
    time.sleep(8)  # a hook doing slow I/O in gunicorn's master loop


gunicorn_insight.install(globals())
"""


@pytest.mark.oldest
def test_a_blocked_master_loop_is_measured_and_named_with_its_stack(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """A hook that holds gunicorn's master loop for 8 s: the gauge climbs past 5 s, one line names the hook's
    frame, one more says the loop goes round again, and the gauge is back at 0."""
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(BLOCKING_RELOAD_CONFIG)
    server = start_gunicorn(process_factory, config=str(config), workers=1)
    wait_until(  # present and 0: the master has seen the loop wait (an absent gauge sums to 0 as well)
        lambda: server.value("gunicorn_master_loop_stuck_seconds") == 0,
        timeout=30,
        what="gunicorn_master_loop_stuck_seconds == 0",
        dump=server.process.describe,
    )
    server.process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: (server.value("gunicorn_master_loop_stuck_seconds") or 0) >= 5,
        timeout=30,
        what="gunicorn_master_loop_stuck_seconds >= 5",
        dump=server.process.describe,
    )
    found = server.process.wait_for_log(
        r"gunicorn's master loop has not gone round for \d+\.\ds: [^\n]*\n(?:.*\n)*?.*in on_reload\n\s+time\.sleep",
        timeout=30,
    )
    server.process.wait_for_log(r"gunicorn's master loop goes round again after \d+\.\ds", timeout=30)
    server.wait_for_value("gunicorn_master_loop_stuck_seconds", 0)
    assert server.process.output().count("master loop has not gone round") == 1, found.group(0)
