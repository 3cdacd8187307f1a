"""OTLP export end to end: real gunicorn, real requests, real OTLP/HTTP exports decoded by a receiver in
the test process with opentelemetry-proto's classes."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from harness import Gunicorn, start_gunicorn
from otlp_receiver import GrpcOtlpReceiver, OtlpReceiver, attributes_of, point_total, points
from servers import ProcessFactory, wait_until

from gunicorn_insight.settings import DEFAULT_BUCKETS

FAST = {"OTEL_METRIC_EXPORT_INTERVAL": "300", "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}
CUMULATIVE = 2  # AggregationTemporality in the OTLP protobuf
DELTA = 1


def otlp_env(receiver: OtlpReceiver, **extra: str) -> dict[str, str | None]:
    return {"GUNICORN_INSIGHT_OTLP": f"http://127.0.0.1:{receiver.port}", **FAST, **extra}


def wait_for_total(receiver: OtlpReceiver, server: Gunicorn, name: str, expected: float, **wanted: Any) -> None:
    wait_until(
        lambda: point_total(receiver.latest(name), **wanted) == expected,
        timeout=60,
        what=f"{name}{wanted or ''} == {expected} in the latest export",
        dump=lambda: (
            f"got {point_total(receiver.latest(name), **wanted)}\n{receiver.describe()}\n{server.process.describe()}"
        ),
    )


@pytest.mark.oldest
def test_exports_exact_counts_with_http_semantic_conventions(
    process_factory: ProcessFactory, otlp_receiver: OtlpReceiver
) -> None:
    """Request count and duration count exact, attributes and resource per the conventions; OTLP alone
    (metrics_bind off) still starts the exporting process."""
    server = start_gunicorn(
        process_factory,
        metrics=False,
        args=["-n", "shop"],
        env=otlp_env(otlp_receiver, OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=test"),
    )
    for _ in range(5):
        assert server.get("/") == 200
    for _ in range(3):
        assert server.get("/status/404?token=secret") == 404
    wait_for_total(otlp_receiver, server, "http.server.request.duration", 8)
    wait_for_total(otlp_receiver, server, "gunicorn.requests", 3, **{"http.response.status_code": 404})

    duration = otlp_receiver.latest("http.server.request.duration")
    assert (duration.unit, duration.histogram.aggregation_temporality) == ("s", CUMULATIVE)
    by_status = {attributes_of(point.attributes)["http.response.status_code"]: point for point in points(duration)}
    assert sorted(by_status) == [200, 404]
    for status, count in ((200, 5), (404, 3)):
        point = by_status[status]
        assert attributes_of(point.attributes) == {
            "http.request.method": "GET",
            "http.response.status_code": status,
            "server.port": server.port,
        }
        assert (point.count, sum(point.bucket_counts)) == (count, count)
        assert list(point.explicit_bounds) == list(DEFAULT_BUCKETS)
        assert point.sum > 0
        assert point.start_time_unix_nano < point.time_unix_nano
    requests = otlp_receiver.latest("gunicorn.requests")
    assert requests.sum.is_monotonic
    assert point_total(requests, **{"http.response.status_code": 200, "http.request.method": "GET"}) == 5
    active = otlp_receiver.latest("http.server.active_requests")
    assert (active.unit, active.sum.is_monotonic, point_total(active)) == ("{request}", False, 0)
    assert point_total(otlp_receiver.latest("gunicorn.workers")) == 2
    assert otlp_receiver.latest("gunicorn.worker.memory.usage").unit == "By"
    assert point_total(otlp_receiver.latest("gunicorn.worker.exits"), **{"gunicorn.worker.exit.cause": "killed"}) == 0
    resource = otlp_receiver.resource()
    assert resource["service.name"] == "shop"
    assert resource["process.pid"] == server.pid
    assert resource["host.name"] == socket.gethostname()
    assert len(resource["service.instance.id"]) == 36
    assert resource["deployment.environment.name"] == "test"
    assert otlp_receiver.bad == []
    assert "secret" not in str(otlp_receiver.all_requests())
    described = json.loads((Path(server.scoreboard_path).parent / "server.json").read_text())
    assert (described["otlp"], described["metrics_url"]) == (f"http://127.0.0.1:{otlp_receiver.port}/v1/metrics", None)


def test_delta_temporality_adds_up_to_the_exact_count(
    process_factory: ProcessFactory, otlp_receiver: OtlpReceiver
) -> None:
    """With the delta preference, counters and histograms arrive as deltas that sum to what was sent;
    OTEL_SERVICE_NAME wins over proc_name."""
    env = otlp_env(
        otlp_receiver, OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE="delta", OTEL_SERVICE_NAME="checkout"
    )
    server = start_gunicorn(process_factory, env=env)
    for round_ in range(3):
        for _ in range(4):
            assert server.get("/") == 200
        sent = 4 * (round_ + 1)
        wait_until(
            lambda sent=sent: (
                sum(
                    point_total(metric)
                    for metric in otlp_receiver.metrics("http.server.request.duration")  # type: ignore[misc]
                )
                == sent
            ),
            timeout=60,
            what=f"deltas adding up to {sent}",
            dump=otlp_receiver.describe,
        )
    for metric in otlp_receiver.metrics("gunicorn.requests"):
        assert metric.sum.aggregation_temporality == DELTA
    assert sum(point_total(metric) for metric in otlp_receiver.metrics("gunicorn.requests")) == 12
    assert otlp_receiver.latest("http.server.active_requests").sum.aggregation_temporality == CUMULATIVE
    assert otlp_receiver.resource()["service.name"] == "checkout"
    # /metrics is served too when metrics_bind says so; Prometheus and OTLP read the same rounds, and the
    # status-split histogram written for OTLP stays out of /metrics.
    assert server.total("gunicorn_requests_total") == 12
    assert server.total("gunicorn_request_duration_seconds_count") == 12
    assert "gunicorn_insight_otlp" not in server.metrics_text()


def test_worker_killed_is_counted_with_its_cause(process_factory: ProcessFactory, otlp_receiver: OtlpReceiver) -> None:
    """kill -9 of a worker arrives as gunicorn.worker.exits{gunicorn.worker.exit.cause=killed} == 1."""
    server = start_gunicorn(process_factory, env=otlp_env(otlp_receiver), metrics=False)
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for_total(otlp_receiver, server, "gunicorn.worker.exits", 1, **{"gunicorn.worker.exit.cause": "killed"})
    server.wait_for_workers(2)
    wait_for_total(otlp_receiver, server, "gunicorn.workers", 2)


def test_endpoint_down_then_back(process_factory: ProcessFactory, otlp_receiver: OtlpReceiver) -> None:
    """A collector that is down: requests still served, one warning, and the export resumes with exact
    counts (nothing lost: cumulative) once it is back."""
    otlp_receiver.stop()
    server = start_gunicorn(process_factory, env=otlp_env(otlp_receiver), metrics=False)
    for _ in range(6):
        assert server.get("/") == 200
    server.process.wait_for_log(r"OTLP export to http://127\.0\.0\.1:\d+/v1/metrics failed \(", timeout=60)
    for _ in range(4):
        assert server.get("/") == 200
    otlp_receiver.start()
    wait_for_total(otlp_receiver, server, "http.server.request.duration", 10)
    server.process.wait_for_log(r"OTLP export to \S+ works again", timeout=30)
    output = server.process.output()
    assert output.count("OTLP export to") == 2  # one warning (rate-limited), one recovery line
    assert "Traceback" not in output


MODULES_CONFIG = """
import json, sys
import gunicorn_insight

