"""doctor: loading a gunicorn config as gunicorn does, and each check's finding, triggered and not."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from gunicorn.config import Config

from gunicorn_insight import _hooks
from gunicorn_insight.cli import commands, configload
from gunicorn_insight.cli import doctor as _doctor
from gunicorn_insight.cli.doctor import Context, Finding
from gunicorn_insight.cli.hostfacts import Mount, System

GIB = 1 << 30
SYSTEM = System(
    cpus=4,
    mem_available=16 * GIB,
    somaxconn=4096,
    mounts=(Mount("/", "ext4"), Mount("/dev/shm", "tmpfs"), Mount("/tmp", "ext4")),
    tempdir="/dev/shm",
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
    assert (
        found(_doctor.check_workers_memory, {"workers": workers}, system=system, worker_memory_mb=per_worker)
        == expected
    )


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
    ("settings", "version", "expected"),
    [
        (
            {"worker_class": "gthread", "keepalive": 5, "max_requests": 1000},
            "26.0.0",
            [("recycle-keepalive", "warning")],
        ),
        ({"worker_class": "gthread", "keepalive": 5, "max_requests": 1000}, "27.0.1", []),
        ({"worker_class": "gthread", "keepalive": 0, "max_requests": 1000}, "26.0.0", []),
        ({"worker_class": "gthread", "keepalive": 5}, "26.0.0", []),
        ({"worker_class": "sync", "keepalive": 5, "max_requests": 1000}, "26.0.0", []),
    ],
    ids=["gthread recycling before 27", "gunicorn 27", "keepalive off", "no recycling", "sync"],
)
def test_recycling_with_keepalive_before_gunicorn_27(
    settings: dict[str, Any], version: str, expected: list[tuple[str, str]]
) -> None:
    """gthread recycling workers (max_requests) with keep-alive on before gunicorn 27 warns of the proxy's 502."""
    assert found(_doctor.check_recycle_keepalive, settings, gunicorn_version=version) == expected


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
    """Missing: info; a file: error; stale metric files of dead pids with no server using it: warning (a
    user's app.db is not one)."""
    env = "PROMETHEUS_MULTIPROC_DIR"
    assert found(_doctor.check_prometheus_dir, environ={env: str(tmp_path / "missing")}) == [("prometheus-dir", "info")]
    (tmp_path / "file").write_text("")
    assert found(_doctor.check_prometheus_dir, environ={env: str(tmp_path / "file")}) == [("prometheus-dir", "error")]
    stale = tmp_path / "stale"
    stale.mkdir()
    assert found(_doctor.check_prometheus_dir, environ={env: str(stale)}) == []
    (stale / "app.db").write_bytes(b"SQLite format 3\0")  # the user's, not a metric file: no warning
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


@pytest.mark.parametrize(
    ("worker_class", "expected"),
    [
        ("sync", []),
        ("gthread", []),
        ("gevent", []),
        ("asgi", []),
        ("uvicorn_worker.UvicornWorker", []),
        ("gunicorn.workers.base.Worker", [("requests-unseen", "warning")]),  # serves nothing through the hooks
        ("nosuch.module.Worker", []),  # the worker-class check reports that one
    ],
)
def test_worker_class_whose_requests_cannot_be_seen(worker_class: str, expected: list[tuple[str, str]]) -> None:
    """A class that never calls the request hooks (and is not recorded otherwise) is named, with what is missing."""
    assert found(_doctor.check_requests_seen, {"worker_class": worker_class}) == expected


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
    loaded = configload.load(str(path))
    assert (prometheus / "counter_1.db").exists()
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    assert _hooks.STATE.settings is settings_before
    assert found(_doctor.check_plugin, {"on_starting": loaded.cfg.on_starting}) == []


