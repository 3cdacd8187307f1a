"""A WSGI app whose /grow keeps allocating until something stops it (the OOM killer, in a memory-limited cgroup),
and whose /hold?mb=N allocates N MiB more and keeps it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

HOARD: list[bytes] = []


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/hold":
        megabytes = int(environ.get("QUERY_STRING", "mb=0").partition("=")[2] or 0)
        HOARD.extend(b"x" * (1 << 20) for _ in range(megabytes))
    if environ["PATH_INFO"] == "/grow":
        while True:
            HOARD.append(b"x" * (8 << 20))  # written, not just reserved: the pages count against the limit
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]
