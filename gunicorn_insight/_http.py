"""The embedded ``/metrics`` endpoint: a small threaded HTTP server in the master, off the arbiter's loop."""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from ._safety import LOG, report
from .settings import ConfigurationError

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

StartResponse = Callable[..., Any]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """A scrape every few seconds is not news; and stderr writes from threads risk fork deadlocks."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """Binds at construction, so a port in use is a startup error; serves once :meth:`start` is called.

    A successor master (gunicorn's USR2 upgrade) finds the port held by its parent, which keeps serving
    until it is told to quit; the successor then takes the port over as soon as it is free.
    """

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        before_scrape: Callable[[], None],
        *,
        successor: bool = False,
    ) -> None:
        from prometheus_client import make_wsgi_app

        self._inner = make_wsgi_app(registry)
        self._before_scrape = before_scrape
        self.address = address
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        try:
            self._bind()
        except OSError as error:
            if not (successor and error.errno == errno.EADDRINUSE):
                host, port = address
                raise ConfigurationError(
                    f"metrics_bind={host}:{port} cannot be bound ({error.strerror}); pick a free port with "
                    "GUNICORN_INSIGHT_METRICS_BIND=host:port, or 'off' to not serve /metrics"
                ) from None
            LOG.info("gunicorn-insight: %s is still served by the previous master (USR2 upgrade); taking it "
                     "over when that master exits", self.url)

    def _bind(self) -> None:
        host, port = self.address
        server = (_Server6 if ":" in host else _Server)((host, port), _QuietHandler)
        server.set_app(self._app)
        self._server = server

    @property
    def url(self) -> str:
        host, port = str(self.address[0]), self.address[1]
        return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="gunicorn-insight-http", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._server is None:
            if self._stopping.wait(1.0):
                return
            with contextlib.suppress(OSError):
                self._bind()
        self._server.serve_forever(poll_interval=0.5)

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            if self._thread is not None:
                self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close_in_child(self) -> None:
        """A forked worker must not hold our listening socket open (it would keep the port busy)."""
        if self._server is not None:
            self._server.socket.close()

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"gunicorn-insight serves /metrics\n"]
        try:
            self._before_scrape()
        except Exception as error:
            report("refreshing metrics before a scrape", error)
        result: Iterable[bytes] = self._inner(environ, start_response)
        return result
