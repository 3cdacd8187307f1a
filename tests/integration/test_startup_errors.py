"""Bad input stops gunicorn at startup with one clear line, before any request is served."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from harness import EXAMPLES, clean_environment, gunicorn_argv
from servers import ProcessFactory, free_port


def start_expecting_failure(process_factory: ProcessFactory, env: dict[str, str], *args: str) -> str:
    argv = gunicorn_argv(
        "-c",
        "python:gunicorn_insight.conf",
        "-b",
        f"127.0.0.1:{free_port()}",
        "--chdir",
        str(EXAMPLES),
        *args,
        "app:app",
    )
    process = process_factory(argv, env=clean_environment(env), cwd=EXAMPLES, name="gunicorn")
    assert process.wait(timeout=30) != 0
    return process.output()


@pytest.mark.oldest
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GUNICORN_INSIGHT_STATSDD": "x:1"}, "unknown environment variable GUNICORN_INSIGHT_STATSDD; valid ones are"),
        ({"GUNICORN_INSIGHT_STATSD": "localhost"}, "statsd='localhost' is not host:port"),
        ({"GUNICORN_INSIGHT_METRICS_BIND": "nope"}, "metrics_bind='nope' is not host:port"),
        ({"GUNICORN_INSIGHT_BUCKETS": "1,0.5"}, "strictly increasing"),
    ],
)
def test_malformed_settings_fail_before_serving(
    process_factory: ProcessFactory, env: dict[str, str], message: str
) -> None:
    """A malformed or unknown setting is refused while gunicorn loads its config, naming it."""
    assert message in start_expecting_failure(process_factory, env)


@pytest.mark.oldest
def test_metrics_port_in_use_fails_at_startup(process_factory: ProcessFactory) -> None:
    """An explicit /metrics port someone else holds is a startup error (after 5 s of retries) with the fix."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        output = start_expecting_failure(process_factory, {"GUNICORN_INSIGHT_METRICS_BIND": f"127.0.0.1:{port}"})
    assert f"Error: metrics_bind=127.0.0.1:{port} cannot be bound (Address already in use)" in output
    assert f"find it with: ss -ltnp 'sport = :{port}'" in output
    assert "pick a free port" not in output
    assert "Booting worker" not in output


def test_prometheus_dir_that_is_a_file_fails_at_startup(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """A multiprocess directory that cannot be created or written is refused with the fix."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    output = start_expecting_failure(process_factory, {"GUNICORN_INSIGHT_PROMETHEUS_DIR": str(blocker)})
    assert f"prometheus_dir='{blocker}' is not a writable directory" in output


def test_prometheus_client_imported_too_early_fails_at_startup(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """A config that imports prometheus_client before install() gets the error that explains the order."""
    config = tmp_path / "gunicorn.conf.py"
    config.write_text("import prometheus_client\nimport gunicorn_insight\ngunicorn_insight.install(globals())\n")
    argv = gunicorn_argv("-c", str(config), "-b", f"127.0.0.1:{free_port()}", "--chdir", str(EXAMPLES), "app:app")
    env = clean_environment({"GUNICORN_INSIGHT_METRICS_BIND": f"127.0.0.1:{free_port()}"})
    process = process_factory(argv, env=env, cwd=tmp_path, name="gunicorn")
    assert process.wait(timeout=30) != 0
    assert "prometheus_client was imported before gunicorn-insight set PROMETHEUS_MULTIPROC_DIR" in process.output()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GUNICORN_INSIGHT_OTLP": "collector:4318"}, "otlp='collector:4318' is not an OTLP endpoint URL"),
        (
            {"GUNICORN_INSIGHT_OTLP": "on", "OTEL_METRIC_EXPORT_INTERVAL": "soon"},
            "Error: OTEL_METRIC_EXPORT_INTERVAL='soon' must be milliseconds",
        ),
        (
            {"GUNICORN_INSIGHT_OTLP": "on", "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "sometimes"},
            "Error: OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE='sometimes' is not one of",
        ),
        (
            {"GUNICORN_INSIGHT_OTLP": "on", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "Error: OTEL_EXPORTER_OTLP_PROTOCOL='http/json': gunicorn-insight sends OTLP as http/protobuf",
        ),
        (
            {"GUNICORN_INSIGHT_OTLP": "on", "OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://collector:4317"},
            "Error: OTEL_EXPORTER_OTLP_ENDPOINT='grpc://collector:4317/v1/metrics' is not an http:// or https:// URL",
        ),
    ],
)
def test_bad_otlp_configuration_fails_at_startup(
    process_factory: ProcessFactory, env: dict[str, str], message: str
) -> None:
    """A bad otlp value or OTEL_* variable stops gunicorn with one line naming it, before any worker boots."""
    output = start_expecting_failure(process_factory, env)
    assert message in output
    assert "Booting worker" not in output


def test_otlp_without_the_sdk_names_the_extra_to_install(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """otlp on where the OpenTelemetry SDK cannot be imported: a startup error saying which extra installs it."""
    shadow = tmp_path / "no-sdk" / "opentelemetry"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no OpenTelemetry here (test)')\n")
    output = start_expecting_failure(process_factory, {"GUNICORN_INSIGHT_OTLP": "on", "PYTHONPATH": str(shadow.parent)})
    assert "Error: otlp='on' needs the OpenTelemetry SDK and its OTLP/HTTP exporter" in output
    assert "pip install 'gunicorn-insight[otlp]'" in output
    assert "Booting worker" not in output


def test_otlp_grpc_without_grpcio_names_the_grpc_extra(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """The grpc protocol where the gRPC exporter cannot be imported: a startup error naming the otlp-grpc extra."""
    shadow = tmp_path / "no-grpc" / "grpc"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no grpcio here (test)')\n")
    env = {"GUNICORN_INSIGHT_OTLP": "on", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "PYTHONPATH": str(shadow.parent)}
    output = start_expecting_failure(process_factory, env)
    assert "Error: otlp='on' needs the OpenTelemetry SDK and its OTLP/gRPC exporter" in output
    assert "pip install 'gunicorn-insight[otlp-grpc]'" in output
    assert "Booting worker" not in output
