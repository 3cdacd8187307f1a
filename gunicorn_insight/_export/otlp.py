"""OTLP metrics export (HTTP, or gRPC with the otlp-grpc extra), run by the /metrics process (see
metrics_process), never by the master or a worker.

The numbers are the ones Prometheus serves: every export interval this process asks the master for a
round (as a scrape does), merges the multiprocess directory with the same collector, and translates the
merged families into OpenTelemetry metric data following the HTTP semantic conventions. The official
SDK's data classes and its OTLP exporter (HTTP or gRPC) encode and send them; nothing here writes protobuf.

The OpenTelemetry SDK is imported only by :class:`OtlpExport` (in this process). The rest of the module
is plain Python: option parsing and the translation table are testable without the SDK.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .._report import LOG, RateLimitedLog
from .._version import __version__
from ..settings import OTLP_PROTOCOL_VARIABLES, ConfigurationError
from .prometheus import OTLP_DURATION

DEFAULT_ENDPOINT = "http://localhost:4318/v1/metrics"
DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"
PROTOCOLS = ("http/protobuf", "grpc")
EXTRAS = {"http/protobuf": "otlp", "grpc": "otlp-grpc"}
"""The package extra that installs the exporter of each protocol."""
DEFAULT_INTERVAL_MS = 60000
TEMPORALITIES = ("cumulative", "delta", "lowmemory")
WARN_EVERY = 300.0
"""Seconds between two warnings about a failing endpoint."""
_NANOS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class OtlpOptions:
    """Everything the export needs, resolved from the ``otlp`` setting and the ``OTEL_*`` variables."""

    endpoint: str
    protocol: str
    """``http/protobuf`` (the default) or ``grpc``."""
    interval: float
    """Seconds between two exports (``OTEL_METRIC_EXPORT_INTERVAL``, in milliseconds there)."""
    delta: bool
    """Counters and histograms as deltas (``delta`` and ``lowmemory`` preferences); gauges and
    up-down counters stay cumulative, as the specification says for both preferences."""
    attributes: Mapping[str, str | int]
    """Our resource attributes; ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME`` win over them."""
    server_port: int | None
    started_ns: int
    """When the master started: the start of every cumulative series."""


def resolve_options(
    otlp: str,
    environ: Mapping[str, str],
    *,
    service_name: str,
    instance_id: str,
    master_pid: int,
    server_port: int | None,
    started: float,
) -> OtlpOptions:
    """Validate the ``otlp`` value and the standard variables; errors name the variable and the fix."""
    protocol = _protocol(environ)
    grpc = protocol == "grpc"
    if otlp.lower() in ("on", "true", "yes", "1"):
        endpoint = environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip()
        source = "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
        if not endpoint:
            base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
            source = "OTEL_EXPORTER_OTLP_ENDPOINT"
            if grpc:  # gRPC has no signal path: the base endpoint is the metrics endpoint
                endpoint = base or DEFAULT_GRPC_ENDPOINT
            else:
                endpoint = f"{base.removesuffix('/')}/v1/metrics" if base else DEFAULT_ENDPOINT
        _check_url(source, endpoint)
    else:
        endpoint = otlp
        _check_url("otlp", endpoint)
    raw_interval = environ.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip() or str(DEFAULT_INTERVAL_MS)
    try:
        interval_ms = float(raw_interval)
    except ValueError:
        interval_ms = math.nan
    if not 100 <= interval_ms <= 86_400_000:
        raise ConfigurationError(
            f"OTEL_METRIC_EXPORT_INTERVAL={raw_interval!r} must be milliseconds between 100 and 86400000, "
            "e.g. 60000 for one export a minute"
        )
    raw_temporality = environ.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "").strip() or "cumulative"
    if raw_temporality.lower() not in TEMPORALITIES:
        raise ConfigurationError(
            f"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE={raw_temporality!r} is not one of "
            f"{', '.join(TEMPORALITIES)}; cumulative is the default"
        )
    for item in filter(None, environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")):
        key, equals, _ = item.partition("=")
        if not equals or not key.strip():
            raise ConfigurationError(
                f"OTEL_RESOURCE_ATTRIBUTES has {item!r}, which is not key=value; write it like "
                "deployment.environment.name=prod,team=web (percent-encode commas in values)"
            )
    return OtlpOptions(
        endpoint=endpoint,
        protocol=protocol,
        interval=interval_ms / 1000.0,
        delta=raw_temporality.lower() != "cumulative",
        attributes={
            "service.name": service_name,
            "service.instance.id": instance_id,
            "host.name": socket.gethostname(),
            "process.pid": master_pid,
        },
        server_port=server_port,
        started_ns=int(started * _NANOS),
    )


def _protocol(environ: Mapping[str, str]) -> str:
    for variable in OTLP_PROTOCOL_VARIABLES:
        value = environ.get(variable, "").strip()
        if not value:
            continue
        if value not in PROTOCOLS:
            raise ConfigurationError(
                f"{variable}={value!r}: gunicorn-insight sends OTLP as http/protobuf (collectors listen on port "
                "4318) or grpc (port 4317, with pip install 'gunicorn-insight[otlp-grpc]'); set one of those or "
                "unset it"
            )
        return value  # the signal-specific variable wins over the general one
    return "http/protobuf"


def _check_url(field: str, url: str) -> None:
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # not a number, or outside 0..65535
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ConfigurationError(
            f"{field}={url!r} is not an http:// or https:// URL; give the collector's OTLP endpoint, "
            "e.g. http://collector:4318/v1/metrics (or http://collector:4317 with the grpc protocol)"
        )


# -- translation --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Instrument:
    """How one Prometheus family of ours is sent over OTLP."""

    name: str
    unit: str
    kind: str
    """``counter`` (monotonic sum), ``updown`` (non-monotonic cumulative sum), ``gauge``, ``histogram``."""
    description: str
    http: bool = False
    """Carries ``server.port``, as the HTTP server conventions ask."""


INSTRUMENTS: dict[str, Instrument] = {
    # The master writes this family (by method, status and route) only when OTLP is on, from the same rounds
    # as gunicorn_request_duration_seconds, which has no status label (see _prometheus.OTLP_DURATION).
    OTLP_DURATION: Instrument(
        "http.server.request.duration", "s", "histogram", "Duration of HTTP server requests.", http=True
    ),
    "gunicorn_requests_in_flight": Instrument(
        "http.server.active_requests", "{request}", "updown", "Number of active HTTP server requests.", http=True
    ),
    "gunicorn_requests": Instrument(
        "gunicorn.requests", "{request}", "counter", "Requests finished, by method, status code and route.", http=True
    ),
    "gunicorn_request_cpu_seconds": Instrument(
        "gunicorn.request.cpu.time",
        "s",
        "counter",
        "CPU seconds spent by requests, by method, status code and route.",
        http=True,
    ),
    "gunicorn_requests_client_closed": Instrument(
        "gunicorn.requests.client_closed",
        "{request}",
        "counter",
        "Requests whose client had gone before the response was written.",
        http=True,
    ),
    "gunicorn_request_queue_seconds": Instrument(
        "gunicorn.request.queue.duration",
        "s",
        "histogram",
        "Time from the proxy's X-Request-Start to a worker picking the request up.",
    ),
    "gunicorn_request_queue_invalid": Instrument(
        "gunicorn.request.queue.invalid", "{request}", "counter", "X-Request-Start headers ignored."
    ),
    "gunicorn_slow_requests": Instrument(
        "gunicorn.request.slow", "{request}", "counter", "Requests that ran past slow_request_timeout."
    ),
    "gunicorn_insight_lost_requests": Instrument(
        "gunicorn.insight.lost_requests",
        "{request}",
        "counter",
        "Finished requests the master could not read in time; stays 0.",
    ),
    "gunicorn_worker_exits": Instrument("gunicorn.worker.exits", "{exit}", "counter", "Worker exits by cause."),
    "gunicorn_requests_rejected": Instrument(
        "gunicorn.requests.rejected",
        "{request}",
        "counter",
        "Requests gunicorn's HTTP parser refused before the application, by reason.",
    ),
    "gunicorn_workers": Instrument("gunicorn.workers", "{worker}", "gauge", "Live worker processes."),
    "gunicorn_workers_desired": Instrument(
        "gunicorn.workers.desired", "{worker}", "gauge", "The number of workers gunicorn keeps."
    ),
    "gunicorn_master_loop_stuck_seconds": Instrument(
        "gunicorn.master.loop.stuck_time",
        "s",
        "gauge",
        "Seconds since gunicorn's master loop was last seen waiting for signals.",
    ),
    "gunicorn_workers_busy": Instrument(
        "gunicorn.workers.busy", "{worker}", "gauge", "Workers with at least one request in flight."
    ),
    "gunicorn_capacity": Instrument(
        "gunicorn.capacity", "{request}", "gauge", "Requests the live workers can run at once."
    ),
    "gunicorn_requests_waiting": Instrument(
        "gunicorn.requests.waiting",
        "{connection}",
        "gauge",
        "gthread: connections accepted, waiting for a free thread.",
    ),
    "gunicorn_worker_busy_seconds": Instrument(
        "gunicorn.worker.busy_time", "s", "counter", "Request-seconds spent by the workers of each slot."
    ),
    "gunicorn_worker_cpu_seconds": Instrument(
        "gunicorn.worker.cpu.time", "s", "counter", "CPU seconds (user + system) of each slot's workers."
    ),
    "gunicorn_worker_connections": Instrument(
        "gunicorn.worker.connections", "{connection}", "gauge", "Open client connections per worker slot."
    ),
    "gunicorn_worker_connections_limit": Instrument(
        "gunicorn.worker.connections.limit", "{connection}", "gauge", "Connections one worker accepts at most."
    ),
    "gunicorn_worker_memory_bytes": Instrument(
        "gunicorn.worker.memory.usage", "By", "gauge", "Resident memory of the worker in each slot."
    ),
    "gunicorn_worker_open_fds": Instrument(
        "gunicorn.worker.file_descriptor.count",
        "{file_descriptor}",
        "gauge",
        "Open file descriptors of each slot's worker.",
    ),
    "gunicorn_worker_max_fds": Instrument(
        "gunicorn.worker.file_descriptor.limit",
        "{file_descriptor}",
        "gauge",
        "The soft limit on open file descriptors of each slot's worker.",
    ),
    "gunicorn_worker_threads": Instrument(
        "gunicorn.worker.thread.count", "{thread}", "gauge", "Threads of each slot's worker."
    ),
    "gunicorn_listen_backlog": Instrument(
        "gunicorn.listen.backlog", "{connection}", "gauge", "Connections waiting in a listener's accept queue."
    ),
    "gunicorn_listen_backlog_max": Instrument(
        "gunicorn.listen.backlog.limit", "{connection}", "gauge", "The accept queue's limit."
    ),
    "gunicorn_listen_unserved_seconds": Instrument(
        "gunicorn.listen.unserved.duration",
        "s",
        "gauge",
        "Seconds connections have waited in a listener's accept queue while no worker was in a request.",
    ),
    "gunicorn_listen_time_wait": Instrument(
        "gunicorn.listen.time_wait",
        "{connection}",
        "gauge",
        "A TCP listener's connections closed in the last 60 s, in TIME_WAIT.",
    ),
    "gunicorn_listen_drops": Instrument(
        "gunicorn.listen.drops",
        "{packet}",
        "counter",
        "Packets the kernel dropped at a TCP listener, almost all of them connection attempts met by a full "
        "accept queue.",
    ),
    "gunicorn_listen_overflows": Instrument(
        "gunicorn.listen.overflows",
        "{connection}",
        "counter",
        "Connections the kernel dropped because an accept queue was full.",
    ),
}

ATTRIBUTE_NAMES = {
    "method": "http.request.method",
    "status": "http.response.status_code",
    "route": "http.route",
    "worker": "gunicorn.worker.slot",
    "cause": "gunicorn.worker.exit.cause",
    "reason": "gunicorn.request.rejected.reason",
    "listener": "gunicorn.listener",
}


def attributes(labels: Mapping[str, str], instrument: Instrument, server_port: int | None) -> dict[str, str | int]:
    """Prometheus labels as semantic-convention attributes. A value the conventions have no word for
    (status ``unknown``, route ``none``) is left out rather than invented; a request its worker died under
    (status ``aborted``) has no status code and ``error.type`` ``aborted``."""
    found: dict[str, str | int] = {}
    for label, value in labels.items():
        if label == "method":
            found["http.request.method"] = "_OTHER" if value == "other" else value
        elif label == "status":
            if value.isdigit():
                found["http.response.status_code"] = int(value)
            elif value == "aborted":  # the worker died under it: no response, so no status code
                found["error.type"] = "aborted"
        elif label == "route":
            if value != "none":
                found["http.route"] = value
        elif label == "worker":
            found["gunicorn.worker.slot"] = int(value) if value.isdigit() else value
        else:
            found[ATTRIBUTE_NAMES.get(label, label)] = value
    if instrument.http and server_port is not None:
        found["server.port"] = server_port
    return found


@dataclass(slots=True)
class HistogramPoint:
    count: int
    total: float
    bounds: tuple[float, ...]
    buckets: list[int]
    """Per bucket, not cumulative: OTLP's bucket_counts, the last one above the highest bound."""


