"""OTLP: the otlp setting, the OTEL_* variables, and the translation of merged Prometheus families into
OpenTelemetry data (names, units, attributes, temporality). End to end: tests/integration/test_otlp_export.py."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.samples import Sample

from gunicorn_insight._export import otlp as _otlp
from gunicorn_insight.settings import ConfigurationError, Settings


class Family:
    """What prometheus_client's merge yields: a name, a type and samples."""

    def __init__(self, name: str, kind: str, samples: list[Sample]) -> None:
        self.name, self.type, self.samples = name, kind, samples


def options(**environ: str) -> _otlp.OtlpOptions:
    return _otlp.resolve_options(
        "on", environ, service_name="shop", instance_id="id-1", master_pid=42, server_port=8000, started=1.0
    )


@pytest.mark.parametrize(
    ("value", "endpoint"),
    [
        ("http://collector:4318", "http://collector:4318/v1/metrics"),
        ("https://otlp.example.com/", "https://otlp.example.com/v1/metrics"),
        ("http://collector:4318/custom/path", "http://collector:4318/custom/path"),
        ("on", None),
        ("off", None),
    ],
)
def test_otlp_setting_takes_a_base_url_a_full_url_or_on(value: str, endpoint: str | None) -> None:
    """A URL without a path gets /v1/metrics, as OTEL_EXPORTER_OTLP_ENDPOINT does; on defers to OTEL_*."""
    settings = Settings.build({}, {"GUNICORN_INSIGHT_OTLP": value})
    assert settings.otlp_endpoint == endpoint
    assert settings.otlp_enabled == (value != "off")


@pytest.mark.parametrize("value", ["collector:4318", "grpc://collector:4317", "http://", "http://host:99999"])
def test_bad_otlp_url_names_the_field_and_the_fix(value: str) -> None:
    """Not an http(s) URL: refused with an example of one."""
    with pytest.raises(ConfigurationError, match=r"otlp=.* is not an OTLP endpoint URL; write it like"):
        Settings.build({"otlp": value}, {})


def test_otlp_alone_keeps_the_directory_but_serves_no_metrics_port() -> None:
    """OTLP reads the multiprocess files, so they are written; /metrics is only served if asked for."""
    alone = Settings.build({"otlp": "on"}, {})
    assert (alone.prometheus_enabled, alone.serves_prometheus) == (True, False)
    both = Settings.build({"otlp": "on", "metrics_bind": "127.0.0.1:9100"}, {})
    assert (both.prometheus_enabled, both.serves_prometheus) == (True, True)
    assert Settings.build({}, {}).serves_prometheus


