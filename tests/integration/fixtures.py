"""Fixtures that start real servers (statsd, Prometheus, nginx, any process) and always stop them.

conftest.py only re-exports them: two modules named ``conftest`` (tests/ and tests/integration/) cannot be
type-checked in one mypy run, so the code lives here under a name of its own.

A missing binary fails the test with a pointer to scripts/test-all: skipping would let a machine without
the servers report a green suite that tested nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from otlp_receiver import GrpcOtlpReceiver, OtlpReceiver
from servers import (
    STATSD_JS_ENV,
    Nginx,
    NginxFactory,
    Process,
    ProcessFactory,
    PrometheusFactory,
    PrometheusServer,
    StatsdDaemon,
    process_starter,
)

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # Fixtures read this in their teardown to print server output only when the test went wrong.
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORTS, {})
    return any(report.failed for report in reports.values())


def _require_binary(name: str) -> None:
    if shutil.which(name) is None:
        pytest.fail(f"{name} is not installed: run scripts/test-all, which installs it", pytrace=False)


def _require_statsd_js() -> None:
    stats_js = os.environ.get(STATSD_JS_ENV)
    if not stats_js or not Path(stats_js).is_file():
        pytest.fail(
            f"the statsd daemon was not found ({STATSD_JS_ENV}={stats_js!r}): run scripts/test-all, which "
            "installs it under .tools/statsd and exports that variable",
            pytrace=False,
        )


def _print_dump(title: str, dump: str) -> None:
    # Printed during teardown, pytest shows it under the failed test as "Captured stdout teardown".
    print(f"\n======== {title} ========\n{dump}")


@pytest.fixture
def short_tmp_path() -> Iterator[Path]:
    """A short directory for unix sockets: pytest's tmp_path can exceed the 107-byte sun_path limit."""
    path = Path(tempfile.mkdtemp(prefix="gi-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def statsd_daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StatsdDaemon]:
    """A fresh reference statsd daemon per test, so counters start from zero."""
    _require_binary("node")
    _require_statsd_js()
    daemon = StatsdDaemon(tmp_path / "statsd")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        if _test_failed(request) and daemon.start_error is None:
            _print_dump("statsd daemon", daemon.dump())


@pytest.fixture
def process_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessFactory]:
    """Start processes with output captured to files under tmp_path; all are stopped at teardown."""
    processes: list[Process] = []
    try:
        yield process_starter(tmp_path, processes)
    finally:
        with contextlib.ExitStack() as stack:
            for process in processes:
                stack.callback(process.stop, process.teardown_signal, grace=process.teardown_grace)
        if _test_failed(request):
            for process in processes:
                _print_dump(f"process {process.name} pid {process.pid}", process.describe())


@contextlib.contextmanager
def _fleet(request: pytest.FixtureRequest, label: str) -> Iterator[list[Any]]:
    """The servers a factory fixture started: all stopped at teardown, their output shown if the test failed."""
    servers: list[Any] = []
    try:
        yield servers
    finally:
        with contextlib.ExitStack() as stack:
            for server in servers:
                stack.callback(server.stop)
        if _test_failed(request):
            for server in servers:
                if server.start_error is None:  # a failed start already raised with the full dump
                    _print_dump(f"{label} on port {server.port}", server.dump())


@pytest.fixture
def prometheus_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PrometheusFactory]:
    """Start real Prometheus servers scraping given targets; all are stopped at teardown."""
    _require_binary("prometheus")
    serial = itertools.count(1)
    with _fleet(request, "prometheus") as servers:

        def start(
            targets: Sequence[str],
            *,
            job_name: str = "test",
            scrape_interval: float = 1.0,
            metrics_path: str = "/metrics",
        ) -> PrometheusServer:
            server = PrometheusServer(
                targets,
                job_name=job_name,
                scrape_interval=scrape_interval,
                metrics_path=metrics_path,
                workdir=tmp_path / f"prometheus-{next(serial)}",
            )
            servers.append(server)
            server.start()
            return server

        yield start


@pytest.fixture
def nginx_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NginxFactory]:
    """Start real nginx reverse proxies in front of an upstream; all are stopped at teardown."""
    _require_binary("nginx")
    serial = itertools.count(1)
    with _fleet(request, "nginx") as servers:

        def start(
            upstream: str,
            *,
            extra_location_directives: str = "",
            extra_server_directives: str = "",
            extra_upstream_directives: str = "",
        ) -> Nginx:
            server = Nginx(
                upstream,
                extra_location_directives=extra_location_directives,
                extra_server_directives=extra_server_directives,
                extra_upstream_directives=extra_upstream_directives,
                workdir=tmp_path / f"nginx-{next(serial)}",
            )
            servers.append(server)
            server.start()
            return server

        yield start


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """An OTLP/HTTP receiver in the test process on a free port, running; stopped at teardown."""
    receiver = OtlpReceiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture
def grpc_otlp_receiver() -> Iterator[GrpcOtlpReceiver]:
    """An OTLP/gRPC receiver (grpcio serving MetricsService) in the test process on a free port; stopped at teardown."""
    receiver = GrpcOtlpReceiver()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
