"""``gunicorn-insight doctor``: compare a gunicorn configuration with this host and point out trouble.

The configuration is loaded by :mod:`._configload` exactly as gunicorn would load it; the host's facts come
from :mod:`._hostfacts`. Each check is a function ``Context -> Iterable[Finding]`` listed in :data:`CHECKS`;
adding one is adding a function to that list (and a section to docs/cli.md).
"""

from __future__ import annotations

import glob
import ipaddress
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

import gunicorn

from .. import _discovery
from .._export.prometheus import is_metric_file
from ..settings import ENV_PREFIX, ConfigurationError, Settings
from .configload import Loaded, load
from .hostfacts import MEMORY_FILESYSTEMS, System

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")

DEFAULT_WORKER_MEMORY_MB = 150
NGINX_PROXY_READ_TIMEOUT = 60
SYNC_LONG_TIMEOUT = 30
KEEPALIVE_MARGIN = 2
"""gthread: worker_connections at or below threads + this leaves no room for idle keep-alive connections."""
_PROMETHEUS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_DB_PID = re.compile(r"_(?:archive-)?(\d+)\.db$")
_QUIET_LEVELS = {"warning": 1, "warn": 1, "error": 2, "critical": 3}
RESOLVE_DEADLINE = 2.0
"""Seconds the StatsD check waits for a name to resolve (in a thread of the doctor, never in the server)."""
SLOW_IMPORT = 2.0
"""An application import slower than this, done once per worker, is worth preloading."""
IMPORT_DEADLINE = 120.0


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


# -- the machine -----------------------------------------------------------------------------------------


# -- loading the configuration ---------------------------------------------------------------------------


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
    gunicorn_version: str = gunicorn.__version__
    resolve: Callable[[str], str | None] | None = None
    """Why a host does not resolve, None when it does; :func:`resolve_host` unless replaced."""
    app_import: AppImport | None = None
    """The application's import, measured when the doctor was asked to (--import-app)."""

    def __post_init__(self) -> None:
        if not self.worker_kind:
            self.worker_kind, self.worker_class_error = resolve_worker_kind(self.cfg)


def resolve_worker_kind(cfg: Any) -> tuple[str, str | None]:
    """sync, gthread, gevent, ... as gunicorn-insight names it; the import error when the class cannot load.

    ``cfg.worker_class`` would also call the class's ``setup()``, which for gevent monkey-patches this
    process: the class is loaded here without that.
    """
    from gunicorn.util import load_class

    from .._gunicorn import worker_kind

    uri = _worker_class_uri(cfg)
    try:
        klass = load_class(uri)
    except Exception as error:
        return (uri if isinstance(uri, str) else getattr(uri, "__name__", "unknown")), str(error).strip()
    return worker_kind(SimpleNamespace(worker_class=klass)), None


# -- facts the doctor measures itself ------------------------------------------------------------------


def resolve_host(host: str, deadline: float = RESOLVE_DEADLINE) -> str | None:
    """Why ``host`` does not resolve within ``deadline`` seconds; None when it does.

    getaddrinfo has no timeout of its own, so it runs in a daemon thread the doctor stops waiting for.
    """
    outcome: list[str | None] = []

    def lookup() -> None:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as error:
            outcome.append(str(error) or type(error).__name__)
        else:
            outcome.append(None)

    thread = threading.Thread(target=lookup, name="doctor-resolve", daemon=True)
    thread.start()
    thread.join(deadline)
    if not outcome:
        return f"no answer within {deadline:g}s"
    return outcome[0]


@dataclass(frozen=True)
class AppImport:
    """How loading the application went, in a subprocess of the doctor."""

    app: str
    seconds: float
    error: str | None = None
    """The exception's last line, or "did not finish in N s"."""


