"""A WSGI app with its own prometheus_client metric, as a user's app would have."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter

HITS = Counter("app_hits", "Requests the application itself counted.")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    HITS.inc()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]
