"""Every worker exit classified and counted; the request in flight and its stack named, whatever the cause."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import threading
import urllib.request

import pytest
from harness import APPS, Gunicorn, start_gunicorn
from servers import ProcessFactory, StatsdDaemon, wait_until

EXITED = (
    r"gunicorn-insight: worker exited pid=(?P<pid>\d+) slot=(?P<slot>\d+) cause=(?P<cause>\w+) "
    r'detail="(?P<detail>[^"]*)" uptime=(?P<uptime>[\d.]+)s served=(?P<served>\d+) rss=(?P<rss>\S+) '
    r'request=(?:"(?P<method>\S+) (?P<path>\S+)" client=(?P<client>\S+) elapsed=(?P<elapsed>[\d.]+)s '
    r'thread=(?P<thread>\d+)|none)(?: stack="(?P<stack>[^"]*)")?$'
)
SLOW = r'gunicorn-insight: slow request pid=(?P<pid>\d+) slot=\d+ request="GET (?P<path>\S+)" elapsed=[\d.]+s'


def fire_and_forget(server: Gunicorn, path: str) -> threading.Thread:
    """Send a request whose answer we do not wait for (the worker may die serving it)."""

    def send() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):  # the connection dies with the worker
            server.get(path, timeout=60)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def exits(server: Gunicorn, cause: str) -> float:
    return server.total("gunicorn_worker_exits_total", cause=cause)


@pytest.mark.oldest
def test_request_stuck_in_c_code_is_named_after_sigkill(process_factory: ProcessFactory) -> None:
    """Sync worker stuck in C: the watchdog logs its stack first, then SIGKILL is classified timeout_kill."""
    server = start_gunicorn(process_factory, workers=1, args=["--timeout", "2"])
    fire_and_forget(server, "/stuck-c?token=hunter2")
    slow = server.process.wait_for_log(SLOW, timeout=30)
    match = server.process.wait_for_log(EXITED, timeout=30)
    output = server.process.output()
    assert "SIGKILL" in output
    assert match["cause"] == "timeout_kill"
    assert (match["path"], slow["path"]) == ("/stuck-c?<redacted>", "/stuck-c?<redacted>")
    assert float(match["elapsed"]) >= 2
    assert "no stack" in match["stack"]
    assert "pbkdf2_hmac" in output[slow.end() : match.start()]  # the stack, taken before the kill
    assert "hunter2" not in output
    server.wait_for_value("gunicorn_worker_exits_total", 1, cause="timeout_kill")
    server.wait_for_value("gunicorn_slow_requests_total", 1)


@pytest.mark.oldest
def test_request_stuck_in_python_is_aborted_with_its_stack(process_factory: ProcessFactory) -> None:
    """Sync worker stuck in Python: worker_abort writes the stack signal-safely; cause is timeout."""
    server = start_gunicorn(
        process_factory, workers=1, args=["--timeout", "2"], env={"GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": "0"}
    )
    fire_and_forget(server, "/stuck")
    header = server.process.wait_for_log(
        r"worker pid=\d+ aborted \(WORKER TIMEOUT\) while serving GET /stuck; stack:", timeout=30
    )
    match = server.process.wait_for_log(EXITED, timeout=30)
    assert match["cause"] == "timeout"
    assert match["path"] == "/stuck"
    assert re.search(r'File "[^"]*examples/app.py", line \d+ in app', server.process.output()[header.end() :])
    assert "slow request" not in server.process.output()  # slow_request_timeout=0 turned the watchdog off
    server.wait_for_value("gunicorn_worker_exits_total", 1, cause="timeout")


def test_gthread_stuck_thread_is_reported_not_killed(process_factory: ProcessFactory) -> None:
    """gthread never times out a stuck thread: the watchdog logs it once with the app's frame, and counts it."""
    # The stuck thread outlives the worker's quick exit; a short graceful_timeout ends the teardown sooner.
    server = start_gunicorn(
        process_factory,
        worker_class="gthread",
        workers=1,
        args=["--threads", "2", "--graceful-timeout", "1"],
        env={"GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": "1"},
    )
    fire_and_forget(server, "/stuck")
    slow = server.process.wait_for_log(SLOW, timeout=30)
    assert slow["path"] == "/stuck"
    assert re.search(r'File "[^"]*examples/app.py", line \d+, in app', server.process.output()[slow.end() :])
    server.wait_for_value("gunicorn_slow_requests_total", 1)
    assert server.get("/") == 200  # the other thread still serves
    assert server.process.output().count("slow request") == 1
    assert "worker exited" not in server.process.output()


