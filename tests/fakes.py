"""Stand-ins for the few attributes of gunicorn's objects the unit tests need."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest

from gunicorn_insight._runfiles import ServerInfo, StatusRecord
from gunicorn_insight._worker import recorder as _recorder
from gunicorn_insight._worker.recorder import RequestRecorder


class FakeRequest:
    """The attributes of gunicorn's Request that the recorder reads."""

    def __init__(
        self,
        method: str = "GET",
        path: str = "/",
        query: str = "",
        peer: object = ("10.1.2.3", 4567),
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.peer_addr = peer
        self.headers = headers if headers is not None else [("HOST", "example.com")]


class FakeResponse:
    def __init__(self, status: object) -> None:
        self.status = status


IMPLEMENTATIONS: dict[str, tuple[Callable[..., None], Callable[..., None]]] = {
    "python": (_recorder.pre_request, _recorder.post_request),
    **({"compiled": _recorder.COMPILED} if _recorder.COMPILED is not None else {}),
}
HOOKS = IMPLEMENTATIONS.get("compiled", IMPLEMENTATIONS["python"])
"""The pair start() and finish() call: what install() puts in a config, unless a test picks one."""


def compiled_hooks() -> tuple[Callable[..., None], Callable[..., None]]:
    """The compiled pair. Where the extension was not built the test is skipped, unless
    INSIGHT_TEST_REQUIRE_COMPILED is set (scripts/test-all sets it): then it fails, so CI cannot pass
    without testing the compiled hooks."""
    if _recorder.COMPILED is None:
        if os.environ.get("INSIGHT_TEST_REQUIRE_COMPILED"):
            pytest.fail(
                "gunicorn_insight._worker._speedups was not built; see the pip install output for the compiler error"
            )
        pytest.skip("gunicorn_insight._worker._speedups was not built (no compiler at install time)")
    return _recorder.COMPILED


def start(recorder: RequestRecorder, req: object) -> None:
    """gunicorn calling pre_request in the worker that owns ``recorder``."""
    _recorder.RECORDER = recorder
    HOOKS[0](None, req)


def finish(recorder: RequestRecorder, req: object, environ: object, resp: object) -> None:
    """gunicorn calling post_request in the worker that owns ``recorder``."""
    _recorder.RECORDER = recorder
    HOOKS[1](None, req, environ, resp)


def server_info(scoreboard: str, **fields: Any) -> ServerInfo:
    """server.json as a live master in this process would write it (a gthread server), with `fields` changed."""
    info = ServerInfo(
        master_pid=os.getpid(),
        proc_name="app",
        started=time.time(),
        binds=("127.0.0.1:8000",),
        pidfile=None,
        worker_class="gthread",
        workers=2,
        threads=4,
        worker_connections=100,
        connections_limit=100,
        per_worker_capacity=4,
        timeout=30,
        interval=0.5,
        version="0.1.0",
        request_hooks="python",
        scoreboard_version=4,
        scoreboard=scoreboard,
        prometheus_dir=None,
        metrics_url=None,
        statsd=None,
        otlp=None,
        max_requests=0,
        preload_app=False,
        gunicorn_version="27.0.1",
    )
    return dataclasses.replace(info, **fields)


def status_record(**fields: Any) -> StatusRecord:
    """status.json after a quiet round of two workers, with `fields` changed."""
    record = StatusRecord(
        time=time.time(),
        monotonic=time.monotonic(),
        workers=2,
        busy_workers=1,
        in_flight=1,
        capacity=8,
        waiting=0,
        connections=1,
        listeners=(),
        listen_overflows=0,
        lost_requests=0,
        recent_exits=(),
        rounds=1,
        workers_ready=2,
        workers_booting=0,
        stalled_requests=0,
        crash_loop=False,
        host={},
        workers_desired=2,
        master_loop_stuck=0.0,
        stalled_since=None,
    )
    return dataclasses.replace(record, **fields)


def served_families() -> dict[str, str]:
    """Every metric family /metrics serves, as the Prometheus sink declares them (all options on): name ->
    kind ("counter", "gauge_livesum" or "histogram"). The one list alerts, panels and tests check names
    against; the families written for OTLP alone are left out, as /metrics leaves them out."""
    from gunicorn_insight._export.prometheus import OTLP_ONLY_PREFIX, PrometheusSink, _Family

    with tempfile.TemporaryDirectory() as directory:
        sink = PrometheusSink(directory, (0.1, 1.0), 1, routes=True, otlp=True)
        try:
            return {
                family.name: family.file_prefix
                for family in vars(sink).values()
                if isinstance(family, _Family) and not family.name.startswith(OTLP_ONLY_PREFIX)
            }
        finally:
            sink.close()


def served_samples() -> set[str]:
    """The sample names of served_families(): ``_total`` for counters, ``_bucket``/``_sum``/``_count`` for
    histograms."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {name + suffix for name, kind in served_families().items() for suffix in suffixes.get(kind, ("",))}
