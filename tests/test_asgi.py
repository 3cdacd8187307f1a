"""The recording ASGI layer (_asgi) against the request hooks it hands each request to."""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from types import MethodType
from typing import Any

import fakes
import pytest
from fakes import FakeRequest, FakeResponse
from test_speedups import masked

from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._worker import asgi as _asgi
from gunicorn_insight._worker import recorder as _recorder
from gunicorn_insight._worker.recorder import RecorderOptions, RequestRecorder
from gunicorn_insight._worker.routes import ROUTE_KEY

Hooks = tuple[Callable[..., None], Callable[..., None]]


class Worker:
    nr_conns = 3
    nr = 0


class Route:
    def __init__(self, path: str) -> None:
        self.path = path


class FormattedRoute:
    """Starlette's: the template is ``path_format`` (``path`` keeps the converters)."""

    def __init__(self, path: str) -> None:
        self.path_format = path
        self.path = path.replace("}", ":int}")


def stamp(seconds_ago: float) -> str:
    return f"t={time.time() - seconds_ago:.3f}"


class Case:
    """One request, as gunicorn hands it to the hooks and as an ASGI server hands it to the application."""

    def __init__(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        client: Any = ("10.1.2.3", 4567),
        headers: tuple[tuple[str, str], ...] = (),
        status: int | None = 200,
        route: str | None = None,
        mount: str = "",
        formatted: bool = False,
    ) -> None:
        self.method, self.path, self.query, self.client = method, path, query, client
        self.headers, self.status, self.route, self.mount = headers, status, route, mount
        self.formatted = formatted

    def gunicorn(self) -> tuple[FakeRequest, dict[str, Any], FakeResponse]:
        peer = tuple(self.client) if self.client else None
        environ: dict[str, Any] = {f"HTTP_{name.upper().replace('-', '_')}": value for name, value in self.headers}
        if self.route:
            environ[ROUTE_KEY] = self.mount + self.route
        return (
            FakeRequest(self.method, self.path, query=self.query, peer=peer),
            environ,
            FakeResponse("" if self.status is None else self.status),
        )

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "method": self.method,
            "path": self.path,
            "root_path": "",
            "query_string": self.query.encode(),
            "client": self.client,
            "headers": [(b"host", b"example.com")] + [(n.encode(), v.encode()) for n, v in self.headers],
        }

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Routes like Starlette (scope["route"], a mount extending root_path), answers or fails."""
        if self.route:
            scope["route"] = FormattedRoute(self.route) if self.formatted else Route(self.route)
            scope["root_path"] = scope["root_path"] + self.mount
        if self.status is None:
            raise RuntimeError("the application failed before its response")
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


CASES = [
    Case("GET", "/items/3", route="/items/{item_id}", formatted=True),
    Case("POST", "/login", query="password=hunter2", headers=(("X-Request-Start", stamp(0.2)),), status=302),
    Case("PROPFIND", "/caf\u00e9", client=["::1", 8080], status=207, route="/items/{item_id}"),
    Case("GET", "/api/things/x", status=404, route="/things/{thing_id}", mount="/api", formatted=True),
    Case("GET", "/boom", status=None, headers=(("X-Queue-Start", stamp(0.1)), ("X-Request-Start", "garbage"))),
    Case("GET", "/healthz"),
    Case("DELETE", "/unix", client=None, status=204, headers=(("X-Queue-Start", f"{time.time() * 1000:.0f}"),)),
]


async def _noop_send(message: Any) -> None:
    return None


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def through_hooks(hooks: Hooks, worker: Worker) -> None:
    """All in flight at once (each in an entry of its own), then finished last to first."""
    requests = [case.gunicorn() for case in CASES]
    for req, _, _ in requests:
        hooks[0](worker, req)
    for req, environ, resp in reversed(requests):
        hooks[1](worker, req, environ, resp)


def through_layer(hooks: Hooks, worker: Worker, *, entry: bool = False) -> None:
    """The same order: every application call waits until the ones started after it have finished. ``entry``:
    through what the server calls with the compiled hooks (RecordingApp.entry()), not RecordingApp itself."""

    async def serve() -> None:
        releases = [asyncio.Event() for _ in CASES]

        async def one(case: Case, release: asyncio.Event) -> None:
            async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
                await release.wait()
                await case.app(scope, receive, send)

            layer = _asgi.RecordingApp(app, worker, hooks, routes=True)
            served = layer.entry() if entry else layer
            assert (served is layer) != entry
            try:
                await served(case.scope(), _receive, _noop_send)
            except RuntimeError:
                assert case.status is None

        tasks = [asyncio.create_task(one(case, release)) for case, release in zip(CASES, releases, strict=True)]
        await asyncio.sleep(0)  # every request is in flight
        for task, release in reversed(list(zip(tasks, releases, strict=True))):
            release.set()
            await task

    asyncio.run(serve())


class UnknownFreeList(list[int]):
    """A free-entry list of a type the compiled hooks were not written against: they hand each request to the
    Python hooks."""


def through_entry_delegating(hooks: Hooks, worker: Worker) -> None:
    """The compiled entry on a recorder the compiled hooks delegate for: the Python post_request still gets
    the request's environ (queue stamp, route), which the compiled layer builds only for it."""
    recorder = _recorder.RECORDER
    assert recorder is not None
    recorder._free = UnknownFreeList(recorder._free)
    through_layer(hooks, worker, entry=True)


