"""The /metrics process: renders the multiprocess directory over HTTP, apart from gunicorn's master.

prometheus_client and the stdlib HTTP stack are imported here, never in the master: every worker
gunicorn forks carries the master's memory, and these would add about 1.5 MB to each one. The master
starts this process (see _endpoint) with one end of a socket pair as file descriptor 3 and talks to it
in single bytes: before each scrape this process sends ``r``, the master drains the scoreboard into the
files and answers ``d``, so a scrape always includes the requests finished before it. When the socket
closes (the master stopped or died) this process exits.

The first line it writes is its state: ``ready <url>``, ``waiting <url>`` (a USR2 successor whose
parent still holds the port) or ``error <message>``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from ._prometheus import merge_lock, usable_files
from .settings import join_host_port, parse_host_port

LINK_FD = 3
SCRAPE_WAIT = 2.0
"""Seconds a scrape waits for the master's round before serving the files as they are."""

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


def make_registry(directory: str) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DirectoryCollector(directory))
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


class _QuietHandler(WSGIRequestHandler):
    """The WSGI request handler without a log line per request."""

    def log_message(self, format: str, *args: Any) -> None:
        """A scrape every few seconds is not news."""


class _Server(ThreadingMixIn, WSGIServer):
    """The /metrics HTTP server: one thread per scrape, so a slow scraper does not block the next."""

    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    """The same on an IPv6 address."""

    address_family = socket.AF_INET6


class MetricsServer:
    """Serves the registry; a successor master's process binds once its parent lets the port go."""

    def __init__(self, address: tuple[str, int], registry: Any, before_scrape: Callable[[], None]) -> None:
        from prometheus_client import make_wsgi_app

        self._inner = make_wsgi_app(registry)
        self._before_scrape = before_scrape
        self.address = address
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def bind(self) -> None:
        host, port = self.address
        server = (_Server6 if ":" in host else _Server)((host, port), _QuietHandler)
        server.set_app(self._app)
        self._server = server

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="gunicorn-insight-http", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._server is None:
            if self._stopping.wait(1.0):
                return
            with contextlib.suppress(OSError):
                self.bind()
        self._server.serve_forever(poll_interval=0.5)

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            if self._thread is not None:
                self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"gunicorn-insight serves /metrics\n"]
        self._before_scrape()
        result: Iterable[bytes] = self._inner(environ, start_response)
        return result


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gunicorn-insight /metrics process")
    parser.add_argument("--directory", required=True)
    parser.add_argument("--bind", required=True)
    parser.add_argument("--successor", action="store_true")
    parser.add_argument("--title", default="")
    return parser.parse_args(argv)


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
        address = parse_host_port("metrics_bind", args.bind, 9180)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = args.directory
        server = MetricsServer(address, make_registry(args.directory), link.fresh_round)
        try:
            server.bind()
            link.say(f"ready {metrics_url(address)}")
        except OSError as error:
            if not (args.successor and error.errno == errno.EADDRINUSE):
                link.say(f"error metrics_bind={args.bind} cannot be bound ({error.strerror}); pick a free port "
                         "with GUNICORN_INSIGHT_METRICS_BIND=host:port, or 'off' to not serve /metrics")
                return 0
            link.say(f"waiting {metrics_url(address)}")
    except Exception as error:  # whatever it is, the master reports it as a startup error
        with contextlib.suppress(OSError):
            link.say(f"error the /metrics process could not start: {type(error).__name__}: {error}")
        return 0
    server.start()
    link.listen()
    server.stop()
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
