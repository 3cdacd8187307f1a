"""``/segfault`` crashes the worker in C code (reads address 0 through ctypes), ``/abort-handler`` answers with
the name of what handles SIGABRT in the worker, anything else answers ok."""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Callable, Iterable
from typing import Any


def read_address_zero() -> None:
    ctypes.string_at(0)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    if path == "/segfault":
        read_address_zero()
    body = b"ok\n"
    if path == "/abort-handler":
        handler = signal.getsignal(signal.SIGABRT)
        body = getattr(handler, "__qualname__", repr(handler)).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
