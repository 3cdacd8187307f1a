"""StatsD export end to end: real gunicorn, real requests, the reference statsd daemon counting."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import start_gunicorn
from servers import ProcessFactory, StatsdDaemon, free_udp_port, wait_until


def rounds_pass(daemon: StatsdDaemon, count: int = 2) -> None:
    """Wait until the exporter has sent `count` more rounds (each round sends gauges, so packets arrive)."""
    start = daemon.counters().get("statsd.packets_received", 0)
    wait_until(
        lambda: daemon.counters().get("statsd.packets_received", 0) >= start + count,
        timeout=30,
        what=f"{count} more StatsD rounds",
        dump=daemon.dump,
    )


@pytest.mark.oldest
@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent"])
def test_statsd_daemon_gets_exact_counts_and_timings(
    worker_class: str, process_factory: ProcessFactory, statsd_daemon: StatsdDaemon
) -> None:
    """Every request is one count and one timer at the real daemon; per-worker gauges keep separate names."""
    host, port = statsd_daemon.udp_address
    threads = ["--threads", "3"] if worker_class == "gthread" else []  # --threads turns sync into gthread
    server = start_gunicorn(
        process_factory,
        worker_class=worker_class,
        metrics=False,
        env={"GUNICORN_INSIGHT_STATSD": f"{host}:{port}"},
        args=threads,
    )
    for _ in range(25):
        assert server.get("/") == 200
    for _ in range(3):
        assert server.get("/status/503") == 503
    wait_until(
        lambda: statsd_daemon.counters().get("gunicorn.requests") == 28,
        timeout=30,
        what="gunicorn.requests == 28",
        dump=lambda: repr(statsd_daemon.counters()),
    )
    rounds_pass(statsd_daemon)
    counters = statsd_daemon.counters()
    assert counters["gunicorn.requests"] == 28
    assert counters["gunicorn.request.status.200"] == 25
    assert counters["gunicorn.request.status.503"] == 3
    assert statsd_daemon.timer_counts()["gunicorn.request.duration"] == 28
    assert all(0 <= ms < 5000 for ms in statsd_daemon.timers()["gunicorn.request.duration"])
    gauges = statsd_daemon.gauges()
    assert gauges["gunicorn.workers"] == 2
    assert {"gunicorn.worker.0.connections", "gunicorn.worker.1.connections", "gunicorn.connections"} <= set(gauges)
    assert statsd_daemon.bad_lines() == 0


def test_timers_over_the_cap_reach_the_daemon_as_a_marked_sample(
    process_factory: ProcessFactory, statsd_daemon: StatsdDaemon
) -> None:
    """With statsd_timers_per_second low, the daemon gets fewer timer values than requests, marked with their
    rate (no bad lines), while the request counter stays exact."""
    host, port = statsd_daemon.udp_address
    server = start_gunicorn(
        process_factory,
        metrics=False,
        env={
            "GUNICORN_INSIGHT_STATSD": f"{host}:{port}",
            "GUNICORN_INSIGHT_STATSD_TIMERS_PER_SECOND": "4",
            "GUNICORN_INSIGHT_INTERVAL": "1",
        },
    )
    for _ in range(80):
        assert server.get("/") == 200
    wait_until(
        lambda: statsd_daemon.counters().get("gunicorn.requests") == 80,
        timeout=30,
        what="gunicorn.requests == 80",
        dump=lambda: repr(statsd_daemon.counters()),
    )
    rounds_pass(statsd_daemon)
    assert 2 <= statsd_daemon.timer_counts()["gunicorn.request.duration"] < 80
    assert statsd_daemon.bad_lines() == 0


@pytest.mark.oldest
def test_gunicorn_statsd_settings_are_reused_without_double_counting(
    process_factory: ProcessFactory, statsd_daemon: StatsdDaemon
) -> None:
    """With only gunicorn's --statsd-host/--statsd-prefix set, we add our gauges and never re-count requests."""
    host, port = statsd_daemon.udp_address
    server = start_gunicorn(
        process_factory, metrics=False, args=["--statsd-host", f"{host}:{port}", "--statsd-prefix", "shop"]
    )
    for _ in range(10):
        server.get("/")
    wait_until(
        lambda: statsd_daemon.counters().get("shop.gunicorn.requests") == 10,
        timeout=30,
        what="shop.gunicorn.requests == 10",
        dump=lambda: repr(statsd_daemon.counters()),
    )
    rounds_pass(statsd_daemon, 3)
    assert statsd_daemon.counters()["shop.gunicorn.requests"] == 10
    assert statsd_daemon.timer_counts()["shop.gunicorn.request.duration"] == 10
    gauges = statsd_daemon.gauges()
    assert gauges["shop.gunicorn.workers"] == 2
    assert "shop.gunicorn.worker.0.connections" in gauges


