"""Reference row: the minimal prometheus_client multiprocess recipe, as found in many gunicorn configs.

One Counter and one Histogram, updated from gunicorn's request hooks. ``PROMETHEUS_MULTIPROC_DIR`` must be
set before gunicorn starts (the benchmark points it at a fresh temporary directory), because
prometheus_client picks its storage when it is first imported, here, in the master.
Nothing serves the metrics: the row measures the cost of recording them on the request path.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Histogram, multiprocess

REQUESTS = Counter("http_requests", "Requests served.")
DURATION = Histogram("http_request_duration_seconds", "Time from pre_request to post_request.")


def pre_request(worker: Any, req: Any) -> None:
    req.bench_started = time.perf_counter()


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    REQUESTS.inc()
    DURATION.observe(time.perf_counter() - req.bench_started)


def child_exit(server: Any, worker: Any) -> None:
    multiprocess.mark_process_dead(worker.pid)  # part of the documented recipe (drops live-gauge files)