def recorded(board: sb.Scoreboard, serve: Callable[[Hooks, Worker], None], hooks: Hooks) -> None:
    board.assign(0, now=1.0)
    worker = Worker()
    _recorder.RECORDER = RequestRecorder(
        board, 0, worker, RecorderOptions(routes=True, exclude_paths=frozenset({"/healthz"}), threaded=False)
    )
    serve(hooks, worker)
    _recorder.RECORDER = None


def test_asgi_layer_writes_the_bytes_the_request_hooks_write(tmp_path: Path) -> None:
    """Same requests, same slot bytes: the Python hooks fed by gunicorn, and the ASGI layer feeding the Python
    hooks and the compiled ones, itself and through its compiled entry, also when the compiled hooks delegate
    (entries, ring records with status, method, route, queue sign, routes table)."""
    runs: dict[str, tuple[Callable[[Hooks, Worker], None], Hooks]] = {
        "hooks": (through_hooks, fakes.IMPLEMENTATIONS["python"]),
        "layer+python": (through_layer, fakes.IMPLEMENTATIONS["python"]),
    }
    if "compiled" in fakes.IMPLEMENTATIONS:
        runs["layer+compiled"] = (through_layer, fakes.IMPLEMENTATIONS["compiled"])
        runs["entry+compiled"] = (functools.partial(through_layer, entry=True), fakes.IMPLEMENTATIONS["compiled"])
        runs["entry+compiled, delegating"] = (through_entry_delegating, fakes.IMPLEMENTATIONS["compiled"])
    boards = {
        name: sb.Scoreboard.create(str(tmp_path / name), slots=1, entries=8, ring=16, master_pid=1, routes=4)
        for name in runs
    }
    try:
        for name, (serve, hooks) in runs.items():
            recorded(boards[name], serve, hooks)
        reference_bytes, reference_queues = masked(boards["hooks"])
        for name in runs:
            data, queues = masked(boards[name])
            assert data == reference_bytes, name
            for (theirs,), (ours,) in zip(reference_queues, queues, strict=True):
                assert (math.isnan(theirs), theirs < 0) == (math.isnan(ours), ours < 0), name
        view = boards["layer+python"].read(0)
        assert view.head == 6  # seven requests, one excluded
        assert boards["layer+python"].route_names(0) == ["/api/things/{thing_id}", "/items/{item_id}"]
        statuses = [record[2] for record in boards["layer+python"].read_ring(0, 0, 6)]
        assert statuses == [204, 500, 404, 207, 302, 200]
    finally:
        for board in boards.values():
            board.close()


def test_lifespan_and_websocket_scopes_pass_through_unrecorded(board: sb.Scoreboard) -> None:
    """Only http scopes are requests: lifespan and websocket reach the app as they came and write nothing."""
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope)

    board.assign(0, now=1.0)
    worker = Worker()
    _recorder.RECORDER = RequestRecorder(board, 0, worker, RecorderOptions(threaded=False))
    layer = _asgi.RecordingApp(app, worker, fakes.HOOKS, routes=True)
    scopes: list[dict[str, Any]] = [{"type": "lifespan"}, {"type": "websocket", "path": "/ws"}]
    for scope in scopes:
        asyncio.run(layer(scope, _receive, _noop_send))
    assert seen == scopes
    assert board.read(0).head == 0


