"""Prometheus export end to end: real gunicorn, real requests, a real Prometheus server scraping /metrics."""

from __future__ import annotations

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
    server = start_gunicorn(process_factory, worker_class=worker_class, args=threads)
    for _ in range(30):
        assert server.get("/") == 200
    for _ in range(7):
        assert server.get("/status/404?token=secret") == 404
    prometheus = prometheus_factory([f"127.0.0.1:{server.metrics_port}"], scrape_interval=0.5)

    def answered(query: str, expected: float) -> None:
        wait_until(lambda: prometheus.query_value(query) == expected, timeout=30,
                   what=f"{query} == {expected}", dump=lambda: f"got {prometheus.query_value(query)}")

    answered("sum(gunicorn_requests_total)", 37)
    answered('sum(gunicorn_requests_total{method="GET",status="404"})', 7)
    answered("sum(gunicorn_request_duration_seconds_count)", 37)
    answered('sum(gunicorn_request_duration_seconds_bucket{le="+Inf"})', 37)
    answered("gunicorn_workers", 2)
    answered("gunicorn_requests_in_flight", 0)
    assert "secret" not in server.metrics_text()


def test_scrape_is_fresh_and_never_double_counts(process_factory: ProcessFactory) -> None:
    """Each scrape drains the scoreboard first: counts are exact at once and stable across scrapes."""
    server = start_gunicorn(process_factory)
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
    server = start_gunicorn(process_factory, app="asgi_app:app", worker_class="asgi", cwd=APPS, workers=1,
                            args=["--access-logfile", "/dev/null"])
    for _ in range(6):
        server.get("/")
    assert server.value("gunicorn_requests_total", method="GET", status="201") == 6
