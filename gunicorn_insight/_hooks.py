"""gunicorn server hooks, and :func:`install`, which puts them into a configuration namespace.

Each hook is a plain function with exactly the positional parameters gunicorn expects (gunicorn counts
them). Each catches everything: rule one is that the plugin never breaks the server. The only
exception is :class:`ConfigurationError` in ``on_starting``, which stops a misconfigured server before
it serves anything, with a one-line message.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any, TypeVar

from . import _discovery
from . import _scoreboard as sb
from ._export import prometheus as _prometheus
from ._gunicorn import HOOK_ARITY
from ._master import arbiter as _arbiter
from ._master import binds as _binds
from ._master.plan import Plan
from ._report import LOG, error_log_fd, report
from ._runfiles import ServerInfo
from ._space import mebibytes
from ._version import __version__
from ._worker import recorder as _recorder
from ._worker.asgi import RecordingApp, current_task, find_uvicorn_state, is_recording_layer
from ._worker.loglines import log_line_counters, rejected_counters
from ._worker.recorder import RequestRecorder, post_request, pre_request, summarize
from ._worker.rejected import RejectWatch
from ._worker.routes import hook_frameworks
from ._worker.unseen import AcceptWatch
from ._worker.watchdog import Monitor, dump_stacks_on_fatal_signals, write_abort_stack
from .settings import ENV_PREFIX, ConfigurationError, Settings, otlp_protocol

PROMETHEUS_ENV = "PROMETHEUS_MULTIPROC_DIR"
EMBEDDED_ENV = "_GUNICORN_INSIGHT_EMBEDDED_DIR"  # leading underscore: not a setting, never validated as one


class _State:
    """Per-process state. A forked worker inherits the master's copy and replaces what it needs."""

    settings: Settings | None = None
    run_dir: str | None = None
    run_dir_owner = 0
    prometheus_dir: str | None = None
    prometheus_dir_created = False
    """The directory did not exist before install() made it (so it may be handed to the worker user)."""
    clear_prometheus_dir = False
    """Leftovers of earlier runs are removed from it when the master starts (see on_starting)."""
    request_hooks = "python"
    """Which pre_request/post_request install() put in: "compiled", or "python" and why."""
    error_fd = 2
    inspecting = False
    started = False
    """on_starting (or pre_fork in its place) has run in this master: the plugin's master side was tried."""
    uvicorn_requests: Callable[[], int] | None = None
    """The requests uvicorn's server counted (for max_requests), once the worker has found it."""
    adopted_cfg: Any = None
    """The gunicorn configuration whose hooks were last checked against ours (held, so no id is reused)."""


STATE = _State()


# -- install ------------------------------------------------------------------------------------------


def install(namespace: MutableMapping[str, Any], settings: Settings | None = None, **fields: Any) -> Settings:
    """Validate the settings and put gunicorn-insight's hooks into ``namespace`` (a config's globals()).

    Settings come as keywords (laid over the ``GUNICORN_INSIGHT_*`` environment variables) or as one
    ``Settings`` object, used as it is. Hooks already defined in the namespace keep working: ours run first,
    then theirs. Call it at the end of ``gunicorn.conf.py``, after your own hooks.
    """
    built = _settings(settings, fields)
    if STATE.inspecting:
        STATE.settings = built
    elif _arbiter.CURRENT is None:
        STATE.settings = built
        _prepare_directories(built)
    elif STATE.settings is not None and not built.same_as(STATE.settings):
        # A HUP re-reads the config in the running master; the directories and sockets stay as they are.
        LOG.warning("gunicorn-insight: settings changed on reload; they take effect at the next restart")
    if built.compiled_hooks and _recorder.COMPILED is not None:
        STATE.request_hooks = "compiled"
    else:
        STATE.request_hooks = "python" if not built.compiled_hooks else "python (the C extension is not built)"
    for name, ours in _our_hooks().items():
        theirs = namespace.get(name)
        if theirs is None or is_ours(theirs):
            namespace[name] = ours
        else:
            namespace[name] = _chain(name, ours, theirs)
    return STATE.settings or built


def _settings(given: Any, fields: dict[str, Any]) -> Settings:
    if given is None:
        return Settings.build(fields)
    if not isinstance(given, Settings):
        raise ConfigurationError(
            f"install()'s settings argument is a {type(given).__name__}, not gunicorn_insight.Settings; pass "
            "Settings(...), or the settings as keywords: install(globals(), statsd=...)"
        )
    if fields:
        raise ConfigurationError(
            f"install() got a Settings object and the keywords {', '.join(sorted(fields))}; give one or the other "
            "(dataclasses.replace(settings, ...) changes a Settings)"
        )
    unread = sorted(
        variable
        for variable in (ENV_PREFIX + name.upper() for name in Settings.field_names())
        if os.environ.get(variable, "").strip()
    )
    if unread:
        LOG.warning(
            "gunicorn-insight: install() was given a Settings object, which is used as it is, so %s %s not "
            "read; Settings.build({...}) makes one that reads the environment too",
            ", ".join(unread),
            "is" if len(unread) == 1 else "are",
        )
    return given


