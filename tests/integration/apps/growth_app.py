"""A WSGI app whose requests hold memory while the test lets them, or leave something behind.

/hold?mb=N     allocates N MiB (every page written), keeps it until ``GROWTH_APP_RELEASE`` exists
               (at most 120 s), then frees it
/leak-file     opens this file and never closes it: one more open file descriptor per request
/leak-thread   starts a thread that never ends: one more thread per request
anything else  answers at once and keeps nothing
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

_LONGEST_WAIT = 120.0
_PAGE = 4096
LEAKED_FILES: list[IO[bytes]] = []
_NEVER = threading.Event()


def _hold(megabytes: int) -> None:
    held = bytearray(megabytes << 20)
    held[::_PAGE] = b"x" * (len(held) // _PAGE)  # written, so the pages are resident
    release = os.environ.get("GROWTH_APP_RELEASE")
    give_up = time.monotonic() + _LONGEST_WAIT
    while release and not os.path.exists(release) and time.monotonic() < give_up:
        time.sleep(0.05)
    del held


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ["PATH_INFO"]
    if path == "/hold":
        _hold(int(environ.get("QUERY_STRING", "mb=0").partition("=")[2] or 0))
    elif path == "/leak-file":
        LEAKED_FILES.append(open(__file__, "rb"))  # noqa: SIM115  # the leak is the point
    elif path == "/leak-thread":
        threading.Thread(target=_NEVER.wait, daemon=True).start()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]