# gunicorn's own loader, as its workers call it: the module imported, the variable found (or the factory called,
# for "module:create_app()"), and the result checked to be callable.
_IMPORT_SCRIPT = """
import sys, time
sys.path[:0] = [entry for entry in sys.argv[2:] if entry]
from gunicorn.util import import_app
started = time.perf_counter()
import_app(sys.argv[1])
print(f"imported {time.perf_counter() - started:.6f}")
"""


def measure_import(app: str, chdir: str | None, pythonpath: str | None, deadline: float = IMPORT_DEADLINE) -> AppImport:
    """Load ``app`` (``module:variable``) in a fresh interpreter, as a worker would, and time it: a module that
    does not import, a variable it does not define and a factory that raises all fail here as at boot.

    It runs the application's import-time code, so the doctor does it only when asked (--import-app).
    """
    cwd = chdir or os.getcwd()
    paths = [cwd, *(part for part in (pythonpath or "").split(",") if part)]
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-c", _IMPORT_SCRIPT, app.strip(), *paths],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=deadline,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return AppImport(app, deadline, f"did not finish importing in {deadline:g}s")
    except OSError as error:
        return AppImport(app, 0.0, f"could not start {sys.executable}: {error}")
    elapsed = time.monotonic() - started
    match = re.search(r"^imported ([0-9.]+)$", result.stdout, re.MULTILINE)
    if result.returncode != 0 or match is None:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        return AppImport(app, elapsed, lines[-1].strip() if lines else f"exited with status {result.returncode}")
    return AppImport(app, float(match[1]))


def _worker_class_uri(cfg: Any) -> Any:
    uri = cfg.settings["worker_class"].get()
    if cfg.worker_class_str == "gthread":
        uri = "gthread"  # gunicorn turns sync with threads > 1 into gthread
    return uri


# -- the checks ------------------------------------------------------------------------------------------

Check = Callable[[Context], Iterable[Finding]]


def check_plugin(ctx: Context) -> Iterable[Finding]:
    for message in ctx.plugin_errors:
        yield Finding(
            "plugin-settings",
            "error",
            f"gunicorn_insight.install() refuses its settings: {message}",
            "gunicorn stops at startup with this message, before serving anything.",
            "correct the setting named in the message (keyword argument or GUNICORN_INSIGHT_* variable)",
        )
    # A later on_starting does not keep the plugin out: its pre_fork starts it (see _hooks.adopt_late_hooks).
    installed = any(
        getattr(ctx.cfg.settings[name].get(), "__gunicorn_insight__", False) for name in ("on_starting", "pre_fork")
    )
    if not ctx.plugin_errors and not installed:
        yield Finding(
            "plugin-installed",
            "info",
            "gunicorn-insight is not installed by this configuration",
            "without it there is no scoreboard: status and top cannot find the server and dead workers' "
            "requests go unnamed.",
            "end the config file with `import gunicorn_insight; gunicorn_insight.install(globals())`, "
            "or start with -c python:gunicorn_insight.conf",
        )


def check_worker_class(ctx: Context) -> Iterable[Finding]:
    if ctx.worker_class_error is not None:
        yield Finding(
            "worker-class",
            "error",
            f"worker_class {ctx.worker_kind!r} cannot be loaded: {ctx.worker_class_error}",
            "gunicorn imports the worker class when it starts and exits if the import fails.",
            "install the worker's package (e.g. pip install gevent) or fix the class path",
        )


def check_requests_seen(ctx: Context) -> Iterable[Finding]:
    if ctx.worker_class_error is not None:
        return
    from gunicorn.util import load_class

    from .._gunicorn import unseen_requests

    missing = unseen_requests(load_class(_worker_class_uri(ctx.cfg)))
    if missing:
        yield Finding(
            "requests-unseen",
            "warning",
            missing[0].upper() + missing[1:],
            "gunicorn-insight records requests from gunicorn's request hooks, or on asgi and uvicorn's classes "
            "from an ASGI layer; this class gives it neither. The server also logs this once at startup.",
            "use a worker class gunicorn-insight records (sync, gthread, gevent, asgi, "
            "uvicorn_worker.UvicornWorker), or call self.cfg.pre_request(self, req) and "
            "self.cfg.post_request(self, req, environ, resp) around each request in your class",
        )


