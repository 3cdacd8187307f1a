"""The /metrics port: restarting at once, a second server on the default port, an explicit port in use."""

from __future__ import annotations

import errno
import signal
import socket
from collections.abc import Iterator

import pytest
from harness import Gunicorn, start_gunicorn
from servers import ProcessFactory, free_port

from gunicorn_insight.settings import DEFAULT_METRICS_BIND, parse_host_port


def _start_on(process_factory: ProcessFactory, metrics_port: int) -> Gunicorn:
    server = start_gunicorn(
        process_factory, workers=1, env={"GUNICORN_INSIGHT_METRICS_BIND": f"127.0.0.1:{metrics_port}"}
    )
    server.metrics_port = metrics_port
    return server


@pytest.mark.oldest
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_server_restarted_at_once_gets_its_metrics_port(process_factory: ProcessFactory, sig: int) -> None:
    """Stop the master (SIGTERM, or SIGKILL leaving its /metrics process to notice) and start again at once."""
    metrics_port = free_port()
    first = _start_on(process_factory, metrics_port)
    assert first.total("gunicorn_workers") == 1
    if sig == signal.SIGKILL:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=30)
    else:
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(timeout=30) == 0, first.process.describe()
    second = _start_on(process_factory, metrics_port)
    assert second.get("/") == 200
    second.wait_for_value("gunicorn_requests_total", 1)
    assert "cannot be bound" not in second.process.output()
    first.process.stop()  # the workers a SIGKILLed master left behind


@pytest.fixture
def default_port_held() -> Iterator[int]:
    """Holds the default metrics port (127.0.0.1:9180) with a plain listening socket for the test."""
    host, port = parse_host_port("metrics_bind", DEFAULT_METRICS_BIND, 9180)
    holder = socket.socket()
    try:
        holder.bind((host, port))
    except OSError as error:
        holder.close()
        if error.errno == errno.EADDRINUSE:
            pytest.skip(
                f"another process holds the default metrics port {DEFAULT_METRICS_BIND}; this test "
                "needs to hold it itself"
            )
        raise
    holder.listen()
    try:
        yield port
    finally:
        holder.close()


def test_default_metrics_port_in_use_is_a_warning_not_a_failure(
    process_factory: ProcessFactory, default_port_held: int
) -> None:
    """metrics_bind not set and its default port taken: the server starts and serves, warning once with the fix."""
    server = start_gunicorn(process_factory, workers=1, metrics=False, env={"GUNICORN_INSIGHT_METRICS_BIND": None})
    assert server.get("/") == 200
    output = server.process.output()
    warning = f"/metrics is not served: the default metrics_bind {DEFAULT_METRICS_BIND} is in use"
    assert output.count(warning) == 1, output
    assert "GUNICORN_INSIGHT_METRICS_BIND=host:port" in output
    assert "[WARNING] gunicorn-insight: /metrics is not served" in output
