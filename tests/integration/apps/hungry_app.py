"""A WSGI app whose /grow keeps allocating until something stops it (the OOM killer, in a memory-limited cgroup)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

HOARD: list[bytes] = []


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/grow":
        while True:
            HOARD.append(b"x" * (8 << 20))  # written, not just reserved: the pages count against the limit
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]
