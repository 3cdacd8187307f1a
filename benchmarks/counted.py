"""The benchmark applications (hello.py's and hello_asgi.py's) with callgrind's counters zeroed at request
WARMUP and dumped COUNT requests later, for worker_instructions.py.

Both values and the helper library that makes callgrind's client requests come from the environment
(``COUNTED_WARMUP``, ``COUNTED_COUNT``, ``COUNTED_HELPER``). The wrappers cost the same with and without
gunicorn-insight, and their own requests around the counted ones are not counted.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import hello
import hello_asgi

_CALLGRIND = ctypes.CDLL(os.environ["COUNTED_HELPER"])
_WARMUP = int(os.environ["COUNTED_WARMUP"])
_LAST = _WARMUP + int(os.environ["COUNTED_COUNT"])
_served = [0]  # one worker process, one thread serving: no lock


def _count_one() -> None:
    _served[0] += 1
    if _served[0] == _WARMUP:
        _CALLGRIND.counted_zero()
    elif _served[0] == _LAST:
        _CALLGRIND.counted_dump()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    _count_one()
    return hello.app(environ, start_response)


async def asgi_app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
    send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
) -> None:
    if scope["type"] == "http":
        _count_one()
    await hello_asgi.app(scope, receive, send)
