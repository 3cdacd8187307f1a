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
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, TypeVar

from . import _master, _prometheus, _worker
from . import _scoreboard as sb
from ._routes import hook_frameworks
from ._safety import LOG, report
from ._status import ServerInfo
from ._version import __version__
from ._watchdog import Monitor, error_log_fd, write_abort_stack
from ._worker import RequestRecorder, post_request, pre_request, summarize
from .settings import ENV_PREFIX, ConfigurationError, Settings

PROMETHEUS_ENV = "PROMETHEUS_MULTIPROC_DIR"
EMBEDDED_ENV = "_GUNICORN_INSIGHT_EMBEDDED_DIR"  # leading underscore: not a setting, never validated as one


class _State:
    """Per-process state. A forked worker inherits the master's copy and replaces what it needs."""

    settings: Settings | None = None
    run_dir: str | None = None
    run_dir_owner = 0
    prometheus_dir: str | None = None
    request_hooks = "python"
    """Which pre_request/post_request install() put in: "compiled", or "python" and why."""
    error_fd = 2
    inspecting = False


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
    elif _master.CURRENT is None:
        STATE.settings = built
        _prepare_directories(built)
    elif STATE.settings is not None and not built.same_as(STATE.settings):
        # A HUP re-reads the config in the running master; the directories and sockets stay as they are.
        LOG.warning("gunicorn-insight: settings changed on reload; they take effect at the next restart")
    hooks = HOOKS
    if built.compiled_hooks and _worker.COMPILED is not None:
        hooks = {**HOOKS, "pre_request": _worker.COMPILED[0], "post_request": _worker.COMPILED[1]}
        STATE.request_hooks = "compiled"
    else:
        STATE.request_hooks = "python" if not built.compiled_hooks else "python (the C extension is not built)"
    for name, ours in hooks.items():
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
        variable for variable in (ENV_PREFIX + name.upper() for name in Settings.field_names())
        if os.environ.get(variable, "").strip()
    )
    if unread:
        LOG.warning("gunicorn-insight: install() was given a Settings object, which is used as it is, so %s %s not "
                    "read; Settings.build({...}) makes one that reads the environment too",
                    ", ".join(unread), "is" if len(unread) == 1 else "are")
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
    # Only a fresh master may clear: a USR2-forked successor shares the directory with its live parent.
    _prometheus.prepare_directory(directory, clear="GUNICORN_PID" not in os.environ)
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


def _remove_run_dir() -> None:
    # Workers run atexit handlers too (gunicorn exits them with sys.exit): only the creator cleans up.
    if STATE.run_dir and os.getpid() == STATE.run_dir_owner:
        shutil.rmtree(STATE.run_dir, ignore_errors=True)


def is_ours(hook: Any) -> bool:
    """A hook install() put there: ours, chained with someone's, or compiled (which carries no attributes)."""
    return getattr(hook, "__gunicorn_insight__", False) or (_worker.COMPILED is not None and hook in _worker.COMPILED)


# -- chaining --------------------------------------------------------------------------------------------


def _chain(name: str, ours: Callable[..., Any], theirs: Callable[..., Any]) -> Callable[..., Any]:
    """Ours, then theirs, with the arity gunicorn checks. Their exceptions stay theirs."""
    if name == "post_request":
        theirs = _as_post_request(theirs)

        def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
            ours(worker, req, environ, resp)
            theirs(worker, req, environ, resp)

        chained: Callable[..., Any] = post_request
    elif ARITY[name] == 1:

        def one(arg: Any) -> None:
            ours(arg)
            theirs(arg)

        chained = one
    elif ARITY[name] == 2:

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
    settings = STATE.settings
    if settings is None or _master.CURRENT is not None or STATE.run_dir is None:
        return
    try:
        plan = _master.Plan.resolve(settings, server.cfg, STATE.prometheus_dir)
        title = f"gunicorn-insight: metrics [{getattr(server, 'proc_name', None) or 'gunicorn'}]"
        master = _master.Master(plan, STATE.run_dir, title)
    except ConfigurationError:
        raise
    except Exception as error:
        report("on_starting, so gunicorn-insight is off for this run", error)
        return
    _master.CURRENT = master
    master.watch_logger(server.log)
    master.watch_listeners(lambda: list(server.LISTENERS))
    try:
        master.status.write_server(_describe(server, master))
    except Exception as error:
        report("writing server.json", error)
    master.start()
    _announce(master)


_T = TypeVar("_T")


def _describe(server: Any, master: _master.Master) -> ServerInfo:
    """What a tool needs to find and label this server (see gunicorn_insight._status)."""
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
        interval=plan.settings.interval,
        version=__version__,
        request_hooks=STATE.request_hooks,
        scoreboard_version=sb.VERSION,
        scoreboard=master.board.path,
        prometheus_dir=plan.prometheus_dir,
        metrics_url=master.endpoint.url if master.endpoint is not None else None,
        statsd=repr(plan.statsd_target) if plan.statsd_target is not None else None,
    )


def _optional(kind: Callable[[Any], _T], value: Any) -> _T | None:
    return None if value is None else kind(value)