def when_ready(server):
    with open({marks!r}, "w") as marks:
        json.dump(sorted(name for name in sys.modules if name.startswith(("opentelemetry", "google.protobuf", "grpc"))),
                  marks)

gunicorn_insight.install(globals())
"""


def test_master_exports_otlp_without_importing_opentelemetry(
    process_factory: ProcessFactory, otlp_receiver: OtlpReceiver, tmp_path: Path
) -> None:
    """The SDK and protobuf stay out of the master (and so out of every worker it forks)."""
    marks = tmp_path / "modules.json"
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(MODULES_CONFIG.format(marks=str(marks)))
    server = start_gunicorn(process_factory, config=str(config), env=otlp_env(otlp_receiver), metrics=False)
    server.get("/")
    wait_for_total(otlp_receiver, server, "gunicorn.requests", 1)
    assert json.loads(marks.read_text()) == []


@pytest.mark.oldest
def test_grpc_protocol_exports_exact_counts_to_a_grpc_receiver(
    process_factory: ProcessFactory, grpc_otlp_receiver: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc: exact request counts reach a gRPC MetricsService; grpc, protobuf and
    the SDK stay out of the master."""
    marks = tmp_path / "modules.json"
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(MODULES_CONFIG.format(marks=str(marks)))
    env = {
        "GUNICORN_INSIGHT_OTLP": "on",
        "OTEL_EXPORTER_OTLP_ENDPOINT": grpc_otlp_receiver.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        **FAST,
    }
    server = start_gunicorn(process_factory, config=str(config), env=env, metrics=False)
    server.process.wait_for_log(r"OTLP to the OTEL_EXPORTER_OTLP_\* endpoint over gRPC", timeout=30)
    for _ in range(4):
        assert server.get("/") == 200
    for _ in range(2):
        assert server.get("/status/404") == 404
    wait_for_total(grpc_otlp_receiver, server, "http.server.request.duration", 6)
    wait_for_total(grpc_otlp_receiver, server, "gunicorn.requests", 2, **{"http.response.status_code": 404})
    requests = grpc_otlp_receiver.latest("gunicorn.requests")
    assert point_total(requests, **{"http.response.status_code": 200, "http.request.method": "GET"}) == 4
    assert grpc_otlp_receiver.resource()["process.pid"] == server.pid
    assert json.loads(marks.read_text()) == []


