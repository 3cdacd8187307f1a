"""A small or full /dev/shm: a clear startup error or a warning, never a SIGBUS.

gunicorn runs in a private mount namespace with a small tmpfs mounted over /dev/shm (where the plugin puts
its run directory, see _hooks._prepare_directories); the test reaches that tmpfs through /proc/<pid>/root.
Needs root (or CAP_SYS_ADMIN) and unshare(1): skipped with the reason where the machine refuses them.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from harness import Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until


def _small_shm(size: str) -> list[str]:
    """A command prefix: a new mount namespace whose /dev/shm is a tmpfs of ``size``, then exec the rest."""
    script = f'mount -t tmpfs -o size={size} gi-test-shm /dev/shm && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


@pytest.fixture(scope="module")
def namespaces() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed: cannot mount a small /dev/shm without touching the host's")
    probe = subprocess.run([*_small_shm("1m"), "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()}")


def _run_dir(server: Gunicorn) -> Path:
    """The run directory inside the namespace's /dev/shm, seen from outside through /proc/<pid>/root."""
    shm = f"/proc/{server.pid}/root/dev/shm"

    def found() -> str | None:
        server.process.assert_alive("its server.json")
        # Before the mount, /proc/<pid>/root/dev/shm is still the host's, with other servers' directories.
        for path in glob.glob(f"{shm}/gunicorn-insight-*/server.json"):
            try:
                if json.loads(Path(path).read_text())["master_pid"] == server.pid:
                    return os.path.dirname(path)
            except (OSError, ValueError):
                continue
        return None

    return Path(wait_until(found, timeout=30, what="server.json in the small /dev/shm", dump=server.process.describe))


def _fill(directory: Path) -> None:
    """Write until the filesystem is full."""
    chunk = bytes(1 << 16)
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(OSError, match="No space left on device"):
            _write_forever(fd, chunk)
    finally:
        os.close(fd)
    statistics = os.statvfs(directory)
    assert statistics.f_bavail < 16  # fewer than 16 blocks left


def _write_forever(fd: int, chunk: bytes) -> None:
    while True:
        os.write(fd, chunk)


@pytest.mark.usefixtures("namespaces")
def test_no_room_for_the_scoreboard_is_a_clear_startup_error(process_factory: ProcessFactory) -> None:
    """A /dev/shm too small for the scoreboard stops gunicorn with one line naming the directory, the
    room needed and the fixes, instead of the master dying of SIGBUS."""
    server = start_gunicorn(process_factory, launcher=_small_shm("1m"), wait=False)
    status = server.process.wait(timeout=60)
    output = server.process.output()
    assert status == 1, output  # gunicorn's own exit for an error while starting; SIGBUS would be -7
    assert "Error: gunicorn-insight cannot reserve 4.1 MiB for its scoreboard in /dev/shm/gunicorn-insight-" in output
    assert "--shm-size" in output
    assert "GUNICORN_INSIGHT_MAX_WORKERS (16 slots of 260 KiB" in output
    assert "Booting worker" not in output


@pytest.mark.usefixtures("namespaces")
def test_a_dev_shm_that_fills_up_while_serving_costs_the_metrics_not_the_server(
    process_factory: ProcessFactory,
) -> None:
    """/dev/shm filled to the last block while serving: requests keep succeeding, a replacement worker starts
    in a new slot, and when the master's metric files cannot grow the plugin warns once and stops exporting."""
    server = start_gunicorn(process_factory, launcher=_small_shm("8m"), wait=False)
    run_dir = _run_dir(server)
    server.scoreboard_path = str(run_dir / "scoreboard")
    server.process.wait_for_port(server.port, timeout=30)
    server.wait_for_workers(2)
    assert server.get("/") == 200
    _fill(run_dir)

    for _ in range(300):  # more than a ring page's worth per worker: untouched pages get written
        assert server.get("/") == 200
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)  # the master forks a replacement into a slot never used before
    wait_until(
        lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 2,
        timeout=30,
        what="a replacement worker",
        dump=server.process.describe,
    )
    server.wait_for_workers(2)
    assert server.get("/") == 200
    server.wait_for_value("gunicorn_requests_total", 302)
    assert server.value("gunicorn_worker_exits_total", cause="killed") == 1

    # Hundreds of (method, status) pairs: new keys that no longer fit the master's 64 KiB counter file.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        for status in range(200, 600, 2):
            connection.request(method, f"/status/{status}")
            connection.getresponse().read()
    connection.close()
    server.process.wait_for_log("no room to grow the Prometheus files in /dev/shm/gunicorn-insight-", timeout=30)
    for _ in range(20):
        assert server.get("/") == 200
    assert server.process.alive()
    assert "gunicorn_requests_total" not in server.metrics_text()  # gone, not frozen
    assert server.process.output().count("no room to grow the Prometheus files") == 1
    assert "Worker (pid:" not in server.process.output().replace(f"Worker (pid:{victim})", "")