def test_endpoint_comes_from_the_standard_variables() -> None:
    """The signal variable wins over the base one, which gets /v1/metrics; the default is localhost:4318."""
    assert options().endpoint == "http://localhost:4318/v1/metrics"
    assert options(OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318/").endpoint == "http://c:4318/v1/metrics"
    assert (
        options(OTEL_EXPORTER_OTLP_ENDPOINT="http://c:4318", OTEL_EXPORTER_OTLP_METRICS_ENDPOINT="https://m/x").endpoint
        == "https://m/x"
    )


def test_the_http_protobuf_protocol_is_accepted_and_the_signal_variable_wins() -> None:
    """http/protobuf is the default; the metrics-specific variable overrides the general one."""
    assert options().protocol == "http/protobuf"
    assert options(OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf").endpoint == "http://localhost:4318/v1/metrics"
    resolved = options(OTEL_EXPORTER_OTLP_METRICS_PROTOCOL="http/protobuf", OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    assert (resolved.protocol, resolved.endpoint) == ("http/protobuf", "http://localhost:4318/v1/metrics")


def test_grpc_endpoints_have_no_signal_path() -> None:
    """gRPC: port 4317 by default, the base endpoint used as it is, the signal variable winning over the general."""
    assert (
        options(OTEL_EXPORTER_OTLP_PROTOCOL="grpc").protocol,
        options(OTEL_EXPORTER_OTLP_PROTOCOL="grpc").endpoint,
    ) == (
        "grpc",
        "http://localhost:4317",
    )
    grpc = options(OTEL_EXPORTER_OTLP_METRICS_PROTOCOL="grpc", OTEL_EXPORTER_OTLP_ENDPOINT="https://c:4317")
    assert (grpc.protocol, grpc.endpoint) == ("grpc", "https://c:4317")
    settings = Settings.build({"otlp": "http://collector:4317"}, {})
    assert settings.otlp_destination({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "http://collector:4317"
    assert settings.otlp_destination({}) == "http://collector:4317/v1/metrics"
    assert Settings.build({"otlp": "on"}, {}).otlp_destination({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) is None


def test_interval_and_temporality_come_from_the_standard_variables() -> None:
    """OTEL_METRIC_EXPORT_INTERVAL is milliseconds (default one minute); delta and lowmemory mean deltas."""
    assert (options().interval, options().delta) == (60.0, False)
    assert options(OTEL_METRIC_EXPORT_INTERVAL="500").interval == 0.5
    assert options(OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE="Delta").delta
    assert options(OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE="lowmemory").delta


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"OTEL_METRIC_EXPORT_INTERVAL": "1m"}, "OTEL_METRIC_EXPORT_INTERVAL='1m' must be milliseconds"),
        ({"OTEL_METRIC_EXPORT_INTERVAL": "0"}, "OTEL_METRIC_EXPORT_INTERVAL='0' must be milliseconds"),
        ({"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "both"}, "is not one of cumulative, delta"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "team=web,oops"}, "OTEL_RESOURCE_ATTRIBUTES has 'oops', which is not key"),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "collector:4318"}, "is not an http:// or https:// URL"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL='http/json': gunicorn-insight"),
        (
            {"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "http/json", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL='http/json'",
        ),
    ],
)
def test_bad_standard_variables_name_the_variable_and_the_fix(environ: dict[str, str], message: str) -> None:
    """Each OTEL_* variable we honour is checked at startup instead of being silently replaced by a default."""
    with pytest.raises(ConfigurationError, match=message):
        options(**environ)


def test_labels_become_semantic_convention_attributes() -> None:
    """method/status/route map to http.*; other methods are _OTHER; unknown status and route none are left out."""
    instrument = _otlp.INSTRUMENTS["gunicorn_requests"]
    assert _otlp.attributes({"method": "GET", "status": "503", "route": "/items/<id>"}, instrument, 8000) == {
        "http.request.method": "GET",
        "http.response.status_code": 503,
        "http.route": "/items/<id>",
        "server.port": 8000,
    }
    assert _otlp.attributes({"method": "other", "status": "unknown", "route": "none"}, instrument, None) == {
        "http.request.method": "_OTHER"
    }
    assert _otlp.attributes({"worker": "3"}, _otlp.INSTRUMENTS["gunicorn_worker_memory_bytes"], 8000) == {
        "gunicorn.worker.slot": 3
    }


def histogram(counts: dict[str, float], total: float) -> Family:
    samples = [Sample("d_bucket", {"method": "GET", "le": le}, value) for le, value in counts.items()]
    samples.append(Sample("d_sum", {"method": "GET"}, total))
    samples.append(Sample("d_count", {"method": "GET"}, counts["+Inf"]))
    return Family("d", "histogram", samples)


def test_cumulative_prometheus_buckets_become_otlp_bucket_counts() -> None:
    """Prometheus buckets are cumulative with +Inf; OTLP's are per bucket with the overflow last."""
    family = histogram({"0.1": 2, "1.0": 5, "+Inf": 6}, 3.5)
    (point,) = _otlp.histogram_points(family.samples, "d").values()
    assert (point.count, point.total, point.bounds, point.buckets) == (6, 3.5, (0.1, 1.0), [2, 3, 1])


def requests_family(ok: float, missing: float) -> Family:
    return Family(
        "gunicorn_requests",
        "counter",
        [
            Sample("gunicorn_requests_total", {"method": "GET", "status": "200"}, ok),
            Sample("gunicorn_requests_total", {"method": "GET", "status": "404"}, missing),
        ],
    )


def values(metric: Any) -> list[float]:
    return [point.value for point in metric.data.data_points]


def test_delta_temporality_sends_differences_and_survives_a_reset() -> None:
    """Deltas are this export minus the last; a counter that went down (new master) is sent whole."""
    translator = _otlp.Translator(options(OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE="delta"))
    (first,) = translator.metrics([requests_family(10, 1)], 2_000)
    (second,) = translator.metrics([requests_family(15, 1)], 3_000)
    (third,) = translator.metrics([requests_family(4, 2)], 4_000)
    assert (values(first), values(second), values(third)) == ([10, 1], [5, 0], [4, 1])
    assert second.data.data_points[0].start_time_unix_nano == 2_000
    assert first.data.aggregation_temporality.name == "DELTA"


def test_cumulative_series_start_when_the_master_did() -> None:
    """Cumulative points carry the master's start time; applications' own families are not sent."""
    translator = _otlp.Translator(options())
    app = Family("app_hits", "counter", [Sample("app_hits_total", {}, 3.0)])
    (metric,) = translator.metrics([requests_family(10, 1), app], 5_000_000_000)
    assert (metric.name, metric.unit, values(metric)) == ("gunicorn.requests", "{request}", [10, 1])
    assert {point.start_time_unix_nano for point in metric.data.data_points} == {1_000_000_000}


def test_resource_has_our_attributes_and_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """service.name defaults to proc_name; OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override it."""
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=prod")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    export = _otlp.OtlpExport(options(), list, lambda: None)
    attributes = dict(export.resource.attributes)
    assert (attributes["service.name"], attributes["process.pid"]) == ("shop", 42)
    assert attributes["deployment.environment.name"] == "prod"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout")
    assert _otlp.OtlpExport(options(), list, lambda: None).resource.attributes["service.name"] == "checkout"


@pytest.mark.parametrize(
    ("binds", "port"),
    [
        (["127.0.0.1:8000"], 8000),
        (["0.0.0.0:8000", "[::]:8000"], 8000),
        (["127.0.0.1:8000", "127.0.0.1:8001"], None),
        (["unix:/run/gunicorn.sock"], None),
        (["fd://3"], None),
        ([], None),
    ],
)
def test_server_port_only_when_gunicorn_binds_one_tcp_port(binds: list[str], port: int | None) -> None:
    """server.port is a fact only with one TCP port; unix sockets, fds or several ports leave it out."""
    from gunicorn_insight._master.plan import single_port

    assert single_port(binds) == port
