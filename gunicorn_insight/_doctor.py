"""``gunicorn-insight doctor``: read a gunicorn configuration the way gunicorn does and point out trouble.

Loading: gunicorn's own :class:`gunicorn.config.Config` and its own ``load_config_from_file`` (so
``python:module`` and ``file:path`` forms, and every setting's validator, behave exactly as in gunicorn),
then ``GUNICORN_CMD_ARGS`` on top, as ``gunicorn`` applies it. Nothing is started, no socket is bound and
the application is not imported (unless the config file itself imports it).

A config that calls ``gunicorn_insight.install(globals())`` would normally create a run directory and
prepare, and clear, the Prometheus directory: in a doctor run next to a live server that would delete the
live server's metric files. While the config loads, directory preparation is therefore switched off and
``install`` errors are caught and turned into a finding; the process environment is restored afterwards.

Each check is a function ``Context -> Iterable[Finding]`` listed in :data:`CHECKS`; adding one is adding
a function to that list (and a section to docs/cli.md).
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

from . import _discovery
from ._cgroup import memory_cgroup_dirs

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")

DEFAULT_WORKER_MEMORY_MB = 150
NGINX_PROXY_READ_TIMEOUT = 60
SYNC_LONG_TIMEOUT = 30
KEEPALIVE_MARGIN = 2
"""gthread: worker_connections at or below threads + this leaves no room for idle keep-alive connections."""
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge page-aligned number
_PROMETHEUS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_DB_PID = re.compile(r"_(?:archive-)?(\d+)\.db$")
_QUIET_LEVELS = {"warning": 1, "warn": 1, "error": 2, "critical": 3}


@dataclass(frozen=True)
class Finding:
    """One problem the doctor found: which check, how bad, what it saw, why it matters and the fix."""

    check: str
    severity: Severity
    what: str
    why: str
    fix: str

    def as_dict(self) -> dict[str, str]:
        return {"check": self.check, "severity": self.severity, "what": self.what, "why": self.why, "fix": self.fix}


class ConfigLoadError(Exception):
    """The configuration could not be loaded; the message says which part and how to fix it."""


# -- the machine -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of /proc/mounts: the mount point and the filesystem type."""

    point: str
    fstype: str


