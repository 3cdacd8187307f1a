"""The /metrics process: renders the multiprocess directory over HTTP, apart from gunicorn's master.

prometheus_client and the stdlib HTTP stack are imported here, never in the master: every worker
gunicorn forks carries the master's memory, and these would add about 1.5 MB to each one. The master
starts this process (see metrics_link) with one end of a socket pair as file descriptor 3 and talks to it
in single bytes: before each scrape this process sends ``r``, the master drains the scoreboard into the
files and answers ``d``, so a scrape always includes the requests finished before it. When the socket
closes (the master stopped or died) this process closes its listening socket at once, so a master started
right after can bind the port, and exits.

The first line it writes is its state: ``ready <url>``, ``waiting <url>`` (a USR2 successor whose
parent still holds the port), ``unavailable <message>`` (the default port, which nobody asked for
explicitly, is held by another process) or ``error <message>``.

Limits: one thread accepts connections and waits for their first bytes (at most ``MAX_IDLE`` waiting,
the oldest dropped first, each for at most ``READ_TIMEOUT`` seconds); ``HANDLERS`` threads answer the
connections that sent something. Idle or slow clients therefore cost a descriptor, not a thread, and
cannot keep a scrape out.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import queue
import selectors
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from .._report import LOG
from ..settings import ConfigurationError, join_host_port, parse_host_port
from .probes import Probes, Verdict
from .prometheus import OTLP_ONLY_PREFIX, merge_lock, usable_files

LINK_FD = 3
SCRAPE_WAIT = 2.0
"""Seconds a scrape waits for the master's round before serving the files as they are."""
BIND_FOR = 5.0
BIND_EVERY = 0.1
"""A port in use is tried again every BIND_EVERY seconds for BIND_FOR seconds: a server restarted at once
finds it held for a moment by the previous run's process (gunicorn retries its own binds for 5 s too)."""
HANDLERS = 4
"""Connections answered at once."""
QUEUED = 32
"""Connections that sent a request and wait for a handler; past that, new ones are closed."""
MAX_IDLE = 128
"""Connections accepted that have not sent anything yet; past that, the oldest is closed."""
READ_TIMEOUT = 5.0
"""Seconds a connection may stay silent: before its first byte, and between reads of its request."""

StartResponse = Callable[..., Any]


def metrics_url(address: tuple[str, int]) -> str:
    return f"http://{join_host_port(*address)}/metrics"


class DirectoryCollector:
    """Like prometheus_client's MultiProcessCollector, but a truncated file is skipped, not fatal, and a
    merge in progress in the master is waited for, not counted twice."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Any]:
        from prometheus_client.multiprocess import MultiProcessCollector

        with merge_lock(self._directory, shared=True):
            return list(MultiProcessCollector.merge(usable_files(self._directory), accumulate=True))


class PrometheusView(DirectoryCollector):
    """What /metrics serves: the directory without the families written for OTLP alone."""

    def collect(self) -> Iterable[Any]:
        return [family for family in super().collect() if not family.name.startswith(OTLP_ONLY_PREFIX)]


def make_registry(directory: str) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusView(directory))
    return registry


class MasterLink:
    """This process's end of the socket pair: asks for rounds, and notices the master going away."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._changed = threading.Condition()
        self._asked = 0
        self._answered = 0
        self.closed = False

    def say(self, line: str) -> None:
        self._sock.sendall(line.encode("utf-8", "replace") + b"\n")

    def fresh_round(self) -> None:
        """Ask the master for a round and wait for it, at most SCRAPE_WAIT seconds."""
        with self._changed:
            self._asked += 1
            ticket = self._asked
            with contextlib.suppress(OSError):
                self._sock.sendall(b"r")
            self._changed.wait_for(lambda: self._answered >= ticket or self.closed, timeout=SCRAPE_WAIT)

    def listen(self) -> None:
        """Count the master's answers until it closes the socket."""
        while True:
            try:
                data = self._sock.recv(4096)
            except OSError:
                data = b""
            with self._changed:
                if not data:
                    self.closed = True
                    self._changed.notify_all()
                    return
                self._answered += data.count(b"d")
                self._changed.notify_all()


