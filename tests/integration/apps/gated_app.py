"""A WSGI app the test holds back: its import waits for a file (a slow import the test ends), and /block waits
for another (a worker kept busy until the test releases it).

    GATED_APP_IMPORT_GATE=path   the import waits (at most 120 s) until ``path`` exists
    GATED_APP_RELEASE=path       /block waits (at most 120 s) until ``path`` exists
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

_LONGEST_WAIT = 120.0


def _wait_for(path: str | None) -> None:
    give_up = time.monotonic() + _LONGEST_WAIT
    while path and not os.path.exists(path) and time.monotonic() < give_up:
        time.sleep(0.05)


_wait_for(os.environ.get("GATED_APP_IMPORT_GATE"))


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/block":
        _wait_for(os.environ.get("GATED_APP_RELEASE"))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]
