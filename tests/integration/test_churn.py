"""Worker churn (max_requests=1): no count lost, the multiprocess directory stays bounded."""

from __future__ import annotations

import glob
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from harness import APPS, Gunicorn, start_gunicorn
from servers import ProcessFactory


def churn(process_factory: ProcessFactory, requests: int) -> None:
    """`requests` requests, each on a fresh worker (4 at a time); every count arrives, files stay bounded."""
    server = start_gunicorn(process_factory, app="metrics_app:app", cwd=APPS, workers=4, args=["--max-requests", "1"])
    with ThreadPoolExecutor(max_workers=4) as pool:
        statuses = list(pool.map(lambda _: server.get("/"), range(requests)))
    assert statuses == [200] * requests
    server.wait_for_value("gunicorn_requests_total", requests)
    server.wait_for_value("app_hits_total", requests)
    server.wait_for_value("gunicorn_request_duration_seconds_count", requests)
    assert server.value("gunicorn_insight_lost_requests_total") == 0
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(prometheus_dir(server), "*.db")))
    # The master's three files, one archive, and one file per live worker (4): never one set per dead pid.
    assert len(files) <= 8, files
    assert server.process.output().count("Booting worker") > requests * 0.9


def test_churn_loses_no_count_and_keeps_files_bounded(process_factory: ProcessFactory) -> None:
    """40 requests, each on a fresh worker: plugin and app totals are exact, dead workers' files merged."""
    churn(process_factory, 40)


@pytest.mark.slow
def test_long_churn_loses_no_count_and_keeps_files_bounded(process_factory: ProcessFactory) -> None:
    """The same over 2,000 fresh workers (3.5 minutes on 2 cores): nothing accumulates over time."""
    churn(process_factory, 2000)


def prometheus_dir(server: Gunicorn) -> str:
    """The embedded default keeps the multiprocess files next to the scoreboard."""
    return os.path.join(os.path.dirname(server.scoreboard_path), "prometheus")