def check_workers_cpus(ctx: Context) -> Iterable[Finding]:
    workers, cpus = ctx.cfg.workers, ctx.system.cpus
    suggested = 2 * cpus + 1
    if workers > 2 * suggested:
        yield Finding(
            "workers-cpus",
            "warning",
            f"workers={workers} is far above (2 x {cpus} CPUs) + 1 = {suggested}",
            "more processes than the CPUs can run only add memory and context switches; "
            "waiting on I/O is better served by threads or an async worker.",
            f"use about {suggested} workers; for I/O-bound apps add threads (gthread) instead of processes",
        )
    elif workers < cpus:
        yield Finding(
            "workers-cpus",
            "warning",
            f"workers={workers} is fewer than the {cpus} CPUs this host gives it",
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
            "workers-memory",
            "error",
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
            "timeout-zero",
            "warning",
            "timeout=0 switches gunicorn's worker timeout off",
            "a worker stuck in a request is never killed and replaced, so capacity leaks away one worker at a time.",
            "set timeout a little above your slowest legitimate request (default 30)",
        )
    elif timeout > NGINX_PROXY_READ_TIMEOUT:
        yield Finding(
            "timeout-proxy",
            "warning",
            f"timeout={timeout}s is longer than nginx's default proxy_read_timeout of {NGINX_PROXY_READ_TIMEOUT}s",
            "a proxy with default timeouts answers 504 (or 502) before gunicorn gives up on the worker, "
            "so clients see errors while the worker keeps working on a request nobody waits for.",
            f"lower timeout below {NGINX_PROXY_READ_TIMEOUT}s, or raise proxy_read_timeout in the proxy to match",
        )


def check_worker_tmp_dir(ctx: Context) -> Iterable[Finding]:
    configured = ctx.cfg.worker_tmp_dir
    if configured and not os.path.isdir(configured):
        yield Finding(
            "worker-tmp-dir",
            "error",
            f"worker_tmp_dir={configured} does not exist",
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
            "worker-tmp-dir",
            "warning",
            f"worker_tmp_dir={configured} is on a disk-backed filesystem ({fstype})",
            "each worker keeps touching its heartbeat file to show the master it is alive, and on disk that "
            "write can block behind other I/O until a healthy worker is timed out.",
            "use worker_tmp_dir=/dev/shm (tmpfs)",
        )
    elif not configured:
        yield Finding(
            "worker-tmp-dir",
            "warning" if not memory_backed else "info",
            f"worker_tmp_dir is unset: heartbeat files go to {directory} ({fstype})",
            "each worker keeps touching its heartbeat file to show the master it is alive; on a disk-backed "
            "filesystem that write can block behind other I/O until a healthy worker is timed out"
            + (" (tmpfs here, but the default temporary directory differs between hosts)." if memory_backed else "."),
            "set worker_tmp_dir=/dev/shm (tmpfs)",
        )


def check_sync_timeout(ctx: Context) -> Iterable[Finding]:
    if ctx.worker_kind == "sync" and ctx.cfg.timeout > SYNC_LONG_TIMEOUT:
        yield Finding(
            "sync-long-requests",
            "warning",
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
            "gthread-keepalive",
            "warning",
            f"gthread with worker_connections={cfg.worker_connections}, threads={cfg.threads} and "
            f"keepalive={cfg.keepalive}s",
            "idle keep-alive connections count against worker_connections, and once they fill it the worker "
            "stops accepting even with idle threads: requests hang.",
            f"raise worker_connections well above threads (e.g. {max(1000, 10 * cfg.threads)}), or set keepalive=0",
        )