def test_double_callable_applications_keep_working(board: sb.Scoreboard) -> None:
    """An ASGI 2 application (a class called with the scope) is still served, and its request recorded."""

    class Asgi2:
        def __init__(self, scope: dict[str, Any]) -> None:
            self.scope = scope

        async def __call__(self, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 202, "headers": []})

    board.assign(0, now=1.0)
    _recorder.RECORDER = RequestRecorder(board, 0, Worker(), RecorderOptions(threaded=False))
    layer = _asgi.RecordingApp(Asgi2, Worker(), fakes.HOOKS, routes=False)
    asyncio.run(layer(CASES[0].scope(), _receive, _noop_send))
    assert [record[2] for record in board.read_ring(0, 0, 1)] == [202]


def test_a_failing_recorder_never_costs_the_request(board: sb.Scoreboard, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug of ours while recording is reported and swallowed: the application still answers."""
    answered: list[int] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            answered.append(message["status"])

    def broken(*_args: Any) -> None:
        raise RuntimeError("recorder bug")

    reports: list[str] = []
    monkeypatch.setattr(_asgi, "report", lambda what, error: reports.append(what))
    layer = _asgi.RecordingApp(CASES[0].app, Worker(), fakes.HOOKS, routes=True)
    layer._serving = (None, broken, *layer._serving[2:])
    asyncio.run(layer(CASES[0].scope(), _receive, send))
    assert answered == [200]
    assert reports == ["recording an ASGI request"]


def test_asgi_worker_gets_the_users_own_request_hooks_back() -> None:
    """On gunicorn's asgi worker the layer records: the worker's config keeps the user's hooks, drops ours
    (gunicorn's defaults where the user had none), so a request is written once and their hooks still run."""
    from gunicorn.config import Config

    from gunicorn_insight import _hooks

    calls: list[str] = []

    def pre_request(worker: Any, req: Any) -> None:
        calls.append("theirs")

    chained: dict[str, Any] = {"pre_request": pre_request}
    alone: dict[str, Any] = {}
    for namespace in (chained, alone):
        _hooks.install(namespace, statsd="127.0.0.1:9")
    configs = []
    for namespace in (chained, alone):
        cfg = Config()
        for name in ("pre_request", "post_request"):
            cfg.set(name, namespace[name])
        _hooks._hand_back_request_hooks(cfg)
        configs.append(cfg)
    with_theirs, without = configs
    assert with_theirs.pre_request is pre_request
    with_theirs.pre_request(None, None)
    assert calls == ["theirs"]
    assert not _hooks.is_ours(with_theirs.post_request)
    for name in ("pre_request", "post_request"):
        assert getattr(without, name) is without.settings[name].default


def test_route_templates_of_real_starlette_and_fastapi_routing() -> None:
    """scope["route"] after real routing gives templates: FastAPI routes, a mounted app's routes with the mount's
    prefix, and never a raw path (a mount parameter's value, a mount without a router of its own)."""
    from fastapi import FastAPI
    from starlette.responses import PlainTextResponse

    async def plain(scope: Any, receive: Any, send: Any) -> None:
        await PlainTextResponse("ok")(scope, receive, send)

    app, api, users = FastAPI(), FastAPI(), FastAPI()
    app.get("/items/{item_id}")(lambda item_id: item_id)
    app.get("/files/{name:path}")(lambda name: name)
    api.get("/things/{thing_id}")(lambda thing_id: thing_id)
    users.get("/orders/{order_id}")(lambda order_id: order_id)
    app.mount("/api", api)
    app.mount("/static", plain)
    app.mount("/users/{user_id}", users)
    templates = {}
    for path in ("/items/3", "/files/a/b.txt", "/api/things/x", "/static/css/site.css", "/users/42/orders/7", "/nope"):
        scope = {**CASES[0].scope(), "path": path, "raw_path": path.encode(), "app": app}
        asyncio.run(app(scope, _receive, _noop_send))
        templates[path] = _asgi.route_template(scope, "")
    assert templates == {
        "/items/3": "/items/{item_id}",
        "/files/a/b.txt": "/files/{name}",
        "/api/things/x": "/api/things/{thing_id}",
        # FastAPI's router leaves no route for a mount without a router of its own: no route, never a raw path.
        "/static/css/site.css": None,
        "/users/42/orders/7": "/orders/{order_id}",
        "/nope": None,
    }


def test_request_is_recorded_before_the_last_of_its_response_goes_out(board: sb.Scoreboard) -> None:
    """The ring head has moved when the server is handed the final body: a client holding its answer never
    reads a count without it (what the application does after, e.g. background tasks, is not its time)."""
    heads: list[tuple[str, bool, int]] = []

    async def send(message: Any) -> None:
        heads.append((message["type"], message.get("more_body", False), board.head(0)))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})
        await asyncio.sleep(0)  # a background task: already recorded, and not twice

    board.assign(0, now=1.0)
    worker = Worker()
    _recorder.RECORDER = RequestRecorder(board, 0, worker, RecorderOptions(threaded=False))
    layer = _asgi.RecordingApp(app, worker, fakes.HOOKS, routes=False)
    asyncio.run(layer(CASES[0].scope(), _receive, send))
    assert heads == [
        ("http.response.start", False, 0),
        ("http.response.body", True, 0),
        ("http.response.body", False, 1),
    ]
    assert board.head(0) == 1


