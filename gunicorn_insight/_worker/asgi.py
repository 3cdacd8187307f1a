"""Request recording for ASGI worker classes, as an ASGI layer around the application.

uvicorn's worker classes never call gunicorn's ``pre_request``/``post_request``, and gunicorn's own
``asgi`` worker calls them without a response (status unknown) or an environ (no route) unless its access
log is on, and with a request that has no peer address. So on those classes the worker wraps the loaded
application in :class:`RecordingApp`, which hands each HTTP request to the very same two hooks
(compiled or Python, whichever install() chose) through a small stand-in for gunicorn's request: one
definition of what a request writes, identical bytes in the slot. With the compiled hooks the stand-in and
the per-request steps are C too (``_speedups.asgi_start``), falling back to this module's functions for
anything unusual. The application's ``send`` is :func:`sender`'s plain Python function bound to the request,
not a coroutine of the layer's own.

Only ``http`` scopes are requests. ``lifespan`` and ``websocket`` scopes go to the application untouched
and are not counted (a websocket connection can last hours: it is not a request with a duration).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from types import MethodType
from typing import Any

from .._report import report
from . import recorder
from .routes import ROUTE_KEY

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Hook = Callable[..., None]

_QUEUE_HEADERS = {b"x-request-start": "X-REQUEST-START", b"x-queue-start": "X-QUEUE-START"}
_QUEUE_HEADER_LENGTHS = frozenset(map(len, _QUEUE_HEADERS))
_FINAL_MESSAGES = frozenset({"http.response.body", "http.response.pathsend", "http.response.zerocopysend"})
_ENVIRON_KEYS = {"X-REQUEST-START": "HTTP_X_REQUEST_START", "X-QUEUE-START": "HTTP_X_QUEUE_START"}


class AsgiRequest:
    """One HTTP request through the layer, for the Python hooks: what they read from gunicorn's request and
    response objects, taken from an ASGI scope, and what the application's ``send`` notes (:meth:`note`).

    One object is both request and response: ``status_code`` is what post_request reads first from a response.
    It starts at 500, what the server answers when the application fails before starting its response
    (gunicorn's WSGI path records the same). ``_speedups.Recording`` is the same thing in C, for the compiled
    hooks (see RecordingApp)."""

    __slots__ = (
        "_finished",
        "_post_request",
        "_routes",
        "_scope",
        "_send",
        "_worker",
        "method",
        "path",
        "peer_addr",
        "query",
        "root_path",
        "status_code",
    )

    sock = None  # no socket to ask for the TCP state (post_request's client_closed)

    def __init__(self, scope: Scope, send: Send, worker: Any, finishing: tuple[Hook, bool]) -> None:
        self.method: str = scope.get("method") or ""
        self.path: str = scope.get("path") or ""
        query = scope.get("query_string")
        self.query = query.decode("latin-1") if query else ""
        client = scope.get("client")
        # ASGI servers give [host, port] or (host, port); the hooks take a tuple as a TCP peer, anything else
        # (None on a unix socket) as "unix".
        self.peer_addr: Any = tuple(client) if client else None
        self.root_path = scope.get("root_path", "")
        self.status_code = 500
        self._scope, self._send, self._finished = scope, send, False
        self._worker = worker
        self._post_request, self._routes = finishing

    def note(self, message: Message) -> Send:
        """What the application's send does before the message goes out (see :func:`sender`); returns the
        server's send."""
        try:
            kind = message.get("type")
            if kind == "http.response.start":
                self.status_code = message.get("status", 500)
            elif not self._finished and kind in _FINAL_MESSAGES and not message.get("more_body", False):
                # Recorded before the last of the response goes out, so a client that got its answer never
                # reads a count without it; what runs after (background tasks) is not the request's time.
                self.finish()
        except Exception as error:  # our bug: the message still goes out
            report("recording an ASGI request", error)
        return self._send

    def finish(self) -> None:
        """Record the request now, unless its response has finished already."""
        if self._finished:
            return
        self._finished = True
        worker = self._worker
        try:
            environ = request_environ(self._scope, self.root_path, self._routes)
            self._post_request(worker, self, environ, self)
        except Exception as error:
            report("recording an ASGI request", error)


def sender(note: Callable[[Any, Message], Send]) -> Callable[[Any, Message], Awaitable[None]]:
    """The application's send, for a request bound as its first argument (``MethodType(send, request)``):
    ``note`` records what the message says and returns the server's send, and the message goes there.

    A plain Python function, not a callable object: the interpreter runs it, and the server's ``send`` it calls,
    in the frame loop it is already in. A C callable in between made the interpreter start a new one for each
    message (the server's send is a coroutine function: calling it runs Python code)."""

    def send(request: Any, message: Message) -> Awaitable[None]:
        return note(request, message)(message)

    return send


_PYTHON_SEND = sender(AsgiRequest.note)


def request_environ(scope: Scope, root_path: str, routes: bool) -> dict[str, Any]:
    """What post_request reads from a WSGI environ, for an ASGI request: the queue time header, the route.

    ``asgi.scope`` is always there (for a route_resolver written for ASGI): an empty environ would read as none
    given."""
    environ: dict[str, Any] = {"asgi.scope": scope}
    stamp = queue_stamp(scope)
    if stamp is not None:
        environ[_ENVIRON_KEYS[stamp[0]]] = stamp[1]
    if routes:
        route = route_template(scope, root_path)
        if route is not None:
            environ[ROUTE_KEY] = route
    return environ


def queue_stamp(scope: Scope) -> tuple[str, str] | None:
    """(header name as gunicorn spells it, value) of X-Request-Start, else X-Queue-Start, from an ASGI scope."""
    found = None
    for name, value in scope.get("headers") or ():
        # A length compared first: most headers are neither, and lower() would copy every name.
        known = _QUEUE_HEADERS.get(bytes(name).lower()) if len(name) in _QUEUE_HEADER_LENGTHS else None
        if known is not None:
            if known == "X-REQUEST-START":
                return known, bytes(value).decode("latin-1")
            if found is None:
                found = known, bytes(value).decode("latin-1")
    return found


def route_template(scope: Scope, root_path: str) -> str | None:
    """The matched route's path format, which Starlette (and so FastAPI) leaves in ``scope["route"]``.

    A route inside a mounted application is relative to its mount: the mount's part of ``root_path`` (which
    the router extended while routing) goes in front. Not when the route is the mount itself (a mounted
    application without a router of its own: its format has the prefix already), nor when the mount's path has
    parameters of its own (``root_path`` holds their values, raw: the route stays relative instead)."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(path, str) or not path:
        return None
    mounted = scope.get("root_path", root_path)
    if (
        isinstance(mounted, str)
        and mounted != root_path
        and mounted.startswith(root_path)
        and not hasattr(route, "routes")
        and all(f"{{{name}}}" in path for name in scope.get("path_params") or ())
    ):
        return mounted[len(root_path) :] + path
    return path


_RUNNING_LOOP = asyncio.events._get_running_loop
_TASK_OF_LOOP: Any = (
    # Before 3.12, asyncio.current_task() is Python reading this dict: read it straight (once per request).
    asyncio.tasks._current_tasks  # type: ignore[attr-defined]  # private, as above
    if sys.version_info < (3, 12) and isinstance(getattr(asyncio.tasks, "_current_tasks", None), dict)
    else asyncio.current_task
)


class _KnownLoop:
    """The loop :func:`_current_task` last found running, and the thread it ran in. Asking for the running loop
    costs a getpid() system call (asyncio checks for a fork), once per request; a thread's loop keeps serving
    it, so it is asked again only when that loop has no task running now (it stopped, or another thread
    asks). A loop runs in one thread and a thread runs one loop at a time: a task running on the loop this
    thread found before is this thread's."""

    loop: Any = None
    thread = 0

    @classmethod
    def forget(cls) -> None:
        cls.loop = None  # in a forked child the loop is the parent's


os.register_at_fork(after_in_child=_KnownLoop.forget)


def _task_running_on(loop: Any) -> Any:
    return _TASK_OF_LOOP.get(loop) if type(_TASK_OF_LOOP) is dict else _TASK_OF_LOOP(loop)


def _current_task() -> Any:
    thread = threading.get_ident()
    if _KnownLoop.loop is not None and thread == _KnownLoop.thread:
        task = _task_running_on(_KnownLoop.loop)
        if task is not None:
            return task
    loop = _RUNNING_LOOP()
    if loop is None:
        return thread
    _KnownLoop.loop, _KnownLoop.thread = loop, thread
    task = _task_running_on(loop)
    return thread if task is None else task


def _is_asgi3(app: Any) -> bool:
    """A single-callable (ASGI 3) application, or a double-callable one (a class called with the scope), told
    apart the way uvicorn does."""
    if inspect.isclass(app):
        return hasattr(app, "__await__")
    if inspect.iscoroutinefunction(app):  # functions and bound methods
        return True
    return inspect.iscoroutinefunction(type(app).__call__) if callable(app) else False


class RecordingApp:
    """The application, with each HTTP request written to the scoreboard by the request hooks.

    ``on_loop`` is given the running event loop at the first call, for a worker (uvicorn's) that creates its
    loop only when it starts serving. ``interface``: the application's as the server was told it ("asgi2",
    "asgi3"), else "auto" to tell it as uvicorn does; the layer itself is always ASGI 3.
    Nothing else about the application changes: its own attributes are reachable through this object.
    """

    def __init__(
        self,
        app: Any,
        worker: Any,
        hooks: tuple[Hook, Hook],
        *,
        routes: bool,
        on_loop: Callable[[asyncio.AbstractEventLoop], None] | None = None,
        interface: str = "auto",
    ) -> None:
        self.app = app
        asgi3 = _is_asgi3(app) if interface == "auto" else interface == "asgi3"
        app3: Callable[[Scope, Receive, Send], Awaitable[None]] = (
            app if asgi3 else lambda scope, receive, send: app(scope)(receive, send)
        )
        # The compiled hooks get the compiled request (one C call to start, and one per message in its send);
        # any other pair, the Python one: the same steps, so the same bytes.
        compiled = _compiled_start()
        if compiled is not None and hooks == recorder.COMPILED:
            start, send = compiled, _COMPILED_SEND
        else:
            start, send = _python_start(hooks, routes), _PYTHON_SEND
        # What a request needs, read with one attribute lookup: __getattr__ (below) makes each lookup on this
        # object a slow one (the interpreter does not specialize them).
        self._serving: tuple[
            Any, Callable[..., Any], Any, Callable[[Scope, Receive, Send], Awaitable[None]], bool, Callable[..., Any]
        ] = (on_loop, start, worker, app3, routes, send)

    def __getattr__(self, name: str) -> Any:
        if name == "app":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.app, name)

    def entry(self) -> Any:
        """What the server should call: with the compiled hooks, ``_speedups.Entry``, the same steps as
        :meth:`__call__` without a coroutine of the layer's own per request; else this object."""
        _, start, worker, app, routes, _ = self._serving
        if start is not _compiled_start():
            return self
        from . import _speedups

        return _speedups.Entry(self, worker, app, routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        on_loop, start, worker, app, routes, send_through = self._serving
        if on_loop is not None:  # the first call (lifespan, at startup): the loop the server runs
            self._serving = (None, start, worker, app, routes, send_through)
            try:
                on_loop(asyncio.get_running_loop())
            except Exception as error:
                report("finding the event loop", error)
        if scope.get("type") != "http":
            await app(scope, receive, send)
            return
        try:
            request = start(worker, scope, send, routes)
        except Exception as error:  # our bug must not cost the application its request
            report("recording an ASGI request", error)
            await app(scope, receive, send)
            return
        try:
            await app(scope, receive, MethodType(send_through, request))
        finally:
            # The application failed, or returned without finishing its response: recorded now (else nothing).
            request.finish()


def is_recording_layer(app: Any) -> bool:
    """Whether ``app`` is the layer already (a RecordingApp or its compiled entry)."""
    if isinstance(app, RecordingApp):
        return True
    if recorder.COMPILED is None:
        return False
    from . import _speedups

    return isinstance(app, _speedups.Entry)


def _python_start(hooks: tuple[Hook, Hook], routes: bool) -> Callable[[Any, Scope, Send, bool], AsgiRequest]:
    """What asgi_start does, for the Python hooks (or any other pair); the layer's routes are this one's
    already."""
    pre_request, post_request = hooks
    finishing = (post_request, routes)

    def start(worker: Any, scope: Scope, send: Send, _routes: bool) -> AsgiRequest:
        req = AsgiRequest(scope, send, worker, finishing)
        pre_request(worker, req)
        return req

    return start


def _compiled_start() -> Callable[[Any, Scope, Send, bool], Any] | None:
    """_speedups.asgi_start, bound to this module's definitions; None where the compiled hooks are not built."""
    if recorder.COMPILED is None:
        return None
    from . import _speedups

    return _speedups.asgi_start


def _bind_compiled() -> tuple[Callable[[], Any], Callable[[Any, Message], Awaitable[None]]] | None:
    """_speedups bound to this module's definitions: its current_task, and the send an Entry binds to each of
    its Recordings (sender over _speedups.note); None where the compiled hooks are not built."""
    if recorder.COMPILED is None:
        return None
    from . import _speedups

    send = sender(_speedups.note)
    _speedups.bind_asgi(route_template, queue_stamp, _RUNNING_LOOP, _TASK_OF_LOOP, threading.get_ident, send)
    return _speedups.current_task, send


_COMPILED = _bind_compiled()
_COMPILED_SEND: Any = None if _COMPILED is None else _COMPILED[1]

current_task: Callable[[], Any] = _current_task if _COMPILED is None else _COMPILED[0]
"""What serves the request now, for the scoreboard and the watchdog: the asyncio task (its stack is the
request's), or the thread where there is none (another event loop library). In C where the hooks are."""


def find_uvicorn_state(worker: Any, found: Callable[[Any], None]) -> None:
    """Call ``found`` with uvicorn's ``ServerState`` (its open ``connections``, its ``total_requests``) once
    its server runs.

    uvicorn's worker builds its ``Server`` inside ``run()`` and keeps it in a local variable; the server calls
    ``config.callback_notify`` (the heartbeat) from its own method on its first tick. The first call is
    intercepted to read that server's ``server_state``, then uvicorn's callback is put back."""
    config: Any = getattr(worker, "config", None)
    notify = getattr(config, "callback_notify", None)
    if config is None or notify is None:
        return

    async def callback_notify() -> None:
        config.callback_notify = notify
        try:
            server = sys._getframe(1).f_locals.get("self")
            state = getattr(server, "server_state", None)
            if isinstance(getattr(state, "connections", None), (set, dict, list)) and isinstance(
                getattr(state, "total_requests", None), int
            ):
                found(state)
        except Exception as error:
            report("finding uvicorn's server state", error)
        await notify()

    config.callback_notify = callback_notify
