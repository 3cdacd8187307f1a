"""Requests busy in known functions, for ``gunicorn-insight stacks``.

/wait     sleeps in ``wait_in_known_function`` until the first byte of the file STACKS_APP_RELEASE is not 0,
          at most 120 s
/regex    backtracks in ``re`` (C code that never releases the GIL) for far longer than any test
"""

from __future__ import annotations

import asyncio
import mmap
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

_LONGEST_WAIT = 120.0


def release_flag(release: str | None) -> mmap.mmap | bytes:
    """The release file's first byte, mapped. Reading it is no system call, so the waiting loop lets go of the
    GIL only in its sleep: a stack sampled while the check runs (a stat() would let a sampler in there) would
    not be the same stack as the other waiting requests'."""
    if not release:
        return b"\0"
    with open(release, "rb") as file:
        return mmap.mmap(file.fileno(), 1, access=mmap.ACCESS_READ)


def wait_in_known_function(release: str | None) -> None:
    give_up = time.monotonic() + _LONGEST_WAIT
    released = release_flag(release)
    while not released[0] and time.monotonic() < give_up:
        time.sleep(0.05)


def hold_the_gil() -> None:
    # Catastrophic backtracking: 2**60 steps inside the regex engine, which holds the GIL throughout.
    re.match(r"(a+)+$", "a" * 60 + "b")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/wait":
        wait_in_known_function(os.environ.get("STACKS_APP_RELEASE"))
    elif environ["PATH_INFO"] == "/regex":
        hold_the_gil()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]


async def wait_in_known_coroutine(release: str | None) -> None:
    give_up = time.monotonic() + _LONGEST_WAIT
    released = release_flag(release)
    while not released[0] and time.monotonic() < give_up:
        await asyncio.sleep(0.05)


async def asgi_app(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Any]) -> None:
    if scope["type"] != "http":
        return  # lifespan: nothing to set up
    if scope["path"] == "/wait":
        await wait_in_known_coroutine(os.environ.get("STACKS_APP_RELEASE"))
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok\n"})