def check_max_requests_jitter(ctx: Context) -> Iterable[Finding]:
    cfg = ctx.cfg
    if cfg.max_requests > 0 and cfg.max_requests_jitter <= 0:
        yield Finding(
            "max-requests-jitter",
            "warning",
            f"max_requests={cfg.max_requests} without max_requests_jitter",
            "workers that start together reach the limit together and restart at the same moment, "
            "leaving nobody to serve.",
            f"set max_requests_jitter to about 10% of max_requests (e.g. {max(1, cfg.max_requests // 10)})",
        )


RECYCLE_LINGER_SINCE = (27,)
"""The gunicorn whose stopping gthread worker keeps its kept-alive connections open a moment (2 s) and answers
a request that arrives on one, instead of closing them at once."""


def check_recycle_keepalive(ctx: Context) -> Iterable[Finding]:
    cfg = ctx.cfg
    version = parse_version(ctx.gunicorn_version)
    if ctx.worker_kind != "gthread" or cfg.keepalive <= 0 or cfg.max_requests <= 0 or not version:
        return
    if version < RECYCLE_LINGER_SINCE:
        yield Finding(
            "recycle-keepalive",
            "warning",
            f"gthread with keepalive={cfg.keepalive}s and max_requests={cfg.max_requests} on gunicorn "
            f"{ctx.gunicorn_version}",
            "a worker that reaches max_requests leaves its idle keep-alive connections to its exit; a proxy that "
            "reuses upstream connections (nginx's upstream keepalive) and sends a request on one at that moment "
            "gets a 502 ('upstream prematurely closed connection'). No gunicorn hook sees it: gunicorn-insight "
            "counts those requests when the worker exits, as status=\"aborted\", and its 'worker exited' line "
            "says how many it dropped.",
            "upgrade gunicorn to 27 or later (a stopping worker answers such a request with Connection: close), "
            "or let the proxy retry it (nginx: proxy_next_upstream error; idempotent requests only), or set "
            "keepalive=0",
        )


