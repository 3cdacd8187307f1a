"""The embedded ``/metrics`` endpoint: a small threaded HTTP server in the master, off the arbiter's loop."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from ._safety import report
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
    """Binds at construction, so a port in use is a startup error; serves once :meth:`start` is called."""

    def __init__(
        self, address: tuple[str, int], registry: CollectorRegistry, before_scrape: Callable[[], None]
    ) -> None:
        from prometheus_client import make_wsgi_app

        self._inner = make_wsgi_app(registry)
        self._before_scrape = before_scrape
        host, port = address
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), _QuietHandler)
        except OSError as error:
            raise ConfigurationError(
                f"metrics_bind={host}:{port} cannot be bound ({error.strerror}); pick a free port with "
                "GUNICORN_INSIGHT_METRICS_BIND=host:port, or 'off' to not serve /metrics"
            ) from None
        self._server.set_app(self._app)
        self.address = self._server.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = str(self.address[0]), self.address[1]
        return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    def fileno(self) -> int:
        return self._server.fileno()

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, name="gunicorn-insight-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def close_in_child(self) -> None:
        """A forked worker must not hold our listening socket open (it would keep the port busy)."""
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
