"""The compiled request hooks (_speedups.c) against the pure-Python hooks they stand in for."""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakes
import pytest
from fakes import FakeRequest, FakeResponse
from gunicorn.config import Config

from gunicorn_insight import _hooks, _report
from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._worker import recorder as _recorder
from gunicorn_insight._worker.recorder import RecorderOptions, RequestRecorder
from gunicorn_insight._worker.routes import ROUTE_KEY


@pytest.fixture
def compiled() -> tuple[Callable[..., None], Callable[..., None]]:
    return fakes.compiled_hooks()


class StatusCodeResponse:
    """gunicorn's WSGI Response, which parses the status into status_code once."""

    def __init__(self, code: int) -> None:
        self.status = f"{code} Whatever"
        self.status_code = code


class Worker:
    nr_conns = 3


def stamp(seconds_ago: float) -> str:
    return f"t={time.time() - seconds_ago:.3f}"


# (request, environ, response) in the order they start; every one also finishes, in reverse order, so
# four are in flight at once and the fourth has no entry of its own (overflow).
CASES: list[tuple[FakeRequest, Any, Any]] = [
    (FakeRequest("GET", "/"), {ROUTE_KEY: "/"}, StatusCodeResponse(200)),
    (
        FakeRequest("POST", "/login", query="password=hunter2"),
        {"HTTP_X_REQUEST_START": stamp(0.2)},
        FakeResponse("302 Found"),
    ),
    (FakeRequest("PROPFIND", "/caf\u00e9", peer=("::1", 8080, 0, 0)), {ROUTE_KEY: "/<name>"}, FakeResponse(207)),
    (
        FakeRequest("VERYLONGMETHOD", "/" + "x" * 300, peer=b"/run/gunicorn.sock"),
        {"HTTP_X_QUEUE_START": stamp(0.1), ROUTE_KEY: "/<name>"},
        FakeResponse(""),
    ),
    (FakeRequest(path="/caf\udce9", peer=None), {"HTTP_X_REQUEST_START": "garbage"}, None),
    (FakeRequest(path="/healthz"), {}, FakeResponse("200 OK")),
    # as long as the excluded path without being it, and a method known only in capitals
    (FakeRequest("get", "/healthy"), {}, FakeResponse("200 OK")),
    (
        FakeRequest(path="/unix", peer="unix-name"),
        {"HTTP_X_REQUEST_START": f"{time.time() * 1000:.0f}"},
        StatusCodeResponse(404),
    ),
    (FakeRequest(path="/asgi", headers=[("X-REQUEST-START", stamp(0.3))]), None, FakeResponse(200)),
]


def served(hooks: tuple[Callable[..., None], Callable[..., None]], board: sb.Scoreboard, **options: Any) -> None:
    """Every case through one implementation: the first four at once, then the rest one by one."""
    board.assign(0, now=1.0)
    _recorder.RECORDER = RequestRecorder(board, 0, Worker(), RecorderOptions(**options))
    pre_request, post_request = hooks
    batch = CASES[:4]
    for req, _, _ in batch:
        pre_request(None, req)
    for req, environ, resp in reversed(batch):
        post_request(None, req, environ, resp)
    for req, environ, resp in CASES[4:]:
        pre_request(None, req)
        post_request(None, req, environ, resp)
    for req, _, _ in CASES[:2]:  # and two left in flight, for their entries
        pre_request(None, req)
    _recorder.RECORDER = None


def masked(board: sb.Scoreboard) -> tuple[bytes, list[tuple[float, ...]]]:
    """The slot's bytes with start times, durations and queue times zeroed (the clocks differ between runs),
    and the queue times apart."""
    data = bytearray(board.buffer[board.offset(0) : board.routes_offset(0) + board.routes * sb.ROUTE_SIZE])
    base = board.offset(0)
    for entry in range(board.entries):
        start = board.entries_offset(0) - base + entry * sb.ENTRY_SIZE + 8
        data[start : start + 8] = bytes(8)
    queues = []
    for record in range(board.ring):
        start = board.ring_offset(0) - base + record * sb.RING_SIZE
        queues.append(struct.unpack_from("<d", data, start + 8))
        data[start : start + 16] = bytes(16)
        data[start + 24 : start + 32] = bytes(8)  # the CPU clock differs as the monotonic one does
    return bytes(data), queues