def test_gevent_stuck_greenlet_stack_and_timeout(process_factory: ProcessFactory) -> None:
    """gevent: a real thread reports the stuck greenlet's stack; gunicorn's abort is classified timeout."""
    server = start_gunicorn(
        process_factory,
        worker_class="gevent",
        workers=1,
        args=["--timeout", "3"],
        env={"GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": "1"},
    )
    fire_and_forget(server, "/stuck")
    slow = server.process.wait_for_log(SLOW + r" greenlet=0x[0-9a-f]+", timeout=30)
    assert re.search(r"in app\n", server.process.output()[slow.end() :])
    match = server.process.wait_for_log(EXITED, timeout=30)
    assert match["cause"] in ("timeout", "timeout_kill")
    assert match["path"] == "/stuck"
    server.wait_for_value("gunicorn_slow_requests_total", 1)


def test_external_kill_of_a_busy_worker(process_factory: ProcessFactory) -> None:
    """kill -9 from outside: cause killed, no OOM claimed without the cgroup's word, the request named."""
    server = start_gunicorn(process_factory, workers=1)
    fire_and_forget(server, "/slow?s=30")
    server.wait_for_value("gunicorn_requests_in_flight", 1)
    (pid,) = server.worker_pids()
    os.kill(pid, signal.SIGKILL)
    match = server.process.wait_for_log(EXITED, timeout=30)
    assert (int(match["pid"]), match["cause"], match["path"]) == (pid, "killed", "/slow?<redacted>")
    assert "from outside gunicorn (OOM killer not confirmed" in match["detail"]
    assert match["rss"].endswith("MiB")
    server.wait_for_value("gunicorn_worker_exits_total", 1, cause="killed")


def test_max_requests_recycling_is_counted_quietly(process_factory: ProcessFactory) -> None:
    """Workers recycled by max_requests are counted under max_requests and log no death line."""
    server = start_gunicorn(process_factory, workers=1, args=["--max-requests", "1"])
    for _ in range(3):
        assert server.get("/") == 200
    server.wait_for_value("gunicorn_worker_exits_total", 3, cause="max_requests")
    assert "worker exited" not in server.process.output()


def test_worker_exiting_non_zero_is_a_crash(process_factory: ProcessFactory) -> None:
    """A worker process that exits with a code (os._exit) is a crash with that code, its request named."""
    server = start_gunicorn(process_factory, workers=1)
    fire_and_forget(server, "/exit?code=7")
    match = server.process.wait_for_log(EXITED, timeout=30)
    assert (match["cause"], match["path"]) == ("crash", "/exit?<redacted>")
    assert "exited with code 7" in match["detail"]
    server.wait_for_value("gunicorn_worker_exits_total", 1, cause="crash")


def test_graceful_shutdown_is_not_an_incident(process_factory: ProcessFactory, statsd_daemon: StatsdDaemon) -> None:
    """TERM to the master: every worker exit is counted graceful, in the last round, with no death line."""
    host, port = statsd_daemon.udp_address
    server = start_gunicorn(
        process_factory, workers=2, metrics=False, env={"GUNICORN_INSIGHT_STATSD": f"{host}:{port}"}
    )
    server.process.stop()
    assert statsd_daemon.counters().get("gunicorn.worker.exit.graceful") == 2
    assert "worker exited" not in server.process.output()


def failed_to_boot(server: Gunicorn, line: str) -> str:
    """The server's output once it has stopped because its worker could not load the application: the
    worker's line matches ``line`` and its exit line says boot_failure."""
    assert server.process.wait(timeout=60) != 0
    output = server.process.output()
    assert re.search(line, output), output
    match = re.search(EXITED, output, re.MULTILINE)
    assert match is not None, output
    assert match["cause"] == "boot_failure"
    return output


@pytest.mark.oldest
def test_app_failing_at_import_is_a_boot_failure(process_factory: ProcessFactory, statsd_daemon: StatsdDaemon) -> None:
    """An import error: one line with the exception's summary and the hint, counted boot_failure at StatsD."""
    host, port = statsd_daemon.udp_address
    server = start_gunicorn(
        process_factory,
        app="broken_app:app",
        cwd=APPS,
        workers=1,
        metrics=False,
        wait=False,
        env={"GUNICORN_INSIGHT_STATSD": f"{host}:{port}"},
    )
    output = failed_to_boot(
        server,
        r"gunicorn-insight: worker pid=\d+ could not load the application: RuntimeError: "
        r"DATABASE_URL is not set; if no traceback is above .* rerun with --log-level debug",
    )
    assert "second line" not in output.split("could not load the application")[1].splitlines()[0]
    wait_until(
        lambda: statsd_daemon.counters().get("gunicorn.worker.exit.boot_failure") == 1,
        timeout=10,
        what="the boot failure counted at StatsD",
        dump=statsd_daemon.dump,
    )


