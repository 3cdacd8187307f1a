"""Everyday deployments that must not break the server or destroy data: a shared multiprocess directory,
a user's files in it, privilege drop with --user, --daemon, a USR2 upgrade."""

from __future__ import annotations

import glob
import grp
import json
import os
import pwd
import re
import signal
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest
from harness import APPS, Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until


def test_a_second_server_keeps_the_first_ones_files_and_the_users_app_db(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """Two servers sharing one prometheus_dir: the second's startup removes neither the first's live files
    nor a user's app.db; the first keeps exporting every count."""
    shared = tmp_path / "multiproc"
    shared.mkdir()
    with sqlite3.connect(shared / "app.db") as database:
        database.execute("create table orders (id integer)")
    env = {"GUNICORN_INSIGHT_PROMETHEUS_DIR": str(shared)}
    first = start_gunicorn(process_factory, app="metrics_app:app", cwd=APPS, env=env)
    for _ in range(5):
        assert first.get("/") == 200
    first.wait_for_value("app_hits_total", 5)
    first.wait_for_value("gunicorn_requests_total", 5)

    second = start_gunicorn(process_factory, app="metrics_app:app", cwd=APPS, env=env)
    assert second.get("/") == 200

    assert first.get("/") == 200
    # Both servers' files are in the directory both /metrics processes read: the totals are the sums.
    first.wait_for_value("app_hits_total", 7)
    first.wait_for_value("gunicorn_requests_total", 7)
    with sqlite3.connect(shared / "app.db") as database:
        assert database.execute("select count(*) from orders").fetchone() == (0,)


def _server_json_of(master_pid: int, since: float) -> Path | None:
    """The server.json of the master with this pid that started after ``since`` (wall clock): a directory
    left by an earlier run's killed master can carry the same pid, reused."""
    for path in glob.glob("/dev/shm/gunicorn-insight-*/server.json") + glob.glob(
        os.path.join(tempfile.gettempdir(), "gunicorn-insight-*", "server.json")
    ):
        try:
            described = json.loads(Path(path).read_text())
            if described["master_pid"] == master_pid and described["started"] >= since:
                return Path(path)
        except (OSError, ValueError, KeyError):
            continue
    return None


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


@pytest.mark.parametrize("daemon", [True, False], ids=["daemon", "foreground"])
def test_a_normal_stop_leaves_nothing_in_dev_shm_or_tmp(
    daemon: bool, process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """After SIGTERM the run directory is gone, also with --daemon (whose master is a grandchild of the process
    that loaded the config)."""
    pidfile = tmp_path / "gunicorn.pid"
    args = ["--pid", str(pidfile), "--error-logfile", str(tmp_path / "error.log")]
    since = time.time()
    server = start_gunicorn(process_factory, args=[*args, "--daemon"] if daemon else args, wait=False)
    master = 0
    try:
        if daemon:
            assert server.process.wait(timeout=30) == 0
        wait_until(
            lambda: pidfile.exists() and pidfile.read_text().strip(),
            timeout=30,
            what="the pidfile",
            dump=lambda: server.process.describe() + _read(tmp_path / "error.log"),
        )
        master = int(pidfile.read_text())
        server_json = wait_until(
            lambda: _server_json_of(master, since),
            timeout=30,
            what="the master's server.json",
            dump=lambda: _read(tmp_path / "error.log"),
        )
        wait_until(lambda: _accepts(server), timeout=30, what="a 200", dump=lambda: _read(tmp_path / "error.log"))
        assert server_json.parent.is_dir()
        os.kill(master, signal.SIGTERM)
        wait_until(
            lambda: _gone(master), timeout=30, what="the master to exit", dump=lambda: _read(tmp_path / "error.log")
        )
        # The /metrics process leaves with the master; the directory goes with the master's atexit.
        assert not server_json.parent.exists(), _read(tmp_path / "error.log")
    finally:
        if master and not _gone(master):
            os.kill(master, signal.SIGKILL)


def _accepts(server: Gunicorn) -> bool:
    try:
        return server.get("/") == 200
    except OSError:
        return False


def _read(path: Path) -> str:
    try:
        return f"\n----- {path} -----\n{path.read_text()}"
    except OSError:
        return ""


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_workers_running_as_nobody_serve_and_export_the_apps_metrics(
    preload: bool, process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """gunicorn started as root with --user nobody --group nogroup: the workers can write the embedded
    multiprocess directory, requests return 200 and the application's counter is served."""
    if os.geteuid() != 0:
        pytest.skip("needs root: gunicorn only switches the workers' user when it starts as root")
    try:
        nobody, nogroup = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    except KeyError:
        pytest.skip("this machine has no user nobody or group nogroup")
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(
        "import gunicorn_insight\n"
        "gunicorn_insight.install(globals())\n"
        "# The interpreter may live where nobody cannot read (under /root here): the standard library modules\n"
        "# prometheus_client needs are loaded before the fork. The application and its Counter still are not.\n"
        "import prometheus_client\n"
    )
    args = ["--user", "nobody", "--group", "nogroup", *(["--preload"] if preload else [])]
    server = start_gunicorn(process_factory, app="metrics_app:app", cwd=APPS, args=args, config=str(config))
    for pid in server.worker_pids():
        assert os.stat(f"/proc/{pid}").st_uid == nobody
    for _ in range(4):
        assert server.get("/") == 200
    server.wait_for_value("app_hits_total", 4)
    server.wait_for_value("gunicorn_requests_total", 4)
    run_dir = Path(server.scoreboard_path).parent
    for path in (run_dir, run_dir / "prometheus", run_dir / "scoreboard"):
        status = path.stat()
        assert (status.st_uid, status.st_gid) == (nobody, nogroup), path


def test_a_prometheus_dir_the_worker_user_cannot_write_is_a_startup_error(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """--user nobody with a root-only prometheus_dir of the operator's: one Error naming the uid and the fix,
    instead of workers that cannot write their metrics."""
    if os.geteuid() != 0:
        pytest.skip("needs root: gunicorn only switches the workers' user when it starts as root")
    directory = tmp_path / "metrics"
    directory.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    server = start_gunicorn(
        process_factory,
        args=["--user", "nobody", "--group", "nogroup"],
        wait=False,
        env={"GUNICORN_INSIGHT_PROMETHEUS_DIR": str(directory)},
    )
    assert server.process.wait(timeout=30) == 1
    output = server.process.output()
    assert f"Error: prometheus_dir='{directory}' is not writable for uid 65534" in output
    assert f"chown 65534:65534 {directory}" in output
    assert "Booting worker" not in output


def test_counters_carry_over_a_usr2_upgrade_with_the_embedded_directory(process_factory: ProcessFactory) -> None:
    """After USR2 and the old master's exit, the new master's /metrics still counts the requests the old
    one served (its embedded directory's files are handed over), plus its own."""
    server = start_gunicorn(process_factory, app="metrics_app:app", cwd=APPS, workers=1, script=True)
    for _ in range(3):
        assert server.get("/") == 200
    server.wait_for_value("gunicorn_requests_total", 3)
    since = time.time()
    server.process.send_signal(signal.SIGUSR2)
    server.process.wait_for_log(r"still served by the previous master \(USR2 upgrade\)", timeout=30)
    successor = int(re.findall(r"\[(\d+)\] \[INFO\] Starting gunicorn", server.process.output())[-1])
    assert successor != server.pid
    wait_until(
        lambda: _server_json_of(successor, since),
        timeout=30,
        what="the new master's server.json",
        dump=server.process.describe,
    )
    try:
        os.kill(server.pid, signal.SIGTERM)  # the operator retires the old master
        server.process.wait(timeout=30)
        for _ in range(2):
            assert server.get("/") == 200
        wait_until(
            lambda: _total_or_none(server, "gunicorn_requests_total") == 5,
            timeout=30,
            what="the new master to serve 3 + 2 requests",
            dump=lambda: f"{_total_or_none(server, 'gunicorn_requests_total')}\n{server.process.describe()}",
        )
        assert server.total("app_hits_total") == 5
    finally:
        os.kill(successor, signal.SIGTERM)
        wait_until(lambda: _gone(successor), timeout=30, what="the new master to exit")


def _total_or_none(server: Gunicorn, name: str) -> float | None:
    try:
        return server.total(name)
    except OSError:
        return None  # the new master's /metrics process is still taking the port over