def test_current_task_is_the_running_task_else_the_thread() -> None:
    """The compiled current_task and the Python one agree: the running asyncio task inside a loop, the thread's
    id outside one (what the scoreboard and the watchdog key a request by)."""
    import threading

    implementations = [_asgi._current_task, _asgi.current_task]
    assert (_asgi.current_task is not _asgi._current_task) == (_recorder.COMPILED is not None)

    async def inside() -> list[Any]:
        return [(find(), asyncio.current_task()) for find in implementations]

    for found, running in asyncio.run(inside()):
        assert found is running
    assert [find() for find in implementations] == [threading.get_ident()] * 2


def test_current_task_asks_for_the_running_loop_once_per_loop_and_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both current_tasks ask asyncio for the running loop (a getpid() each time) only when the loop the thread
    found before has no task running: once per loop and thread, and still right after a loop is replaced or in
    another thread's loop."""
    import concurrent.futures
    import threading

    asked: list[int] = []
    asyncio_running_loop = _asgi._RUNNING_LOOP

    def counting_running_loop() -> Any:
        asked.append(threading.get_ident())
        return asyncio_running_loop()

    monkeypatch.setattr(_asgi, "_RUNNING_LOOP", counting_running_loop)
    implementations = [_asgi._current_task]
    if _recorder.COMPILED is not None:
        from gunicorn_insight._worker import _speedups

        def bind(running_loop: Callable[[], Any]) -> None:
            _speedups.bind_asgi(
                _asgi.route_template,
                _asgi.queue_stamp,
                running_loop,
                _asgi._TASK_OF_LOOP,
                threading.get_ident,
                _asgi._COMPILED_SEND,
            )

        bind(counting_running_loop)
        implementations.append(_speedups.current_task)
    try:
        for find in implementations:

            async def one_request(find: Callable[[], Any] = find) -> bool:
                return find() is asyncio.current_task()

            async def three_requests() -> list[bool]:
                return [await asyncio.create_task(one_request()) for _ in range(3)]

            asked.clear()
            assert asyncio.run(three_requests()) == [True] * 3
            assert len(asked) == 1
            assert asyncio.run(three_requests()) == [True] * 3  # a new loop in the same thread
            assert len(asked) == 2
            with concurrent.futures.ThreadPoolExecutor(1) as other_thread:
                assert other_thread.submit(asyncio.run, three_requests()).result() == [True] * 3
            assert len(asked) == 3
            assert find() == threading.get_ident()  # no loop running: the thread
    finally:
        if _recorder.COMPILED is not None:
            bind(asyncio_running_loop)


