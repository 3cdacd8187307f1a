"""Prometheus export end to end: real gunicorn, real requests, a real Prometheus server scraping /metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
from harness import start_gunicorn
from servers import ProcessFactory, PrometheusFactory, wait_until

WORKER_CLASSES = ["sync", "gthread", "gevent"]


@pytest.mark.oldest
@pytest.mark.parametrize("worker_class", WORKER_CLASSES)
def test_prometheus_server_sees_the_exact_request_count(
    worker_class: str, process_factory: ProcessFactory, prometheus_factory: PrometheusFactory
) -> None:
    """A real Prometheus scraping the embedded /metrics answers PromQL with exactly the requests sent."""
    threads = ["--threads", "4"] if worker_class == "gthread" else []  # --threads turns sync into gthread
    server = start_gunicorn(process_factory, worker_class=worker_class, args=threads, interval=None)
    for _ in range(30):
        assert server.get("/") == 200
    for _ in range(7):
        assert server.get("/status/404?token=secret") == 404
    prometheus = prometheus_factory([f"127.0.0.1:{server.metrics_port}"], scrape_interval=0.5)

    def answered(query: str, expected: float) -> None:
        wait_until(
            lambda: prometheus.query_value(query) == expected,
            timeout=30,
            what=f"{query} == {expected}",
            dump=lambda: f"got {prometheus.query_value(query)}",
        )

    answered("sum(gunicorn_requests_total)", 37)
    answered('sum(gunicorn_requests_total{method="GET",status="404"})', 7)
    answered("sum(gunicorn_request_duration_seconds_count)", 37)
    answered('sum(gunicorn_request_duration_seconds_bucket{le="+Inf"})', 37)
    answered("gunicorn_workers", 2)
    answered("gunicorn_requests_in_flight", 0)
    assert "secret" not in server.metrics_text()


@pytest.mark.parametrize("compiled", ["true", "false"])
def test_either_request_hooks_count_every_request(compiled: str, process_factory: ProcessFactory) -> None:
    """The compiled hooks (the default) and the Python ones count the same requests; the startup line says which."""
    from gunicorn_insight._worker import recorder

    if compiled == "true" and recorder.COMPILED is None and not os.environ.get("INSIGHT_TEST_REQUIRE_COMPILED"):
        pytest.skip("gunicorn_insight._worker._speedups was not built (no compiler at install time)")
    server = start_gunicorn(process_factory, env={"GUNICORN_INSIGHT_COMPILED_HOOKS": compiled})
    for _ in range(9):
        assert server.get("/") == 200
    for _ in range(4):
        assert server.get("/status/404?token=secret") == 404
    assert server.total("gunicorn_requests_total") == 13
    assert server.total("gunicorn_requests_total", status="404") == 4
    expected = "compiled request hooks" if compiled == "true" else "python request hooks"
    assert expected in server.process.output()


def test_scrape_is_fresh_and_never_double_counts(process_factory: ProcessFactory) -> None:
    """Each scrape drains the scoreboard first (at the default interval): counts are exact at once and stable
    across scrapes."""
    server = start_gunicorn(process_factory, interval=None)
    for _ in range(12):
        server.get("/")
    assert server.total("gunicorn_requests_total") == 12
    assert server.total("gunicorn_requests_total") == 12
    assert server.value("gunicorn_request_duration_seconds_bucket", method="GET", le="+Inf") == 12


def test_request_in_flight_is_a_gauge(process_factory: ProcessFactory) -> None:
    """A slow request shows as in flight while it runs, on the worker's connection gauge too."""
    import threading

    server = start_gunicorn(process_factory, workers=1)
    thread = threading.Thread(target=server.get, args=("/slow?s=3",))
    thread.start()
    try:
        server.wait_for_value("gunicorn_requests_in_flight", 1)
        server.wait_for_value("gunicorn_worker_connections", 1, worker="0")
        assert server.value("gunicorn_worker_connections_limit") == 1
    finally:
        thread.join()
    server.wait_for_value("gunicorn_requests_in_flight", 0)


def test_application_metrics_are_served_with_the_plugins(process_factory: ProcessFactory) -> None:
    """The app's own prometheus_client counter shares the directory and the endpoint with ours."""
    from harness import APPS

    server = start_gunicorn(process_factory, app="metrics_app:app", cwd=APPS)
    for _ in range(5):
        server.get("/")
    assert server.total("app_hits_total") == 5
    assert server.total("gunicorn_requests_total") == 5


def test_asgi_worker_counts_requests(process_factory: ProcessFactory) -> None:
    """On the asgi worker requests are counted; the status is known when gunicorn's access log is on."""
    from harness import APPS, GUNICORN_VERSION

    if GUNICORN_VERSION < (24, 0):
        pytest.fail("the asgi worker needs gunicorn >= 24; this test is not marked oldest")
    server = start_gunicorn(
        process_factory,
        app="asgi_app:app",
        worker_class="asgi",
        cwd=APPS,
        workers=1,
        args=["--access-logfile", "/dev/null"],
    )
    for _ in range(6):
        server.get("/")
    assert server.value("gunicorn_requests_total", method="GET", status="201") == 6


MODULES_CONFIG = """
import json, sys
import gunicorn_insight

def when_ready(server):
    with open({marks!r}, "w") as marks:
        json.dump({{name: name in sys.modules for name in ("prometheus_client", "http.server", "wsgiref")}}, marks)

gunicorn_insight.install(globals())
"""


def test_master_serves_metrics_without_importing_prometheus_client(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """prometheus_client and the HTTP stack stay out of the master (and so out of every worker it forks)."""
    marks = tmp_path / "modules.json"
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(MODULES_CONFIG.format(marks=str(marks)))
    server = start_gunicorn(process_factory, config=str(config))
    server.get("/")
    assert server.total("gunicorn_requests_total") == 1
    assert json.loads(marks.read_text()) == {"prometheus_client": False, "http.server": False, "wsgiref": False}


@pytest.mark.oldest
def test_metrics_process_exits_when_the_master_is_killed(process_factory: ProcessFactory) -> None:
    """SIGKILL the master: its /metrics process sees the socket close, exits, and frees the port."""
    server = start_gunicorn(process_factory, workers=1)
    metrics_pid = server.metrics_pid()
    assert server.metrics_port is not None
    assert server.total("gunicorn_workers") == 1
    os.kill(server.pid, signal.SIGKILL)
    wait_until(
        lambda: not Path(f"/proc/{metrics_pid}").exists() or _zombie(metrics_pid),
        timeout=20,
        what="the /metrics process to exit after its master was killed",
        dump=server.process.describe,
    )
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", server.metrics_port))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_whole_group_stops_gunicorn_without_restarting_metrics(
    sig: int, process_factory: ProcessFactory
) -> None:
    """Ctrl-C (SIGINT) or a supervisor's SIGTERM to gunicorn's process group: no restart, no trace of ours.

    (gunicorn's sync worker may log its own traceback when SIGINT lands while it accepts a connection.)"""
    server = start_gunicorn(process_factory, workers=1)
    metrics_pid = server.metrics_pid()
    server.process.stop(sig)
    wait_until(
        lambda: not Path(f"/proc/{metrics_pid}").exists() or _zombie(metrics_pid),
        timeout=20,
        what="the /metrics process to exit with its master",
        dump=server.process.describe,
    )
    output = server.process.output()
    assert "restarting it" not in output
    assert "gunicorn_insight/_export/metrics_process.py" not in output
    assert "KeyboardInterrupt" not in output


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