def test_aggregator_down_then_up_resumes_without_hurting_the_server(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """Requests keep flowing while nothing listens; counting resumes by itself when the daemon appears."""
    port = free_udp_port()
    server = start_gunicorn(process_factory, metrics=False, env={"GUNICORN_INSIGHT_STATSD": f"127.0.0.1:{port}"})
    for _ in range(20):
        assert server.get("/") == 200
    with StatsdDaemon(tmp_path / "late-statsd", extra_config={"port": port}) as daemon:
        for _ in range(5):
            assert server.get("/") == 200
        wait_until(
            lambda: daemon.counters().get("gunicorn.requests", 0) >= 5,
            timeout=30,
            what="counts after the daemon came back",
            dump=daemon.dump,
        )
    assert "Traceback" not in server.process.output()


@pytest.mark.oldest
def test_dogstatsd_mode_sends_the_names_datadogs_gunicorn_integration_reads(
    process_factory: ProcessFactory, statsd_daemon: StatsdDaemon
) -> None:
    """DogStatsD mode keeps Datadog's gunicorn names and types (gunicorn.requests, gunicorn.request.duration,
    gunicorn.request.status.<code>, gunicorn.workers by state) beside the tags, checked at the real daemon."""
    import threading

    host, port = statsd_daemon.udp_address
    server = start_gunicorn(
        process_factory,
        metrics=False,
        env={"GUNICORN_INSIGHT_STATSD": f"{host}:{port}"},
        args=["--dogstatsd-tags", "env:test"],
    )
    for _ in range(6):
        assert server.get("/") == 200
    for _ in range(2):
        assert server.get("/status/503") == 503
    slow = threading.Thread(target=server.get, args=("/slow?s=3",))
    slow.start()
    try:
        wait_until(
            lambda: statsd_daemon.gauges().get("gunicorn.workers;state=working;env=test") == 1,
            timeout=30,
            what="gunicorn.workers{state:working} == 1",
            dump=lambda: repr(statsd_daemon.gauges()),
        )
        assert statsd_daemon.gauges()["gunicorn.workers;state=idle;env=test"] == 1
    finally:
        slow.join()
    wait_until(
        lambda: statsd_daemon.counters().get("gunicorn.request.status.200;env=test") == 7,
        timeout=30,
        what="gunicorn.request.status.200{env:test} == 7",
        dump=lambda: repr(statsd_daemon.counters()),
    )
    rounds_pass(statsd_daemon)
    counters = statsd_daemon.counters()
    assert counters["gunicorn.request.status.503;env=test"] == 2
    assert counters["gunicorn.requests;method=GET;status=200;env=test"] == 7
    assert counters["gunicorn.requests;method=GET;status=503;env=test"] == 2
    assert statsd_daemon.timer_counts()["gunicorn.request.duration;method=GET;env=test"] == 9
    gauges = statsd_daemon.gauges()
    assert (gauges["gunicorn.workers;state=working;env=test"], gauges["gunicorn.workers;state=idle;env=test"]) == (0, 2)
    assert "gunicorn.workers;env=test" not in gauges
    assert statsd_daemon.bad_lines() == 0


LOG_LINES_CONFIG = """
import gunicorn_insight

def when_ready(server):
    server.log.warning("the master's own warning (test)")

def pre_request(worker, req):
    if req.path == "/status/202":  # the example app answers it; the hook logs as the worker
        worker.log.error("a worker's error (test)")
        worker.log.warning("a worker's warning (test)")

gunicorn_insight.install(globals())
"""


def log_lines_server(process_factory: ProcessFactory, tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
    """One worker that restarts after two requests: it logs an error and a warning, then a request raises
    (gunicorn logs the exception) and it is replaced; the next worker, in the same slot, logs again. The
    master logs one warning of its own."""
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(LOG_LINES_CONFIG)
    server = start_gunicorn(
        process_factory, config=str(config), workers=1, metrics=False, args=["--max-requests", "2", *args], env=env
    )
    first = server.worker_pids()
    assert server.get("/status/202") == 202
    assert server.get("/error") == 500
    assert server.get("/status/202") == 202
    assert server.worker_pids() != first, "the worker was not replaced after --max-requests 2"


@pytest.mark.oldest
def test_dogstatsd_mode_counts_gunicorns_log_lines_like_its_statsd_logger(
    process_factory: ProcessFactory, statsd_daemon: StatsdDaemon, tmp_path: Path
) -> None:
    """Without gunicorn's statsd logger, gunicorn.log.* counts the master's and the workers' lines exactly,
    across a worker replaced in the same slot."""
    host, port = statsd_daemon.udp_address
    log_lines_server(
        process_factory, tmp_path, ["--dogstatsd-tags", "env:test"], {"GUNICORN_INSIGHT_STATSD": f"{host}:{port}"}
    )
    expected = {"gunicorn.log.warning;env=test": 3, "gunicorn.log.error;env=test": 2}
    expected["gunicorn.log.exception;env=test"] = 1
    wait_until(
        lambda: {name: statsd_daemon.counters().get(name) for name in expected} == expected,
        timeout=30,
        what=f"{expected}",
        dump=lambda: repr(statsd_daemon.counters()),
    )
    rounds_pass(statsd_daemon, 3)
    counters = statsd_daemon.counters()
    assert {name: counters.get(name) for name in expected} == expected
    assert not [name for name in counters if name.startswith("gunicorn.log.critical")]


def test_gunicorns_statsd_logger_alone_counts_its_log_lines(
    process_factory: ProcessFactory, statsd_daemon: StatsdDaemon, tmp_path: Path
) -> None:
    """With gunicorn's --statsd-host, its statsd logger sends gunicorn.log.*; gunicorn-insight adds nothing."""
    host, port = statsd_daemon.udp_address
    log_lines_server(process_factory, tmp_path, ["--statsd-host", f"{host}:{port}"], {})
    expected = {"gunicorn.log.warning": 3, "gunicorn.log.error": 2, "gunicorn.log.exception": 1}
    wait_until(
        lambda: {name: statsd_daemon.counters().get(name) for name in expected} == expected,
        timeout=30,
        what=f"{expected}",
        dump=lambda: repr(statsd_daemon.counters()),
    )
    rounds_pass(statsd_daemon, 3)
    counters = statsd_daemon.counters()
    assert {name: counters.get(name) for name in expected} == expected
