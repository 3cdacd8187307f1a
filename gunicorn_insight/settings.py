"""The plugin's settings: one immutable object, validated when it is built.

Each field can be given as a keyword argument to :func:`gunicorn_insight.install` or as an environment
variable ``GUNICORN_INSIGHT_<FIELD>``; keyword arguments win. Facts gunicorn already has (``statsd_host``,
``statsd_prefix``, ``dogstatsd_tags``, ``worker_connections``, ``timeout``) are read from gunicorn's own
configuration when the server starts, never duplicated here.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["DEFAULT_BUCKETS", "DEFAULT_METRICS_BIND", "ENV_PREFIX", "ConfigurationError", "Settings"]

ENV_PREFIX = "GUNICORN_INSIGHT_"
DEFAULT_METRICS_BIND = "127.0.0.1:9180"
DEFAULT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_OFF = frozenset({"off", "none", "false", "0", "no", "disabled"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_HOST_PORT = re.compile(r"^(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d{1,5})$")


class ConfigurationError(RuntimeError):
    """A setting is wrong. The message names the field, the bad value and the fix.

    It derives from RuntimeError because gunicorn turns a RuntimeError raised while the arbiter starts
    into a one-line ``Error: ...`` and exit status 1 instead of a traceback.
    """


def parse_host_port(field_name: str, value: str, example_port: int) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) or raise naming the field."""
    match = _HOST_PORT.match(value.strip())
    if match is None:
        raise ConfigurationError(
            f"{field_name}={value!r} is not host:port; write it like "
            f"'127.0.0.1:{example_port}' or '[::1]:{example_port}'"
        )
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ConfigurationError(f"{field_name}={value!r}: port {port} is outside 1..65535")
    return (match["ipv6"] or match["host"]), port