def test_install_errors_become_findings(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting install() refuses (here from the environment) is reported, not a crash of doctor."""
    path = clean_env / "gunicorn.conf.py"
    path.write_text("import gunicorn_insight\ngunicorn_insight.install(globals())\n")
    monkeypatch.setenv("GUNICORN_INSIGHT_STATSD", "localhost")
    loaded = configload.load(str(path))
    (error,) = loaded.plugin_errors
    assert error.startswith("statsd='localhost' is not host:port")


def test_doctor_exits_1_on_an_error_and_prints_json(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An error finding makes exit status 1; --json lists findings with check, severity, what, why and fix."""
    path = clean_env / "gunicorn.conf.py"
    path.write_text("worker_tmp_dir = '/nonexistent/heartbeat'\nmax_requests = 100\n")
    assert commands.main(["doctor", "-c", str(path), "--json"]) == 1
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
    assert commands.main(["doctor", "-c", str(path), "--worker-memory-mb", "1"]) == 0
    out = capsys.readouterr().out
    assert "max-requests-jitter" in out
    assert "why: workers that start together" in out
    assert "fix: set max_requests_jitter" in out


def test_doctor_config_load_failure_exits_1(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config that cannot load: exit 1 and the reason on stderr."""
    assert commands.main(["doctor", "-c", str(clean_env / "missing.py")]) == 1
    assert "does not exist" in capsys.readouterr().err


# -- the field's lessons -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("21.2.0", [("gunicorn-version", "error"), ("gunicorn-version", "warning")]),
        ("23.0.0", [("gunicorn-version", "warning")]),
        ("24.0.0", []),
        ("27.0.1", []),
        ("unknown", []),
    ],
)
def test_gunicorn_versions_with_known_bugs(version: str, expected: list[tuple[str, str]]) -> None:
    """Below 22: request smuggling (error); below 24: logging inside the SIGCHLD handler; 24 and later: quiet."""
    assert found(_doctor.check_gunicorn_version, gunicorn_version=version) == expected


def test_sigchld_finding_names_the_gunicorn_issues() -> None:
    """The finding cites gunicorn's issues and the error operators search for."""
    ctx = Context(config(), SYSTEM, gunicorn_version="23.0.0")
    (finding,) = _doctor.check_gunicorn_version(ctx)
    assert "2564, 2816, 3198" in finding.what
    assert "reentrant call" in finding.why


@pytest.mark.parametrize(
    ("environ", "timeout", "expected"),
    [
        ({"DYNO": "web.1"}, 30, [("timeout-platform", "warning")]),
        ({"DYNO": "web.1"}, 25, []),
        ({"DYNO": "web.1"}, 0, [("timeout-platform", "warning")]),
        ({"WEBSITE_SITE_NAME": "shop"}, 240, [("timeout-platform", "warning")]),
        ({"WEBSITE_SITE_NAME": "shop"}, 120, []),
        ({"K_SERVICE": "api"}, 600, [("timeout-platform", "warning")]),
        ({"K_SERVICE": "api"}, 120, []),
        ({}, 600, []),
    ],
)
def test_timeout_against_platform_limits(
    environ: dict[str, str], timeout: int, expected: list[tuple[str, str]]
) -> None:
    """Heroku 30 s, App Service 230 s, Cloud Run 300 s: a timeout at or above the platform's is a warning."""
    assert found(_doctor.check_platform_timeout, {"timeout": timeout}, environ=environ) == expected


def test_heroku_finding_names_h12() -> None:
    """The Heroku finding names the error code operators see in the router log."""
    ctx = Context(config(timeout=60), SYSTEM, {"DYNO": "web.1"})
    (finding,) = _doctor.check_platform_timeout(ctx)
    assert "H12" in finding.why


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"worker_class": "gthread", "threads": 4}, [("timeout-not-per-request", "info")]),
        ({"worker_class": "sync"}, []),
    ],
)
def test_worker_classes_whose_timeout_does_not_end_a_request(
    settings: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    """gthread: a stuck request hangs until the proxy's 60 s; sync: gunicorn's timeout ends it, quiet."""
    assert found(_doctor.check_request_bound, settings) == expected


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"bind": ["0.0.0.0:8000"]}, [("sync-no-proxy", "info")]),
        ({"bind": ["[::]:8000"]}, [("sync-no-proxy", "info")]),
        ({"bind": ["10.1.2.3:8000"]}, [("sync-no-proxy", "info")]),
        ({"bind": ["127.0.0.1:8000", "unix:/run/gunicorn.sock"]}, []),
        ({"bind": ["localhost:8000"]}, []),
        ({"bind": ["[::1]:8000"]}, []),
        ({"bind": ["0.0.0.0:8000"], "worker_class": "gthread", "threads": 4}, []),
    ],
)
def test_sync_workers_reachable_without_a_proxy(settings: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    """sync on a reachable address is advice (info); loopback, unix sockets and non-sync workers are quiet."""
    assert found(_doctor.check_sync_exposed, settings) == expected


def test_statsd_host_that_does_not_resolve() -> None:
    """A real lookup of a name under .invalid (RFC 6761: never resolves) is a warning naming the setting."""
    ctx = Context(config(statsd_host="statsd.invalid:8125"), SYSTEM)
    (finding,) = _doctor.check_statsd_host(ctx)
    assert (finding.check, finding.severity) == ("statsd-host", "warning")
    assert "statsd_host names 'statsd.invalid'" in finding.what


def test_statsd_host_that_resolves_is_quiet() -> None:
    """localhost and an address resolve: nothing to say."""
    assert found(_doctor.check_statsd_host, {"statsd_host": "localhost:8125"}) == []
    assert found(_doctor.check_statsd_host, environ={"GUNICORN_INSIGHT_STATSD": "127.0.0.1:8125"}) == []


def test_plugin_statsd_setting_is_resolved_too() -> None:
    """GUNICORN_INSIGHT_STATSD's host is looked up as well; unix sockets are not."""
    asked: list[str] = []

    def resolve(host: str) -> str | None:
        asked.append(host)
        return "Name or service not known"

    assert found(
        _doctor.check_statsd_host, environ={"GUNICORN_INSIGHT_STATSD": "agg.invalid:8125"}, resolve=resolve
    ) == [("statsd-host", "warning")]
    assert (
        found(_doctor.check_statsd_host, environ={"GUNICORN_INSIGHT_STATSD": "unix:/run/statsd.sock"}, resolve=resolve)
        == []
    )
    assert asked == ["agg.invalid"]


def test_resolution_has_a_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resolver that never answers is given up on after the deadline, not waited for."""
    release = threading.Event()
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: release.wait(30))
    try:
        assert _doctor.resolve_host("slow.example", deadline=0.2) == "no answer within 0.2s"
    finally:
        release.set()


def _app_module(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(body + "\ndef app(environ, start_response):\n    return []\n")


def test_slow_import_without_preload(tmp_path: Path) -> None:
    """An app whose import takes 2.5 s, measured in a subprocess, with preload_app off: a warning."""
    _app_module(tmp_path, "slowapp", "import time\ntime.sleep(2.5)")
    measured = _doctor.measure_import("slowapp:app", str(tmp_path), None)
    assert measured.error is None
    assert measured.seconds >= 2.5
    assert found(_doctor.check_app_import, app_import=measured) == [("preload-slow-import", "warning")]
    assert found(_doctor.check_app_import, {"preload_app": True}, app_import=measured) == []


def test_fast_import_is_quiet(tmp_path: Path) -> None:
    """An app that imports at once: nothing to say, preload or not."""
    _app_module(tmp_path, "fastapp", "")
    measured = _doctor.measure_import("fastapp:app", str(tmp_path), None)
    assert measured.error is None
    assert found(_doctor.check_app_import, app_import=measured) == []


def test_import_failure_is_an_error(tmp_path: Path) -> None:
    """An import that raises is an error with the exception's line."""
    _app_module(tmp_path, "brokenapp", "import no_such_module_here")
    measured = _doctor.measure_import("brokenapp:app", str(tmp_path), None)
    assert measured.error == "ModuleNotFoundError: No module named 'no_such_module_here'"
    assert found(_doctor.check_app_import, app_import=measured) == [("app-import", "error")]


@pytest.mark.parametrize(
    ("body", "app", "words"),
    [
        ("", "goodmod:does_not_exist", ("AppImportError", "does_not_exist")),
        ("app_number = 3", "goodmod:app_number", ("AppImportError", "callable")),
    ],
    ids=["variable-missing", "not-callable"],
)
def test_an_entry_point_gunicorn_cannot_load_is_an_error(
    tmp_path: Path, body: str, app: str, words: tuple[str, ...]
) -> None:
    """A module that imports but whose name after the colon is missing or not an application fails as
    gunicorn's loader fails at boot: the app-import error, with gunicorn's message."""
    _app_module(tmp_path, "goodmod", body)
    measured = _doctor.measure_import(app, str(tmp_path), None)
    assert measured.error is not None
    assert all(word in measured.error for word in words), measured.error
    assert found(_doctor.check_app_import, app_import=measured) == [("app-import", "error")]


def test_a_factory_is_called_as_a_worker_calls_it(tmp_path: Path) -> None:
    """A factory named with a call runs: one that raises is an error, one that returns the app is not."""
    factories = "def create_app():\n    return app\ndef broken():\n    raise KeyError('DATABASE_URL')"
    _app_module(tmp_path, "factorymod", factories)
    assert _doctor.measure_import("factorymod:create_app()", str(tmp_path), None).error is None
    measured = _doctor.measure_import("factorymod:broken()", str(tmp_path), None)
    assert measured.error == "KeyError: 'DATABASE_URL'"


def test_import_past_the_deadline_is_reported(tmp_path: Path) -> None:
    """An import that does not finish in time is stopped and reported, never waited for."""
    _app_module(tmp_path, "hangapp", "import time\ntime.sleep(60)")
    measured = _doctor.measure_import("hangapp:app", str(tmp_path), None, deadline=1.0)
    assert measured.error == "did not finish importing in 1s"


def test_app_is_not_imported_unless_asked(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --import-app the doctor never runs the application's code, even when the config names it."""
    marker = clean_env / "imported"
    _app_module(clean_env, "sideapp", f"open({str(marker)!r}, 'w').close()")
    path = clean_env / "gunicorn.conf.py"
    path.write_text(f"wsgi_app = 'sideapp:app'\nchdir = {str(clean_env)!r}\n")
    commands.main(["doctor", "-c", str(path), "--json"])
    assert not marker.exists()
    assert json.loads(capsys.readouterr().out)["facts"]["app_import_seconds"] is None
    commands.main(["doctor", "-c", str(path), "--json", "--import-app"])
    assert marker.exists()
    document = json.loads(capsys.readouterr().out)
    assert document["facts"]["app_import_seconds"] is not None
    assert "app-import" not in [finding["check"] for finding in document["findings"]]