class _Handler(WSGIRequestHandler):
    """The WSGI request handler with a read timeout and without a log line per request."""

    timeout = READ_TIMEOUT  # StreamRequestHandler puts it on the connection: a stalled read ends it

    def log_message(self, format: str, *args: Any) -> None:
        """A scrape every few seconds is not news."""


class _Server(WSGIServer):
    """The /metrics HTTP server; connections are handed to the bounded pool above, never a thread each."""

    allow_reuse_address = True
    request_queue_size = MAX_IDLE


class _Server6(_Server):
    """The same on an IPv6 address."""

    address_family = socket.AF_INET6


class MetricsServer:
    """Serves the registry; a successor master's process binds once its parent lets the port go."""

    def __init__(
        self,
        address: tuple[str, int],
        registry: Any,
        before_scrape: Callable[[], None],
        probes: Probes | None = None,
        master_link_open: Callable[[], bool] = lambda: True,
    ) -> None:
        from prometheus_client import make_wsgi_app

        self._inner = make_wsgi_app(registry)
        self._before_scrape = before_scrape
        self._probes = probes
        self._master_link_open = master_link_open
        self.address = address
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._queue: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(QUEUED)

    def bind(self) -> None:
        host, port = self.address
        server = (_Server6 if ":" in host else _Server)((host, port), _Handler)
        server.set_app(self._app)
        server.socket.setblocking(False)
        self._server = server

    def bind_retrying(self) -> None:
        """Bind, trying again for BIND_FOR seconds while the port is in use."""
        give_up = time.monotonic() + BIND_FOR
        while True:
            try:
                self.bind()
                return
            except OSError as error:
                if error.errno != errno.EADDRINUSE or time.monotonic() >= give_up:
                    raise
            time.sleep(BIND_EVERY)

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._serve, name="gunicorn-insight-http", daemon=True)]
        self._threads += [
            threading.Thread(target=self._handle, name=f"gunicorn-insight-http-{number}", daemon=True)
            for number in range(HANDLERS)
        ]
        for thread in self._threads:
            thread.start()

    def _serve(self) -> None:
        while self._server is None:
            if self._stopping.wait(1.0):
                return
            with contextlib.suppress(OSError):
                self.bind()
        listener = self._server.socket
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        idle: dict[socket.socket, tuple[float, Any]] = {}  # in the order accepted: oldest first
        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(self._until_oldest_expires(idle)):
                    if key.fileobj is listener:
                        self._accept(listener, selector, idle)
                    else:
                        connection = key.fileobj
                        assert isinstance(connection, socket.socket)
                        selector.unregister(connection)
                        _, address = idle.pop(connection)
                        try:
                            self._queue.put_nowait((connection, address))
                        except queue.Full:
                            connection.close()  # every handler busy and the queue full: shed load
                self._expire(selector, idle, time.monotonic() - READ_TIMEOUT)
        finally:
            for connection in idle:
                connection.close()

    @staticmethod
    def _until_oldest_expires(idle: dict[socket.socket, tuple[float, Any]]) -> float:
        if not idle:
            return 0.5
        accepted = next(iter(idle.values()))[0]
        return min(0.5, max(0.0, accepted + READ_TIMEOUT - time.monotonic()))

    @staticmethod
    def _expire(selector: selectors.BaseSelector, idle: dict[socket.socket, tuple[float, Any]], before: float) -> None:
        """Close the connections accepted before ``before`` that have not sent anything."""
        while idle and next(iter(idle.values()))[0] <= before:
            _drop_oldest(selector, idle)

    def _accept(
        self, listener: socket.socket, selector: selectors.BaseSelector, idle: dict[socket.socket, tuple[float, Any]]
    ) -> None:
        for _ in range(MAX_IDLE):
            if len(idle) >= MAX_IDLE:
                _drop_oldest(selector, idle)
            try:
                connection, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # Out of descriptors (EMFILE): make room for the next accept, or, with none to drop, pause
                # rather than spin on a listener that stays readable.
                if idle:
                    _drop_oldest(selector, idle)
                else:
                    self._stopping.wait(0.05)
                return
            idle[connection] = (time.monotonic(), address)
            selector.register(connection, selectors.EVENT_READ)

    def _handle(self) -> None:
        """One of HANDLERS threads: answers the connections that sent their first bytes."""
        while True:
            item = self._queue.get()
            if item is None or self._server is None:
                return
            connection, address = item
            try:
                self._server.finish_request(connection, address)
            except Exception:  # a client that went away or stalled: nothing to tell anyone
                pass
            finally:
                self._server.shutdown_request(connection)

    def close_listener(self) -> None:
        """Let go of the port first thing when the master is gone; the rest of the shutdown can follow."""
        if self._server is not None:
            self._server.socket.close()

    def stop(self) -> None:
        """Ask the threads to end; the process exits right after without waiting for a scrape in progress."""
        self._stopping.set()
        self.close_listener()
        for _ in range(HANDLERS):
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz") and self._probes is not None:
            # Answered from files this process reads itself: no round asked of the master, no worker involved.
            verdict = self._probes.health(self._master_link_open()) if path == "/healthz" else self._probes.readiness()
            return _verdict_response(verdict, start_response)
        if path not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"gunicorn-insight serves /metrics, /healthz and /readyz\n"]
        self._before_scrape()
        if self._probes is not None:
            # No round for as long as /healthz allows (the master stopped, its exporter thread stuck): the
            # files hold the last round's numbers, which would read as measured now. Refused, as /healthz is,
            # so the scrape fails (up == 0) with the reason, instead of the series going flat.
            health = self._probes.health(self._master_link_open())
            if not health.ok:
                return _verdict_response(health, start_response)
        result: Iterable[bytes] = self._inner(environ, start_response)
        return result


