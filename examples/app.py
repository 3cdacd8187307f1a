"""A small WSGI application with the endpoints an operator needs to see gunicorn-insight at work.

/            hello
/slow?s=2    sleeps (default 1 s): shows in-flight requests and latency
/stuck       spins in pure Python forever: WORKER TIMEOUT, the abort handler can run
/stuck-c     hashes in C with a huge iteration count: the worker is SIGKILLed, no handler runs
/error       raises: a 500
/exit?code=7 the worker process exits at once with that code (a crash gunicorn cannot see coming)
/status/N    answers with status N
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

StartResponse = Callable[..., Any]


def _text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/":
        return _text(start_response, "200 OK", "hello\n")
    if path == "/slow":
        seconds = float(query.get("s", ["1"])[0])
        time.sleep(seconds)
        return _text(start_response, "200 OK", f"slept {seconds}s\n")
    if path == "/stuck":
        while True:
            sum(range(1000))
    if path == "/stuck-c":
        hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 2**31 - 1)  # about half an hour of C
        return _text(start_response, "200 OK", "unreachable\n")
    if path == "/exit":
        os._exit(int(query.get("code", ["7"])[0]))  # not 3 or 4: gunicorn reads those as boot failures
    if path == "/error":
        raise RuntimeError("the example's /error endpoint raises on purpose")
    if path == "/echo":
        body = environ["wsgi.input"].read()  # a chunked body is parsed here, while the application reads it
        return _text(start_response, "200 OK", f"read {len(body)} bytes\n")
    if path.startswith("/status/"):
        code = int(path.rsplit("/", 1)[1])
        return _text(start_response, f"{code} Status", f"{code}\n")
    return _text(start_response, "404 Not Found", "not found\n")
