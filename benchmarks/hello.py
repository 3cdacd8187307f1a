"""The benchmark's application: the cheapest WSGI app there is, so that any overhead of the plugin shows."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from bench_ready import mark_booted

BODY = b"hello"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    # What a framework's router tells gunicorn-insight (read only when its route label is on): bare runs pay
    # this one dict store too, so both sides of a pair run the same app.
    environ["gunicorn_insight.route"] = "/"
    start_response("200 OK", HEADERS)
    return [BODY]


mark_booted()
