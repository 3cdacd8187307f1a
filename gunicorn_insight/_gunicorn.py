"""Facts about gunicorn itself, in one place: its worker classes, the hooks it calls and how many
positional parameters it wants for each, and the log lines it writes when it reaps a worker."""

from __future__ import annotations

import inspect
import re
from types import SimpleNamespace
from typing import Any

# Worker classes that call pre_request and post_request from one OS thread (greenlets and coroutines never
# switch inside a hook): their recorder needs no lock. Custom classes are not assumed to be among them.
ONE_THREAD_KINDS = frozenset({"sync", "gevent", "eventlet", "tornado", "asgi", "uvicorn"})
THREAD_PER_REQUEST_KINDS = frozenset({"sync", "gthread"})
"""Each request runs on an OS thread of its own from pre_request to post_request: its CPU is that thread's."""
PARSED_BY_GUNICORN_KINDS = frozenset({"sync", "gthread", "gevent", "eventlet"})
"""gunicorn's own HTTP parser reads their requests and hands its errors to ``worker.handle_error``; gunicorn's
asgi worker parses in its protocol, uvicorn's with h11 or httptools, tornado's with tornado: none calls it."""


def parsed_by_gunicorn(cfg: Any) -> bool:
    """The worker class reads requests with gunicorn's parser (see PARSED_BY_GUNICORN_KINDS); gevent_pywsgi, a
    gevent kind, serves through gevent's own WSGI server instead."""
    if worker_kind(cfg) not in PARSED_BY_GUNICORN_KINDS:
        return False
    try:
        return all(klass.__name__ != "GeventPyWSGIWorker" for klass in cfg.worker_class.__mro__)
    except Exception:  # no class to read: worker_kind said "unknown" already
        return False


def worker_kind(cfg: Any) -> str:
    """sync, gthread, gevent, eventlet, tornado, asgi, uvicorn, or the class name of a custom worker."""
    try:
        worker_class = cfg.worker_class
    except Exception:
        return "unknown"
    names = {
        "SyncWorker": "sync",
        "ThreadWorker": "gthread",
        "GeventWorker": "gevent",
        "GeventPyWSGIWorker": "gevent",
        "EventletWorker": "eventlet",
        "TornadoWorker": "tornado",
        "ASGIWorker": "asgi",
        "UvicornWorker": "uvicorn",  # uvicorn.workers and uvicorn_worker: same name
    }
    for klass in worker_class.__mro__:
        if klass.__name__ in names:
            return names[klass.__name__]
    return str(worker_class.__name__)


# gunicorn counts a hook's positional parameters and refuses a function with another number.
HOOK_ARITY = {
    "post_request": 4,
    "on_reload": 1,
    "post_worker_init": 1,
    "worker_int": 1,
    "worker_abort": 1,
    "on_starting": 1,
    "on_exit": 1,
    "pre_fork": 2,
    "post_fork": 2,
    "pre_request": 2,
    "child_exit": 2,
    "worker_exit": 2,
}


REAP_SENT = re.compile(r"Worker \(pid:(\d+)\) was sent (?:code (\d+)|(\w+))")


REAP_EXITED = re.compile(r"Worker \(pid:(\d+)\) exited with code (-?\d+)")


# Worker classes whose requests are recorded: by gunicorn's request hooks, or by the ASGI layer (asgi, uvicorn).
RECORDED_KINDS = frozenset({"sync", "gthread", "gevent", "eventlet", "asgi", "uvicorn"})


def unseen_requests(worker_class: Any) -> str | None:
    """What will be missing, when requests on this worker class cannot be recorded; None when they can.

    A class of another kind is trusted when its source (or a base class's) calls ``pre_request``: gunicorn's
    tornado worker does not, nor does a custom class that serves requests its own way."""
    if worker_kind(SimpleNamespace(worker_class=worker_class)) in RECORDED_KINDS or _calls_request_hooks(worker_class):
        return None
    return (
        f"worker class {getattr(worker_class, '__name__', worker_class)} never calls gunicorn's "
        "pre_request/post_request hooks, so gunicorn-insight cannot see its requests: request counts, "
        "durations, statuses, routes, queue time, busy time, requests in flight (status, top, exit lines) "
        "and slow-request reports will be missing (absent, not zero); worker, memory, exit and listen "
        "backlog metrics still work. Classes whose requests are recorded: sync, gthread, gevent, eventlet, "
        "asgi, uvicorn's"
    )


def _calls_request_hooks(worker_class: Any) -> bool:
    for klass in getattr(worker_class, "__mro__", ()):
        try:
            if "pre_request" in inspect.getsource(klass):
                return True
        except (OSError, TypeError):  # a builtin or a class without source: cannot tell, so not trusted
            continue
    return False


def _uses_gunicorn_statsd(cfg: Any) -> bool:
    from gunicorn.instrument.statsd import Statsd

    try:
        return issubclass(cfg.logger_class, Statsd)
    except Exception:
        return False