def _prepare_directories(settings: Settings) -> None:
    """Runs while the config file loads: the application (maybe preloaded) must see the directory."""
    if STATE.run_dir is None:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        STATE.run_dir = tempfile.mkdtemp(prefix="gunicorn-insight-", dir=base)
        STATE.run_dir_owner = os.getpid()
        atexit.register(_remove_run_dir)
    if not settings.prometheus_enabled:
        STATE.prometheus_dir = None
        return
    directory = settings.prometheus_dir or os.environ.get(PROMETHEUS_ENV)
    if directory and directory == os.environ.get(EMBEDDED_ENV) and STATE.run_dir not in directory:
        directory = None  # a USR2 parent's private directory: it is removed when that master exits
    if not directory or directory == os.path.join(STATE.run_dir, "prometheus"):
        directory = os.path.join(STATE.run_dir, "prometheus")
        os.environ[EMBEDDED_ENV] = directory
    assert directory is not None
    _prometheus.check_import_order(directory)
    STATE.prometheus_dir_created = not os.path.isdir(directory)
    _prometheus.prepare_directory(directory)
    # A USR2-forked successor shares the directory with its live parent, whose files it must not touch;
    # the embedded directory is new. Clearing waits for on_starting, which knows the workers' uid.
    embedded = directory == os.environ.get(EMBEDDED_ENV)
    STATE.clear_prometheus_dir = "GUNICORN_PID" not in os.environ and not embedded
    os.environ[PROMETHEUS_ENV] = directory
    STATE.prometheus_dir = directory


@contextlib.contextmanager
def inspecting() -> Iterator[None]:
    """Load a config that calls install() without creating, clearing or exporting anything (the doctor)."""
    before = STATE.inspecting, STATE.settings
    STATE.inspecting = True
    try:
        yield
    finally:
        STATE.inspecting, STATE.settings = before


