"""Request recording for ASGI worker classes, as an ASGI layer around the application.

uvicorn's worker classes never call gunicorn's ``pre_request``/``post_request``, and gunicorn's own
``asgi`` worker calls them without a response (status unknown) or an environ (no route) unless its access
log is on, and with a request that has no peer address. So on those classes the worker wraps the loaded
application in :class:`RecordingApp`, which hands each HTTP request to the very same two hooks
(compiled or Python, whichever install() chose) through a small stand-in for gunicorn's request: one
definition of what a request writes, identical bytes in the slot.

Only ``http`` scopes are requests. ``lifespan`` and ``websocket`` scopes go to the application untouched
and are not counted (a websocket connection can last hours: it is not a request with a duration).
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .._report import report
from .routes import ROUTE_KEY

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Hook = Callable[..., None]

_QUEUE_HEADERS = {b"x-request-start": "X-REQUEST-START", b"x-queue-start": "X-QUEUE-START"}
_FINAL_MESSAGES = frozenset({"http.response.body", "http.response.pathsend", "http.response.zerocopysend"})
_ENVIRON_KEYS = {"X-REQUEST-START": "HTTP_X_REQUEST_START", "X-QUEUE-START": "HTTP_X_QUEUE_START"}


class AsgiRequest:
    """What the request hooks read from gunicorn's request and response objects, taken from an ASGI scope.

    One object is both: ``status_code`` is what post_request reads first from a response. It starts at
    500, what the server answers when the application fails before starting its response (gunicorn's
    WSGI path records the same)."""

    __slots__ = ("headers", "method", "path", "peer_addr", "query", "status_code")

    def __init__(self, scope: Scope) -> None:
        self.method: str = scope.get("method") or ""
        self.path: str = scope.get("path") or ""
        query = scope.get("query_string")
        self.query = query.decode("latin-1") if query else ""
        client = scope.get("client")
        # ASGI servers give [host, port] or (host, port); the hooks take a tuple as a TCP peer, anything else
        # (None on a unix socket) as "unix".
        self.peer_addr: Any = tuple(client) if client else None
        self.headers: list[tuple[str, str]] = []
        self.status_code = 500


def queue_stamp(scope: Scope) -> tuple[str, str] | None:
    """(header name as gunicorn spells it, value) of X-Request-Start, else X-Queue-Start, from an ASGI scope."""
    found = None
    for name, value in scope.get("headers") or ():
        known = _QUEUE_HEADERS.get(bytes(name).lower())
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


def current_task() -> Any:
    """What serves the request now, for the scoreboard and the watchdog: the asyncio task (its stack is the
    request's), or the thread where there is none (another event loop library)."""
    try:
        return asyncio.current_task() or threading.get_ident()
    except RuntimeError:
        return threading.get_ident()


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

    ``count_requests`` adds one to ``worker.nr`` per finished HTTP request, for worker classes (uvicorn's)
    that do not keep gunicorn's count, so an exit after ``max_requests`` is told apart from a plain stop.
    ``on_loop`` is given the running event loop at the first call, for a worker (uvicorn's) that creates its
    loop only when it starts serving.
    Nothing else about the application changes: its own attributes are reachable through this object.
    """

    def __init__(
        self,
        app: Any,
        worker: Any,
        hooks: tuple[Hook, Hook],
        *,
        routes: bool,
        count_requests: bool,
        on_loop: Callable[[asyncio.AbstractEventLoop], None] | None = None,
    ) -> None:
        self.app = app
        self._on_loop = on_loop
        self._worker = worker
        self._pre_request, self._post_request = hooks
        self._routes = routes
        self._count = count_requests
        self._asgi3 = _is_asgi3(app)

    def __getattr__(self, name: str) -> Any:
        if name == "app":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.app, name)

    async def _call(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._asgi3:
            await self.app(scope, receive, send)
        else:
            await self.app(scope)(receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._on_loop is not None:  # the first call (lifespan, at startup): the loop the server runs
            on_loop, self._on_loop = self._on_loop, None
            try:
                on_loop(asyncio.get_running_loop())
            except Exception as error:
                report("finding the event loop", error)
        if scope.get("type") != "http":
            await self._call(scope, receive, send)
            return
        worker = self._worker
        try:
            req = AsgiRequest(scope)
            root_path = scope.get("root_path", "")
            self._pre_request(worker, req)
        except Exception as error:  # our bug must not cost the application its request
            report("recording an ASGI request", error)
            await self._call(scope, receive, send)
            return

        finished = False

        async def recording_send(message: Message) -> None:
            nonlocal finished
            kind = message.get("type")
            if kind == "http.response.start":
                req.status_code = message.get("status", 500)
            elif not finished and (kind in _FINAL_MESSAGES and not message.get("more_body", False)):
                # Recorded before the last of the response goes out, so a client that got its answer never
                # reads a count without it; what runs after (background tasks) is not the request's time.
                finished = True
                self._finish(worker, req, scope, root_path)
            await send(message)

        try:
            await self._call(scope, receive, recording_send)
        finally:
            if not finished:  # the application failed, or returned without finishing its response
                self._finish(worker, req, scope, root_path)

    def _finish(self, worker: Any, req: AsgiRequest, scope: Scope, root_path: str) -> None:
        try:
            environ: dict[str, Any] = {}
            stamp = queue_stamp(scope)
            if stamp is not None:
                environ[_ENVIRON_KEYS[stamp[0]]] = stamp[1]
            if self._routes:
                route = route_template(scope, root_path)
                if route is not None:
                    environ[ROUTE_KEY] = route
                environ["asgi.scope"] = scope  # for a route_resolver written for ASGI
            if self._count:
                worker.nr += 1
            self._post_request(worker, req, environ, req)
        except Exception as error:
            report("recording an ASGI request", error)


def find_uvicorn_connections(worker: Any, found: Callable[[Callable[[], int]], None]) -> None:
    """Call ``found`` with a function counting the open connections of uvicorn's server, once it runs.

    uvicorn's worker builds its ``Server`` inside ``run()`` and keeps it in a local variable; the server calls
    ``config.callback_notify`` (the heartbeat) from its own method on its first tick. The first call is
    intercepted to read that server's ``server_state.connections``, then uvicorn's callback is put back."""
    config: Any = getattr(worker, "config", None)
    notify = getattr(config, "callback_notify", None)
    if config is None or notify is None:
        return

    async def callback_notify() -> None:
        config.callback_notify = notify
        try:
            server = sys._getframe(1).f_locals.get("self")
            connections = getattr(getattr(server, "server_state", None), "connections", None)
            if isinstance(connections, (set, dict, list)):
                found(lambda: len(connections))
        except Exception as error:
            report("finding uvicorn's connections", error)
        await notify()

    config.callback_notify = callback_notify
