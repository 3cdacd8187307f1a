"""doctor --pid's judgements: each live check triggered by measured facts, and quiet when they are fine."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import fakes
import pytest

from gunicorn_insight._runfiles import Growth, HeldMemory, WorkerExit
from gunicorn_insight.cli import livedoctor
from gunicorn_insight.cli.hostfacts import GunicornOnHost
from gunicorn_insight.cli.livedoctor import Histogram, LiveFacts

MIB = 1 << 20


def facts(**changes: Any) -> LiveFacts:
    """A healthy server: 4 sync workers on 4 CPUs, half busy, computing half the time, 3 s watched."""
    base = LiveFacts(
        info=fakes.server_info("", timeout=30, max_requests=0, master_pid=1),
        window=3.0,
        samples=60,
        worker_class="sync",
        workers=4,
        per_worker=1,
        capacity=4,
        busy_now=2,
        utilisation=0.5,
        busy_seconds=6.0,
        cpu_seconds=3.0,
        cpus=4.0,
        rss=[100 * MIB] * 4,
        memory_used=500 * MIB,
        memory_limit=2048 * MIB,
    )
    return replace(base, **changes)


def an_exit(cause: str, request: str | None = None, elapsed: float | None = None) -> WorkerExit:
    """A recent exit as status.json holds it."""
    return WorkerExit(
        time=0.0,
        pid=10,
        slot=0,
        cause=cause,
        detail="",
        uptime=60.0,
        served=100,
        rss=0,
        request=request,
        elapsed=elapsed,
    )


def checks(check: livedoctor.LiveCheck, measured: LiveFacts) -> list[tuple[str, str]]:
    return [(finding.check, finding.severity) for finding in check(measured)]


def test_healthy_server_has_no_findings() -> None:
    """Nothing saturated, queued, CPU-bound, near its memory limit or timed out: no finding at all."""
    assert livedoctor.run_live_checks(facts()) == []


@pytest.mark.parametrize(
    ("changes", "advice"),
    [
        ({"cpu_seconds": 0.3}, "switch to gthread"),
        ({"cpu_seconds": 0.3, "worker_class": "gthread", "per_worker": 4}, "raise threads (threads=4 now, e.g. 8)"),
        ({"cpu_seconds": 5.4, "workers": 2, "capacity": 2}, "raise workers to about 5"),
        ({"cpu_seconds": 11.5}, "more workers will not help"),
    ],
)
def test_saturation_advice_follows_what_requests_do(changes: dict[str, Any], advice: str) -> None:
    """Saturated: waiting requests -> threads or a worker class; computing with CPUs left -> workers; CPUs full
    -> not more workers."""
    measured = facts(utilisation=0.97, busy_now=4, **changes)
    (finding,) = livedoctor.check_saturation(measured)
    assert finding.check == "live-saturation"
    assert "utilisation 97%" in finding.what
    assert advice in finding.fix


def test_saturation_quiet_below_the_threshold() -> None:
    """Utilisation of 85% is busy but not saturated."""
    assert checks(livedoctor.check_saturation, facts(utilisation=0.85)) == []


def test_backlog_and_overflows() -> None:
    """A queue seen during the window is a warning; connections dropped on a full queue an error."""
    queued = facts(backlog_peak=5, backlog_limit=128, backlog_listener="http://0.0.0.0:8000")
    (finding,) = livedoctor.check_backlog(queued)
    assert finding.severity == "warning"
    assert "up to 5 connections waited in the accept queue of http://0.0.0.0:8000 (limit 128)" in finding.what
    assert checks(livedoctor.check_backlog, facts(listen_overflows=3)) == [("live-backlog", "error")]
    assert checks(livedoctor.check_backlog, facts()) == []


def test_a_listeners_own_drops_are_judged_before_the_hosts_overflows() -> None:
    """Drops counted at gunicorn's listener name it and are an error; with a count per listener, the host's
    overflows (another server's queue, maybe) are no evidence against gunicorn."""
    (finding,) = livedoctor.check_backlog(facts(listen_drops={"http://0.0.0.0:8000": 7}, listen_overflows=9))
    assert finding.severity == "error"
    assert "dropped 7 connection attempts at http://0.0.0.0:8000" in finding.what
    assert "9" not in finding.what
    assert checks(livedoctor.check_backlog, facts(listen_drops={"http://0.0.0.0:8000": 0}, listen_overflows=9)) == []


def test_queue_time() -> None:
    """A mean wait of 250 ms is a finding; 20 ms is not; no Prometheus files means nothing is judged."""
    slow = facts(queue_window=Histogram(count=10, total=2.5), queue_total=Histogram(count=100, total=3.0))
    (finding,) = livedoctor.check_queue_time(slow)
    assert "waited 250 ms on average" in finding.what
    assert "10 requests during the window" in finding.what
    fast = facts(queue_window=Histogram(count=10, total=0.2), queue_total=Histogram(count=10, total=0.2))
    assert checks(livedoctor.check_queue_time, fast) == []
    assert checks(livedoctor.check_queue_time, facts()) == []


def test_queue_time_falls_back_to_since_start() -> None:
    """No request during the window: the totals since the server started are judged, and it says so."""
    measured = facts(queue_window=Histogram(), queue_total=Histogram(count=4, total=2.0))
    (finding,) = livedoctor.check_queue_time(measured)
    assert "4 requests since the server started" in finding.what


def test_cpu_bound_server() -> None:
    """Workers using 3.8 of 4 CPUs: a warning; 2 of 4: quiet."""
    (finding,) = livedoctor.check_cpu(facts(cpu_seconds=11.4))
    assert "used 3.80 of the 4 CPUs" in finding.what
    assert checks(livedoctor.check_cpu, facts(cpu_seconds=6.0)) == []


def test_memory_near_the_cgroup_limit() -> None:
    """90% of the limit: a warning saying how many workers fit, and max_requests when it is off."""
    (finding,) = livedoctor.check_memory(facts(memory_used=1843 * MIB, workers=8, rss=[200 * MIB] * 8))
    assert finding.severity == "warning"
    assert "uses 1843 MiB (working set) of its 2048 MiB limit (90%); 8 workers at 200 MiB each" in finding.what
    assert "about 6 workers of 200 MiB fit in 80% of the limit" in finding.fix
    assert "set max_requests" in finding.fix
    assert (
        "max_requests"
        not in next(
            iter(
                livedoctor.check_memory(
                    facts(memory_used=1843 * MIB, info=fakes.server_info("", timeout=30, max_requests=1000))
                )
            )
        ).fix
    )


def test_memory_quiet_below_the_limit_or_without_one() -> None:
    """Half the limit, or no limit at all: nothing to say."""
    assert checks(livedoctor.check_memory, facts()) == []
    assert checks(livedoctor.check_memory, facts(memory_limit=None, memory_used=None)) == []


def test_oom_kills_are_an_error() -> None:
    """A recent exit with cause oom is an error, naming the request in flight."""
    measured = facts(recent_exits=(an_exit("oom", "POST /upload"),))
    (finding,) = livedoctor.check_memory(measured)
    assert finding.severity == "error"
    assert "POST /upload" in finding.what


def test_timeout_below_the_slowest_requests() -> None:
    """Workers killed by timeout: a warning naming the request and its elapsed time; fix: raise timeout."""
    measured = facts(recent_exits=(an_exit("graceful"), an_exit("timeout", "GET /report", 30.4)))
    (finding,) = livedoctor.check_timeout(measured)
    assert finding.severity == "warning"
    assert "1 worker killed by timeout=30s recently (last: GET /report after 30.4s)" in finding.what
    assert "raise timeout" in finding.fix


def test_slow_requests_and_overdue_requests() -> None:
    """Slow requests alone are info; a request in flight past timeout (gthread never kills it) a warning."""
    assert checks(livedoctor.check_timeout, facts(slow_requests=3)) == [("live-timeout", "info")]
    overdue = facts(worker_class="gthread", oldest_request=("GET /hang", 95.0))
    (finding,) = livedoctor.check_timeout(overdue)
    assert finding.severity == "warning"
    assert "GET /hang has been running 95.0s, past timeout=30s" in finding.what


def test_timeout_quiet_when_nothing_was_slow() -> None:
    """No timed-out exit, no slow request, nothing overdue: quiet."""
    assert checks(livedoctor.check_timeout, facts(oldest_request=("GET /", 0.2))) == []


def test_a_host_nearly_out_of_memory_names_every_gunicorn_on_it() -> None:
    """MemAvailable under 10% of MemTotal: live-host-memory with the host's figures, every gunicorn server's
    memory and this one's; 10% or more, or no /proc/meminfo: nothing."""
    on_host = GunicornOnHost(servers=3, processes=14, rss=700 * MIB)
    low = facts(host_memory=(1024 * MIB, 60 * MIB), host_gunicorn=on_host)
    (finding,) = [found for found in livedoctor.run_live_checks(low) if found.check == "live-host-memory"]
    assert finding.severity == "warning"
    assert finding.what == (
        "the host has 60 MiB of 1024 MiB available (6%); 3 gunicorn servers on this host use 700 MiB in 14 "
        "processes, this server's 4 workers 400 MiB"
    )
    assert "--preload" in finding.fix
    for quiet in (facts(host_memory=(1024 * MIB, 200 * MIB), host_gunicorn=on_host), facts(host_memory=None)):
        assert "live-host-memory" not in {found.check for found in livedoctor.run_live_checks(quiet)}


def a_held(bytes_per_request: int, idle_bytes: int = 30 * MIB) -> HeldMemory:
    """The master's estimate as status.json holds it."""
    return HeldMemory(
        slot=0,
        pid=10,
        bytes_per_request=bytes_per_request,
        idle_bytes=idle_bytes,
        requests_low=0,
        requests_high=10,
        rounds=40,
        correlation=0.99,
        measured=0.0,
    )


def test_memory_per_request_is_projected_to_the_concurrency_limit() -> None:
    """4 gevent workers at worker_connections=100 holding 4 MiB per request reach 430 MiB each, 1720 MiB in
    all, past 80% of a 2 GiB limit: a warning saying how many requests fit; no estimate: nothing."""
    gevent = facts(worker_class="gevent", per_worker=100, capacity=400)
    assert checks(livedoctor.check_memory_per_request, gevent) == []
    (finding,) = livedoctor.check_memory_per_request(replace(gevent, held_memory=(a_held(4 * MIB),)))
    assert finding.severity == "warning"
    assert "each request held open costs about 4.0 MiB in worker pid=10 slot=0" in finding.what
    assert "at worker_connections=100 a worker could reach 430 MiB" in finding.what
    assert "4 workers at that size: 1720 MiB in all, against the cgroup's memory limit of 2048 MiB" in finding.what
    # 80% of 2048 MiB over 4 workers is 409.6 MiB each; less the 30 MiB idle, 94 requests of 4 MiB fit.
    assert finding.fix.startswith("lower worker_connections to what memory allows (about 94 keep 4 workers")
    small = livedoctor.check_memory_per_request(replace(gevent, held_memory=(a_held(MIB // 2),)))
    assert [item.severity for item in small] == ["info"]
    threads = facts(worker_class="gthread", per_worker=8, capacity=32, held_memory=(a_held(4 * MIB),))
    (finding,) = livedoctor.check_memory_per_request(threads)
    assert "at threads=8 a worker could reach 62 MiB" in finding.what


def test_growth_found_by_the_master_is_a_leak_finding() -> None:
    """Descriptors growing per request served: live-leak with the evidence and where to look; none: nothing."""
    assert checks(livedoctor.check_growth, facts()) == []
    growth = Growth(
        slot=1, pid=11, resource="open_fds", at_ready=50, now=550, served=500, per_1000=1000.0, kinds="490 files"
    )
    (finding,) = livedoctor.check_growth(facts(growth=(growth,)))
    assert finding.severity == "warning"
    assert finding.what.startswith(
        "worker pid=11 slot=1 holds more open file descriptors with every request it serves: 50 when it became "
        "ready, 550 after 500 requests (about 1,000 more per 1,000 requests)"
    )
    assert "490 files" in finding.what
    assert "ls -l /proc/11/fd" in finding.fix
    assert "set max_requests" in finding.fix


def time_wait(count: int, closed: int | None, requests: int | None = 300, **changes: Any) -> LiveFacts:
    """A server whose listener has ``count`` connections in TIME_WAIT, ``closed`` of them during the window."""
    found = livedoctor.ListenerTimeWait("http://127.0.0.1:8000", count, closed)
    return facts(time_wait=(found,), requests_in_window=requests, ephemeral_ports=(32768, 60999), **changes)


def test_a_connection_per_request_is_a_time_wait_finding() -> None:
    """As many connections closed as requests finished: a warning with the evidence and, for sync, the unix
    socket first; a listener using half the ephemeral ports is an error whatever the requests."""
    (finding,) = livedoctor.check_time_wait(time_wait(900, 290))
    assert finding.severity == "warning"
    assert "900 connections to http://127.0.0.1:8000 were closed in the last 60 s" in finding.what
    assert "3.2% of the 28232 ephemeral ports (32768-60999" in finding.what
    assert "290 connections closed for 300 requests during the 3.0s window: 0.97 new connections per" in finding.what
    assert finding.fix.startswith("with the proxy on the same host, bind gunicorn to a unix socket")
    (gthread,) = livedoctor.check_time_wait(time_wait(900, 290, worker_class="gthread"))
    assert gthread.fix.startswith("keep connections to gunicorn open")
    assert checks(livedoctor.check_time_wait, time_wait(15000, None, None)) == [("live-time-wait", "error")]


@pytest.mark.parametrize(
    ("count", "closed", "requests"),
    [
        (90, 90, 90),  # a connection per request, but too few to matter
        (900, 20, 3000),  # keep-alive: a few connections recycled for many requests
        (900, None, 300),  # the window could not be read and the ports are far from used up
        (900, 290, 0),  # no request during the window: nothing to compare with
    ],
)
def test_time_wait_quiet_when_it_is_not_a_connection_per_request(count: int, closed: int | None, requests: int) -> None:
    """Few TIME_WAIT, keep-alive traffic, or nothing to compare with: no finding."""
    assert checks(livedoctor.check_time_wait, time_wait(count, closed, requests)) == []


def test_listener_names_become_addresses() -> None:
    """gunicorn's listener names give the family, host and port doctor asks the kernel about."""
    import socket

    assert livedoctor.listener_address("http://127.0.0.1:8000") == (socket.AF_INET, "127.0.0.1", 8000)
    assert livedoctor.listener_address("https://[::1]:8443") == (socket.AF_INET6, "::1", 8443)
    assert livedoctor.listener_address("unix:/run/gunicorn.sock") is None
