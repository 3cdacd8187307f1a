"""doctor: loading a gunicorn config as gunicorn does, and each check's finding, triggered and not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from gunicorn.config import Config

from gunicorn_insight import _doctor, _hooks, cli
from gunicorn_insight._doctor import Context, Finding, Mount, System

GIB = 1 << 30
SYSTEM = System(
    cpus=4, mem_available=16 * GIB, somaxconn=4096,
    mounts=(Mount("/", "ext4"), Mount("/dev/shm", "tmpfs"), Mount("/tmp", "ext4")), tempdir="/dev/shm",
)


def config(**settings: Any) -> Config:
    """A gunicorn Config with these settings, through gunicorn's own validators."""
    cfg = Config()
    for name, value in settings.items():
        cfg.set(name, value)
    return cfg


def found(
    check: Callable[[Context], Iterable[Finding]],
    settings: Mapping[str, Any] | None = None,
    *,
    system: System = SYSTEM,
    environ: Mapping[str, str] | None = None,
    **context: Any,
) -> list[tuple[str, str]]:
    """(check id, severity) of what one check finds in this configuration on this (fake) host."""
    ctx = Context(config(**(settings or {})), system, environ or {}, **context)
    return [(finding.check, finding.severity) for finding in check(ctx)]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- each check, triggered and not ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("workers", "expected"),
    [(9, []), (5, []), (40, [("workers-cpus", "warning")]), (2, [("workers-cpus", "warning")])],
)
def test_workers_against_cpus(workers: int, expected: list[tuple[str, str]]) -> None:
    """workers far above (2 x CPUs) + 1, or below the CPU count, is a warning; near it is fine."""
    assert found(_doctor.check_workers_cpus, {"workers": workers}) == expected


@pytest.mark.parametrize(
    ("workers", "available", "per_worker", "expected"),
    [
        (9, 16 * GIB, 150, []),
        (9, 1 * GIB, 150, [("workers-memory", "error")]),
        (9, 16 * GIB, 2000, [("workers-memory", "error")]),
        (9, None, 150, []),
    ],
)
def test_workers_against_available_memory(
    workers: int, available: int | None, per_worker: int, expected: list[tuple[str, str]]
) -> None:
    """workers x worker memory above what is available is an error; unknown memory is not judged."""
    system = replace(SYSTEM, mem_available=available)
    assert found(_doctor.check_workers_memory, {"workers": workers}, system=system,
                 worker_memory_mb=per_worker) == expected


def test_memory_finding_says_how_many_workers_fit() -> None:
    """The memory error's fix names the worker count that fits."""
    ctx = Context(config(workers=20), replace(SYSTEM, mem_available=GIB), {})
    (finding,) = _doctor.check_workers_memory(ctx)
    assert "at most 6 workers" in finding.fix


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [(30, []), (60, []), (61, [("timeout-proxy", "warning")]), (0, [("timeout-zero", "warning")])],
)
def test_timeout(timeout: int, expected: list[tuple[str, str]]) -> None:
    """timeout above nginx's 60 s proxy_read_timeout, or 0 (never replaced), is a warning."""
    assert found(_doctor.check_timeout, {"timeout": timeout}) == expected


@pytest.mark.parametrize(
    ("worker_tmp_dir", "tempdir", "expected"),
    [
        ("/dev/shm", "/tmp", []),
        ("/", "/tmp", [("worker-tmp-dir", "warning")]),
        (None, "/tmp", [("worker-tmp-dir", "warning")]),
        (None, "/dev/shm", [("worker-tmp-dir", "info")]),
        ("/nonexistent/heartbeat", "/tmp", [("worker-tmp-dir", "error")]),
    ],
)
def test_worker_tmp_dir(worker_tmp_dir: str | None, tempdir: str, expected: list[tuple[str, str]]) -> None:
    """Heartbeat files on disk (set or by default) warn; tmpfs is fine; unset on tmpfs is info; missing: error."""
    settings = {"worker_tmp_dir": worker_tmp_dir} if worker_tmp_dir else {}
    assert found(_doctor.check_worker_tmp_dir, settings, system=replace(SYSTEM, tempdir=tempdir)) == expected


def test_filesystem_is_the_longest_mount_point_and_the_last_mounted() -> None:
    """/dev/shm/x is on the /dev/shm mount, not on /; a mount listed later over the same point wins."""
    system = replace(SYSTEM, mounts=(Mount("/", "ext4"), Mount("/dev", "devtmpfs"), Mount("/dev/shm", "ext4"),
                                     Mount("/dev/shm", "tmpfs")))
    assert system.filesystem("/dev/shm/heartbeat") == "tmpfs"
    assert system.filesystem("/dev/shmx") == "devtmpfs"
    assert system.filesystem("/var/tmp") == "ext4"


