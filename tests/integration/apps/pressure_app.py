"""``/burn?s=N`` spins on the CPU for N seconds of wall time (a CPU-bound request), ``/slow?s=N`` sleeps N
seconds, ``/hold?n=N`` opens N more handles on /dev/null and keeps them (a descriptor leak), anything else
answers at once. ``CrashingWorker``: a sync worker that dies of an exception soon after
it has booted, every time (a crash loop). With ``PRESSURE_APP_IMPORT_SECONDS`` set, importing the module takes
that long (a slow-to-import application: its workers stay booting meanwhile)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from gunicorn.workers.sync import SyncWorker

time.sleep(float(os.environ.get("PRESSURE_APP_IMPORT_SECONDS", "0")))
HELD: list[Any] = []


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["1"])[0])
    if path == "/burn":
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sum(range(10000))
    elif path == "/slow":
        time.sleep(seconds)
    elif path == "/hold":
        HELD.extend(open(os.devnull) for _ in range(int(parse_qs(environ["QUERY_STRING"])["n"][0])))  # noqa: SIM115 -- a leak on purpose
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]


class CrashingWorker(SyncWorker):  # type: ignore[misc]  # gunicorn ships no type information
    def run(self) -> None:
        time.sleep(0.3)
        raise RuntimeError("lost the database connection pool")