def check_backlog(ctx: Context) -> Iterable[Finding]:
    somaxconn = ctx.system.somaxconn
    if somaxconn is not None and ctx.cfg.backlog > somaxconn:
        yield Finding(
            "backlog-somaxconn",
            "warning",
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
            "prometheus-dir",
            "info",
            f"{_PROMETHEUS_ENV}={directory} does not exist yet",
            "gunicorn-insight creates it at startup, but a plain prometheus_client setup fails on a missing directory.",
            f"create it before starting (mkdir -p {directory})",
        )
        return
    if not os.path.isdir(directory):
        yield Finding(
            "prometheus-dir",
            "error",
            f"{_PROMETHEUS_ENV}={directory} is not a directory",
            "prometheus_client keeps one file per process in that directory; gunicorn-insight stops at startup "
            "and plain prometheus_client fails at the first metric.",
            f"point {_PROMETHEUS_ENV} at an empty directory, e.g. /dev/shm/gunicorn-metrics",
        )
        return
    if not os.access(directory, os.W_OK | os.X_OK):
        yield Finding(
            "prometheus-dir",
            "error",
            f"{_PROMETHEUS_ENV}={directory} is not writable by this user",
            "every worker writes its metric files there; without write access metrics fail.",
            "give the gunicorn user write access to it, or choose a directory it owns",
        )
    files = [path for path in glob.glob(os.path.join(directory, "*.db")) if is_metric_file(os.path.basename(path))]
    if files and not _prometheus_dir_in_use(directory, files, ctx.live_prometheus_dirs):
        yield Finding(
            "prometheus-dir",
            "warning",
            f"{_PROMETHEUS_ENV}={directory} holds {len(files)} .db files of processes that are gone",
            "prometheus_client merges every file in the directory, so counters from an earlier run are added to "
            "the new one and scrapes get slower with each file.",
            "remove them before gunicorn starts (gunicorn-insight removes those of gone processes at startup)",
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
        lost = (
            "gunicorn's 'Booting worker' and 'Worker exiting' lines and gunicorn-insight's startup line are "
            "logged at info and vanish, so worker churn leaves no trace."
        )
    elif quiet == 2:
        lost = (
            "gunicorn's worker boot and exit lines (info) vanish; the error-level lines, including "
            "gunicorn-insight's worker-exit and boot-failure reports, still show."
        )
    else:
        lost = (
            "with 'critical', boot-failure hints and worker-exit reports (logged at error by gunicorn and "
            "gunicorn-insight) vanish too, so a crash-looping worker is silent."
        )
    yield Finding("loglevel", "warning", f"loglevel={level}", lost, "use loglevel=info")


def check_capture_output(ctx: Context) -> Iterable[Finding]:
    errorlog = ctx.cfg.errorlog
    if not ctx.cfg.capture_output and errorlog and errorlog != "-":
        yield Finding(
            "capture-output",
            "info",
            f"errorlog={errorlog} without capture_output",
            "what the application prints to stdout/stderr (and tracebacks it writes there) does not reach the "
            "error log file, only the terminal or the service manager's log.",
            "set capture_output=True to send it to the error log too",
        )


@dataclass(frozen=True)
class KnownBug:
    below: tuple[int, ...]
    """Versions below this one have it."""
    severity: Severity
    what: str
    why: str
    fix: str


KNOWN_BUGS: tuple[KnownBug, ...] = (
    KnownBug(
        (22, 0),
        "error",
        "request smuggling through Transfer-Encoding (CVE-2024-1135)",
        "conflicting Transfer-Encoding headers are accepted, so a proxy and gunicorn can disagree on where a "
        "request ends and a crafted request reaches endpoints the proxy restricts.",
        "upgrade gunicorn to 22.0 or later (24 or later also fixes the SIGCHLD logging crash)",
    ),
    KnownBug(
        (24, 0),
        "warning",
        "logs from inside its SIGCHLD signal handler (gunicorn issues 2564, 2816, 3198)",
        "the master reaps workers and logs their exit inside the signal handler; when the signal interrupts "
        "another log write the master dies with 'RuntimeError: reentrant call inside <_io.BufferedWriter "
        "name='<stderr>'>' or deadlocks, and workers stop being replaced. gunicorn 24 handles SIGCHLD in "
        "its main loop.",
        "upgrade gunicorn to 24.0 or later",
    ),
)


def parse_version(text: str) -> tuple[int, ...]:
    numbers = []
    for part in text.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits[0]))
    return tuple(numbers)


def version_findings(text: str) -> Iterable[Finding]:
    """The known bugs of gunicorn ``text`` (also judged on a running server's version by ``doctor --pid``)."""
    version = parse_version(text)
    if not version:
        return
    for bug in KNOWN_BUGS:
        if version < bug.below:
            yield Finding("gunicorn-version", bug.severity, f"gunicorn {text} {bug.what}", bug.why, bug.fix)


def check_gunicorn_version(ctx: Context) -> Iterable[Finding]:
    return version_findings(ctx.gunicorn_version)


@dataclass(frozen=True)
class Platform:
    name: str
    markers: tuple[str, ...]
    """Environment variables the platform sets in every instance."""
    limit: int
    answer: str


PLATFORMS: tuple[Platform, ...] = (
    Platform("Heroku", ("DYNO",), 30, "the router answers 503 with H12 Request Timeout"),
    Platform(
        "Azure App Service",
        ("WEBSITE_SITE_NAME", "WEBSITE_INSTANCE_ID"),
        230,
        "the front end answers 504 (its 230 s limit cannot be raised)",
    ),
    Platform(
        "Cloud Run",
        ("K_SERVICE",),
        300,
        "the request fails with 504 at the service's request timeout (300 s by default, up to 3600 s)",
    ),
)


