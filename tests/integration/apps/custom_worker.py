"""Worker classes of one's own that answer HTTP without gunicorn's request hooks: PlainWorker neither derives
from a class gunicorn-insight knows nor calls pre_request/post_request, so its requests cannot be seen;
BypassingSyncWorker derives from sync but overrides handle_request without the hooks."""

from __future__ import annotations

import select
import socket
from typing import Any

from gunicorn.workers.base import Worker
from gunicorn.workers.sync import SyncWorker


class PlainWorker(Worker):  # type: ignore[misc]  # gunicorn ships no type information
    def run(self) -> None:
        listener = self.sockets[0]
        listener.setblocking(False)
        while self.alive:
            self.notify()
            readable, _, _ = select.select([listener], [], [], 0.5)
            if not readable:
                continue
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            with client:
                client.setblocking(True)
                client.settimeout(5)
                try:
                    client.recv(65536)
                    client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
                except OSError:  # the client went away, or timed out (TimeoutError is an OSError)
                    continue


class BypassingSyncWorker(SyncWorker):  # type: ignore[misc]  # gunicorn ships no type information
    """Derived from gunicorn's sync worker, so trusted at startup, but its handle_request is its own and calls
    neither request hook: every request is answered and none is recorded."""

    def handle_request(self, listener: Any, req: Any, client: socket.socket, addr: Any) -> bool:
        client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
        return True
