"""The gunicorn-insight command against a real gunicorn: status names the slow request, top refreshes, doctor judges."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from harness import Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until

from gunicorn_insight import _scoreboard as sb


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m gunicorn_insight.cli ...`` as an operator would run it, wide enough not to wrap."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "gunicorn_insight.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def fire_slow_request(server: Gunicorn, seconds: float) -> threading.Thread:
    def send() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            server.get(f"/slow?s={seconds}", timeout=60)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def wait_for_request_in_flight(server: Gunicorn) -> int:
    """The pid of the worker serving a request, once the scoreboard shows it."""

    def busy_pid() -> int | None:
        board = server.board()
        try:
            return next((view.pid for view in board if view.state == sb.READY and view.requests), None)
        finally:
            board.close()

    return wait_until(busy_pid, timeout=30, what="a request in flight in the scoreboard", dump=server.process.describe)


def busy_workers(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [worker for worker in document["workers"] if worker["state"] == "busy"]


def test_status_json_names_the_busy_worker_and_its_request(process_factory: ProcessFactory) -> None:
    """status --pid <master> --json shows the busy worker, the slow request's path and its growing elapsed time."""
    server = start_gunicorn(process_factory, workers=2)
    fire_slow_request(server, 5)
    worker_pid = wait_for_request_in_flight(server)
    result = run_cli("status", "--pid", str(server.pid), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["server"]["master_pid"] == server.pid
    assert document["server"]["worker_class"] == "sync"
    (busy,) = busy_workers(document)
    assert busy["pid"] == worker_pid
    (request,) = busy["requests"]
    assert (request["method"], request["path"]) == ("GET", "/slow?<redacted>")
    assert 0 < request["elapsed"] < 5
    assert document["totals"]["workers"] == 2
    assert (document["totals"]["busy"], document["totals"]["capacity"]) == (1, 2)
    idle = [worker for worker in document["workers"] if worker["state"] == "idle"]
    assert len(idle) == 1
    assert all(worker["connections_limit"] == 1 for worker in document["workers"])


def test_status_by_worker_pid_shows_the_table(process_factory: ProcessFactory) -> None:
    """status --pid <worker> finds the worker's server and prints the human table with the request."""
    server = start_gunicorn(process_factory, workers=2)
    fire_slow_request(server, 5)
    worker_pid = wait_for_request_in_flight(server)
    result = run_cli("status", "--pid", str(worker_pid))
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "/slow?<redacted>" in line)
    assert str(worker_pid) in row
    assert "busy" in row
    assert f"master {server.pid}" in result.stdout


def test_top_renders_frames_then_exits(process_factory: ProcessFactory) -> None:
    """top --iterations 2 without a terminal prints two frames with the request in flight, then exits 0."""
    server = start_gunicorn(process_factory, workers=2)
    fire_slow_request(server, 5)
    wait_for_request_in_flight(server)
    result = run_cli("top", "--pid", str(server.pid), "--iterations", "2", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("gunicorn-insight top") == 2
    assert result.stdout.count("/slow?<redacted>") == 2


def test_top_exits_1_when_gunicorn_stops(process_factory: ProcessFactory) -> None:
    """top notices the master is gone, says so on stderr and exits 1."""
    server = start_gunicorn(process_factory, workers=1)
    env = {**os.environ, "COLUMNS": "200"}
    top = subprocess.Popen(
        [sys.executable, "-m", "gunicorn_insight.cli", "top", "--pid", str(server.pid), "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    assert top.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(top.stdout or ()), daemon=True)
    reader.start()
    try:
        # Stop gunicorn only once top has drawn a frame: before that, top would not have found it at all.
        wait_until(
            lambda: any("gunicorn-insight top" in line for line in lines),
            timeout=30,
            what="top's first frame",
            dump=lambda: "".join(lines),
        )
        server.process.stop()
        top.wait(timeout=30)
        reader.join(timeout=10)
        err = top.stderr.read() if top.stderr is not None else ""
    finally:
        if top.poll() is None:
            top.kill()
            top.wait()
    assert top.returncode == 1, err
    assert f"gunicorn (master pid {server.pid}" in err
    assert "has exited" in err


def test_status_with_a_selector_matching_nothing(process_factory: ProcessFactory) -> None:
    """A proc_name no running server has: exit 1 with the list of running servers."""
    server = start_gunicorn(process_factory, workers=1)
    result = run_cli("status", "--name", "no-such-server")
    assert result.returncode == 1
    assert "matches name 'no-such-server'" in result.stderr
    assert f"pid {server.pid}" in result.stderr


def test_doctor_reports_known_problems(tmp_path: Path) -> None:
    """doctor on a config with known problems lists them and exits 1 because one is an error."""
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(
        "import gunicorn_insight\n"
        "workers = 4\n"
        "timeout = 0\n"
        "max_requests = 500\n"
        "threads = 8\n"
        "worker_connections = 8\n"
        "loglevel = 'critical'\n"
        "worker_tmp_dir = '/nonexistent/heartbeat'\n"
        "gunicorn_insight.install(globals())\n"
    )
    result = run_cli("doctor", "-c", str(config), "--json")
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    severities = {finding["check"]: finding["severity"] for finding in document["findings"]}
    assert severities["worker-tmp-dir"] == "error"
    for check in ("timeout-zero", "max-requests-jitter", "gthread-keepalive", "loglevel"):
        assert severities[check] == "warning", check
    assert "plugin-installed" not in severities
    assert document["facts"]["worker_class"] == "gthread"
    assert document["errors"] == sum(1 for severity in severities.values() if severity == "error")


def test_doctor_without_errors_exits_0(tmp_path: Path) -> None:
    """A config with no error (warnings allowed) exits 0 and prints the human table."""
    config = tmp_path / "gunicorn.conf.py"
    config.write_text("worker_tmp_dir = '/dev/shm'\nmax_requests = 1000\nmax_requests_jitter = 100\n")
    result = run_cli("doctor", "-c", str(config), "--worker-memory-mb", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"config: {config}" in result.stdout
    assert "0 error(s)" in result.stdout
