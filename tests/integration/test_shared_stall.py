"""Several gunicorn servers on one host stalled at once: doctor --pid says so, with since when and the frame
their stuck requests share. Two real servers whose /lock requests wait on one file lock the test holds.

The doctor looks at every server of the host, so it runs in a private mount namespace whose /dev/shm holds
only this test's servers' run directories (bind-mounted): other servers running on this machine at the same
time (other tests) cannot change what it finds. Needs root and unshare(1): skipped with the reason elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import APPS, Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until


@pytest.fixture(scope="module")
def namespaces() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed: cannot give the doctor a /dev/shm of this test's servers only")
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs gi-probe /dev/shm"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")


def run_dir(server: Gunicorn) -> str:
    return os.path.dirname(server.scoreboard_path)


def doctor_on_this_host(servers: list[Gunicorn], target: Gunicorn, stage: Path) -> dict[str, Any]:
    """``doctor --pid <target> --json`` on a host whose only gunicorn-insight servers are ``servers``."""
    stage.mkdir(exist_ok=True)
    (stage / "tmp").mkdir(exist_ok=True)
    lines = ["set -e"]
    for number, server in enumerate(servers):
        lines.append(f"mkdir -p {stage}/{number} && mount --bind {shlex.quote(run_dir(server))} {stage}/{number}")
    lines.append("mount -t tmpfs gi-test-host /dev/shm")
    for number, server in enumerate(servers):
        lines.append(
            f"mkdir {shlex.quote(run_dir(server))} && mount --move {stage}/{number} {shlex.quote(run_dir(server))}"
        )
    lines.append('exec "$@"')
    command = [sys.executable, "-m", "gunicorn_insight.cli", "doctor", "--pid", str(target.pid), "--json"]
    result = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "\n".join(lines),
            "sh",
            *command,
            "--window",
            "0.3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "TMPDIR": str(stage / "tmp"), "COLUMNS": "200"},  # the temporary directory: empty too
    )
    assert result.stdout, result.stderr
    return dict(json.loads(result.stdout))


def shared_stall(document: dict[str, Any]) -> dict[str, str] | None:
    return next((finding for finding in document["findings"] if finding["check"] == "live-shared-stall"), None)


@contextlib.contextmanager
def held(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def start(process_factory: ProcessFactory, lock: Path, name: str) -> Gunicorn:
    """One sync worker, stalls declared after 1 s: two /lock requests (one in flight, one queued) stall it."""
    return start_gunicorn(
        process_factory,
        app="shared_lock_app:app",
        cwd=APPS,
        workers=1,
        metrics=False,
        args=["--timeout", "120", "-n", name],
        env={"SHARED_LOCK": str(lock), "GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": "1"},
    )


def stall(server: Gunicorn) -> None:
    def send() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            server.get("/lock", timeout=120)

    for _ in range(2):
        threading.Thread(target=send, daemon=True).start()

    def stalled() -> bool:
        status = json.loads((Path(run_dir(server)) / "status.json").read_text())
        return status["stalled_since"] is not None

    wait_until(stalled, timeout=30, what=f"pid {server.pid} stalled", dump=server.process.describe)


@pytest.mark.usefixtures("namespaces")
def test_two_servers_stalled_on_one_lock_are_named_with_the_frame_they_share(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """Both servers' requests wait on one file lock: live-shared-stall names both, since when, and the frame."""
    lock = tmp_path / "shared.lock"
    first, second = (start(process_factory, lock, name) for name in ("shop", "billing"))
    with held(lock):
        stall(first)
        stall(second)
        document = doctor_on_this_host([first, second], first, tmp_path / "host")
    finding = shared_stall(document)
    assert finding is not None, document
    assert finding["severity"] == "error"
    what = finding["what"]
    assert what.startswith("2 gunicorn servers on this host are stalled at once"), what
    for server, name in ((first, "shop"), (second, "billing")):
        assert f"pid {server.pid} '{name}' (127.0.0.1:{server.port}) stalled since " in what, what
    assert "the stuck requests of 2 of them wait in take_the_shared_lock (" in what, what
    assert "shared_lock_app.py: fcntl.flock(shared, fcntl.LOCK_EX)" in what, what
    assert f"pid {first.pid} 1 of 1 request(s) at line " in what, what
    assert [item["master_pid"] for item in document["measured"]["host_stalled_servers"]] == [first.pid, second.pid]
    assert document["errors"] >= 1


@pytest.mark.usefixtures("namespaces")
def test_healthy_servers_or_one_stalled_alone_are_no_shared_stall(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """Two healthy servers: no finding; one of them stalled, the other serving: still none."""
    lock = tmp_path / "shared.lock"
    first, second = (start(process_factory, lock, name) for name in ("shop", "billing"))
    assert first.get("/") == second.get("/") == 200
    healthy = doctor_on_this_host([first, second], first, tmp_path / "host")
    assert shared_stall(healthy) is None, healthy
    assert healthy["measured"]["host_stalled_servers"] is None
    with held(lock):
        stall(first)
        assert second.get("/") == 200
        alone = doctor_on_this_host([first, second], second, tmp_path / "host")
    assert shared_stall(alone) is None, alone
    assert alone["measured"]["host_stalled_servers"] is None
