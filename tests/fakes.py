"""Stand-ins for the few attributes of gunicorn's objects the unit tests need."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

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


IMPLEMENTATIONS: dict[str, tuple[Callable[..., None], Callable[..., None]]] = {
    "python": (_worker.pre_request, _worker.post_request),
    **({"compiled": _worker.COMPILED} if _worker.COMPILED is not None else {}),
}
HOOKS = IMPLEMENTATIONS.get("compiled", IMPLEMENTATIONS["python"])
"""The pair start() and finish() call: what install() puts in a config, unless a test picks one."""


def compiled_hooks() -> tuple[Callable[..., None], Callable[..., None]]:
    """The compiled pair. Where the extension was not built the test is skipped, unless
    INSIGHT_TEST_REQUIRE_COMPILED is set (scripts/test-all sets it): then it fails, so CI cannot pass
    without testing the compiled hooks."""
    if _worker.COMPILED is None:
        if os.environ.get("INSIGHT_TEST_REQUIRE_COMPILED"):
            pytest.fail("gunicorn_insight._speedups was not built; see the pip install output for the compiler error")
        pytest.skip("gunicorn_insight._speedups was not built (no compiler at install time)")
    return _worker.COMPILED


def start(recorder: RequestRecorder, req: object) -> None:
    """gunicorn calling pre_request in the worker that owns ``recorder``."""
    _worker.RECORDER = recorder
    HOOKS[0](None, req)


def finish(recorder: RequestRecorder, req: object, environ: object, resp: object) -> None:
    """gunicorn calling post_request in the worker that owns ``recorder``."""
    _worker.RECORDER = recorder
    HOOKS[1](None, req, environ, resp)
