"""Stand-ins for the few attributes of gunicorn's objects the unit tests need."""

from __future__ import annotations

from gunicorn_insight import _worker
from gunicorn_insight._worker import RequestRecorder


class FakeRequest:
    """The attributes of gunicorn's Request that the recorder reads."""

    def __init__(
        self, method: str = "GET", path: str = "/", query: str = "", peer: object = ("10.1.2.3", 4567),
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.peer_addr = peer
        self.headers = headers if headers is not None else [("HOST", "example.com")]


class FakeResponse:
    def __init__(self, status: object) -> None:
        self.status = status


def start(recorder: RequestRecorder, req: object) -> None:
    """gunicorn calling pre_request in the worker that owns ``recorder``."""
    _worker.RECORDER = recorder
    _worker.pre_request(None, req)


def finish(recorder: RequestRecorder, req: object, environ: object, resp: object) -> None:
    """gunicorn calling post_request in the worker that owns ``recorder``."""
    _worker.RECORDER = recorder
    _worker.post_request(None, req, environ, resp)
