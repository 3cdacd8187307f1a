"""CPU time against waiting time: gunicorn_request_cpu_seconds_total tells a computing endpoint from a waiting one."""

from __future__ import annotations

import pytest
from harness import APPS, Gunicorn, start_gunicorn
from servers import ProcessFactory


def cpu_and_duration(server: Gunicorn) -> tuple[float, float]:
    return (
        server.total("gunicorn_request_cpu_seconds_total"),
        server.total("gunicorn_request_duration_seconds_sum"),
    )


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_a_cpu_bound_endpoint_and_a_waiting_one_are_told_apart(
    process_factory: ProcessFactory, worker_class: str
) -> None:
    """CPU seconds over duration seconds: near 1 for requests that spin, near 0 for requests that sleep."""
    server = start_gunicorn(
        process_factory,
        app="pressure_app:app",
        cwd=APPS,
        worker_class=worker_class,
        workers=1,
        args=["--threads", "2"] if worker_class == "gthread" else [],
    )
    for _ in range(3):
        assert server.get("/burn?s=0.3", timeout=60) == 200
    server.wait_for_value("gunicorn_requests_total", 3, timeout=60, method="GET", status="200")
    burn_cpu, burn_duration = cpu_and_duration(server)
    for _ in range(3):
        assert server.get("/slow?s=0.3", timeout=60) == 200
    server.wait_for_value("gunicorn_requests_total", 6, timeout=60, method="GET", status="200")
    cpu, duration = cpu_and_duration(server)
    sleep_cpu, sleep_duration = cpu - burn_cpu, duration - burn_duration
    burn_share, sleep_share = burn_cpu / burn_duration, sleep_cpu / sleep_duration
    print(f"{worker_class}: CPU share of request time: burn {burn_share:.3f}, sleep {sleep_share:.4f}")
    assert server.value("gunicorn_request_cpu_seconds_total", method="GET", status="200") == cpu
    assert 0 < burn_share <= 1.05, burn_share
    assert sleep_share < 0.1, sleep_share
    assert burn_share > 5 * sleep_share, (burn_share, sleep_share)


def test_the_asgi_worker_shares_its_cpu_among_its_requests(process_factory: ProcessFactory) -> None:
    """Where requests share a thread, the worker's CPU while they run goes to the requests it finished (not
    its boot, not its idle time): the computing endpoint gets most of it, the awaiting one almost none."""
    server = start_gunicorn(process_factory, app="asgi_app:app", cwd=APPS, worker_class="asgi", workers=1)
    worker_before = server.total("gunicorn_worker_cpu_seconds_total")
    for _ in range(2):
        assert server.get("/burn", timeout=60) == 201
    server.wait_for_value("gunicorn_requests_total", 2, timeout=60, method="GET", status="201")
    burn_cpu, burn_duration = cpu_and_duration(server)
    worker_used = server.total("gunicorn_worker_cpu_seconds_total") - worker_before
    assert server.get("/slow", timeout=60) == 201
    server.wait_for_value("gunicorn_requests_total", 3, timeout=60, method="GET", status="201")
    cpu, duration = cpu_and_duration(server)
    burn_share, sleep_share = burn_cpu / burn_duration, (cpu - burn_cpu) / (duration - burn_duration)
    print(f"asgi: CPU share of request time: burn {burn_share:.3f}, await {sleep_share:.4f}")
    assert 0.8 * worker_used <= burn_cpu <= worker_used + 0.05, (burn_cpu, worker_used)
    assert sleep_share < 0.1, sleep_share
    assert burn_share > 5 * sleep_share, (burn_share, sleep_share)