@dataclass(frozen=True)
class System:
    """Facts about this host that the checks compare the configuration with (faked in tests)."""

    cpus: int
    mem_available: int | None
    """Bytes: MemAvailable, or what the cgroup memory limit leaves when that is less."""
    somaxconn: int | None
    mounts: tuple[Mount, ...]
    tempdir: str

    @classmethod
    def current(cls) -> System:
        try:
            cpus = len(os.sched_getaffinity(0))  # CPUs this process may run on, not all the host has
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        return cls(cpus, _available_memory(), _read_int("/proc/sys/net/core/somaxconn"), _read_mounts(),
                   tempfile.gettempdir())

    def filesystem(self, path: str) -> str | None:
        """The type of the filesystem ``path`` (or its nearest existing parent) lives on."""
        real = os.path.realpath(path)
        best: Mount | None = None
        for mount in self.mounts:
            point = mount.point.rstrip("/") or "/"
            inside = real == point or real.startswith(point + "/") or point == "/"
            # The longest mount point wins; for equal ones the last listed, which is mounted on top.
            if inside and (best is None or len(point) >= len(best.point.rstrip("/") or "/")):
                best = mount
        return best.fstype if best is not None else None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_mounts(path: str = "/proc/mounts") -> tuple[Mount, ...]:
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return ()
    mounts = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            # /proc/mounts escapes spaces and a few other bytes as \ooo octal.
            point = re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), parts[1])
            mounts.append(Mount(point, parts[2]))
    return tuple(mounts)


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_headroom(proc_self_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes the memory cgroup still allows: in a container MemAvailable shows the whole host."""
    for version, base in memory_cgroup_dirs(proc_self_cgroup, root):
        names = ("memory.max", "memory.current") if version == 2 else ("memory.limit_in_bytes", "memory.usage_in_bytes")
        limit, usage = _read_int(os.path.join(base, names[0])), _read_int(os.path.join(base, names[1]))
        if limit is not None and usage is not None and limit < _UNLIMITED:
            return max(0, limit - usage)
    return None


def _available_memory() -> int | None:
    values = [value for value in (_meminfo_available(), _cgroup_headroom()) if value is not None]
    return min(values) if values else None


# -- loading the configuration ---------------------------------------------------------------------------


@dataclass
class Loaded:
    """A gunicorn configuration as the doctor loaded it, with what the plugin refused while loading."""

    cfg: Any
    """gunicorn.config.Config with the file and GUNICORN_CMD_ARGS applied."""
    source: str | None
    cmd_args: str | None
    environ: dict[str, str]
    """The environment as the config file left it (a config may export PROMETHEUS_MULTIPROC_DIR itself)."""
    plugin_errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _quarantine() -> Iterator[list[str]]:
    """Let a config call gunicorn_insight.install() without side effects; collect its ConfigurationErrors."""
    import gunicorn_insight

    from . import _hooks
    from .settings import ConfigurationError

    errors: list[str] = []
    original_install = gunicorn_insight.install
    saved_environ = dict(os.environ)
    saved_path = list(sys.path)

    def install(namespace: Any, settings: Any = None, **fields: Any) -> Any:
        try:
            return original_install(namespace, settings, **fields)
        except ConfigurationError as error:
            errors.append(str(error))
            return None

    gunicorn_insight.install = install
    try:
        with _hooks.inspecting():  # no run dir, no Prometheus directory created or cleared
            yield errors
    finally:
        gunicorn_insight.install = original_install
        os.environ.clear()
        os.environ.update(saved_environ)
        sys.path[:] = saved_path


def _loader() -> Any:
    from gunicorn.app.base import Application

    class ConfigOnly(Application):  # type: ignore[misc]
        """gunicorn's Application minus argv parsing, chdir and running: only the config loading."""

        def __init__(self) -> None:  # the base __init__ would parse sys.argv and exit on any error
            self.usage, self.prog, self.cfg, self.callable, self.logger = None, "gunicorn", None, None, None

        def init(self, parser: Any, opts: Any, args: Any) -> None:
            return None

        def load(self) -> None:
            raise NotImplementedError("doctor never loads the application")

    return ConfigOnly()


def load(location: str | None) -> Loaded:
    """The configuration gunicorn would run with, from ``location`` (else GUNICORN_CMD_ARGS' -c, else
    ./gunicorn.conf.py, as gunicorn picks it), plus GUNICORN_CMD_ARGS."""
    from gunicorn.config import get_default_config_file

    app = _loader()
    app.load_default_config()
    cfg = app.cfg
    parser = cfg.parser()
    cmd_args = os.environ.get("GUNICORN_CMD_ARGS")
    complaint = io.StringIO()
    try:
        # argparse prints gunicorn's whole usage before its one-line complaint: keep only the complaint.
        with contextlib.redirect_stderr(complaint):
            env_args = parser.parse_args(cfg.get_cmd_args_from_env())
    except SystemExit:
        reason = (complaint.getvalue().strip().splitlines() or ["not valid"])[-1].partition("error: ")[2]
        raise ConfigLoadError(
            f"GUNICORN_CMD_ARGS={cmd_args!r} is not valid gunicorn options ({reason}); fix or unset it"
        ) from None
    source = location or env_args.config or get_default_config_file()
    with _quarantine() as plugin_errors:
        if source is not None:
            _load_file(app, source)
        for name, value in vars(env_args).items():
            if value is None or name == "args":
                continue
            try:
                cfg.set(name.lower(), value)
            except Exception as error:
                raise ConfigLoadError(
                    f"GUNICORN_CMD_ARGS sets {name}={value!r}, which gunicorn refuses: {error}"
                ) from None
        environ = dict(os.environ)
    return Loaded(cfg, source, cmd_args, environ, plugin_errors)


def _load_file(app: Any, source: str) -> None:
    if source.startswith("python:"):
        # Re-run the module (e.g. python:gunicorn_insight.conf) so install() sees today's environment.
        sys.modules.pop(source[len("python:") :], None)
    else:
        path = source[len("file:") :] if source.startswith("file:") else source
        if not os.path.exists(path):
            raise ConfigLoadError(f"config file {path} does not exist; give the path of your gunicorn.conf.py with -c")
    try:
        app.load_config_from_file(source)
    except SystemExit:
        # gunicorn printed "Failed to read config file" and the traceback just before exiting.
        raise ConfigLoadError(
            f"the config file {source} raised while loading (traceback above); fix it, then rerun"
        ) from None
    except ModuleNotFoundError as error:
        raise ConfigLoadError(f"{source}: {error}; check the module name and sys.path") from None
    except Exception as error:
        # gunicorn printed "Invalid value for <name>: <value>"; the validator's message is the reason.
        raise ConfigLoadError(f"{source} sets a value gunicorn refuses: {error}") from None


# -- the context the checks read -------------------------------------------------------------------------


@dataclass
class Context:
    """Everything one run of the checks looks at: the configuration, the host and the live servers."""

    cfg: Any
    system: System
    environ: Mapping[str, str] = field(default_factory=dict)
    worker_memory_mb: int = DEFAULT_WORKER_MEMORY_MB
    plugin_errors: Sequence[str] = ()
    live_prometheus_dirs: frozenset[str] = frozenset()
    """Real paths of the Prometheus directories of live gunicorn-insight servers on this host."""
    worker_kind: str = ""
    worker_class_error: str | None = None

    def __post_init__(self) -> None:
        if not self.worker_kind:
            self.worker_kind, self.worker_class_error = resolve_worker_kind(self.cfg)


def resolve_worker_kind(cfg: Any) -> tuple[str, str | None]:
    """sync, gthread, gevent, ... as gunicorn-insight names it; the import error when the class cannot load.

    ``cfg.worker_class`` would also call the class's ``setup()``, which for gevent monkey-patches this
    process: the class is loaded here without that.
    """
    from gunicorn.util import load_class

    from ._master import worker_kind

    uri = cfg.settings["worker_class"].get()
    if cfg.worker_class_str == "gthread":
        uri = "gthread"  # gunicorn turns sync with threads > 1 into gthread
    try:
        klass = load_class(uri)
    except Exception as error:
        return (uri if isinstance(uri, str) else getattr(uri, "__name__", "unknown")), str(error).strip()
    return worker_kind(SimpleNamespace(worker_class=klass)), None


# -- the checks ------------------------------------------------------------------------------------------

Check = Callable[[Context], Iterable[Finding]]


def check_plugin(ctx: Context) -> Iterable[Finding]:
    for message in ctx.plugin_errors:
        yield Finding(
            "plugin-settings", "error", f"gunicorn_insight.install() refuses its settings: {message}",
            "gunicorn stops at startup with this message, before serving anything.",
            "correct the setting named in the message (keyword argument or GUNICORN_INSIGHT_* variable)",
        )
    hook = ctx.cfg.settings["on_starting"].get()
    if not ctx.plugin_errors and not getattr(hook, "__gunicorn_insight__", False):
        yield Finding(
            "plugin-installed", "info", "gunicorn-insight is not installed by this configuration",
            "without it there is no scoreboard: status and top cannot find the server and dead workers' "
            "requests go unnamed.",
            "end the config file with `import gunicorn_insight; gunicorn_insight.install(globals())`, "
            "or start with -c python:gunicorn_insight.conf",
        )


def check_worker_class(ctx: Context) -> Iterable[Finding]:
    if ctx.worker_class_error is not None:
        yield Finding(
            "worker-class", "error", f"worker_class {ctx.worker_kind!r} cannot be loaded: {ctx.worker_class_error}",
            "gunicorn imports the worker class when it starts and exits if the import fails.",
            "install the worker's package (e.g. pip install gevent) or fix the class path",
        )


def check_workers_cpus(ctx: Context) -> Iterable[Finding]:
    workers, cpus = ctx.cfg.workers, ctx.system.cpus
    suggested = 2 * cpus + 1
    if workers > 2 * suggested:
        yield Finding(
            "workers-cpus", "warning", f"workers={workers} is far above (2 x {cpus} CPUs) + 1 = {suggested}",
            "more processes than the CPUs can run only add memory and context switches; "
            "waiting on I/O is better served by threads or an async worker.",
            f"use about {suggested} workers; for I/O-bound apps add threads (gthread) instead of processes",
        )
    elif workers < cpus:
        yield Finding(
            "workers-cpus", "warning", f"workers={workers} is fewer than the {cpus} CPUs this host gives it",
            "each Python worker uses at most one CPU at a time (the GIL), so CPUs sit idle while requests queue.",
            f"start with (2 x {cpus}) + 1 = {suggested} workers (or set WEB_CONCURRENCY)",
        )


def check_workers_memory(ctx: Context) -> Iterable[Finding]:
    available = ctx.system.mem_available
    if available is None:
        return
    workers = ctx.cfg.workers
    needed = workers * ctx.worker_memory_mb * 1024 * 1024
    if needed > available:
        fits = max(1, available // (ctx.worker_memory_mb * 1024 * 1024))
        yield Finding(
            "workers-memory", "error",
            f"workers={workers} x ~{ctx.worker_memory_mb} MB = {needed // 1048576} MB, but only "
            f"{available // 1048576} MB is available",
            "when memory runs out the kernel's OOM killer SIGKILLs workers mid-request.",
            f"run at most {fits} workers, give the host more memory, or measure a worker's real RSS "
            "(gunicorn-insight status) and pass it with --worker-memory-mb",
        )


def check_timeout(ctx: Context) -> Iterable[Finding]:
    timeout = ctx.cfg.timeout
    if timeout == 0:
        yield Finding(
            "timeout-zero", "warning", "timeout=0 switches gunicorn's worker timeout off",
            "a worker stuck in a request is never killed and replaced, so capacity leaks away one worker at a time.",
            "set timeout a little above your slowest legitimate request (default 30)",
        )
    elif timeout > NGINX_PROXY_READ_TIMEOUT:
        yield Finding(
            "timeout-proxy", "warning",
            f"timeout={timeout}s is longer than nginx's default proxy_read_timeout of {NGINX_PROXY_READ_TIMEOUT}s",
            "a proxy with default timeouts answers 504 (or 502) before gunicorn gives up on the worker, "
            "so clients see errors while the worker keeps working on a request nobody waits for.",
            f"lower timeout below {NGINX_PROXY_READ_TIMEOUT}s, or raise proxy_read_timeout in the proxy to match",
        )


def check_worker_tmp_dir(ctx: Context) -> Iterable[Finding]:
    configured = ctx.cfg.worker_tmp_dir
    if configured and not os.path.isdir(configured):
        yield Finding(
            "worker-tmp-dir", "error", f"worker_tmp_dir={configured} does not exist",
            "every worker creates its heartbeat file there at boot, and fails to boot without it.",
            "create the directory or use worker_tmp_dir=/dev/shm",
        )
        return
    directory = configured or ctx.system.tempdir
    fstype = ctx.system.filesystem(directory)
    if fstype is None:
        return
    memory_backed = fstype in MEMORY_FILESYSTEMS
    if configured and not memory_backed:
        yield Finding(
            "worker-tmp-dir", "warning", f"worker_tmp_dir={configured} is on a disk-backed filesystem ({fstype})",
            "each worker keeps touching its heartbeat file to show the master it is alive, and on disk that "
            "write can block behind other I/O until a healthy worker is timed out.",
            "use worker_tmp_dir=/dev/shm (tmpfs)",
        )
    elif not configured:
        yield Finding(
            "worker-tmp-dir", "warning" if not memory_backed else "info",
            f"worker_tmp_dir is unset: heartbeat files go to {directory} ({fstype})",
            "each worker keeps touching its heartbeat file to show the master it is alive; on a disk-backed "
            "filesystem that write can block behind other I/O until a healthy worker is timed out"
            + (" (tmpfs here, but the default temporary directory differs between hosts)." if memory_backed else "."),
            "set worker_tmp_dir=/dev/shm (tmpfs)",
        )


def check_sync_timeout(ctx: Context) -> Iterable[Finding]:
    if ctx.worker_kind == "sync" and ctx.cfg.timeout > SYNC_LONG_TIMEOUT:
        yield Finding(
            "sync-long-requests", "warning",
            f"sync workers with timeout={ctx.cfg.timeout}s (above {SYNC_LONG_TIMEOUT}s)",
            "a sync worker serves one request at a time, so each long request blocks a whole worker and a few "
            "of them queue everything else.",
            "for long or I/O-bound requests use gthread (--threads N) or gevent, or move the work to a job queue",
        )


def check_gthread_connections(ctx: Context) -> Iterable[Finding]:
    cfg = ctx.cfg
    if ctx.worker_kind != "gthread" or cfg.keepalive <= 0:
        return
    if cfg.worker_connections <= cfg.threads + KEEPALIVE_MARGIN:
        yield Finding(
            "gthread-keepalive", "warning",
            f"gthread with worker_connections={cfg.worker_connections}, threads={cfg.threads} and "
            f"keepalive={cfg.keepalive}s",
            "idle keep-alive connections count against worker_connections, and once they fill it the worker "
            "stops accepting even with idle threads: requests hang.",
            f"raise worker_connections well above threads (e.g. {max(1000, 10 * cfg.threads)}), "
            "or set keepalive=0",
        )


def check_max_requests_jitter(ctx: Context) -> Iterable[Finding]:
    cfg = ctx.cfg
    if cfg.max_requests > 0 and cfg.max_requests_jitter <= 0:
        yield Finding(
            "max-requests-jitter", "warning", f"max_requests={cfg.max_requests} without max_requests_jitter",
            "workers that start together reach the limit together and restart at the same moment, "
            "leaving nobody to serve.",
            f"set max_requests_jitter to about 10% of max_requests (e.g. {max(1, cfg.max_requests // 10)})",
        )


def check_backlog(ctx: Context) -> Iterable[Finding]:
    somaxconn = ctx.system.somaxconn
    if somaxconn is not None and ctx.cfg.backlog > somaxconn:
        yield Finding(
            "backlog-somaxconn", "warning",
            f"backlog={ctx.cfg.backlog} is above the kernel's net.core.somaxconn={somaxconn}",
            "the kernel silently caps the listen queue at somaxconn, so the backlog you asked for is not the "
            "one you get.",
            f"raise it with sysctl -w net.core.somaxconn={ctx.cfg.backlog}, or lower backlog to {somaxconn}",
        )


def check_prometheus_dir(ctx: Context) -> Iterable[Finding]:
    directory = ctx.environ.get(_PROMETHEUS_ENV)
    if not directory:
        return
    if not os.path.exists(directory):
        yield Finding(
            "prometheus-dir", "info", f"{_PROMETHEUS_ENV}={directory} does not exist yet",
            "gunicorn-insight creates it at startup, but a plain prometheus_client setup fails on a missing "
            "directory.",
            f"create it before starting (mkdir -p {directory})",
        )
        return
    if not os.path.isdir(directory):
        yield Finding(
            "prometheus-dir", "error", f"{_PROMETHEUS_ENV}={directory} is not a directory",
            "prometheus_client keeps one file per process in that directory; gunicorn-insight stops at startup "
            "and plain prometheus_client fails at the first metric.",
            f"point {_PROMETHEUS_ENV} at an empty directory, e.g. /dev/shm/gunicorn-metrics",
        )
        return
    if not os.access(directory, os.W_OK | os.X_OK):
        yield Finding(
            "prometheus-dir", "error", f"{_PROMETHEUS_ENV}={directory} is not writable by this user",
            "every worker writes its metric files there; without write access metrics fail.",
            "give the gunicorn user write access to it, or choose a directory it owns",
        )
    files = glob.glob(os.path.join(directory, "*.db"))
    if files and not _prometheus_dir_in_use(directory, files, ctx.live_prometheus_dirs):
        yield Finding(
            "prometheus-dir", "warning",
            f"{_PROMETHEUS_ENV}={directory} holds {len(files)} .db files of processes that are gone",
            "prometheus_client merges every file in the directory, so counters from an earlier run are added to "
            "the new one and scrapes get slower with each file.",
            "empty it before gunicorn starts (gunicorn-insight does so itself when it owns the directory)",
        )


def _prometheus_dir_in_use(directory: str, files: Iterable[str], live_dirs: frozenset[str]) -> bool:
    if os.path.realpath(directory) in live_dirs:
        return True
    for path in files:
        match = _DB_PID.search(os.path.basename(path))
        if match and _discovery.pid_alive(int(match[1])):
            return True  # a server without gunicorn-insight (plain prometheus_client) is writing here
    return False


def check_loglevel(ctx: Context) -> Iterable[Finding]:
    level = str(ctx.cfg.loglevel).lower()
    quiet = _QUIET_LEVELS.get(level)
    if quiet is None:
        return
    if quiet == 1:
        lost = ("gunicorn's 'Booting worker' and 'Worker exiting' lines and gunicorn-insight's startup line are "
                "logged at info and vanish, so worker churn leaves no trace.")
    elif quiet == 2:
        lost = ("gunicorn's worker boot and exit lines (info) vanish; the error-level lines, including "
                "gunicorn-insight's worker-exit and boot-failure reports, still show.")
    else:
        lost = ("with 'critical', boot-failure hints and worker-exit reports (logged at error by gunicorn and "
                "gunicorn-insight) vanish too, so a crash-looping worker is silent.")
    yield Finding("loglevel", "warning", f"loglevel={level}", lost, "use loglevel=info")


def check_capture_output(ctx: Context) -> Iterable[Finding]:
    errorlog = ctx.cfg.errorlog
    if not ctx.cfg.capture_output and errorlog and errorlog != "-":
        yield Finding(
            "capture-output", "info", f"errorlog={errorlog} without capture_output",
            "what the application prints to stdout/stderr (and tracebacks it writes there) does not reach the "
            "error log file, only the terminal or the service manager's log.",
            "set capture_output=True to send it to the error log too",
        )


CHECKS: list[Check] = [
    check_plugin,
    check_worker_class,
    check_workers_cpus,
    check_workers_memory,
    check_timeout,
    check_worker_tmp_dir,
    check_sync_timeout,
    check_gthread_connections,
    check_max_requests_jitter,
    check_backlog,
    check_prometheus_dir,
    check_loglevel,
    check_capture_output,
]


def run_checks(ctx: Context, checks: Sequence[Check] = CHECKS) -> list[Finding]:
    findings = [finding for check in checks for finding in check(ctx)]
    return sorted(findings, key=lambda finding: SEVERITIES.index(finding.severity))


def diagnose(
    location: str | None, worker_memory_mb: int = DEFAULT_WORKER_MEMORY_MB
) -> tuple[Loaded, Context, list[Finding]]:
    loaded = load(location)
    live = frozenset(
        os.path.realpath(server.prometheus_dir) for server in _discovery.scan().servers if server.prometheus_dir
    )
    ctx = Context(loaded.cfg, System.current(), loaded.environ, worker_memory_mb, loaded.plugin_errors, live)
    return loaded, ctx, run_checks(ctx)


def facts(loaded: Loaded, ctx: Context) -> dict[str, Any]:
    """The settings and host facts the findings were judged on (shown above the findings)."""
    cfg = ctx.cfg
    return {
        "config": loaded.source,
        "gunicorn_cmd_args": loaded.cmd_args,
        "worker_class": ctx.worker_kind,
        "workers": cfg.workers,
        "threads": cfg.threads,
        "worker_connections": cfg.worker_connections,
        "timeout": cfg.timeout,
        "keepalive": cfg.keepalive,
        "backlog": cfg.backlog,
        "cpus": ctx.system.cpus,
        "mem_available_mb": None if ctx.system.mem_available is None else ctx.system.mem_available // 1048576,
        "somaxconn": ctx.system.somaxconn,
        "worker_memory_mb": ctx.worker_memory_mb,
    }