def histogram_points(samples: Iterable[Any], family: str) -> dict[tuple[tuple[str, str], ...], HistogramPoint]:
    """Fold a merged histogram family's cumulative ``_bucket``/``_sum``/``_count`` samples into points."""
    cumulative: dict[tuple[tuple[str, str], ...], dict[float, float]] = {}
    sums: dict[tuple[tuple[str, str], ...], float] = {}
    for sample in samples:
        labels = {key: value for key, value in sample.labels.items() if key != "le"}
        key = tuple(sorted(labels.items()))
        if sample.name == family + "_bucket":
            cumulative.setdefault(key, {})[float(sample.labels["le"])] = sample.value
        elif sample.name == family + "_sum":
            sums[key] = sample.value
    points = {}
    for key, by_bound in cumulative.items():
        bounds = sorted(by_bound)
        running = [int(by_bound[bound]) for bound in bounds]
        buckets = [count - previous for count, previous in zip(running, [0, *running[:-1]], strict=True)]
        if bounds and math.isinf(bounds[-1]):
            bounds = bounds[:-1]
        else:
            buckets.append(0)
        points[key] = HistogramPoint(running[-1] if running else 0, sums.get(key, 0.0), tuple(bounds), buckets)
    return points


class Translator:
    """Merged families in, SDK ``Metric`` objects out; remembers the last values for delta temporality."""

    def __init__(self, options: OtlpOptions) -> None:
        self._options = options
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[int, Any]] = {}

    def metrics(self, families: Iterable[Any], now_ns: int) -> list[Any]:
        from opentelemetry.sdk.metrics.export import AggregationTemporality, Gauge, Metric, Sum

        temporality = AggregationTemporality.DELTA if self._options.delta else AggregationTemporality.CUMULATIVE
        found = []
        for family in families:
            instrument = INSTRUMENTS.get(family.name)
            if instrument is None:
                continue  # the application's own metrics: served by /metrics, not sent over OTLP
            data: Any
            if instrument.kind == "histogram":
                data = self._histogram(family, instrument, temporality, now_ns)
            elif instrument.kind == "counter":
                data = Sum(self._counter_points(family, instrument, now_ns), temporality, is_monotonic=True)
            elif instrument.kind == "updown":
                data = Sum(
                    self._gauge_points(family, instrument, now_ns, self._options.started_ns),
                    AggregationTemporality.CUMULATIVE,
                    is_monotonic=False,
                )
            else:
                data = Gauge(self._gauge_points(family, instrument, now_ns, 0))
            if data.data_points:
                found.append(Metric(instrument.name, instrument.description, instrument.unit, data))
        return found

    def _gauge_points(self, family: Any, instrument: Instrument, now_ns: int, start_ns: int) -> list[Any]:
        from opentelemetry.sdk.metrics.export import NumberDataPoint

        return [
            NumberDataPoint(
                attributes(sample.labels, instrument, self._options.server_port),
                start_ns,
                now_ns,
                _number(sample.value),
            )
            for sample in family.samples
        ]

    def _counter_points(self, family: Any, instrument: Instrument, now_ns: int) -> list[Any]:
        from opentelemetry.sdk.metrics.export import NumberDataPoint

        points = []
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue  # _created samples
            value = _number(sample.value)
            start = self._options.started_ns
            if self._options.delta:
                key = (family.name, tuple(sorted(sample.labels.items())))
                previous = self._last.get(key)
                self._last[key] = (now_ns, value)
                if previous is not None:
                    start, before = previous
                    value = value - before if value >= before else value  # a reset: all of it is new
            points.append(
                NumberDataPoint(attributes(sample.labels, instrument, self._options.server_port), start, now_ns, value)
            )
        return points

    def _histogram(self, family: Any, instrument: Instrument, temporality: Any, now_ns: int) -> Any:
        from opentelemetry.sdk.metrics.export import Histogram, HistogramDataPoint

        points = []
        for key, merged in histogram_points(family.samples, family.name).items():
            start, point = self._options.started_ns, merged
            if self._options.delta:
                previous = self._last.get((family.name, key))
                self._last[family.name, key] = (now_ns, merged)
                if previous is not None:
                    start, before = previous
                    if merged.count >= before.count and len(before.buckets) == len(merged.buckets):
                        point = HistogramPoint(
                            merged.count - before.count,
                            merged.total - before.total,
                            merged.bounds,
                            [now - then for now, then in zip(merged.buckets, before.buckets, strict=True)],
                        )
            points.append(
                HistogramDataPoint(
                    attributes(dict(key), instrument, self._options.server_port),
                    start,
                    now_ns,
                    point.count,
                    point.total,
                    point.buckets,
                    point.bounds,
                    # The files keep no minimum or maximum: None leaves the optional OTLP fields unset.
                    None,  # type: ignore[arg-type]
                    None,  # type: ignore[arg-type]
                )
            )
        return Histogram(points, temporality)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


