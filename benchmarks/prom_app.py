"""Plain prometheus_client multiprocess mode, no plugin: the app counts requests and serves /metrics itself.

This is the comparison for the scrape-cost measurement (the plugin's run uses the same app, and scrapes
the plugin's /metrics instead). Each worker process writes its own ``counter_<pid>.db`` file in
``PROMETHEUS_MULTIPROC_DIR`` and nothing removes the files of dead workers, so under ``--max-requests``
churn the directory, and the scrape, grow with every restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from bench_ready import mark_booted
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

BODY = b"hello"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]
REQUESTS = Counter("app_requests", "Requests the application counted itself.")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    REQUESTS.inc()
    if environ.get("PATH_INFO") == "/metrics":
        # The documented recipe: a fresh registry per scrape, merged from every file in the directory.
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        data = generate_latest(registry)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(data)))])
        return [data]
    start_response("200 OK", HEADERS)
    return [BODY]


mark_booted()  # last: the Counter above has created this worker's file by now
