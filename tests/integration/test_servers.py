"""The server helpers work against the real binaries; if these fail, no other integration test means much."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import socketserver
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import harness
import pytest
from servers import (
    JsArray,
    NginxFactory,
    Process,
    ProcessFactory,
    PrometheusFactory,
    StatsdDaemon,
    free_port,
    parse_node_inspect,
    wait_until,
)


class _Backend:
    """What a tiny in-test HTTP backend saw and what it serves."""

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        self.requests: list[dict[str, str]] = []
        self.address = ""


class _Handler(BaseHTTPRequestHandler):
    backend: _Backend  # set on the per-server subclass

    def do_GET(self) -> None:
        self.backend.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        self.send_response(200)
        self.send_header("Content-Type", self.backend.content_type)
        self.send_header("Content-Length", str(len(self.backend.body)))
        self.end_headers()
        self.wfile.write(self.backend.body)

    def log_message(self, format: str, *args: object) -> None:
        # Quiet, and the default would index client_address, which is '' on a unix socket.
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@contextlib.contextmanager
def _http_backend(
    body: bytes = b"hello from backend\n",
    content_type: str = "text/plain",
    unix_path: Path | None = None,
) -> Iterator[_Backend]:
    backend = _Backend(body, content_type)
    handler = type("BoundHandler", (_Handler,), {"backend": backend})
    server: socketserver.BaseServer
    if unix_path is None:
        server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        backend.address = f"127.0.0.1:{server.server_address[1]}"
    else:
        server = _UnixHTTPServer(str(unix_path), handler)
        backend.address = f"unix:{unix_path}"
    thread = threading.Thread(target=server.serve_forever, name="http-backend", daemon=True)
    thread.start()
    try:
        yield backend
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _get(url: str, path: str = "/") -> tuple[int, bytes]:
    host_port = url.removeprefix("http://")
    host, port = host_port.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- statsd --------------------------------------------------------------------------------------------------


def test_statsd_counts_counter_datagrams_exactly(statsd_daemon: StatsdDaemon) -> None:
    """Three `foo.bar:2|c` datagrams add up to exactly 6 in the real daemon."""
    statsd_daemon.send("foo.bar:2|c", "foo.bar:2|c", "foo.bar:2|c")

    wait_until(
        lambda: statsd_daemon.counters().get("statsd.metrics_received") == 3,
        timeout=10,
        what="statsd to receive 3 metrics",
        dump=lambda: repr(statsd_daemon.counters()),
    )
    assert statsd_daemon.counters()["foo.bar"] == 6
    assert statsd_daemon.bad_lines() == 0


def test_statsd_reports_gauges_and_long_timers(statsd_daemon: StatsdDaemon) -> None:
    """Gauges (absolute and +delta) and timers come back parsed, with the true count of a >100 value timer."""
    values = [i * 1.5 for i in range(150)]
    statsd_daemon.send("my-app.workers_busy:3|g", "my-app.workers_busy:+2|g", "short_timer:7|ms")
    statsd_daemon.send(*(f"my-app.request-time.p_1:{value}|ms" for value in values))

    counts = wait_until(
        lambda: (c := statsd_daemon.timer_counts()).get("my-app.request-time.p_1") == 150 and c,
        timeout=10,
        what="statsd to hold 150 timer values",
        dump=lambda: repr(statsd_daemon.timer_counts()),
    )
    assert counts == {"my-app.request-time.p_1": 150, "short_timer": 1}
    timers = statsd_daemon.timers()
    # node prints only the first 100 array items; order is arrival order.
    assert timers["my-app.request-time.p_1"] == values[:100]
    assert timers["short_timer"] == [7.0]
    assert statsd_daemon.gauges() == {"my-app.workers_busy": 5.0}


def test_statsd_counts_malformed_lines(statsd_daemon: StatsdDaemon) -> None:
    """A line statsd cannot parse shows up in bad_lines(); valid lines in the same datagram still count."""
    statsd_daemon.send("this is not a metric\nok.counter:1|c", "negative.timer:-5|ms")

    wait_until(
        lambda: statsd_daemon.counters().get("statsd.metrics_received") == 3,
        timeout=10,
        what="statsd to receive 3 lines",
        dump=lambda: repr(statsd_daemon.counters()),
    )
    assert statsd_daemon.bad_lines() == 2
    assert statsd_daemon.counters()["ok.counter"] == 1
    assert statsd_daemon.timers() == {}


def test_inspect_parser_handles_node_quirks() -> None:
    """The util.inspect parser reads quoted keys, escapes, exponents, NaN and truncated arrays."""
    parsed = parse_node_inspect(
        "{\n  plain: 1,\n  'a.b-c;env=prod': -0.5,\n  \"it's\": 1e+21,\n  'esc\\n\\x41\\u00e9': NaN,\n"
        "  list: [\n      1,   2.5,\n    ... 1 more item\n  ],\n  empty: [],\n  obj: {},\n  s: 'x\\'y'\n}"
    )
    assert parsed["plain"] == 1
    assert parsed["a.b-c;env=prod"] == -0.5
    assert parsed["it's"] == 1e21
    assert parsed["esc\nAé"] != parsed["esc\nAé"]  # NaN
    assert isinstance(parsed["list"], JsArray)
    assert parsed["list"] == [1, 2.5]
    assert parsed["list"].total == 3
    assert parsed["empty"] == []
    assert parsed["obj"] == {}
    assert parsed["s"] == "x'y"


# -- prometheus ----------------------------------------------------------------------------------------------


def test_prometheus_scrapes_a_target(prometheus_factory: PrometheusFactory) -> None:
    """Prometheus scrapes a plain exposition text server and query_value returns the sample."""
    exposition = b"# HELP test_metric A fixed value.\n# TYPE test_metric gauge\ntest_metric 42\n"
    with _http_backend(exposition, "text/plain; version=0.0.4") as backend:
        prometheus = prometheus_factory([backend.address], job_name="helpers", scrape_interval=0.5)

        wait_until(
            prometheus.targets_up,
            timeout=20,
            what="the target to be up",
            dump=lambda: repr(prometheus.targets_status()),
        )
        value = wait_until(
            lambda: prometheus.query_value("test_metric"),
            timeout=20,
            what="test_metric in prometheus",
            dump=prometheus.dump,
        )
        assert value == 42.0
        series = prometheus.query("test_metric")
        assert series[0]["metric"] == {
            "__name__": "test_metric",
            "instance": backend.address,
            "job": "helpers",
        }
        assert prometheus.query_value("absent_metric") is None
        assert any(request["path"] == "/metrics" for request in backend.requests)


# -- nginx -------------------------------------------------------------------------------------------------


def test_nginx_proxies_over_tcp_with_request_start(nginx_factory: NginxFactory) -> None:
    """nginx proxies to a TCP backend, and a header set through extra directives reaches it."""
    with _http_backend() as backend:
        nginx = nginx_factory(
            backend.address,
            extra_location_directives='proxy_set_header X-Request-Start "t=${msec}";\nproxy_read_timeout 2s;',
        )
        status, body = _get(nginx.url, "/hello?x=1")

    assert (status, body) == (200, b"hello from backend\n")
    [request] = backend.requests
    assert request["path"] == "/hello?x=1"
    assert request["x-request-start"].startswith("t=")
    # ${msec} is seconds with millisecond resolution, e.g. t=1700000000.123
    assert float(request["x-request-start"][2:]) > 1e9
    assert request["x-forwarded-for"] == "127.0.0.1"


def test_nginx_proxies_over_unix_socket(nginx_factory: NginxFactory, short_tmp_path: Path) -> None:
    """nginx (as root in CI) proxies to a backend listening on a unix socket."""
    socket_path = short_tmp_path / "app.sock"
    with _http_backend(b"over unix\n", unix_path=socket_path) as backend:
        nginx = nginx_factory(
            backend.address, extra_location_directives='proxy_set_header X-Request-Start "t=${msec}";'
        )
        status, body = _get(nginx.url)

    assert (status, body) == (200, b"over unix\n")
    [request] = backend.requests
    assert request["x-request-start"].startswith("t=")


def test_nginx_reports_a_dead_upstream_as_502(nginx_factory: NginxFactory, short_tmp_path: Path) -> None:
    """With nothing on the upstream socket nginx answers 502 and logs why in its error log."""
    nginx = nginx_factory(f"unix:{short_tmp_path / 'nobody.sock'}")
    status, _ = _get(nginx.url)

    assert status == 502
    assert "No such file or directory" in nginx.dump()


# -- processes -----------------------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    # A child orphaned by the stop may linger as a zombie until init reaps it; that counts as gone.
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


_IGNORE_SIGTERM_AND_SLEEP = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "


def test_process_stop_kills_the_whole_group(process_factory: ProcessFactory) -> None:
    """stop() escalates to SIGKILL when SIGTERM is ignored, and takes the leader's children down too."""
    child = _IGNORE_SIGTERM_AND_SLEEP + "time.sleep(300)"
    leader = (
        _IGNORE_SIGTERM_AND_SLEEP
        + "import subprocess, sys; "
        + f"child = subprocess.Popen([sys.executable, '-c', {child!r}]); "
        + "print(f'child={child.pid}', flush=True); time.sleep(300)"
    )
    process = process_factory([sys.executable, "-c", leader])
    child_pid = int(process.wait_for_log(r"^child=(\d+)$", timeout=10).group(1))

    status = process.stop(timeout=1)

    assert status == -signal.SIGKILL
    assert not process.alive()
    wait_until(lambda: _gone(child_pid), timeout=5, what=f"child {child_pid} to die")