@pytest.mark.usefixtures("namespaces")
def test_room_for_the_scoreboard_but_not_the_metric_files_is_a_clear_startup_error(
    process_factory: ProcessFactory,
) -> None:
    """The scoreboard (4,164 KiB) fits, the master's 64 KiB metric files do not: one line naming the
    Prometheus directory and the fixes."""
    server = start_gunicorn(process_factory, launcher=_small_shm("4224k"), wait=False)
    status = server.process.wait(timeout=60)
    output = server.process.output()
    assert status == 1, output
    assert (
        "Error: gunicorn-insight cannot reserve room for its Prometheus files in /dev/shm/gunicorn-insight-" in output
    )
    assert "GUNICORN_INSIGHT_PROMETHEUS_DIR" in output
    assert "Booting worker" not in output


@pytest.mark.usefixtures("namespaces")
def test_little_room_left_for_the_applications_files_is_said_once(process_factory: ProcessFactory) -> None:
    """Room for the plugin's reserved files but not for the application's (which prometheus_client does not
    reserve): the server starts and serves, with one warning naming the room left and the fixes."""
    server = start_gunicorn(process_factory, launcher=_small_shm("4424k"), wait=False)
    server.process.wait_for_port(server.port, timeout=30)
    assert server.get("/") == 200
    server.process.wait_for_log(
        r"only 0\.\d MiB left in /dev/shm/gunicorn-insight-\S+/prometheus; the "
        r"application's prometheus_client files need 64 KiB",
        timeout=30,
    )
    assert server.process.output().count("the application's prometheus_client files need") == 1


def test_run_directories_of_masters_that_are_gone_are_removed_at_start(
    namespaces: None, process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """In a /dev/shm of its own, a server starts beside two run directories: the one whose server.json names
    a master that no longer runs is removed, in one line; the one of a master that runs stays."""
    live = start_gunicorn(process_factory, workers=1)
    described = json.loads((Path(live.scoreboard_path).parent / "server.json").read_text())
    (tmp_path / "gone.json").write_text(json.dumps({**described, "master_pid": 4_194_304 + 1}))  # above pid_max
    (tmp_path / "live.json").write_text(json.dumps(described))
    plant = " && ".join(
        f"mkdir -m 700 /dev/shm/gunicorn-insight-{name} && "
        f"cp {tmp_path / name}.json /dev/shm/gunicorn-insight-{name}/server.json"
        for name in ("gone", "live")
    )
    script = f'mount -t tmpfs -o size=64m gi-test-shm /dev/shm && {plant} && exec "$@"'
    launcher = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    server = start_gunicorn(process_factory, workers=1, launcher=launcher, wait=False)
    server.process.wait_for_log(
        r"removed 1 run directory of masters that are gone \(killed with SIGKILL\?\): /dev/shm/gunicorn-insight-gone",
        timeout=30,
    )
    shm = Path(f"/proc/{server.pid}/root/dev/shm")
    assert not (shm / "gunicorn-insight-gone").exists()
    assert (shm / "gunicorn-insight-live" / "server.json").exists()