def test_mounts_are_read_with_escaped_spaces(tmp_path: Path) -> None:
    """/proc/mounts writes a space in a mount point as \\040; it is read back as a space."""
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\ntmpfs /run/my\\040dir tmpfs rw 0 0\n")
    assert _doctor._read_mounts(str(mounts)) == (Mount("/", "ext4"), Mount("/run/my dir", "tmpfs"))


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"timeout": 31}, [("sync-long-requests", "warning")]),
        ({"timeout": 30}, []),
        ({"timeout": 45, "threads": 4}, []),  # sync with threads is gthread
        ({"timeout": 45, "worker_class": "gevent"}, []),
    ],
)
def test_sync_workers_with_long_timeout(settings: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    """sync workers allowed more than 30 s per request warn: a long request blocks a whole worker."""
    assert found(_doctor.check_sync_timeout, settings) == expected


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"threads": 4, "worker_connections": 6, "keepalive": 2}, [("gthread-keepalive", "warning")]),
        ({"threads": 4, "worker_connections": 4, "keepalive": 5}, [("gthread-keepalive", "warning")]),
        ({"threads": 4, "worker_connections": 7, "keepalive": 2}, []),
        ({"threads": 4, "worker_connections": 6, "keepalive": 0}, []),
        ({"threads": 1, "worker_connections": 2, "keepalive": 2}, []),  # sync: connections are not pooled
    ],
)
def test_gthread_keepalive_filling_worker_connections(
    settings: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    """gthread with worker_connections <= threads + 2 and keep-alive on warns of the known accept hang."""
    assert found(_doctor.check_gthread_connections, settings) == expected


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"max_requests": 1000}, [("max-requests-jitter", "warning")]),
        ({"max_requests": 1000, "max_requests_jitter": 100}, []),
        ({}, []),
    ],
)
def test_max_requests_without_jitter(settings: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    """max_requests without jitter warns: workers restart all at once."""
    assert found(_doctor.check_max_requests_jitter, settings) == expected


@pytest.mark.parametrize(
    ("backlog", "somaxconn", "expected"),
    [(2048, 4096, []), (8192, 4096, [("backlog-somaxconn", "warning")]), (8192, None, [])],
)
def test_backlog_above_somaxconn(backlog: int, somaxconn: int | None, expected: list[tuple[str, str]]) -> None:
    """A backlog the kernel silently caps at net.core.somaxconn warns; unknown somaxconn is not judged."""
    system = replace(SYSTEM, somaxconn=somaxconn)
    assert found(_doctor.check_backlog, {"backlog": backlog}, system=system) == expected


def test_prometheus_dir_unset_is_not_checked() -> None:
    """Without PROMETHEUS_MULTIPROC_DIR there is nothing to check."""
    assert found(_doctor.check_prometheus_dir) == []


def test_prometheus_dir_problems(tmp_path: Path) -> None:
    """Missing: info; a file: error; stale .db files of dead pids with no server using it: warning."""
    env = "PROMETHEUS_MULTIPROC_DIR"
    assert found(_doctor.check_prometheus_dir, environ={env: str(tmp_path / "missing")}) == [("prometheus-dir", "info")]
    (tmp_path / "file").write_text("")
    assert found(_doctor.check_prometheus_dir, environ={env: str(tmp_path / "file")}) == [("prometheus-dir", "error")]
    stale = tmp_path / "stale"
    stale.mkdir()
    assert found(_doctor.check_prometheus_dir, environ={env: str(stale)}) == []
    (stale / f"counter_{dead_pid()}.db").write_bytes(b"")
    assert found(_doctor.check_prometheus_dir, environ={env: str(stale)}) == [("prometheus-dir", "warning")]


def test_prometheus_dir_in_use_is_not_stale(tmp_path: Path) -> None:
    """.db files are fine when a live process wrote them or a live gunicorn-insight server owns the dir."""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    (tmp_path / f"histogram_{os.getpid()}.db").write_bytes(b"")
    assert found(_doctor.check_prometheus_dir, environ=env) == []
    (tmp_path / f"histogram_{os.getpid()}.db").rename(tmp_path / f"histogram_{dead_pid()}.db")
    live = frozenset({os.path.realpath(tmp_path)})
    assert found(_doctor.check_prometheus_dir, environ=env, live_prometheus_dirs=live) == []


@pytest.mark.parametrize(
    ("level", "expected"),
    [("info", []), ("debug", []), ("warning", [("loglevel", "warning")]), ("critical", [("loglevel", "warning")])],
)
def test_loglevel_above_info(level: str, expected: list[tuple[str, str]]) -> None:
    """A loglevel that hides info lines warns (boot and exit messages vanish)."""
    assert found(_doctor.check_loglevel, {"loglevel": level}) == expected


def test_loglevel_error_explains_that_crashes_go_silent() -> None:
    """At error or critical the reason names the silent crash loop, not just missing info lines."""
    (finding,) = _doctor.check_loglevel(Context(config(loglevel="critical"), SYSTEM))
    assert "crash-looping worker is silent" in finding.why


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"errorlog": "/var/log/gunicorn/error.log"}, [("capture-output", "info")]),
        ({"errorlog": "/var/log/gunicorn/error.log", "capture_output": True}, []),
        ({"errorlog": "-"}, []),
    ],
)
def test_capture_output_off_with_errorlog_file(settings: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    """An error log file without capture_output is worth knowing: the app's own prints go elsewhere."""
    assert found(_doctor.check_capture_output, settings) == expected


def test_plugin_missing_is_info_and_installed_is_quiet() -> None:
    """No gunicorn-insight hooks in the config: info; its hooks present: nothing."""
    assert found(_doctor.check_plugin) == [("plugin-installed", "info")]
    assert found(_doctor.check_plugin, {"on_starting": _hooks.on_starting}) == []


def test_plugin_with_on_starting_defined_after_install_counts_as_installed() -> None:
    """A later on_starting replaced ours, but pre_fork starts the plugin: not reported as missing."""

    def on_starting(server: object) -> None:
        pass

    assert found(_doctor.check_plugin, {"on_starting": on_starting, "pre_fork": _hooks.pre_fork}) == []


def test_plugin_settings_error_is_an_error() -> None:
    """install() refusing its settings is an error finding carrying the plugin's own message."""
    ctx = Context(config(), SYSTEM, {}, plugin_errors=["statsd='x' is not host:port"])
    (finding,) = _doctor.check_plugin(ctx)
    assert (finding.check, finding.severity) == ("plugin-settings", "error")
    assert "statsd='x' is not host:port" in finding.what


def test_worker_class_that_cannot_load_is_an_error() -> None:
    """A worker class gunicorn could not import is an error; gevent loads without monkey-patching us."""
    assert found(_doctor.check_worker_class, {"worker_class": "nosuch.module.Worker"}) == [("worker-class", "error")]
    ctx = Context(config(worker_class="gevent"), SYSTEM)
    assert (ctx.worker_kind, ctx.worker_class_error) == ("gevent", None)
    assert "gevent.monkey" not in sys.modules or not _socket_patched()


def _socket_patched() -> bool:
    import socket

    return socket.socket.__module__.startswith("gevent")


def test_findings_come_errors_first() -> None:
    """run_checks orders findings error, warning, info."""
    ctx = Context(config(workers=200, timeout=0, errorlog="/tmp/error.log"), replace(SYSTEM, mem_available=GIB))
    severities = [finding.severity for finding in _doctor.run_checks(ctx)]
    assert severities == sorted(severities, key=_doctor.SEVERITIES.index)
    assert severities[0] == "error"


# -- loading ---------------------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No GUNICORN_CMD_ARGS or plugin variables from the test runner; cwd without a gunicorn.conf.py."""
    for name in list(os.environ):
        if name.startswith("GUNICORN_INSIGHT_") or name in {"GUNICORN_CMD_ARGS", "PROMETHEUS_MULTIPROC_DIR"}:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_config_file_and_gunicorn_cmd_args_are_applied_as_gunicorn_does(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings come from the file, then GUNICORN_CMD_ARGS on top of it, like gunicorn's own loading."""
    path = clean_env / "gunicorn.conf.py"
    path.write_text("workers = 3\ntimeout = 90\n")
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--workers 5 --threads 2")
    loaded = _doctor.load(str(path))
    assert (loaded.cfg.workers, loaded.cfg.timeout, loaded.cfg.threads) == (5, 90, 2)
    assert loaded.cmd_args == "--workers 5 --threads 2"


def test_default_config_file_is_found_like_gunicorn(clean_env: Path) -> None:
    """Without -c, ./gunicorn.conf.py is used, as gunicorn does; without it, gunicorn's defaults."""
    assert _doctor.load(None).source is None
    (clean_env / "gunicorn.conf.py").write_text("workers = 7\n")
    loaded = _doctor.load(None)
    assert (loaded.source, loaded.cfg.workers) == (str(clean_env / "gunicorn.conf.py"), 7)


def test_install_in_the_config_has_no_side_effects(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """install() in the config neither creates a run dir nor clears a Prometheus dir, nor leaks env changes."""
    prometheus = clean_env / "prom"
    prometheus.mkdir()
    (prometheus / "counter_1.db").write_bytes(b"")
    path = clean_env / "gunicorn.conf.py"
    path.write_text(
        f"import gunicorn_insight\ngunicorn_insight.install(globals(), prometheus_dir={str(prometheus)!r})\n"
    )

    def forbidden(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("doctor created a run directory")

    monkeypatch.setattr("gunicorn_insight._hooks.tempfile.mkdtemp", forbidden)
    settings_before = _hooks.STATE.settings
    loaded = _doctor.load(str(path))
    assert (prometheus / "counter_1.db").exists()
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    assert _hooks.STATE.settings is settings_before
    assert found(_doctor.check_plugin, {"on_starting": loaded.cfg.on_starting}) == []


def test_install_errors_become_findings(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting install() refuses (here from the environment) is reported, not a crash of doctor."""
    path = clean_env / "gunicorn.conf.py"
    path.write_text("import gunicorn_insight\ngunicorn_insight.install(globals())\n")
    monkeypatch.setenv("GUNICORN_INSIGHT_STATSD", "localhost")
    loaded = _doctor.load(str(path))
    (error,) = loaded.plugin_errors
    assert error.startswith("statsd='localhost' is not host:port")


def test_python_module_config_is_loaded(clean_env: Path) -> None:
    """-c python:gunicorn_insight.conf works as with gunicorn, and counts as the plugin installed."""
    loaded = _doctor.load("python:gunicorn_insight.conf")
    assert getattr(loaded.cfg.on_starting, "__gunicorn_insight__", False)


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        (None, None, "does not exist; give the path"),
        ("raise ValueError('boom')\n", None, "raised while loading"),
        ("workers = 'many'\n", None, "sets a value gunicorn refuses"),
        ("workers = 2\n", "--no-such-option", "unrecognized arguments: --no-such-option"),
        ("workers = 2\n", "--workers lots", "GUNICORN_CMD_ARGS"),
    ],
)
def test_config_that_cannot_load_says_why(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, env: str | None, message: str
) -> None:
    """A missing, raising or invalid config, or bad GUNICORN_CMD_ARGS, is one ConfigLoadError naming the cause."""
    path = clean_env / "conf.py"
    if content is not None:
        path.write_text(content)
    if env is not None:
        monkeypatch.setenv("GUNICORN_CMD_ARGS", env)
    with pytest.raises(_doctor.ConfigLoadError, match=message):
        _doctor.load(str(path))


# -- the command ---------------------------------------------------------------------------------------------


def test_doctor_exits_1_on_an_error_and_prints_json(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An error finding makes exit status 1; --json lists findings with check, severity, what, why and fix."""
    path = clean_env / "gunicorn.conf.py"
    path.write_text("worker_tmp_dir = '/nonexistent/heartbeat'\nmax_requests = 100\n")
    assert cli.main(["doctor", "-c", str(path), "--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["errors"] >= 1
    checks = {finding["check"]: finding for finding in document["findings"]}
    assert checks["worker-tmp-dir"]["severity"] == "error"
    assert set(checks["max-requests-jitter"]) == {"check", "severity", "what", "why", "fix"}
    assert document["facts"]["config"] == str(path)


def test_doctor_exits_0_with_warnings_only(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Warnings alone leave exit status 0; the table shows each finding with why and fix."""
    path = clean_env / "gunicorn.conf.py"
    path.write_text("max_requests = 100\nworker_tmp_dir = '/dev/shm'\n")
    assert cli.main(["doctor", "-c", str(path), "--worker-memory-mb", "1"]) == 0
    out = capsys.readouterr().out
    assert "max-requests-jitter" in out
    assert "why: workers that start together" in out
    assert "fix: set max_requests_jitter" in out


def test_doctor_config_load_failure_exits_1(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config that cannot load: exit 1 and the reason on stderr."""
    assert cli.main(["doctor", "-c", str(clean_env / "missing.py")]) == 1
    assert "does not exist" in capsys.readouterr().err