def test_process_stop_grace_kills_the_followers_and_lets_the_leader_finish(process_factory: ProcessFactory) -> None:
    """stop(grace=) SIGKILLs the group's other processes once the grace is over; the leader, which waits for its
    child (as a gunicorn master waits for workers that ignore SIGQUIT), then exits on its own."""
    child = _IGNORE_SIGTERM_AND_SLEEP + "time.sleep(300)"
    leader = (
        _IGNORE_SIGTERM_AND_SLEEP
        + "import subprocess, sys; "
        + f"child = subprocess.Popen([sys.executable, '-c', {child!r}]); "
        + "print(f'child={child.pid}', flush=True); sys.exit(child.wait() == -signal.SIGKILL and 7)"
    )
    process = process_factory([sys.executable, "-c", leader])
    process.wait_for_log(r"^child=(\d+)$", timeout=10)

    status = process.stop(timeout=30, grace=0.5)

    assert status == 7, process.describe()  # not -SIGKILL: the leader saw its child killed and exited itself


def test_process_wait_for_log_fails_fast_when_the_process_dies(process_factory: ProcessFactory) -> None:
    """A readiness wait on a process that exits reports its status and output instead of timing out."""
    process = process_factory([sys.executable, "-c", "print('boom'); raise SystemExit(3)"])

    with pytest.raises(AssertionError, match=r"(?s)exited with status 3.*boom"):
        process.wait_for_log("never printed", timeout=30)


