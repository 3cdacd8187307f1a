"""A worker class that looks recorded but bypasses the request hooks is noticed at run time, once, by name."""

from __future__ import annotations

import json
import time

import pytest
from harness import APPS, start_gunicorn
from servers import ProcessFactory, wait_until
from test_cli_live import run_cli

UNSEEN = "accepted 10 connections and recorded no request"


def test_subclass_bypassing_the_hooks_is_named_once(process_factory: ProcessFactory) -> None:
    """A sync subclass whose handle_request skips the hooks: after 10 connections one warning names the class, and
    status marks the worker."""
    server = start_gunicorn(
        process_factory,
        worker_class="custom_worker.BypassingSyncWorker",
        env={"PYTHONPATH": str(APPS)},
        workers=2,
    )
    assert "never calls gunicorn's pre_request" not in server.process.output()  # trusted at startup

    def told() -> bool:
        assert server.get("/") == 200
        time.sleep(0.05)  # spread the connections over time: the worker waits a second after the first
        return UNSEEN in server.process.output()

    wait_until(told, timeout=60, what="the unseen-requests warning", dump=server.process.describe)
    for _ in range(30):  # both workers have now seen enough: still one warning
        assert server.get("/") == 200
    server.process.wait_for_log(r"worker class custom_worker\.BypassingSyncWorker does not call", timeout=5)
    time.sleep(1.5)  # master rounds (0.1 s each here) that would log a second warning, if any did
    output = server.process.output()
    assert output.count(UNSEEN) == 1, output
    assert "self.cfg.pre_request(self, req)" in output
    status = run_cli("status", "--pid", str(server.pid), "--json")
    assert status.returncode == 0, status.stderr
    marked = [worker for worker in json.loads(status.stdout)["workers"] if "requests_unseen" in worker["marks"]]
    assert marked, status.stdout  # status says which worker, next to its "served 0"
    assert all(worker["served"] == 0 for worker in marked)


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_recorded_classes_never_get_the_runtime_warning(worker_class: str, process_factory: ProcessFactory) -> None:
    """No false alarm: a class that calls the hooks serves many connections without the unseen-requests warning."""
    server = start_gunicorn(process_factory, worker_class=worker_class, workers=1)
    started = time.monotonic()
    served = 0
    while served < 30 or time.monotonic() - started < 2:
        assert server.get("/") == 200
        served += 1
    server.wait_for_value("gunicorn_requests_total", served)
    assert "recorded no request" not in server.process.output()