def _remove_stale_run_dirs(run_dir: str | None) -> None:
    """Remove, beside ours, the run directories of masters that are gone: a master killed with SIGKILL (or by
    the OOM killer) leaves its directory, about 4 MiB of /dev/shm each, and a server restarted that way again
    and again would fill it. Gone means what `status` means by stale: the pid in server.json runs no more, or
    runs a process that started after it (a reused pid). A master removes its own user's; root's, any (with
    --user a directory belongs to the workers' user)."""
    if run_dir is None:
        return
    me = os.geteuid()
    stale = [
        path for path in _discovery.scan([os.path.dirname(run_dir)]).stale if me == 0 or os.stat(path).st_uid == me
    ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if stale:
        LOG.info(
            "gunicorn-insight: removed %d run director%s of masters that are gone (killed with SIGKILL?): %s",
            len(stale),
            "y" if len(stale) == 1 else "ies",
            ", ".join(sorted(stale)[:5]) + (", ..." if len(stale) > 5 else ""),
        )


def _remove_run_dir() -> None:
    # Workers run atexit handlers too (gunicorn exits them with sys.exit): only the master cleans up. The
    # owner is the process that loaded the config until on_starting names the master (with --daemon, a
    # grandchild of it: the processes in between leave with os._exit, which runs no atexit handler).
    if STATE.run_dir and os.getpid() == STATE.run_dir_owner:
        shutil.rmtree(STATE.run_dir, ignore_errors=True)


def _our_hooks() -> dict[str, Callable[..., Any]]:
    """What install() puts in: HOOKS, with the compiled request hooks when it chose them."""
    if STATE.request_hooks == "compiled" and _recorder.COMPILED is not None:
        return {**HOOKS, "pre_request": _recorder.COMPILED[0], "post_request": _recorder.COMPILED[1]}
    return HOOKS


def is_ours(hook: Any) -> bool:
    """A hook install() put there: ours, chained with someone's, or compiled (which carries no attributes)."""
    try:
        marked = getattr(hook, "__gunicorn_insight__", False) is True
    except Exception:  # an arbitrary object's __getattr__
        return False
    return marked or (_recorder.COMPILED is not None and any(hook is compiled for compiled in _recorder.COMPILED))


def _calls_ours(hook: Any) -> bool:
    """A hook that kept install()'s and calls it itself (``saved = post_request`` then a wrapper calling
    ``saved``): chaining ours in front would run ours twice per request."""
    code = getattr(hook, "__code__", None)
    if code is None:
        return False
    referenced: list[Any] = []
    for cell in getattr(hook, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # an empty cell
            referenced.append(cell.cell_contents)
    namespace = getattr(hook, "__globals__", None) or {}
    referenced.extend(namespace.get(name) for name in code.co_names)
    return any(callable(thing) and is_ours(thing) for thing in referenced)


def adopt_late_hooks(cfg: Any, names: Iterable[str] | None = None) -> list[str]:
    """Put our hooks back into gunicorn's final configuration, chained in front of whatever replaced them.

    A hook defined after ``install(globals())`` in the same file, or brought in from another module after
    it, replaces ours: with ``post_request`` gone every request would stay in flight forever. gunicorn's
    configuration is the last word (workers read their hooks from it after the fork), so each hook there is
    compared with what install() put in and set back, chained, through ``cfg.set``, which checks the arity
    as gunicorn does. Returns the names chained; raises ConfigurationError where chaining is impossible.
    """
    ours_by_name = _our_hooks()
    chained = []
    for name in names or ours_by_name:
        ours = ours_by_name[name]
        setting = getattr(cfg, "settings", {}).get(name)
        if setting is None:
            continue
        current = setting.get()
        if current is None or is_ours(current) or _calls_ours(current):
            continue
        if current is getattr(setting, "default", None):
            replacement = ours  # gunicorn's own default, not the user's: install() would have dropped it too
        else:
            replacement = _chain(name, ours, current)
            chained.append(name)
        try:
            cfg.set(name, replacement)
        except Exception as error:
            raise ConfigurationError(
                f"{name}={current!r} replaced gunicorn-insight's {name} after install() and cannot be chained "
                f"({error}); define your {name} before calling gunicorn_insight.install(globals()), at the "
                "end of the config, and install() chains it"
            ) from error
    return chained


def _log_adopted(chained: list[str], when: str) -> None:
    if chained:
        LOG.info(
            "gunicorn-insight: %s defined after install()%s; chained so both run (gunicorn-insight's "
            "first). Call install(globals()) at the end of the config to make this unnecessary",
            ", ".join(chained),
            when,
        )


# -- chaining --------------------------------------------------------------------------------------------


def _chain(name: str, ours: Callable[..., Any], theirs: Callable[..., Any]) -> Callable[..., Any]:
    """Ours, then theirs, with the arity gunicorn checks. Their exceptions stay theirs."""
    if name == "post_request":
        theirs = _as_post_request(theirs)

        def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
            ours(worker, req, environ, resp)
            theirs(worker, req, environ, resp)

        chained: Callable[..., Any] = post_request
    elif HOOK_ARITY[name] == 1:

        def one(arg: Any) -> None:
            ours(arg)
            theirs(arg)

        chained = one
    elif HOOK_ARITY[name] == 2:

        def two(first: Any, second: Any) -> None:
            ours(first, second)
            theirs(first, second)

        chained = two
    else:
        raise AssertionError(name)
    chained.__name__ = chained.__qualname__ = name
    chained.__wrapped__ = theirs  # type: ignore[attr-defined]
    chained.__gunicorn_insight__ = True  # type: ignore[attr-defined]
    return chained


def _as_post_request(hook: Callable[..., Any]) -> Callable[..., Any]:
    """gunicorn accepts post_request with 2, 3 or 4 parameters; call the user's the way it would."""
    from gunicorn.util import get_arity

    arity = get_arity(hook)
    if arity == 4:
        return hook
    if arity == 3:
        return lambda worker, req, environ, _resp: hook(worker, req, environ)
    if arity == 2:
        return lambda worker, req, _environ, _resp: hook(worker, req)
    raise ConfigurationError(
        f"post_request={hook!r} takes {arity} positional parameters; gunicorn calls it with "
        "(worker, req, environ, resp): define it with 2, 3 or 4"
    )


# -- master hooks --------------------------------------------------------------------------------------


def on_starting(server: Any) -> None:
    if STATE.started:
        return
    STATE.started = True
    settings = STATE.settings
    if settings is None or _arbiter.CURRENT is not None or STATE.run_dir is None:
        return
    STATE.run_dir_owner = os.getpid()  # the master, after any --daemon forks
    try:
        _prepare_for_workers(server.cfg)
        _log_adopted(adopt_late_hooks(server.cfg), "")
        STATE.adopted_cfg = server.cfg
        plan = Plan.resolve(settings, server.cfg, STATE.prometheus_dir)
        title = f"gunicorn-insight: metrics [{getattr(server, 'proc_name', None) or 'gunicorn'}]"
        master = _arbiter.Master(plan, STATE.run_dir, title)
    except ConfigurationError as error:
        _to_error_log(server, error)
        raise
    except Exception as error:
        report("on_starting, so gunicorn-insight is off for this run", error)
        return
    _arbiter.CURRENT = master
    try:
        _hand_to_worker_user(server.cfg, master.board.path)
    except Exception as error:
        report("handing the run directory to the worker user", error)
    master.watch_logger(server.log)
    master.watch_listeners(lambda: list(server.LISTENERS))
    master.watch_desired(lambda: int(server.num_workers))
    try:
        master.status.write_server(_describe(server, master))
    except Exception as error:
        report("writing server.json", error)
    master.start()
    _announce(master)
    try:
        _binds.warn_if_taken(server)
    except Exception as error:
        report("naming who holds the addresses to bind", error)
    try:
        _remove_stale_run_dirs(STATE.run_dir)
    except Exception as error:
        report("removing the run directories of masters that are gone", error)
    try:
        _warn_if_little_room(master.plan.prometheus_dir, int(getattr(server.cfg, "workers", 1) or 1))
    except Exception as error:
        report("checking the room left for the application's metric files", error)


APP_FILE_SIZE = 64 * 1024
"""What prometheus_client's multiprocess mode takes per metric type and process at first, unreserved."""


def _warn_if_little_room(directory: str | None, workers: int) -> None:
    """Our files are reserved; the application's are not (prometheus_client maps them sparse). Say so once
    when the room left would not even hold a counter and a histogram file per worker."""
    if directory is None:
        return
    stats = os.statvfs(directory)
    free = stats.f_bavail * stats.f_frsize
    needed = workers * 2 * APP_FILE_SIZE
    if free < needed:
        LOG.warning(
            "gunicorn-insight: only %s left in %s; the application's prometheus_client files need 64 KiB per "
            "metric type and worker at first (%s for a counter and a histogram in %d workers) and are not "
            "reserved: a worker that writes into a page the filesystem cannot back dies of SIGBUS. Give that "
            "filesystem more room (Docker: docker run --shm-size=256m) or set GUNICORN_INSIGHT_PROMETHEUS_DIR "
            "to a directory with room",
            mebibytes(free),
            directory,
            mebibytes(needed),
            workers,
        )


def _prepare_for_workers(cfg: Any) -> None:
    """What needs gunicorn's configuration: leftovers of earlier runs go, the worker user can write."""
    directory = STATE.prometheus_dir
    if directory is None:
        return
    uid, gid = _worker_ids(cfg)
    if STATE.clear_prometheus_dir:
        STATE.clear_prometheus_dir = False
        try:
            removed = _prometheus.remove_stale_files(directory, {os.geteuid(), uid})
        except OSError as error:
            report(f"removing leftover files from {directory}", error)
        else:
            if removed:
                LOG.info(
                    "gunicorn-insight: removed %d metric files of processes that are gone from %s",
                    len(removed),
                    directory,
                )
    in_run_dir = STATE.run_dir is not None and directory.startswith(STATE.run_dir + os.sep)
    if uid == os.geteuid() or in_run_dir:
        return  # the run directory is handed over with the scoreboard (_hand_to_worker_user)
    if STATE.prometheus_dir_created:
        os.chown(directory, uid, gid)
    elif not _writable_for(directory, uid, gid):
        raise ConfigurationError(
            f"prometheus_dir={directory!r} is not writable for uid {uid} (gid {gid}), which gunicorn's user/group "
            "settings make the workers run as, so the application's metrics could not be written; "
            f"run chown {uid}:{gid} {directory}, or point GUNICORN_INSIGHT_PROMETHEUS_DIR elsewhere"
        )


def _worker_ids(cfg: Any) -> tuple[int, int]:
    """The uid and gid gunicorn's workers switch to (--user/--group; ours when not set)."""
    uid, gid = getattr(cfg, "uid", None), getattr(cfg, "gid", None)
    return (uid if isinstance(uid, int) else os.geteuid(), gid if isinstance(gid, int) else os.getegid())


def _writable_for(directory: str, uid: int, gid: int) -> bool:
    if uid == 0:
        return True
    status = os.stat(directory)
    if status.st_uid == uid:
        return bool(status.st_mode & stat.S_IWUSR)
    if status.st_gid == gid:
        return bool(status.st_mode & stat.S_IWGRP)
    return bool(status.st_mode & stat.S_IWOTH)


def _hand_to_worker_user(cfg: Any, *paths: str) -> None:
    """Workers that drop privileges (--user/--group) write the embedded Prometheus directory in the run
    directory, which mkdtemp made private to the master's user: hand both over, with the scoreboard so the
    worker user's tools can read it. The master, root when it can switch users, keeps its access."""
    uid, gid = _worker_ids(cfg)
    if STATE.run_dir is None or (uid, gid) == (os.geteuid(), os.getegid()):
        return
    for path in (STATE.run_dir, *paths):
        os.chown(path, uid, gid)
    embedded = STATE.prometheus_dir
    if embedded is not None and embedded.startswith(STATE.run_dir + os.sep):
        os.chown(embedded, uid, gid)


def _to_error_log(server: Any, error: ConfigurationError) -> None:
    """gunicorn prints an error that stops the arbiter on stderr only; a server started with --error-logfile
    must find it in that file too (where the error log is stderr, printing it once is enough)."""
    with contextlib.suppress(Exception):  # the error itself is what must reach the operator
        if (
            getattr(server.cfg, "errorlog", "-") != "-"
            or getattr(server.cfg, "logconfig_dict", None)
            or getattr(server.cfg, "logconfig", None)
        ):
            server.log.error("Error: %s", error)


def on_reload(server: Any) -> None:
    """After a HUP gunicorn has re-read the config into a new cfg: its hooks are checked again."""
    try:
        if _arbiter.CURRENT is not None and os.getpid() == _arbiter.CURRENT.pid:
            _log_adopted(adopt_late_hooks(server.cfg), " in the reloaded config")
            STATE.adopted_cfg = server.cfg
    except Exception as error:
        report("on_reload", error)


_T = TypeVar("_T")


def _describe(server: Any, master: _arbiter.Master) -> ServerInfo:
    """What a tool needs to find and label this server (see gunicorn_insight._runfiles)."""
    cfg = server.cfg
    plan = master.plan
    return ServerInfo(
        master_pid=master.pid,
        proc_name=str(getattr(cfg, "proc_name", None) or "gunicorn"),
        started=time.time(),
        binds=tuple(str(bind) for bind in getattr(cfg, "bind", []) or []),
        pidfile=_optional(str, getattr(cfg, "pidfile", None)),
        worker_class=plan.worker_kind,
        workers=_optional(int, getattr(cfg, "workers", None)),
        threads=_optional(int, getattr(cfg, "threads", None)),
        worker_connections=_optional(int, getattr(cfg, "worker_connections", None)),
        connections_limit=plan.connections_limit,
        per_worker_capacity=plan.per_worker_capacity,
        timeout=_optional(int, getattr(cfg, "timeout", None)),
        max_requests=_optional(int, getattr(cfg, "max_requests", None)),
        preload_app=_optional(bool, getattr(cfg, "preload_app", None)),
        gunicorn_version=_gunicorn_version(),
        interval=plan.settings.interval,
        version=__version__,
        request_hooks=STATE.request_hooks,
        scoreboard_version=sb.VERSION,
        scoreboard=master.board.path,
        prometheus_dir=plan.prometheus_dir,
        metrics_url=(master.endpoint.url or None) if master.endpoint is not None else None,
        statsd=repr(plan.statsd_target) if plan.statsd_target is not None else None,
        otlp=(plan.settings.otlp_destination(os.environ) or "OTEL_EXPORTER_OTLP_*")
        if plan.settings.otlp_enabled
        else None,
    )


def _optional(kind: Callable[[Any], _T], value: Any) -> _T | None:
    return None if value is None else kind(value)


def _gunicorn_version() -> str:
    import gunicorn

    return str(gunicorn.__version__)


def _announce(master: _arbiter.Master) -> None:
    plan = master.plan
    where = []
    if master.endpoint is not None and master.endpoint.url:
        where.append(f"Prometheus metrics at {master.endpoint.url}")
    elif plan.prometheus_dir is not None:
        where.append(f"Prometheus files in {plan.prometheus_dir}")
    if plan.statsd_target is not None:
        where.append(f"StatsD to {plan.statsd_target!r}")
    if plan.settings.otlp_enabled:
        destination = plan.settings.otlp_destination(os.environ) or "the OTEL_EXPORTER_OTLP_* endpoint"
        where.append(f"OTLP to {destination}" + (" over gRPC" if otlp_protocol(os.environ) == "grpc" else ""))
    LOG.info(
        "gunicorn-insight: %s (worker class %s, %s request hooks, scoreboard %s)",
        "; ".join(where) or "no exporter",
        plan.worker_kind,
        STATE.request_hooks,
        master.board.path,
    )
    if plan.requests_unseen:
        LOG.warning("gunicorn-insight: %s", plan.requests_unseen)
    elif plan.worker_kind in ("asgi", "uvicorn"):
        LOG.info(
            "gunicorn-insight: on the %s worker class the request hooks have no client socket, so clients that "
            "hang up before the response are not seen: gunicorn_requests_client_closed_total stays absent",
            plan.worker_kind,
        )
    if not plan.rejects_seen:
        LOG.info(
            "gunicorn-insight: the %s worker class does not parse requests with gunicorn's HTTP parser (%s), so "
            "the malformed requests it refuses are not seen: gunicorn_requests_rejected_total stays absent",
            plan.worker_kind,
            {
                "uvicorn": "uvicorn uses h11 or httptools",
                "asgi": "its asyncio protocol does",
                "tornado": "tornado does",
                "gevent": "gevent_pywsgi uses gevent's WSGI server",
            }.get(plan.worker_kind, "or does not hand its errors to handle_error"),
        )
    if plan.gunicorn_statsd_active and master.statsd is not None:
        LOG.info(
            "gunicorn-insight: gunicorn's own statsd logger already sends gunicorn.requests, "
            "gunicorn.request.duration, gunicorn.request.status.* and gunicorn.log.*; gunicorn-insight leaves "
            "those to it"
        )


def pre_fork(server: Any, worker: Any) -> None:
    if not STATE.started:
        on_starting(server)  # on_starting was replaced after install(): start here, before the first fork
    try:
        if _arbiter.CURRENT is not None:
            if server.cfg is not STATE.adopted_cfg:  # a HUP whose on_reload was replaced
                _log_adopted(adopt_late_hooks(server.cfg), " in the reloaded config")
                STATE.adopted_cfg = server.cfg
            _arbiter.CURRENT.assign_slot(worker)
    except Exception as error:
        report("pre_fork", error)


def child_exit(server: Any, worker: Any) -> None:
    # On gunicorn 23 this runs inside the SIGCHLD handler: no logging here, report() only on a bug.
    try:
        if _arbiter.CURRENT is not None:
            _arbiter.CURRENT.worker_gone(worker, shutting_down=_stopping(server))
    except Exception as error:
        report("child_exit", error)


def _stopping(server: Any) -> bool:
    """gunicorn's stop() empties LISTENERS before it signals the workers: a worker reaped after that, even
    by stop()'s own last reap after its SIGKILL, was stopped by the shutdown."""
    return not getattr(server, "LISTENERS", True)


def worker_exit(server: Any, worker: Any) -> None:
    try:
        master = _arbiter.CURRENT
        if master is not None and os.getpid() == master.pid:
            # In the master, gunicorn calls this instead of child_exit when the worker had already vanished.
            master.worker_gone(worker, shutting_down=_stopping(server))
            return
        recorder = _recorder.RECORDER
        if recorder is None:
            return
        served = STATE.uvicorn_requests
        boot_error = recorder.exiting(worker, served=None if served is None else served())
        if not getattr(worker, "booted", True):
            LOG.error(
                "gunicorn-insight: worker pid=%s could not load the application: %s; if no traceback is above "
                "(gunicorn logs an import failure's only at --log-level debug), rerun with --log-level debug, "
                "or with --preload to fail at startup with the full traceback",
                os.getpid(),
                summarize(boot_error).rstrip("."),
            )
    except Exception as error:
        report("worker_exit", error)


def on_exit(server: Any) -> None:
    try:
        if _arbiter.CURRENT is not None and os.getpid() == _arbiter.CURRENT.pid:
            _arbiter.CURRENT.stop()
    except Exception as error:
        report("on_exit", error)
    try:
        _hand_counts_to_successor(server)
    except Exception as error:
        report("handing the Prometheus counts to the USR2 successor", error)


def _hand_counts_to_successor(server: Any) -> None:
    """A master leaving after a USR2 upgrade moves its embedded directory's counts to the new master's.

    Each master has an embedded directory of its own, removed when it exits: without this, every counter
    would start over at the upgrade. Its workers are gone by now and its last round is written, so the
    files are final; moved whole (same names, pids unique), the new master's /metrics adds them to its own.
    """
    successor = getattr(server, "reexec_pid", 0)
    directory = STATE.prometheus_dir
    if not successor or directory is None or STATE.run_dir is None or os.getpid() != STATE.run_dir_owner:
        return
    if not directory.startswith(STATE.run_dir + os.sep):
        return  # a directory of the operator's: both masters already share it
    target = next(
        (found.info.prometheus_dir for found in _discovery.scan().servers if found.master_pid == successor), None
    )
    if not isinstance(target, str) or target == directory:
        LOG.warning(
            "gunicorn-insight: the new master (pid %s) was not found; its Prometheus counters start from zero",
            successor,
        )
        return
    moved = _prometheus.hand_over(directory, target)
    LOG.info("gunicorn-insight: %d metric files handed to the new master (pid %s) in %s", moved, successor, target)


# -- worker hooks --------------------------------------------------------------------------------------


def post_fork(server: Any, worker: Any) -> None:
    if STATE.settings is not None and not STATE.started and not STATE.inspecting:
        # Neither on_starting nor pre_fork of ours ran in the master: both were replaced after install().
        # Without the master side nothing would be counted and the worker could not say so: refuse to boot.
        raise ConfigurationError(
            "on_starting and pre_fork were replaced after gunicorn_insight.install(globals()) ran, so "
            "gunicorn-insight cannot start; define your hooks before calling install() (at the end of the "
            "config), and install() chains them"
        )
    try:
        # The last word, in the worker's own copy of the configuration: request hooks a HUP's new config
        # replaced, if the master could not chain them.
        adopt_late_hooks(worker.cfg, _WORKER_HOOKS)
    except Exception as error:
        report("post_fork (chaining the request hooks)", error)
    try:
        master = _arbiter.CURRENT
        slot = getattr(worker, _arbiter.SLOT_ATTRIBUTE, None)
        if master is None or slot is None or STATE.settings is None:
            return
        current = _greenlet_getcurrent() if master.plan.worker_kind in GREEN_KINDS else threading.get_ident
        if master.plan.worker_kind in ASGI_APP_ATTRIBUTES:
            current = current_task  # only the ASGI layer records there, inside the request's task
        if master.plan.worker_kind == "uvicorn":
            worker.nr_conns = 0  # the watchdog publishes it from the start; counted once the server runs
        _recorder.RECORDER = RequestRecorder(master.board, slot, worker, master.plan.recorder, current)
        if master.log_lines is not None:  # the logger object came wrapped from the master: count into the slot
            master.log_lines.in_worker(log_line_counters(master.board.buffer, master.board.offset(slot)).count)
        if master.plan.worker_kind == "uvicorn":
            _recorder.RECORDER.unmark(sb.FLAG_COUNTS_CONNECTIONS)  # until then: the requests in flight
    except Exception as error:
        report("post_fork", error)


def post_worker_init(worker: Any) -> None:
    monitor = None
    try:
        recorder = _recorder.RECORDER
        master = _arbiter.CURRENT
        if recorder is None or master is None:
            return
        recorder.booted()
        STATE.error_fd = error_log_fd()
        dump_stacks_on_fatal_signals(STATE.error_fd)
        if master.plan.recorder.routes:
            hook_frameworks()
        # Always started: besides slow requests and connections it answers `gunicorn-insight stacks`.
        monitor = Monitor(
            recorder,
            worker,
            master.plan.slow_request_timeout,
            greenlets=master.plan.worker_kind if master.plan.worker_kind in GREEN_KINDS else None,
            loop=getattr(worker, "loop", None) if master.plan.worker_kind == "asgi" else None,
            stacks_dir=STATE.run_dir,
        )
        monitor.start()
    except Exception as error:
        report("post_worker_init", error)
    try:
        if _recorder.RECORDER is not None and _arbiter.CURRENT is not None:
            record_asgi_requests(worker, _arbiter.CURRENT.plan, monitor)
    except Exception as error:
        report("wrapping the ASGI application", error)
    try:
        recorder, master = _recorder.RECORDER, _arbiter.CURRENT
        # Where the ASGI layer records, every request is seen; where the startup warning spoke, it is said.
        plan = master.plan if master is not None else None
        watched = plan is not None and not plan.requests_unseen and plan.worker_kind not in ASGI_APP_ATTRIBUTES
        if recorder is not None and watched:
            AcceptWatch(recorder).install(list(getattr(worker, "sockets", None) or ()))
    except Exception as error:
        report("watching accepted connections", error)
    try:
        master = _arbiter.CURRENT
        slot = getattr(worker, _arbiter.SLOT_ATTRIBUTE, None)
        if master is not None and slot is not None and master.plan.rejects_seen:
            RejectWatch(rejected_counters(master.board.buffer, master.board.offset(slot)).count).install(worker)
    except Exception as error:
        report("counting rejected requests", error)


GREEN_KINDS = frozenset({"gevent", "eventlet"})
"""Worker classes that serve requests on greenlets and monkey-patch threading (the watchdog needs a real one)."""

ASGI_APP_ATTRIBUTES = {"uvicorn": "wsgi", "asgi": "asgi"}
"""Worker classes whose requests the ASGI layer records, and where each keeps the loaded application until
it starts serving (uvicorn's hands ``worker.wsgi`` to its server in ``run()``)."""


def record_asgi_requests(worker: Any, plan: Plan, monitor: Monitor | None = None) -> None:
    """Wrap the loaded application in the recording ASGI layer (see _worker.asgi), on the classes that need it.

    gunicorn's asgi worker also calls the request hooks, with less than the layer sees (no status or route
    without its access log, no client address): this worker gets the user's own hooks back, so each request
    is written once."""
    attribute = ASGI_APP_ATTRIBUTES.get(plan.worker_kind)
    if attribute is None:
        return
    app = getattr(worker, attribute, None)
    if app is None or is_recording_layer(app):
        return
    interface = getattr(getattr(worker, "config", None), "interface", "auto")
    if interface not in ("auto", "asgi3", "asgi2"):
        LOG.warning(
            "gunicorn-insight: worker class %s serves a %s application; its requests are not recorded",
            type(worker).__name__,
            interface,
        )
        return
    hooks = (
        _recorder.COMPILED
        if STATE.request_hooks == "compiled" and _recorder.COMPILED is not None
        else (pre_request, post_request)
    )
    # uvicorn creates its event loop when it starts serving: the watchdog gets it at the first call.
    on_loop = monitor.watch_loop if monitor is not None and plan.worker_kind == "uvicorn" else None
    layer = RecordingApp(app, worker, hooks, routes=plan.recorder.routes, on_loop=on_loop, interface=interface)
    setattr(worker, attribute, layer.entry())
    if interface != "auto":
        worker.config.interface = "asgi3"  # what the server calls now is the layer, whatever the application is
    if plan.worker_kind == "asgi":
        _hand_back_request_hooks(worker.cfg)
    if plan.worker_kind == "uvicorn":
        find_uvicorn_state(worker, lambda state: _watch_uvicorn_state(worker, monitor, state))


def _watch_uvicorn_state(worker: Any, monitor: Monitor | None, state: Any) -> None:
    """uvicorn's server keeps the counts gunicorn's worker would: its requests (for max_requests, read when the
    worker exits) and its open connections."""
    STATE.uvicorn_requests = lambda: int(state.total_requests)
    if monitor is not None:
        connections = state.connections
        worker.nr_conns = len(connections)
        monitor.count_connections(lambda: len(connections))
        if _recorder.RECORDER is not None:
            _recorder.RECORDER.mark(sb.FLAG_COUNTS_CONNECTIONS)


def _hand_back_request_hooks(cfg: Any) -> None:
    """In this worker only, gunicorn's request hooks become the user's own again (or gunicorn's defaults)."""
    for name in ("pre_request", "post_request"):
        setting = cfg.settings.get(name)
        if setting is not None and is_ours(setting.value):
            setting.value = getattr(setting.value, "__wrapped__", None) or setting.default


def worker_int(worker: Any) -> None:
    # Runs inside a signal handler (SIGINT/SIGQUIT): a byte in shared memory and an attribute (see mark), nothing
    # else.
    recorder = _recorder.RECORDER
    if recorder is not None:
        with contextlib.suppress(Exception):  # logging here could deadlock; the master notices anyway
            recorder.mark(sb.FLAG_INT_HANDLER)


def worker_abort(worker: Any) -> None:
    # Runs inside a signal handler: a byte in shared memory and an attribute (see mark), then os.write and
    # faulthandler. No logging.
    recorder = _recorder.RECORDER
    if recorder is not None:
        with contextlib.suppress(Exception):  # logging here could deadlock; the master notices anyway
            recorder.mark(sb.FLAG_ABORT_HANDLER)
            write_abort_stack(STATE.error_fd, recorder, os.getpid())


HOOKS: dict[str, Callable[..., Any]] = {
    "on_starting": on_starting,
    "on_reload": on_reload,
    "pre_fork": pre_fork,
    "post_fork": post_fork,
    "post_worker_init": post_worker_init,
    "pre_request": pre_request,
    "post_request": post_request,
    "worker_int": worker_int,
    "worker_abort": worker_abort,
    "child_exit": child_exit,
    "worker_exit": worker_exit,
    "on_exit": on_exit,
}
_WORKER_HOOKS = ("pre_request", "post_request", "post_worker_init", "worker_int", "worker_abort", "worker_exit")
for _hook in HOOKS.values():
    _hook.__gunicorn_insight__ = True  # type: ignore[attr-defined]


def _greenlet_getcurrent() -> Callable[[], Any]:
    from greenlet import getcurrent

    return getcurrent  # type: ignore[no-any-return]