def test_process_env_overrides_and_removes_variables(
    process_factory: ProcessFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """env entries are laid over os.environ and None removes a variable; cwd is honoured."""
    monkeypatch.setenv("GI_TEST_REMOVE_ME", "present")
    process = process_factory(
        [
            sys.executable,
            "-c",
            "import os; print(os.getcwd(), os.environ.get('GI_A'), "
            "os.environ.get('GI_TEST_REMOVE_ME'), 'PATH' in os.environ)",
        ],
        env={"GI_A": "1", "GI_TEST_REMOVE_ME": None},
        cwd=tmp_path,
    )

    assert process.wait(timeout=10) == 0
    assert process.output().split() == [str(tmp_path), "1", "None", "True"]


def test_wait_until_reports_what_and_dump() -> None:
    """A timed-out wait_until names what it waited for and appends the dump."""
    expected = r"^timed out after 0.2s waiting for the impossible\nstate dump$"
    with pytest.raises(AssertionError, match=expected):
        wait_until(lambda: False, timeout=0.2, what="the impossible", dump=lambda: "state dump")


@pytest.mark.parametrize("taken", ["listener", "metrics"])
def test_start_gunicorn_retries_a_port_taken_after_free_port(
    process_factory: ProcessFactory, monkeypatch: pytest.MonkeyPatch, taken: str
) -> None:
    """A port grabbed between free_port() and gunicorn's bind restarts gunicorn on fresh ports, not a failure."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        ports = iter([held] if taken == "listener" else [free_port(), held])
        monkeypatch.setattr(harness, "free_port", lambda: next(ports, None) or free_port())
        started: list[Process] = []

        def recording(
            argv: Sequence[str | os.PathLike[str]],
            env: Mapping[str, str | None] | None = None,
            cwd: str | os.PathLike[str] | None = None,
            *,
            name: str | None = None,
        ) -> Process:
            process = process_factory(argv, env, cwd, name=name)
            started.append(process)
            return process

        server = harness.start_gunicorn(recording, workers=1)

        assert server.get("/") == 200
        assert held not in (server.port, server.metrics_port)
        first, retried = started
        assert retried is server.process
        assert not first.alive()
        assert "in use" in first.output()
