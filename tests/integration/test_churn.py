"""Worker churn (max_requests=1): no count lost, the multiprocess directory stays bounded."""

from __future__ import annotations

import glob
import os
from concurrent.futures import ThreadPoolExecutor

from harness import APPS, Gunicorn, start_gunicorn
from servers import ProcessFactory

REQUESTS = 2000


def test_churn_loses_no_count_and_keeps_files_bounded(process_factory: ProcessFactory) -> None:
    """2,000 requests, each on a fresh worker: plugin and app totals are exact, dead workers' files merged."""
    server = start_gunicorn(process_factory, app="metrics_app:app", cwd=APPS, workers=4,
                            args=["--max-requests", "1"])
    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(lambda _: server.get("/"), range(REQUESTS)))
    assert statuses == [200] * REQUESTS
    server.wait_for_value("gunicorn_requests_total", REQUESTS)
    server.wait_for_value("app_hits_total", REQUESTS)
    server.wait_for_value("gunicorn_request_duration_seconds_count", REQUESTS)
    assert server.value("gunicorn_insight_lost_requests_total") == 0
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(prometheus_dir(server), "*.db")))
    # The master's three files, one archive, and one file per live worker (4): never one set per dead pid.
    assert len(files) <= 8, files
    assert server.process.output().count("Booting worker") > REQUESTS * 0.9


def prometheus_dir(server: Gunicorn) -> str:
    """The embedded default keeps the multiprocess files next to the scoreboard."""
    return os.path.join(os.path.dirname(server.scoreboard_path), "prometheus")