def join_host_port(host: str, port: int) -> str:
    """The inverse of :func:`parse_host_port`: ``host:port``, ``[v6]:port``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_unix_path(value: str) -> bool:
    return value.startswith(("/", "unix:", "./"))


def _unix_path(value: str) -> str:
    return value[len("unix:") :] if value.startswith("unix:") else value


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything gunicorn-insight can be told. Build it with keywords, or from the environment."""

    statsd: str | None = None
    """``host:port`` or a unix datagram socket path. Unset: gunicorn's ``statsd_host`` if it has one."""
    prometheus_dir: str | None = None
    """prometheus_client multiprocess directory. Unset: ``PROMETHEUS_MULTIPROC_DIR``, else a private one."""
    metrics_bind: str | None = None
    """Where ``/metrics`` is served, ``host:port``; ``off`` to not serve it."""
    buckets: tuple[float, ...] = DEFAULT_BUCKETS
    """Upper bounds (seconds) of the request duration histogram."""
    redact_query: bool = True
    """Replace query strings with ``?<redacted>`` wherever a request is named."""
    max_workers: int | None = None
    """Scoreboard slots. Unset: four times gunicorn's ``workers``, at least 16."""
    dogstatsd: bool | None = None
    """Send per-worker StatsD values as DogStatsD tags. Unset: on when gunicorn's ``dogstatsd_tags`` is."""
    interval: float = 0.5
    """Seconds between two rounds of the master's exporter (StatsD flush, gauges, dead-worker merge)."""
    slow_request_timeout: float | None = None
    """Log a request running longer than this, with its stack. Unset: 0.8 x gunicorn's timeout; 0: off."""
    queue_time: bool = True
    """Measure time spent before a worker picked the request up, from X-Request-Start / X-Queue-Start."""
    exclude_paths: tuple[str, ...] = ()
    """Exact paths (health checks) left out of every request metric."""
    route_label: bool = False
    """Add a ``route`` label (the route template, never the raw path) to request metrics."""
    route_resolver: Callable[[Any], str | None] | None = None
    """``callable(environ) -> template``, or ``module:function`` from the environment. Unset: the
    ``gunicorn_insight.route`` environ key, which Flask apps and the Django middleware fill in."""
    max_routes: int = 100
    """Distinct route values at most; more are counted as ``other`` (warned about at most once an hour)."""
    access_log_atoms: bool = False
    """Add X-Gunicorn-Busy and X-Gunicorn-Queue-Ms request headers for gunicorn's access_log_format."""
    statsd_timers_per_second: int = 500
    """StatsD timer values sent per timer metric per second at most. Past it, a random sample that keeps
    the fastest and the slowest, each line marked with its sample rate; 0: every value."""
    compiled_hooks: bool = True
    """Use the request hooks compiled from _speedups.c where the package was built with them; off: the
    pure-Python hooks (same behaviour, more CPU per request)."""
    otlp: str | None = None
    """Send metrics over OTLP (HTTP, or gRPC when ``OTEL_EXPORTER_OTLP_[METRICS_]PROTOCOL=grpc``): the
    endpoint URL, or ``on`` to take it (and headers, timeout...) from the standard ``OTEL_EXPORTER_OTLP_*``
    variables; ``off``/unset: no OTLP."""

    def __post_init__(self) -> None:
        for name, check in _VALIDATORS.items():
            object.__setattr__(self, name, check(getattr(self, name)))

    def same_as(self, other: Settings) -> bool:
        """Equal, counting a resolver function re-created by a config reload as the same resolver."""
        mine, theirs = self.route_resolver, other.route_resolver
        if mine is not None and theirs is not None and _qualified(mine) == _qualified(theirs):
            return replace(self, route_resolver=None) == replace(other, route_resolver=None)
        return self == other

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def build(cls, overrides: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
        """Environment variables first, then keyword overrides; unknown names are errors."""
        names = cls.field_names()
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ConfigurationError(
                f"unknown setting {', '.join(map(repr, unknown))}; valid settings are: {', '.join(names)}"
            )
        from_environ = dict(_from_environ(os.environ if environ is None else environ, names))
        for name, value in from_environ.items():
            if name not in overrides:
                _check_from_environ(name, value)
        return cls(**{**from_environ, **overrides})

    # -- derived facts ------------------------------------------------------------------------------

    @property
    def serves_metrics(self) -> bool:
        return self.metrics_bind is None or self.metrics_bind.lower() not in _OFF

    @property
    def metrics_address(self) -> tuple[str, int]:
        return parse_host_port("metrics_bind", self.metrics_bind or DEFAULT_METRICS_BIND, 9180)

    @property
    def otlp_enabled(self) -> bool:
        return self.otlp is not None and self.otlp.lower() not in _OFF

    @property
    def otlp_endpoint(self) -> str | None:
        """The URL given, with the OTLP metrics path added when it has none; None for ``on`` (the
        ``OTEL_EXPORTER_OTLP_*`` variables decide) or when OTLP is off."""
        if not self.otlp_enabled or self.otlp is None or self.otlp.lower() in _TRUE:
            return None
        return _otlp_metrics_url(self.otlp)

    def otlp_destination(self, environ: Mapping[str, str]) -> str | None:
        """Where OTLP goes, for the startup line and server.json: :attr:`otlp_endpoint` over HTTP, the URL
        as given over gRPC (which has no path); None when the ``OTEL_EXPORTER_OTLP_*`` variables decide."""
        if otlp_protocol(environ) == "grpc" and self.otlp_endpoint is not None:
            return self.otlp
        return self.otlp_endpoint

    @property
    def serves_prometheus(self) -> bool:
        """``/metrics`` is served: OTLP alone needs the multiprocess directory, not the endpoint."""
        if not self.serves_metrics:
            return False
        return (
            self.metrics_bind is not None
            or self.prometheus_dir is not None
            or (self.statsd is None and not self.otlp_enabled)
        )

    @property
    def prometheus_enabled(self) -> bool:
        """Prometheus is on unless the user asked for StatsD only (or switched /metrics off, no dir).
        OTLP reads the same directory, so it needs it too."""
        if self.otlp_enabled:
            return True
        if self.prometheus_dir is not None:
            return True
        if self.metrics_bind is not None:
            return self.serves_metrics
        return self.statsd is None

    @property
    def statsd_target(self) -> tuple[str, int] | str | None:
        """``(host, port)`` for UDP, a path for a unix datagram socket, None when not configured."""
        if self.statsd is None:
            return None
        if _is_unix_path(self.statsd):
            return _unix_path(self.statsd)
        return parse_host_port("statsd", self.statsd, 8125)

    # -- validators needing the instance ----------------------------------------------------------

    @staticmethod
    def _check_statsd(raw: Any) -> str | None:
        value = _check_optional_str("statsd")(raw)
        if value is None:
            return None
        if _is_unix_path(value):
            if not _unix_path(value):
                raise ConfigurationError("statsd='unix:' has no path; give the socket path, e.g. unix:/run/statsd.sock")
            return value
        parse_host_port("statsd", value, 8125)
        return value

    @staticmethod
    def _check_metrics_bind(raw: Any) -> str | None:
        value = _check_optional_str("metrics_bind")(raw)
        if value is None or value.lower() in _OFF:
            return value
        parse_host_port("metrics_bind", value, 9180)
        return value


def _from_environ(environ: Mapping[str, str], names: Iterable[str]) -> Iterable[tuple[str, Any]]:
    known = {ENV_PREFIX + name.upper(): name for name in names}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        if key not in known:
            raise ConfigurationError(f"unknown environment variable {key}; valid ones are: {', '.join(sorted(known))}")
        value = raw.strip()
        if not value:
            continue  # an empty variable means "not set", as in most shells' ${VAR:-default} idiom
        name = known[key]
        yield name, tuple(value.split(",")) if name in ("buckets", "exclude_paths") else value


def _check_optional_str(name: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigurationError(f"{name}={value!r} must be a string")
        return value.strip() or None

    return check


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigurationError(f"{name}={value!r} is not a boolean; use true or false")


def _check_bool(name: str) -> Callable[[Any], bool]:
    return lambda value: _to_bool(name, value)


def _check_optional_bool(name: str) -> Callable[[Any], bool | None]:
    return lambda value: None if value is None else _to_bool(name, value)


def _to_float(name: str, value: Any, valid: str) -> float:
    """``valid`` says what a good value is, for the message."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{name}={value!r} must be a number; {valid}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name}={value!r} is not a number; {valid}") from None
    if not math.isfinite(number):
        raise ConfigurationError(f"{name}={value!r} must be a finite number; {valid}")
    return number


def _check_buckets(value: Any) -> tuple[float, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigurationError(f"buckets={value!r} must be a list of numbers like 0.1,0.5,1")
    bounds = tuple(
        _to_float("buckets", item, "give positive upper bounds in seconds, like 0.1,0.5,1") for item in value
    )
    if not bounds:
        raise ConfigurationError("buckets is empty; give at least one upper bound in seconds, e.g. 0.1,1")
    if any(b <= 0 for b in bounds) or list(bounds) != sorted(set(bounds)):
        raise ConfigurationError(
            f"buckets={value!r} must be positive and strictly increasing, e.g. 0.01,0.1,1 (+Inf is implied)"
        )
    return bounds


def _int_between(name: str, value: Any, low: int, high: int, why: str = "") -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"{name}={value!r} is not an integer; give one between {low} and {high}{why}"
        ) from None
    if not low <= number <= high:
        raise ConfigurationError(f"{name}={value!r} must be between {low} and {high}{why}")
    return number


def _check_max_workers(value: Any) -> int | None:
    return None if value is None else _int_between("max_workers", value, 1, 4096)


def _check_interval(value: Any) -> float:
    number = _to_float("interval", value, "give seconds between 0.05 and 60")
    if not 0.05 <= number <= 60:
        raise ConfigurationError(f"interval={value!r} must be between 0.05 and 60 seconds")
    return number


def _check_slow_request_timeout(value: Any) -> float | None:
    if value is None:
        return None
    number = _to_float("slow_request_timeout", value, "give seconds, or 0 to turn the slow-request log off")
    if number < 0:
        raise ConfigurationError(
            f"slow_request_timeout={value!r} is negative; give seconds, or 0 to turn the slow-request log off"
        )
    return number


def _check_paths(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigurationError(f"exclude_paths={value!r} must be a list of paths like /health,/ping")
    paths = tuple(str(item).strip() for item in value if str(item).strip())
    bad = [path for path in paths if not path.startswith("/")]
    if bad:
        raise ConfigurationError(f"exclude_paths: {bad[0]!r} is not a path; write it as gunicorn sees it, e.g. /health")
    return paths


def _check_timers_per_second(value: Any) -> int:
    return _int_between("statsd_timers_per_second", value, 0, 1_000_000, " (0 sends every value)")


def _check_max_routes(value: Any) -> int:
    return _int_between("max_routes", value, 1, 10000, " (it bounds label cardinality)")


def _check_resolver(value: Any) -> Callable[[Any], str | None] | None:
    if value is None or callable(value):
        return value  # type: ignore[no-any-return]
    if not isinstance(value, str) or ":" not in value:
        raise ConfigurationError(f"route_resolver={value!r} must be a callable(environ) or 'package.module:function'")
    module_name, _, attribute = value.partition(":")
    try:
        resolver = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigurationError(f"route_resolver={value!r} cannot be imported: {error}") from None
    if not callable(resolver):
        raise ConfigurationError(f"route_resolver={value!r} is not callable")
    return resolver  # type: ignore[no-any-return]


OTLP_PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def otlp_protocol(environ: Mapping[str, str]) -> str:
    """The OTLP transport the standard variables ask for (the metrics one wins), http/protobuf by default.
    Not checked here: the exporting process refuses a protocol it cannot send (see _export.otlp)."""
    for variable in OTLP_PROTOCOL_VARIABLES:
        value = environ.get(variable, "").strip()
        if value:
            return value
    return "http/protobuf"


def _otlp_metrics_url(value: str) -> str:
    """An OTLP/HTTP base URL gets the metrics signal path, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` does."""
    parts = urlsplit(value)
    if parts.path in ("", "/"):
        return urlunsplit(parts._replace(path="/v1/metrics"))
    return value


def _check_otlp(raw: Any) -> str | None:
    value = _check_optional_str("otlp")(raw)
    if value is None or value.lower() in _OFF | _TRUE:
        return value
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise ConfigurationError(
            f"otlp={value!r} is not an OTLP endpoint URL; write it like 'http://collector:4318' "
            "(the /v1/metrics path is added when the URL has no path; for gRPC 'http://collector:4317'), or "
            "'on' to take the endpoint from "
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT"
        )
    return value


def _qualified(function: Callable[..., Any]) -> str:
    return f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', repr(function))}"


_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "statsd": Settings._check_statsd,
    "prometheus_dir": _check_optional_str("prometheus_dir"),
    "metrics_bind": Settings._check_metrics_bind,
    "buckets": _check_buckets,
    "redact_query": _check_bool("redact_query"),
    "max_workers": _check_max_workers,
    "dogstatsd": _check_optional_bool("dogstatsd"),
    "interval": _check_interval,
    "slow_request_timeout": _check_slow_request_timeout,
    "queue_time": _check_bool("queue_time"),
    "exclude_paths": _check_paths,
    "route_label": _check_bool("route_label"),
    "route_resolver": _check_resolver,
    "max_routes": _check_max_routes,
    "access_log_atoms": _check_bool("access_log_atoms"),
    "statsd_timers_per_second": _check_timers_per_second,
    "compiled_hooks": _check_bool("compiled_hooks"),
    "otlp": _check_otlp,
}


def _check_from_environ(name: str, value: Any) -> None:
    """Validate one value read from the environment; the error names the variable it came from."""
    try:
        _VALIDATORS[name](value)
    except ConfigurationError as error:
        raise ConfigurationError(f"{error} (from the environment variable {ENV_PREFIX}{name.upper()})") from None
