"""A WSGI app whose /lock requests take an exclusive lock on one file several servers share (a stand-in for a
database row, an advisory lock or a lock file): while the test holds it, every /lock request waits.

    SHARED_LOCK=path   the file /lock locks
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterable
from typing import Any


def take_the_shared_lock(path: str) -> None:
    with open(path, "a") as shared:
        fcntl.flock(shared, fcntl.LOCK_EX)
        fcntl.flock(shared, fcntl.LOCK_UN)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/lock":
        take_the_shared_lock(os.environ["SHARED_LOCK"])
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]
