"""A worker class of one's own that answers HTTP without gunicorn's request hooks: neither derived from a
class gunicorn-insight knows nor calling pre_request/post_request, so its requests cannot be seen."""

from __future__ import annotations

import select

from gunicorn.workers.base import Worker


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