@pytest.mark.parametrize("entry", [False, True], ids=["layer", "entry"])
def test_a_request_is_recorded_however_its_application_ends(board: sb.Scoreboard, entry: bool) -> None:
    """The layer and its compiled entry record a request once whichever way the application's call ends: it
    raises (500), returns without a response (500), its task is cancelled, or its awaitable is closed unawaited
    (or, the entry's, dropped); nothing stays in flight."""
    if entry and _recorder.COMPILED is None:
        pytest.skip("the compiled hooks are not built here")
    release = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/raises":
            raise LookupError("the application failed")
        if scope["path"] == "/waits":
            await release.wait()
        if scope["path"] == "/answers":
            await send({"type": "http.response.start", "status": 201, "headers": []})
            await send({"type": "http.response.body", "body": b"made"})

    board.assign(0, now=1.0)
    worker = Worker()
    _recorder.RECORDER = RequestRecorder(board, 0, worker, RecorderOptions(threaded=False))
    layer = _asgi.RecordingApp(app, worker, _recorder.COMPILED or fakes.HOOKS, routes=False)
    served = layer.entry() if entry else layer
    assert (served is layer) != entry

    def scope(path: str) -> dict[str, Any]:
        return {**CASES[0].scope(), "path": path}

    async def serve() -> list[Any]:
        outcomes: list[Any] = [await served(scope("/answers"), _receive, _noop_send)]
        try:
            await served(scope("/raises"), _receive, _noop_send)
        except LookupError as error:
            outcomes.append(str(error))
        outcomes.append(await served(scope("/returns"), _receive, _noop_send))
        waiting = asyncio.ensure_future(served(scope("/waits"), _receive, _noop_send))
        await asyncio.sleep(0)
        assert board.head(0) == 3  # still in flight
        waiting.cancel()
        try:
            await waiting
        except asyncio.CancelledError:
            outcomes.append("cancelled")
        served(scope("/never-awaited"), _receive, _noop_send).close()
        if entry:
            served(scope("/dropped"), _receive, _noop_send)  # finished by its finalizer
        return outcomes

    assert asyncio.run(serve()) == [None, "the application failed", None, "cancelled"]
    statuses = [record[2] for record in board.read_ring(0, 0, board.head(0))]
    # An awaitable closed unawaited: the entry started the request when called, the layer's coroutine never ran.
    assert statuses == [201, 500, 500, 500] + ([500, 500] if entry else [])
    assert board.read(0).in_flight == 0


