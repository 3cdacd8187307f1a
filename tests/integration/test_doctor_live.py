"""doctor --pid against a real gunicorn: findings from what the server measurably does, each with its evidence."""

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

from harness import APPS, Gunicorn, start_gunicorn
from servers import NginxFactory, ProcessFactory, wait_until


def doctor(server: Gunicorn, *args: str) -> tuple[int, dict[str, Any]]:
    """``gunicorn-insight doctor --pid <master> --json`` as an operator would run it: (exit status, document)."""
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn_insight.cli", "doctor", "--pid", str(server.pid), "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.stdout, result.stderr + server.process.describe()
    return result.returncode, json.loads(result.stdout)


def findings(document: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {finding["check"]: finding for finding in document["findings"]}


def test_saturated_server_is_told_to_change_worker_class(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """Idle: no saturation finding. Every sync worker blocked waiting: live-saturation with the measured
    utilisation, the backlog, and advice to use threads since the requests wait rather than compute."""
    release = tmp_path / "release"
    server = start_gunicorn(
        process_factory, app="gated_app:app", cwd=APPS, workers=2, env={"GATED_APP_RELEASE": str(release)}
    )
    status, idle = doctor(server, "--window", "1")
    assert status == 0, idle
    assert "live-saturation" not in findings(idle)
    assert idle["measured"]["utilisation"] == 0
    assert idle["measured"]["host_gunicorn_servers"] >= 1  # this server, found in /proc by its command line
    clients = [
        threading.Thread(target=server.get, args=("/block",), kwargs={"timeout": 150}, daemon=True) for _ in range(4)
    ]
    try:
        for client in clients:
            client.start()
        wait_until(
            lambda: server.busy_workers() == 2, timeout=30, what="both workers busy", dump=server.process.describe
        )
        _, busy = doctor(server, "--window", "2")
    finally:
        release.touch()
        for client in clients:
            client.join(timeout=60)
    found = findings(busy)
    assert busy["measured"]["utilisation"] == 1.0, busy["measured"]
    saturation = found["live-saturation"]
    assert saturation["severity"] == "warning"
    assert "utilisation 100%" in saturation["what"]
    assert "2 of 2 request slots in use" in saturation["what"]
    assert "gthread" in saturation["fix"], saturation
    assert "live-backlog" in found, busy
    assert "connections waited in the accept queue" in found["live-backlog"]["what"]


def test_timeout_below_the_slowest_request(process_factory: ProcessFactory) -> None:
    """A request outlasting timeout=2 kills its worker; doctor --pid names it and says to raise timeout."""
    server = start_gunicorn(process_factory, workers=1, args=["--timeout", "2"])
    _, before = doctor(server, "--window", "0.5")
    assert "live-timeout" not in findings(before)
    with contextlib.suppress(OSError, http.client.HTTPException):  # the worker dies under it
        server.get("/slow?s=8", timeout=60)
    wait_until(
        lambda: server.worker_pids() and server.ready_workers() == 1,
        timeout=60,
        what="the replacement worker",
        dump=server.process.describe,
    )
    _, after = doctor(server, "--window", "0.5")
    timeout = findings(after)["live-timeout"]
    assert timeout["severity"] == "warning"
    assert "killed by timeout=2s" in timeout["what"]
    assert "GET /slow" in timeout["what"]
    assert "raise timeout" in timeout["fix"]


def test_queue_time_behind_nginx(process_factory: ProcessFactory, nginx_factory: NginxFactory) -> None:
    """nginx stamps X-Request-Start; a request queued 2 s behind a busy worker makes doctor --pid report the
    queue time; before any request waited it says nothing."""
    server = start_gunicorn(process_factory, workers=1)
    nginx = nginx_factory(
        f"127.0.0.1:{server.port}", extra_location_directives='proxy_set_header X-Request-Start "t=${msec}";'
    )
    port = int(nginx.url.rsplit(":", 1)[1])

    def through_nginx(path: str) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", path)
        connection.getresponse().read()
        connection.close()

    through_nginx("/")
    server.wait_for_value("gunicorn_request_queue_seconds_count", 1)
    _, before = doctor(server, "--window", "0.5")
    assert "live-queue-time" not in findings(before)
    blocker = threading.Thread(target=through_nginx, args=("/slow?s=2",))
    blocker.start()
    server.wait_for_value("gunicorn_requests_in_flight", 1)
    through_nginx("/")  # waits behind the slow request for about 2 s
    blocker.join()
    server.wait_for_value("gunicorn_request_queue_seconds_count", 3)
    _, after = doctor(server, "--window", "0.5")
    queue = findings(after)["live-queue-time"]
    assert "3 requests since the server started, from X-Request-Start" in queue["what"], queue