@pytest.mark.parametrize(("redact_query", "threaded"), [(True, False), (False, False), (True, True)])
def test_compiled_hooks_write_the_bytes_the_python_hooks_write(
    tmp_path: Path, compiled: tuple[Callable[..., None], Callable[..., None]], redact_query: bool, threaded: bool
) -> None:
    """Same requests, same scoreboard bytes: entries, overflow, ring records, head, connections, routes
    (gthread's locked recorder too)."""
    boards = [
        sb.Scoreboard.create(str(tmp_path / name), slots=1, entries=3, ring=16, master_pid=1, routes=4)
        for name in ("python", "compiled")
    ]
    try:
        options = {
            "redact_query": redact_query,
            "routes": True,
            "exclude_paths": frozenset({"/healthz"}),
            "threaded": threaded,
        }
        served(fakes.IMPLEMENTATIONS["python"], boards[0], **options)
        served(compiled, boards[1], **options)
        (python_bytes, python_queues), (compiled_bytes, compiled_queues) = map(masked, boards)
        assert compiled_bytes == python_bytes
        for (theirs,), (ours,) in zip(python_queues, compiled_queues, strict=True):
            assert (math.isnan(theirs), theirs < 0) == (math.isnan(ours), ours < 0)
            assert math.isnan(theirs) or theirs < 0 or abs(theirs - ours) < 0.05
        view = boards[1].read(0)
        # Nine requests, one of them excluded, the first four finished last to first; two left in flight.
        assert (view.head, view.overflow, len(view.requests), view.connections) == (8, 0, 2, 3)
        assert boards[1].route_names(0) == ["/<name>", "/"]
    finally:
        for board in boards:
            board.close()


def test_compiled_hooks_pass_gunicorns_arity_check(compiled: tuple[Callable[..., None], Callable[..., None]]) -> None:
    """gunicorn counts a hook's parameters; the builtins declare (worker, req) and (worker, req, environ, resp)."""
    config = Config()
    config.set("pre_request", compiled[0])
    config.set("post_request", compiled[1])
    assert (config.pre_request, config.post_request) == compiled