def check_platform_timeout(ctx: Context) -> Iterable[Finding]:
    timeout = ctx.cfg.timeout
    for platform in PLATFORMS:
        present = [name for name in platform.markers if ctx.environ.get(name)]
        if not present or (0 < timeout < platform.limit):
            continue
        yield Finding(
            "timeout-platform",
            "warning",
            f"{platform.name} ({present[0]} is set) gives up on a request after {platform.limit}s, and "
            f"timeout={timeout}s" + (" (off)" if timeout == 0 else ""),
            f"{platform.answer} while the worker keeps working on a request nobody waits for, and stays "
            "busy: under load every worker ends up serving abandoned requests.",
            f"set timeout below {platform.limit}s, and bound slow calls in the application (database statement "
            "and HTTP client timeouts)",
        )


_REQUEST_TIMEOUT_KINDS = frozenset({"sync"})


def check_request_bound(ctx: Context) -> Iterable[Finding]:
    """The "exact 60-second hang": nothing in gunicorn ends one stuck request on these worker classes."""
    if ctx.worker_kind in _REQUEST_TIMEOUT_KINDS or ctx.worker_class_error is not None:
        return
    yield Finding(
        "timeout-not-per-request",
        "info",
        f"timeout={ctx.cfg.timeout}s does not end a stuck request on {ctx.worker_kind} workers",
        "the worker's main loop keeps its heartbeat going whatever one request does, so a request waiting on "
        "a dead database or API hangs until the client or the proxy gives up: behind nginx, exactly 60 s "
        "(proxy_read_timeout), then a 504.",
        "bound every outside call in the application (database statement timeout, HTTP client timeout, pool "
        "checkout timeout); gunicorn-insight's slow-request report (slow_request_timeout) names the stuck "
        "requests with their stacks",
    )


def _exposed(bind: str) -> bool:
    """A bind other processes on other hosts can reach: not a unix socket, not loopback, not an fd."""
    if bind.startswith(("unix:", "fd://")):
        return False
    host = bind.rsplit(":", 1)[0] if ":" in bind else bind
    host = host.strip("[]")
    if host in ("localhost", ""):
        return host == ""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a host name: whatever it resolves to, probably reachable


def check_sync_exposed(ctx: Context) -> Iterable[Finding]:
    """Advice only: whether a buffering proxy sits in front cannot be seen from the configuration."""
    if ctx.worker_kind != "sync":
        return
    exposed = [bind for bind in ctx.cfg.bind if _exposed(bind)]
    if exposed:
        yield Finding(
            "sync-no-proxy",
            "info",
            f"sync workers listen on {', '.join(exposed)}, an address other hosts can reach",
            "a sync worker is held by one client from the first byte of its request to the last byte of the "
            "response, so slow clients (mobile networks, large uploads, slowloris) tie up every worker unless "
            "a buffering proxy (nginx) reads requests and responses for them. Not judged: whether such a proxy "
            "is in front; a bind on loopback or a unix socket is taken as a sign that one is.",
            "put nginx (proxy_buffering and proxy_request_buffering on, its default) in front, or use gthread "
            "or gevent workers, whose connections do not hold a process",
        )


def _statsd_targets(ctx: Context) -> list[tuple[str, str]]:
    """(where it was set, host) of every StatsD target given as a host name or address."""
    targets = []
    configured = ctx.cfg.statsd_host
    if isinstance(configured, tuple) and configured:
        targets.append(("statsd_host", str(configured[0])))
    plugin = ctx.environ.get(f"{ENV_PREFIX}STATSD")
    if plugin:
        try:
            target = Settings(statsd=plugin).statsd_target
        except ConfigurationError:
            target = None  # the plugin-settings check reports it
        if isinstance(target, tuple):
            targets.append((f"{ENV_PREFIX}STATSD", target[0]))
    return targets


