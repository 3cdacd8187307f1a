"""OTLP metrics receivers in the test process, over HTTP and over gRPC: each decodes every export with the
official protobuf classes (opentelemetry-proto's ExportMetricsServiceRequest; over gRPC its generated
MetricsService servicer) and keeps them for assertions."""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from servers import free_port

PATH = "/v1/metrics"


def value_of(any_value: AnyValue) -> Any:
    """The Python value of an OTLP AnyValue (string, int, double, bool)."""
    return getattr(any_value, any_value.WhichOneof("value") or "string_value")


def attributes_of(pairs: Any) -> dict[str, Any]:
    return {pair.key: value_of(pair.value) for pair in pairs}


class OtlpReceiver:
    """Listens on a fixed 127.0.0.1 port; :meth:`stop` and :meth:`start` again simulate a collector outage."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.requests: list[ExportMetricsServiceRequest] = []
        self.bad: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != PATH or self.headers.get("Content-Type") != "application/x-protobuf":
                    receiver.bad.append(f"{self.path} {self.headers.get('Content-Type')}")
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportMetricsServiceRequest()
                request.ParseFromString(body)
                with receiver._lock:
                    receiver.requests.append(request)
                answer = ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: pytest shows failures, not every export."""

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def all_requests(self) -> list[ExportMetricsServiceRequest]:
        with self._lock:
            return list(self.requests)

    def metrics(self, name: str) -> Iterator[Any]:
        """Every exported ``Metric`` called ``name``, oldest first."""
        for request in self.all_requests():
            for resource_metrics in request.resource_metrics:
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        if metric.name == name:
                            yield metric

    def latest(self, name: str) -> Any:
        """The newest exported `Metric` called `name`, None before the first."""
        found = None
        for found in self.metrics(name):  # noqa: B007 - the last one is wanted
            pass
        return found

    def resource(self) -> dict[str, Any]:
        """The resource attributes of the latest export."""
        requests = self.all_requests()
        assert requests, "nothing was exported"
        return attributes_of(requests[-1].resource_metrics[0].resource.attributes)

    def describe(self) -> str:
        names = sorted(
            {
                metric.name
                for request in self.all_requests()
                for rm in request.resource_metrics
                for sm in rm.scope_metrics
                for metric in sm.metrics
            }
        )
        return f"{self.count()} exports to {self.url}; metrics: {', '.join(names)}; bad requests: {self.bad}"


class GrpcOtlpReceiver(OtlpReceiver):
    """The same receiver as a gRPC server: grpcio serving opentelemetry-proto's MetricsService."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self._grpc_server: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import grpc

        receiver = self

        class Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: ExportMetricsServiceRequest, context: Any) -> ExportMetricsServiceResponse:
                with receiver._lock:
                    receiver.requests.append(request)
                return ExportMetricsServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Servicer(), server)
        if server.add_insecure_port(f"127.0.0.1:{self.port}") != self.port:
            raise OSError(f"gRPC receiver could not bind 127.0.0.1:{self.port}")
        server.start()
        self._grpc_server = server

    def stop(self) -> None:
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=None).wait(10)
            self._grpc_server = None


def points(metric: Any) -> list[Any]:
    """The data points of a metric, whatever its type."""
    if metric is None:
        return []
    kind = metric.WhichOneof("data")
    return list(getattr(metric, kind).data_points)


def point_total(metric: Any, **wanted: Any) -> float:
    """Sum over the points whose attributes include ``wanted``: ``count`` for histograms, else the value."""
    total = 0.0
    for point in points(metric):
        if set(wanted.items()) <= set(attributes_of(point.attributes).items()):
            if metric.WhichOneof("data") == "histogram":
                total += point.count
            else:
                total += point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
    return total
