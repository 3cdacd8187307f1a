"""The integration fixtures; their code is in fixtures.py (type-checked there, see its docstring)."""

from fixtures import (
    grpc_otlp_receiver,
    nginx_factory,
    otlp_receiver,
    process_factory,
    prometheus_factory,
    pytest_runtest_makereport,
    short_tmp_path,
    statsd_daemon,
)

__all__ = [
    "grpc_otlp_receiver",
    "nginx_factory",
    "otlp_receiver",
    "process_factory",
    "prometheus_factory",
    "pytest_runtest_makereport",
    "short_tmp_path",
    "statsd_daemon",
]