def _announce(master: _master.Master) -> None:
    plan = master.plan
    where = []
    if master.endpoint is not None:
        where.append(f"Prometheus metrics at {master.endpoint.url}")
    elif plan.prometheus_dir is not None:
        where.append(f"Prometheus files in {plan.prometheus_dir}")
    if plan.statsd_target is not None:
        where.append(f"StatsD to {plan.statsd_target!r}")
    LOG.info("gunicorn-insight: %s (worker class %s, %s request hooks, scoreboard %s)",
             "; ".join(where) or "no exporter", plan.worker_kind, STATE.request_hooks, master.board.path)
    if plan.gunicorn_statsd_active and master.statsd is not None:
        LOG.info("gunicorn-insight: gunicorn's own statsd logger already sends gunicorn.requests, "
                 "gunicorn.request.duration and gunicorn.request.status.*; gunicorn-insight leaves those to it")


def pre_fork(server: Any, worker: Any) -> None:
    try:
        if _master.CURRENT is not None:
            _master.CURRENT.assign_slot(worker)
    except Exception as error:
        report("pre_fork", error)


def child_exit(server: Any, worker: Any) -> None:
    # On gunicorn 23 this runs inside the SIGCHLD handler: no logging here, report() only on a bug.
    try:
        if _master.CURRENT is not None:
            _master.CURRENT.worker_gone(worker)
    except Exception as error:
        report("child_exit", error)


def worker_exit(server: Any, worker: Any) -> None:
    try:
        master = _master.CURRENT
        if master is not None and os.getpid() == master.pid:
            # In the master, gunicorn calls this instead of child_exit when the worker had already vanished.
            master.worker_gone(worker)
            return
        recorder = _worker.RECORDER
        if recorder is None:
            return
        boot_error = recorder.exiting(worker)
        if not getattr(worker, "booted", True):
            LOG.error(
                "gunicorn-insight: worker pid=%s could not load the application: %s; if no traceback is above "
                "(gunicorn logs an import failure's only at --log-level debug), rerun with --log-level debug, "
                "or with --preload to fail at startup with the full traceback",
                os.getpid(), summarize(boot_error).rstrip("."),
            )
    except Exception as error:
        report("worker_exit", error)


def on_exit(server: Any) -> None:
    try:
        if _master.CURRENT is not None and os.getpid() == _master.CURRENT.pid:
            _master.CURRENT.stop()
    except Exception as error:
        report("on_exit", error)


# -- worker hooks --------------------------------------------------------------------------------------


def post_fork(server: Any, worker: Any) -> None:
    try:
        master = _master.CURRENT
        slot = getattr(worker, _master.SLOT_ATTRIBUTE, None)
        if master is None or slot is None or STATE.settings is None:
            return
        current = _greenlet_getcurrent() if master.plan.worker_kind == "gevent" else threading.get_ident
        _worker.RECORDER = RequestRecorder(master.board, slot, worker, master.plan.recorder, current)
    except Exception as error:
        report("post_fork", error)


def post_worker_init(worker: Any) -> None:
    try:
        recorder = _worker.RECORDER
        master = _master.CURRENT
        if recorder is None or master is None:
            return
        recorder.booted()
        STATE.error_fd = error_log_fd()
        if master.plan.recorder.routes:
            hook_frameworks()
        slow_after = master.plan.slow_request_timeout
        if slow_after > 0 or hasattr(worker, "nr_conns"):
            Monitor(recorder, worker, slow_after, greenlets=master.plan.worker_kind == "gevent",
                    loop=getattr(worker, "loop", None) if master.plan.worker_kind == "asgi" else None).start()
    except Exception as error:
        report("post_worker_init", error)


def worker_int(worker: Any) -> None:
    # Runs inside a signal handler (SIGINT/SIGQUIT): a byte in shared memory and an attribute (see mark), nothing
    # else.
    recorder = _worker.RECORDER
    if recorder is not None:
        with contextlib.suppress(Exception):  # logging here could deadlock; the master notices anyway
            recorder.mark(sb.FLAG_INT_HANDLER)


def worker_abort(worker: Any) -> None:
    # Runs inside a signal handler: a byte in shared memory and an attribute (see mark), then os.write and
    # faulthandler. No logging.
    recorder = _worker.RECORDER
    if recorder is not None:
        with contextlib.suppress(Exception):  # logging here could deadlock; the master notices anyway
            recorder.mark(sb.FLAG_ABORT_HANDLER)
            write_abort_stack(STATE.error_fd, recorder, os.getpid())


HOOKS: dict[str, Callable[..., Any]] = {
    "on_starting": on_starting,
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
ARITY = {"post_request": 4, "post_worker_init": 1, "worker_int": 1, "worker_abort": 1, "on_starting": 1,
         "on_exit": 1, "pre_fork": 2, "post_fork": 2, "pre_request": 2, "child_exit": 2, "worker_exit": 2}
for _hook in HOOKS.values():
    _hook.__gunicorn_insight__ = True  # type: ignore[attr-defined]



def _greenlet_getcurrent() -> Callable[[], Any]:
    from greenlet import getcurrent

    return getcurrent  # type: ignore[no-any-return]