def _verdict_response(verdict: Verdict, start_response: StartResponse) -> list[bytes]:
    """A probe's verdict as a one-line plain-text answer (200 or 503)."""
    body = verdict.reason.encode("utf-8", "replace") + b"\n"
    start_response(
        verdict.status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [body]


def _drop_oldest(selector: selectors.BaseSelector, idle: dict[socket.socket, tuple[float, Any]]) -> None:
    if idle:
        connection = next(iter(idle))
        selector.unregister(connection)
        del idle[connection]
        connection.close()


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gunicorn-insight /metrics process")
    parser.add_argument("--directory", required=True)
    parser.add_argument("--bind", default="", help="host:port to serve /metrics on; empty: OTLP only")
    parser.add_argument("--successor", action="store_true")
    parser.add_argument(
        "--optional", action="store_true", help="metrics_bind was not set: a port in use is not an error"
    )
    parser.add_argument("--title", default="")
    parser.add_argument("--run-dir", default="")
    parser.add_argument("--otlp", default="", help="OTLP endpoint URL, or 'on' for the OTEL_* variables")
    parser.add_argument("--service-name", default="gunicorn")
    parser.add_argument("--instance-id", default="")
    parser.add_argument("--master-pid", type=int, default=0)
    parser.add_argument("--server-port", type=int, default=0)
    parser.add_argument("--started", type=float, default=0.0)
    return parser.parse_args(argv)


def bind_failure(bind: str, error: OSError, *, optional: bool) -> str:
    """The first line for a port that could not be bound, with the fix that applies."""
    port = parse_host_port("metrics_bind", bind, 9180)[1]
    if error.errno != errno.EADDRINUSE:
        return (
            f"error metrics_bind={bind} cannot be bound ({error.strerror}); give an address of this host "
            "and a port this user may bind with GUNICORN_INSIGHT_METRICS_BIND=host:port, or 'off' to not "
            "serve /metrics"
        )
    holder = (
        f"another process listens on it (find it with: ss -ltnp 'sport = :{port}'), still after "
        f"{BIND_FOR:.0f}s of retries"
    )
    if optional:
        return (
            f"unavailable /metrics is not served: the default metrics_bind {bind} is in use ({holder}). "
            "The server runs without it; give each server on this host its own port with "
            "GUNICORN_INSIGHT_METRICS_BIND=host:port (or the metrics_bind keyword), or 'off' to not serve "
            "/metrics and silence this warning"
        )
    return (
        f"error metrics_bind={bind} cannot be bound (Address already in use): {holder}. Stop that process, "
        "or give this server a port of its own with GUNICORN_INSIGHT_METRICS_BIND=host:port, or 'off' "
        "to not serve /metrics"
    )


def start_otlp(args: argparse.Namespace, link: MasterLink) -> Any:
    """The OTLP exporter, fed from the same merged directory as /metrics; None when OTLP is off.
    Raises ConfigurationError for a bad OTEL_* variable or a missing SDK (the master reports it)."""
    if not args.otlp:
        return None
    from . import otlp as _otlp

    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        _otlp.log_to_stderr()
        LOG.warning(
            "gunicorn-insight: otlp=%s is set but OTEL_SDK_DISABLED=true: nothing is exported over OTLP", args.otlp
        )
        return None

    options = _otlp.resolve_options(
        args.otlp,
        os.environ,
        service_name=args.service_name,
        instance_id=args.instance_id,
        master_pid=args.master_pid or os.getppid(),
        server_port=args.server_port or None,
        started=args.started,
    )
    try:
        export = _otlp.OtlpExport(options, DirectoryCollector(args.directory).collect, link.fresh_round)
    except ImportError as error:
        transport = "gRPC" if options.protocol == "grpc" else "HTTP"
        raise ConfigurationError(
            f"otlp={args.otlp!r} needs the OpenTelemetry SDK and its OTLP/{transport} exporter ({error}); install "
            f"them with: pip install 'gunicorn-insight[{_otlp.EXTRAS[options.protocol]}]'"
        ) from None
    _otlp.log_to_stderr()
    return export


def _set_title(title: str) -> None:
    """Show up in ps as what it is, when setproctitle is there (gunicorn uses it for its own processes)."""
    if title:
        with contextlib.suppress(ImportError):
            import setproctitle

            setproctitle.setproctitle(title)


def main(argv: list[str]) -> int:
    link = MasterLink(socket.socket(fileno=LINK_FD))
    try:
        args = _arguments(argv)
        _set_title(args.title)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = args.directory
        otlp = start_otlp(args, link)
        if not args.bind:
            return export_only(link, otlp)
        address = parse_host_port("metrics_bind", args.bind, 9180)
        probes = Probes(args.run_dir) if args.run_dir else None
        server = MetricsServer(
            address, make_registry(args.directory), link.fresh_round, probes, lambda: not link.closed
        )
        try:
            if args.successor:
                server.bind()  # a successor's parent keeps the port until it exits: wait for it below
            else:
                server.bind_retrying()
            link.say(f"ready {metrics_url(address)}")
        except OSError as error:
            if not (args.successor and error.errno == errno.EADDRINUSE):
                link.say(bind_failure(args.bind, error, optional=args.optional))
                return 0
            link.say(f"waiting {metrics_url(address)}")
    except ConfigurationError as error:  # a bad OTEL_* variable, a missing SDK: the master's startup error
        with contextlib.suppress(OSError):
            link.say(f"error {error}")
        return 0
    except Exception as error:  # whatever it is, the master reports it as a startup error
        with contextlib.suppress(OSError):
            link.say(f"error the /metrics process could not start: {type(error).__name__}: {error}")
        return 0
    server.start()
    if otlp is not None:
        otlp.start()
    link.listen()
    server.close_listener()  # the master is gone: free the port before anything slower
    server.stop()
    if otlp is not None:
        otlp.stop()
    return 0


def export_only(link: MasterLink, otlp: Any) -> int:
    """metrics_bind off, otlp on: no HTTP server, only the export loop until the master goes."""
    link.say("ready otlp")
    if otlp is not None:
        otlp.start()
    link.listen()
    if otlp is not None:
        otlp.stop()
    return 0


def run() -> None:
    """The process's entry point. It always exits with status 0: gunicorn reaps it like a worker, and
    gunicorn 23 stops the whole server when a child exits with 3 or 4 (its "worker failed to boot")."""
    try:
        main(sys.argv[1:])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    os._exit(0)