def test_an_entry_point_naming_no_variable_is_a_boot_failure(process_factory: ProcessFactory) -> None:
    """A module that imports but lacks the variable after the colon: gunicorn's message in the line, boot_failure."""
    server = start_gunicorn(process_factory, app="app:no_such_app", workers=1, metrics=False, wait=False)
    failed_to_boot(
        server,
        r"worker pid=\d+ could not load the application: AppImportError: Failed to find attribute "
        r"'no_such_app' in 'app'",
    )


def test_kill_is_classified_even_when_gunicorn_logs_nothing(process_factory: ProcessFactory) -> None:
    """With --log-level critical gunicorn's reap line is never emitted as a record; the cause is still killed."""
    server = start_gunicorn(process_factory, workers=1, args=["--log-level", "critical"])
    (pid,) = server.worker_pids()
    os.kill(pid, signal.SIGKILL)
    server.wait_for_value("gunicorn_worker_exits_total", 1, cause="killed")
    assert server.total("gunicorn_worker_exits_total", cause="crash") == 0


def test_request_cut_off_at_shutdown_is_named(process_factory: ProcessFactory, statsd_daemon: StatsdDaemon) -> None:
    """A worker SIGKILLed when graceful_timeout runs out at shutdown: counted graceful, its request named."""
    host, port = statsd_daemon.udp_address
    server = start_gunicorn(
        process_factory,
        workers=1,
        metrics=False,
        args=["--graceful-timeout", "1"],
        env={"GUNICORN_INSIGHT_STATSD": f"{host}:{port}"},
    )
    fire_and_forget(server, "/slow?s=30")
    wait_until(
        lambda: statsd_daemon.gauges().get("gunicorn.requests_in_flight") == 1,
        timeout=20,
        what="the slow request in flight",
        dump=statsd_daemon.dump,
    )
    server.process.stop()
    match = re.search(EXITED, server.process.output(), re.MULTILINE)
    assert match is not None, server.process.output()
    assert (match["cause"], match["path"]) == ("graceful", "/slow?<redacted>")
    assert "graceful_timeout ran out" in match["detail"]
    assert statsd_daemon.counters().get("gunicorn.worker.exit.graceful") == 1


def test_worker_killed_by_another_signal(process_factory: ProcessFactory) -> None:
    """A worker ended by a signal other than SIGKILL/SIGTERM (here SIGSEGV) is cause signal, named in detail."""
    server = start_gunicorn(process_factory, workers=1)
    (pid,) = server.worker_pids()
    os.kill(pid, signal.SIGSEGV)
    match = server.process.wait_for_log(EXITED, timeout=30)
    assert (int(match["pid"]), match["cause"]) == (pid, "signal")
    assert "SIGSEGV" in match["detail"]
    server.wait_for_value("gunicorn_worker_exits_total", 1, cause="signal")


def test_blocked_asyncio_loop_is_reported_with_its_stack(process_factory: ProcessFactory) -> None:
    """asgi: a blocking call inside a coroutine stops the loop; the watchdog logs the loop thread's stack."""
    from harness import GUNICORN_VERSION

    if GUNICORN_VERSION < (24, 0):
        pytest.fail("the asgi worker needs gunicorn >= 24; this test is not marked oldest")
    server = start_gunicorn(
        process_factory,
        app="asgi_app:app",
        worker_class="asgi",
        cwd=APPS,
        workers=1,
        env={"GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": "1"},
    )
    fire_and_forget(server, "/block")
    blocked = server.process.wait_for_log(r"event loop blocked pid=\d+ slot=0 for [\d.]+s", timeout=30)
    assert re.search(r"asgi_app.py\", line \d+, in app\n\s+time\.sleep\(3\)", server.process.output()[blocked.end() :])


def test_a_crash_in_c_code_leaves_the_python_stack(process_factory: ProcessFactory) -> None:
    """A segfault in the application: faulthandler writes the crashing thread's stack (the app's frame) to the
    error log, the exit line says where it is; gunicorn's own SIGABRT handler stays in place."""
    server = start_gunicorn(process_factory, app="crash_app:app", cwd=APPS, workers=1)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/abort-handler", timeout=30) as response:
        assert response.read() == b"Worker.handle_abort"
    (pid,) = server.worker_pids()
    with contextlib.suppress(OSError, http.client.HTTPException):  # the worker dies under the request
        server.get("/segfault")
    match = server.process.wait_for_log(EXITED, timeout=30)
    assert (int(match["pid"]), match["cause"]) == (pid, "signal")
    assert "SIGSEGV" in match["detail"]
    assert "written by faulthandler" in match.group(0)
    output = server.process.output()
    assert "Fatal Python error: Segmentation fault" in output
    assert re.search(r'File ".*crash_app\.py", line \d+ in read_address_zero', output), output