def test_grpc_endpoint_down_then_back(process_factory: ProcessFactory, grpc_otlp_receiver: GrpcOtlpReceiver) -> None:
    """Over gRPC too, a collector that is down costs one warning and the export resumes with exact counts."""
    grpc_otlp_receiver.stop()
    env = {"GUNICORN_INSIGHT_OTLP": grpc_otlp_receiver.url, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc", **FAST}
    server = start_gunicorn(process_factory, env=env, metrics=False)
    for _ in range(5):
        assert server.get("/") == 200
    server.process.wait_for_log(r"OTLP export to http://127\.0\.0\.1:\d+ failed \(", timeout=60)
    grpc_otlp_receiver.start()
    wait_for_total(grpc_otlp_receiver, server, "http.server.request.duration", 5)
    server.process.wait_for_log(r"OTLP export to \S+ works again", timeout=30)
    output = server.process.output()
    assert output.count("OTLP export to") == 2  # one warning (rate-limited), one recovery line
    assert "Traceback" not in output


def test_sdk_disabled_exports_nothing_and_says_so(process_factory: ProcessFactory, otlp_receiver: OtlpReceiver) -> None:
    """OTEL_SDK_DISABLED=true is honoured: gunicorn serves, one line says OTLP is off, the receiver gets nothing."""
    server = start_gunicorn(process_factory, env=otlp_env(otlp_receiver, OTEL_SDK_DISABLED="true"))
    server.process.wait_for_log(r"OTEL_SDK_DISABLED=true: nothing is exported over OTLP", timeout=30)
    for _ in range(3):
        assert server.get("/") == 200
    assert server.total("gunicorn_requests_total") == 3  # a scrape: the same rounds an export would have read
    assert otlp_receiver.count() == 0


def test_the_last_export_at_stop_carries_the_last_requests(
    process_factory: ProcessFactory, otlp_receiver: OtlpReceiver
) -> None:
    """A stop exports the final round before the embedded directory goes: nothing lost, no failure logged."""
    env = otlp_env(otlp_receiver, OTEL_METRIC_EXPORT_INTERVAL="600000")  # only the export at stop
    server = start_gunicorn(process_factory, env=env, metrics=False)
    for _ in range(3):
        assert server.get("/") == 200
    assert server.process.stop(timeout=30) == 0
    assert point_total(otlp_receiver.latest("gunicorn.requests")) == 3, server.process.describe()
    assert "OTLP export" not in server.process.output(), server.process.describe()