# -- export -------------------------------------------------------------------------------------------


class _FirstError(logging.Handler):
    """Keeps the SDK's first complaint of an export (it names the cause; the last one only says the
    retries ran out), which our own rate-limited warning then quotes."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.message = ""

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            if not self.message:
                self.message = record.getMessage()


class OtlpExport:
    """The export loop: every interval, a fresh round, the merged families, one OTLP request."""

    def __init__(
        self, options: OtlpOptions, collect: Callable[[], Iterable[Any]], fresh_round: Callable[[], None]
    ) -> None:
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self.options = options
        self._collect = collect
        self._fresh_round = fresh_round
        self._translator = Translator(options)
        # OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME win over ours; the SDK's telemetry.sdk.* stay.
        self._resource = (
            Resource.create().merge(Resource(dict(options.attributes))).merge(OTELResourceDetector().detect())
        )
        self._scope = InstrumentationScope("gunicorn_insight", __version__)
        self._sdk_error = _FirstError()
        sdk_log = logging.getLogger("opentelemetry")
        sdk_log.addHandler(self._sdk_error)
        sdk_log.propagate = False  # its per-attempt retries and tracebacks would flood gunicorn's error log
        self._exporter = _exporter_class(options.protocol)(endpoint=options.endpoint)
        self._warn = RateLimitedLog(period=WARN_EVERY)
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def resource(self) -> Any:
        return self._resource

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gunicorn-insight-otlp", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.options.interval):
            self.export_once()

    def data(self) -> Any:
        """A fresh round from the master, then the directory as the SDK's MetricsData."""
        from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics, ScopeMetrics

        self._fresh_round()
        metrics = self._translator.metrics(self._collect(), time.time_ns())
        return MetricsData([ResourceMetrics(self._resource, [ScopeMetrics(self._scope, metrics, "")], "")])

    def export_once(self) -> bool:
        from opentelemetry.sdk.metrics.export import MetricExportResult

        try:
            self._sdk_error.message = ""
            ok = self._exporter.export(self.data()) is MetricExportResult.SUCCESS
            reason = self._sdk_error.message or "the collector refused it"
        except Exception as error:  # the SDK's own bugs must not end the loop
            ok, reason = False, f"{type(error).__name__}: {error}"
        if not ok:
            self._failing = True
            self._warn(
                "otlp-export",
                logging.WARNING,
                f"OTLP export to {self.options.endpoint} failed ({reason}); retrying every "
                f"{self.options.interval:g}s, requests are not affected",
            )
        elif self._failing:
            self._failing = False
            LOG.info("gunicorn-insight: OTLP export to %s works again", self.options.endpoint)
        return ok

    def stop(self) -> None:
        """The master is gone: one last export (its final round is in the files), then close."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.options.interval + 30)
        with contextlib.suppress(Exception):
            self.export_once()
        with contextlib.suppress(Exception):
            self._exporter.shutdown()


def _exporter_class(protocol: str) -> Any:
    """The official exporter of the protocol; ImportError when its extra is not installed. An http:// gRPC
    endpoint is a plaintext channel, https:// a TLS one (the exporter decides from the scheme)."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as Grpc

        return Grpc
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as Http

    return Http


def log_to_stderr() -> None:
    """This process has no gunicorn logger: write our lines to its stderr (gunicorn's error log) the way
    gunicorn formats its own."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S %z")
    )
    LOG.addHandler(handler)
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