def check_statsd_host(ctx: Context) -> Iterable[Finding]:
    for setting, host in _statsd_targets(ctx):
        problem = (ctx.resolve or resolve_host)(host)
        if problem is None:
            continue
        yield Finding(
            "statsd-host",
            "warning",
            f"{setting} names {host!r}, which does not resolve here: {problem}",
            "gunicorn's own StatsD logger resolves the name once at startup and drops every metric for the "
            "whole run when that fails; gunicorn-insight keeps retrying, but nothing arrives until it resolves.",
            "fix the name (in a container: the aggregator's service name), or use an IP address",
        )


def check_app_import(ctx: Context) -> Iterable[Finding]:
    measured = ctx.app_import
    if measured is None:
        return
    if measured.error is not None:
        yield Finding(
            "app-import",
            "error",
            f"importing {measured.app} failed: {measured.error}",
            "every worker imports the application when it boots; gunicorn stops with 'Worker failed to boot' "
            "(the traceback shows at --log-level debug).",
            "fix the import (run `python -c 'import MODULE'` in the server's environment and directory) or the "
            "name after the colon (the variable, or factory call, MODULE defines), or start with --preload to see "
            "the traceback at startup",
        )
        return
    if measured.seconds >= SLOW_IMPORT and not ctx.cfg.preload_app:
        workers = ctx.cfg.workers
        yield Finding(
            "preload-slow-import",
            "warning",
            f"importing {measured.app} took {measured.seconds:.1f}s and preload_app is off",
            f"each of the {workers} workers repeats that import when it boots: {workers * measured.seconds:.0f} "
            "CPU-seconds at every start and reload, and every worker replaced (max_requests, a crash, a "
            "timeout) is missing for that long; with the CPUs busy, booting workers and serving ones slow each "
            "other down.",
            "set preload_app=True (the master imports once, workers share the memory copy-on-write; open "
            "database connections after the fork, not at import), or make the import lazier",
        )


CHECKS: list[Check] = [
    check_plugin,
    check_worker_class,
    check_requests_seen,
    check_workers_cpus,
    check_workers_memory,
    check_timeout,
    check_worker_tmp_dir,
    check_sync_timeout,
    check_gthread_connections,
    check_max_requests_jitter,
    check_recycle_keepalive,
    check_backlog,
    check_prometheus_dir,
    check_loglevel,
    check_capture_output,
    check_gunicorn_version,
    check_platform_timeout,
    check_request_bound,
    check_sync_exposed,
    check_statsd_host,
    check_app_import,
]


def run_checks(ctx: Context, checks: Sequence[Check] = CHECKS) -> list[Finding]:
    return by_severity(finding for check in checks for finding in check(ctx))


def by_severity(findings: Iterable[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda finding: SEVERITIES.index(finding.severity))


class UsageError(Exception):
    """The doctor was asked for something it cannot do as asked; the message says what to give it."""


def diagnose(
    location: str | None,
    worker_memory_mb: int = DEFAULT_WORKER_MEMORY_MB,
    *,
    import_app: bool = False,
    app: str | None = None,
) -> tuple[Loaded, Context, list[Finding]]:
    """``import_app``: also import the application (``app``, else the config's ``wsgi_app``) in a subprocess
    and time it. Off by default: it runs the application's import-time code."""
    loaded = load(location)
    live = frozenset(
        os.path.realpath(server.prometheus_dir) for server in _discovery.scan().servers if server.prometheus_dir
    )
    ctx = Context(loaded.cfg, System.current(), loaded.environ, worker_memory_mb, loaded.plugin_errors, live)
    if import_app:
        target = app or loaded.cfg.wsgi_app
        if not target:
            raise UsageError(
                "--import-app needs the application: give --app module:variable, or set wsgi_app in the config"
            )
        ctx.app_import = measure_import(target, loaded.cfg.chdir, loaded.cfg.pythonpath)
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
        "gunicorn_version": ctx.gunicorn_version,
        "app_import_seconds": None
        if ctx.app_import is None or ctx.app_import.error
        else round(ctx.app_import.seconds, 3),
    }