@pytest.mark.parametrize("entry", [False, True], ids=["layer", "entry"])
def test_an_answer_sent_while_the_app_handles_its_own_reset_is_not_a_hang_up(board: sb.Scoreboard, entry: bool) -> None:
    """An application answering from its handler of a connection error of its own (a backend reset it): the
    client did not close, with the compiled hooks as with the Python ones."""
    if entry and _recorder.COMPILED is None:
        pytest.skip("the compiled hooks are not built here")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            raise ConnectionResetError("the backend reset the connection")
        except ConnectionResetError:
            await send({"type": "http.response.start", "status": 502, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    board.assign(0, now=1.0)
    worker = Worker()
    _recorder.RECORDER = RequestRecorder(board, 0, worker, RecorderOptions(threaded=False))
    hooks = _recorder.COMPILED if entry else fakes.IMPLEMENTATIONS["python"]
    assert hooks is not None
    layer = _asgi.RecordingApp(app, worker, hooks, routes=False)
    asyncio.run((layer.entry() if entry else layer)(CASES[0].scope(), _receive, _noop_send))
    ((_, _, status, _, _, outcome, _),) = board.read_ring(0, 0, 1)
    assert (status, outcome & sb.RECORD_CLIENT_CLOSED) == (502, 0)


@pytest.mark.parametrize("entry", [False, True], ids=["layer", "entry"])
def test_a_request_in_flight_reads_as_the_recorders_record(board: sb.Scoreboard, entry: bool) -> None:
    """The requests in flight hold, for a request in the layer or its compiled entry, what the watchdog, the stacks
    command and the abort handler unpack and index: (start, entry, task, method, path, CPU clock)."""
    if entry and _recorder.COMPILED is None:
        pytest.skip("the compiled hooks are not built here")
    seen: list[tuple[Any, ...]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert _recorder.RECORDER is not None
        for record in _recorder.RECORDER.requests_in_flight().values():
            start, number, current, method, path, cpu = record
            assert (record[3], record[4]) == (method, path)
            in_use = board.buffer[number] == 1
            seen.append((type(start), in_use, current is asyncio.current_task(), method, path, math.isnan(cpu)))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    board.assign(0, now=1.0)
    worker = Worker()
    options = RecorderOptions(threaded=False)
    _recorder.RECORDER = RequestRecorder(board, 0, worker, options, _asgi.current_task)
    layer = _asgi.RecordingApp(app, worker, _recorder.COMPILED or fakes.HOOKS, routes=False)
    served = layer.entry() if entry else layer
    scope = {**CASES[0].scope(), "method": "PUT", "path": "/items/7", "query_string": b"q=1"}
    asyncio.run(served(scope, _receive, _noop_send))
    assert seen == [(float, True, True, "PUT", "/items/7?<redacted>", True)]
    assert not _recorder.RECORDER.requests_in_flight()


@pytest.mark.parametrize("entry", [False, True], ids=["layer", "entry"])
def test_routes_made_once_and_used_again_keep_their_own_templates(tmp_path: Path, entry: bool) -> None:
    """A router's route objects live as long as the application: the same route again, another route between,
    one with a mount, then the first again each give their own template (the compiled layer remembers the last
    route read)."""
    if entry and _recorder.COMPILED is None:
        pytest.skip("the compiled hooks are not built here")
    items, users = FormattedRoute("/items/{item_id}"), FormattedRoute("/users/{user_id}")
    plan = [(items, ""), (items, ""), (users, ""), (users, "/api"), (items, ""), (Route("/plain"), ""), (items, "")]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        route, mount = plan[int(scope["path"].rsplit("/", 1)[1])]
        scope["route"], scope["root_path"] = route, scope["root_path"] + mount
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    board = sb.Scoreboard.create(str(tmp_path / "board"), slots=1, entries=2, ring=8, master_pid=1, routes=4)
    board.assign(0, now=1.0)
    worker = Worker()
    _recorder.RECORDER = RequestRecorder(board, 0, worker, RecorderOptions(routes=True, threaded=False))
    layer = _asgi.RecordingApp(app, worker, _recorder.COMPILED or fakes.HOOKS, routes=True)
    served = layer.entry() if entry else layer

    async def serve() -> None:
        for number in range(len(plan)):
            await served({**CASES[0].scope(), "path": f"/request/{number}"}, _receive, _noop_send)

    try:
        asyncio.run(serve())
        names = board.route_names(0)
        routes = [names[record[4] - 1] for record in board.read_ring(0, 0, len(plan))]
    finally:
        board.close()
    expected = ["/items/{item_id}"] * 2 + ["/users/{user_id}", "/api/users/{user_id}", "/items/{item_id}", "/plain"]
    assert routes == [*expected, "/items/{item_id}"]


def test_the_applications_send_is_a_plain_function_bound_to_the_request(board: sb.Scoreboard) -> None:
    """The send the application gets through the compiled entry is asgi.sender's Python function bound to the
    request, so the interpreter calls it and the server's send without entering C between them."""
    if _recorder.COMPILED is None:
        pytest.skip("the compiled hooks are not built here")
    given: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        given.append(send)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    board.assign(0, now=1.0)
    worker = Worker()
    _recorder.RECORDER = RequestRecorder(board, 0, worker, RecorderOptions(threaded=False))
    entry = _asgi.RecordingApp(app, worker, _recorder.COMPILED, routes=False).entry()
    asyncio.run(entry(CASES[0].scope(), _receive, _noop_send))
    (send,) = given
    assert isinstance(send, MethodType)
    assert send.__func__ is _asgi._COMPILED_SEND
    assert type(send.__self__).__name__ == "Recording"
    assert board.read(0).head == 1


def test_servers_see_the_application_through_the_compiled_entry() -> None:
    """The entry answers attribute reads with the application's and __call__ with the layer's async def, so
    uvicorn tells an ASGI 3 application by it; lifespan goes to the layer, which finds the loop once."""
    if _recorder.COMPILED is None:
        pytest.skip("the compiled hooks are not built here")
    from uvicorn.config import Config

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    app.state = "the application's"  # type: ignore[attr-defined]
    seen: list[str] = []
    loops: list[asyncio.AbstractEventLoop] = []
    entry = _asgi.RecordingApp(app, Worker(), _recorder.COMPILED, routes=False, on_loop=loops.append).entry()
    assert entry.state == "the application's"
    assert asyncio.iscoroutinefunction(entry.__call__)
    config = Config(entry, log_config=None)
    config.load()
    assert config.interface == "asgi3"

    async def lifespan_then_websocket() -> None:
        await entry({"type": "lifespan"}, _receive, _noop_send)
        await entry({"type": "websocket", "path": "/ws"}, _receive, _noop_send)

    asyncio.run(lifespan_then_websocket())
    assert seen == ["lifespan", "websocket"]
    assert len(loops) == 1