def test_install_puts_the_compiled_hooks_unless_switched_off(
    compiled: tuple[Callable[..., None], Callable[..., None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """install() picks the compiled pair; compiled_hooks=False the Python pair; a second install() keeps ours."""
    monkeypatch.setattr(_hooks.STATE, "inspecting", True)  # no directories, no sockets
    namespace: dict[str, Any] = {}
    _hooks.install(namespace)
    assert (namespace["pre_request"], namespace["post_request"]) == compiled
    _hooks.install(namespace, compiled_hooks=False)
    assert (namespace["pre_request"], namespace["post_request"]) == (_recorder.pre_request, _recorder.post_request)
    _hooks.install(namespace)
    assert namespace["pre_request"] is compiled[0]


def test_compiled_hooks_chain_the_users_own(
    compiled: tuple[Callable[..., None], Callable[..., None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pre_request the config defined itself runs after the compiled one, with the same arguments."""
    monkeypatch.setattr(_hooks.STATE, "inspecting", True)
    seen: list[object] = []

    def pre_request(worker: object, req: object) -> None:
        seen.append(req)

    namespace: dict[str, Any] = {"pre_request": pre_request}
    _hooks.install(namespace)
    request = FakeRequest()
    namespace["pre_request"](None, request)
    assert seen == [request]
    assert namespace["pre_request"].__wrapped__ is pre_request


def test_compiled_hooks_do_nothing_without_a_recorder(
    compiled: tuple[Callable[..., None], Callable[..., None]], board: sb.Scoreboard
) -> None:
    """In the master, or with the plugin off in a worker, RECORDER is None and the hooks return at once."""
    _recorder.RECORDER = None
    assert compiled[0](None, FakeRequest()) is None
    assert compiled[1](None, FakeRequest(), {}, FakeResponse("200 OK")) is None


def test_a_new_recorder_is_picked_up(compiled: tuple[Callable[..., None], Callable[..., None]], tmp_path: Path) -> None:
    """The compiled hooks follow _recorder.RECORDER: a recorder on another board gets the next request."""
    boards = [
        sb.Scoreboard.create(str(tmp_path / name), slots=1, entries=1, ring=8, master_pid=1)
        for name in ("first", "second")
    ]
    try:
        for board in boards:
            board.assign(0, now=1.0)
            req = FakeRequest()
            fakes.start(RequestRecorder(board, 0, object(), RecorderOptions(threaded=False)), req)
            fakes.finish(_recorder.RECORDER, req, {}, FakeResponse("200 OK"))  # type: ignore[arg-type]
        assert [board.read(0).head for board in boards] == [1, 1]
    finally:
        _recorder.RECORDER = None
        for board in boards:
            board.close()


def test_a_greenlet_is_recorded_by_its_id(
    compiled: tuple[Callable[..., None], Callable[..., None]], board: sb.Scoreboard
) -> None:
    """gevent: the current greenlet is no int; the entry carries its id(), as the Python hook writes."""
    current = object()
    board.assign(0, now=1.0)
    rec = RequestRecorder(board, 0, object(), RecorderOptions(threaded=False), current=lambda: current)
    fakes.start(rec, FakeRequest())
    assert board.read(0).requests[0].thread == id(current)
    assert next(iter(rec.in_flight.values()))[2] is current
    assert threading.get_ident() != id(current)


def test_bind_refuses_a_scoreboard_layout_it_was_not_written_for(
    compiled: tuple[Callable[..., None], Callable[..., None]], board: sb.Scoreboard
) -> None:
    """A changed ENTRY format without a changed _speedups.c is an ImportError, and the binding stays as it was."""
    from gunicorn_insight._worker import _speedups

    with pytest.raises(ImportError, match="scoreboard layout"):
        _speedups.bind(
            {},
            _recorder.pre_request,
            _recorder.post_request,
            _report.report,
            _recorder.describe_peer,
            _recorder.parse_status,
            _recorder.parse_request_start,
            _recorder.queue_header,
            sb.METHOD_INDEX,
            sb.OTHER_METHOD,
            ROUTE_KEY,
            "HTTP_X_REQUEST_START",
            "HTTP_X_QUEUE_START",
            _recorder.HANG_UP_CHECK_AFTER,
            ("<B7xdQ8s46sH200s", sb.RING.format, "<QI", 3),
        )
    board.assign(0, now=1.0)
    req = FakeRequest()
    fakes.start(RequestRecorder(board, 0, object(), RecorderOptions(threaded=False)), req)
    fakes.finish(_recorder.RECORDER, req, {}, FakeResponse("200 OK"))  # type: ignore[arg-type]
    assert board.read(0).head == 1


def test_a_stale_build_falls_back_to_the_python_hooks(
    compiled: tuple[Callable[..., None], Callable[..., None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An extension that refuses this package's scoreboard layout makes _compiled() None, never an import error."""
    from gunicorn_insight._worker import _speedups

    def refuse(*args: object) -> None:
        raise ImportError("scoreboard layout ('<B7xdQ8s46sH200s', ...) is not the one _speedups.c was written for")

    monkeypatch.setattr(_speedups, "bind", refuse)
    assert _recorder._compiled() is None


class SocketResponse:
    """gunicorn's WSGI Response as post_request sees it: its status parsed, and the client's socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.status, self.status_code, self.sock = "200 OK", 200, sock


def connected() -> tuple[socket.socket, socket.socket]:
    """A loopback TCP connection: (the server's accepted socket, the client's)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return server, client


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5.0
    while not condition():
        assert time.monotonic() < deadline, "the kernel never delivered the client's close"
        time.sleep(0.01)


def peer_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture
def hang_up_check_after(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[float], None]]:
    """Sets recorder.HANG_UP_CHECK_AFTER for both implementations (the compiled hooks take it when bound)."""

    def change(seconds: float) -> None:
        monkeypatch.setattr(_recorder, "HANG_UP_CHECK_AFTER", seconds)
        _recorder._compiled()

    yield change
    monkeypatch.undo()
    _recorder._compiled()


def hang_up_cases() -> list[tuple[str, int, Callable[[], tuple[Any, list[socket.socket]]]]]:
    """(name, expected outcome bits, make the response): each as gunicorn leaves it after writing."""

    def alive() -> tuple[Any, list[socket.socket]]:
        server, client = connected()
        server.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        return SocketResponse(server), [server, client]

    def gone_before_response() -> tuple[Any, list[socket.socket]]:
        server, client = connected()
        client.close()  # nginx giving up (499): a FIN, then a reset for the response written after it
        wait_for(lambda: peer_closed(server))
        server.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        wait_for(lambda: server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == 7)
        return SocketResponse(server), [server]

    def closed_after_reading() -> tuple[Any, list[socket.socket]]:
        server, client = connected()
        server.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        client.recv(100)
        client.close()  # read the whole response first: not a hang-up, however soon it closes
        wait_for(lambda: peer_closed(server))
        return SocketResponse(server), [server]

    def unix_socket() -> tuple[Any, list[socket.socket]]:
        server, client = socket.socketpair()
        return SocketResponse(server), [server, client]

    return [
        ("alive", 0, alive),
        ("gone before the response", sb.RECORD_CLIENT_CLOSED, gone_before_response),
        ("closed after reading", 0, closed_after_reading),
        ("unix socket", 0, unix_socket),
        ("no socket", 0, lambda: (FakeResponse("200 OK"), [])),
    ]


def serve_one(board: sb.Scoreboard, implementation: str, make: Callable[[], tuple[Any, list[socket.socket]]]) -> None:
    """One request through the hooks of ``implementation`` with the response ``make`` gives; sockets closed."""
    _recorder.RECORDER = RequestRecorder(board, 0, object(), RecorderOptions(threaded=False))
    pre_request, post_request = fakes.IMPLEMENTATIONS[implementation]
    resp, sockets = make()
    try:
        req = FakeRequest()
        pre_request(None, req)
        post_request(None, req, {}, resp)
    finally:
        _recorder.RECORDER = None
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize("implementation", sorted(fakes.IMPLEMENTATIONS))
@pytest.mark.parametrize(("name", "expected", "make"), hang_up_cases(), ids=[case[0] for case in hang_up_cases()])
def test_both_hooks_tell_a_client_gone_from_one_that_read_the_response(
    board: sb.Scoreboard,
    implementation: str,
    name: str,
    expected: int,
    make: Callable[[], tuple[Any, list[socket.socket]]],
    hang_up_check_after: Callable[[float], None],
) -> None:
    """The ring record's outcome says client closed only when the client left before taking the response."""
    hang_up_check_after(0.0)  # every request is asked, however quick
    board.assign(0, now=1.0)
    serve_one(board, implementation, make)
    ((*_, outcome, _),) = board.read_ring(0, 0, 1)
    assert outcome == expected, name


@pytest.mark.parametrize("implementation", sorted(fakes.IMPLEMENTATIONS))
def test_both_hooks_count_a_failed_write_and_name_a_slow_one(
    board: sb.Scoreboard, implementation: str, caplog: pytest.LogCaptureFixture
) -> None:
    """EPIPE still in flight in gunicorn's finally marks the record, where the response has a socket (without
    one, ASGI, the exception is the application's own); a slow one is named in one log line."""
    board.assign(0, now=1.0)
    _recorder.RECORDER = RequestRecorder(board, 0, object(), RecorderOptions(threaded=False, slow_after=0.05))
    pre_request, post_request = fakes.IMPLEMENTATIONS[implementation]
    fast, slow, unwritten = FakeRequest(path="/fast"), FakeRequest(path="/slow"), FakeRequest(path="/asgi")
    server_end, client_end = socket.socketpair()
    try:
        for req in (fast, slow, unwritten):
            pre_request(None, req)
            if req is slow:
                time.sleep(0.1)
            resp = FakeResponse("200 OK")
            if req is not unwritten:
                resp.sock = server_end  # type: ignore[attr-defined]  # what gunicorn's Response has
            try:
                raise BrokenPipeError(32, "Broken pipe")
            except OSError:
                post_request(None, req, {}, resp)
    finally:
        _recorder.RECORDER = None
        server_end.close()
        client_end.close()
    closed = [sb.RECORD_CLIENT_CLOSED, sb.RECORD_CLIENT_CLOSED, 0]
    assert [record[5] for record in board.read_ring(0, 0, 3)] == closed
    lines = [record.getMessage() for record in caplog.records if "client closed" in record.getMessage()]
    assert len(lines) == 1
    assert 'request="GET /slow"' in lines[0]


def burn(seconds: float) -> None:
    """Compute for ``seconds`` of this thread's CPU time: on a loaded machine wall time can pass without any."""
    deadline = time.thread_time() + seconds
    while time.thread_time() < deadline:
        sum(range(1000))


@pytest.mark.parametrize("implementation", sorted(fakes.IMPLEMENTATIONS))
def test_both_hooks_record_the_threads_cpu_apart_from_waiting(board: sb.Scoreboard, implementation: str) -> None:
    """The record's CPU is the thread's CPU clock from pre_request to post_request: it covers the work done
    between them and no more; where requests share a thread (thread_cpu off) it is NaN, for the master."""
    pre_request, post_request = fakes.IMPLEMENTATIONS[implementation]
    board.assign(0, now=1.0)
    bounds = []
    try:
        for thread_cpu in (True, False):
            options = RecorderOptions(threaded=False, thread_cpu=thread_cpu)
            _recorder.RECORDER = RequestRecorder(board, 0, object(), options)
            for work in (burn, time.sleep):
                req = FakeRequest()
                outer = time.thread_time()
                pre_request(None, req)
                inner = time.thread_time()
                work(0.1)
                worked = time.thread_time() - inner
                post_request(None, req, {}, FakeResponse("200 OK"))
                bounds.append((worked, time.thread_time() - outer))
    finally:
        _recorder.RECORDER = None
    cpus = [record[6] for record in board.read_ring(0, 0, 4)]
    for cpu, (at_least, at_most) in zip(cpus[:2], bounds[:2], strict=True):
        assert at_least <= cpu <= at_most, (cpu, at_least, at_most)
    assert cpus[0] > 0.01, "burning the CPU for 0.1 s was not seen"
    assert math.isnan(cpus[2])
    assert math.isnan(cpus[3])


@pytest.mark.parametrize("implementation", sorted(fakes.IMPLEMENTATIONS))
def test_only_requests_past_the_threshold_ask_the_tcp_state(
    board: sb.Scoreboard, implementation: str, hang_up_check_after: Callable[[float], None]
) -> None:
    """A client gone before the response is a hang-up for a request of at least HANG_UP_CHECK_AFTER; a
    quicker request is not asked (the question costs a system call)."""
    board.assign(0, now=1.0)
    ((_, _, gone_before_response),) = [case for case in hang_up_cases() if case[0] == "gone before the response"]
    for threshold in (3600.0, 0.0):
        hang_up_check_after(threshold)
        serve_one(board, implementation, gone_before_response)
    assert [record[5] for record in board.read_ring(0, 0, 2)] == [0, sb.RECORD_CLIENT_CLOSED]


def test_the_hang_up_threshold_is_short_beside_any_client_timeout() -> None:
    """The threshold stays far below what a client or proxy waits before giving up (a second or more)."""
    assert 0 < _recorder.HANG_UP_CHECK_AFTER <= 0.01


@pytest.mark.parametrize(
    "headers",
    [
        [("HOST", "example.com")],
        [("HOST", "example.com"), ("X-QUEUE-START", stamp(0.25)), ("X-REQUEST-START", stamp(0.05))],
        [("X-QUEUE-START", stamp(0.3))],
        [("X-REQUEST-START", "t=garbage")],
    ],
    ids=["no stamp", "request start wins", "queue start", "garbage"],
)
def test_both_hooks_add_the_same_access_log_atoms(
    compiled: tuple[Callable[..., None], Callable[..., None]], board: sb.Scoreboard, headers: list[tuple[str, str]]
) -> None:
    """access_log_atoms: the compiled pre_request appends what recorder.add_log_atoms does (busy workers with
    this request counted, queue milliseconds or "-"), for each kind of stamp."""
    for slot in (0, 1, 2):
        board.assign(slot, now=1.0)
        board.buffer[board.entries_offset(slot)] = slot > 0  # in flight: slots 1 and 2 (ours gets its own)
    for slot in (0, 2):  # slot 1 is still booting: not counted, whatever its entries say
        sb.store(board.buffer, board.offset(slot) + sb.OFF_STATE, sb.STATE, sb.READY)
    added = {}
    try:
        for name, (pre_request, _) in (("python", fakes.IMPLEMENTATIONS["python"]), ("compiled", compiled)):
            options = RecorderOptions(threaded=False, access_log_atoms=True)
            _recorder.RECORDER = RequestRecorder(board, 0, object(), options)
            req = FakeRequest(headers=list(headers))
            pre_request(None, req)
            added[name] = req.headers[len(headers) :]
            _recorder.RECORDER.in_flight.clear()
    finally:
        _recorder.RECORDER = None
    python, ours = added["python"], added["compiled"]
    assert [name for name, _ in ours] == ["X-GUNICORN-BUSY", "X-GUNICORN-QUEUE-MS"]
    assert ours[0] == python[0] == ("X-GUNICORN-BUSY", "2")
    assert (ours[1][1] == "-") == (python[1][1] == "-")
    if python[1][1] != "-":
        assert abs(float(ours[1][1]) - float(python[1][1])) < 50  # the two read the clock a moment apart


def test_the_extension_is_built_from_the_c_file_as_it_is(
    compiled: tuple[Callable[..., None], Callable[..., None]],
) -> None:
    """A build that failed leaves the previous .so in place (the extension is optional to pip): tests would then
    run a stale binary. Rebuild with `python setup.py build_ext --inplace` when this fails."""
    from gunicorn_insight._worker import _speedups

    source = Path(_recorder.__file__).with_name("_speedups.c")
    assert Path(_speedups.__file__).stat().st_mtime >= source.stat().st_mtime, "rebuild the extension"


@pytest.mark.parametrize("implementation", sorted(fakes.IMPLEMENTATIONS))
def test_connections_counted_at_the_tick_are_left_to_the_tick(board: sb.Scoreboard, implementation: str) -> None:
    """With connections_at_tick (uvicorn's worker) a request's end leaves the slot's connections as the tick
    published them; without it each request publishes the worker's nr_conns."""
    pre_request, post_request = fakes.IMPLEMENTATIONS[implementation]
    board.assign(0, now=1.0)
    published = []
    try:
        for at_tick in (True, False):
            worker = Worker()
            _recorder.RECORDER = rec = RequestRecorder(board, 0, worker, RecorderOptions(connections_at_tick=at_tick))
            rec.refresh_connections()
            worker.nr_conns = 9
            req = FakeRequest()
            pre_request(None, req)
            post_request(None, req, {}, FakeResponse("200 OK"))
            published.append(board.read(0).connections_now)
    finally:
        _recorder.RECORDER = None
    assert published == [3, 9]


@pytest.mark.parametrize("implementation", sorted(fakes.IMPLEMENTATIONS))
def test_route_numbers_are_each_recorders_own(tmp_path: Path, implementation: str) -> None:
    """The same template objects numbered in another order by a second recorder keep that recorder's numbers:
    nothing one recorder learnt of its routes answers for the next."""
    board = sb.Scoreboard.create(str(tmp_path / "scoreboard"), slots=2, entries=3, ring=8, master_pid=1, routes=8)
    pre_request, post_request = fakes.IMPLEMENTATIONS[implementation]
    first, second = "/first/<id>", "/second/<id>"
    numbered = {}
    for slot, order in ((0, (first, second, first)), (1, (second, first, second))):
        board.assign(slot, now=1.0)
        _recorder.RECORDER = RequestRecorder(board, slot, object(), RecorderOptions(threaded=False, routes=True))
        try:
            for template in order:
                req = FakeRequest()
                pre_request(None, req)
                post_request(None, req, {ROUTE_KEY: template}, FakeResponse("200 OK"))
        finally:
            _recorder.RECORDER = None
        numbered[slot] = [record[4] for record in board.read_ring(slot, 0, board.head(slot))]
    assert numbered == {0: [1, 2, 1], 1: [1, 2, 1]}
    assert board.route_names(0) == [first, second]
    assert board.route_names(1) == [second, first]
    board.close()
