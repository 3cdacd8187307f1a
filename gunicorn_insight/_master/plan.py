"""The plugin's settings resolved against gunicorn's own configuration, once, when the master starts."""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .._gunicorn import (
    ONE_THREAD_KINDS,
    THREAD_PER_REQUEST_KINDS,
    _uses_gunicorn_statsd,
    parsed_by_gunicorn,
    unseen_requests,
    worker_kind,
)
from .._worker.recorder import RecorderOptions
from ..settings import Settings

_MAX_ENTRIES = 64


@dataclass(frozen=True, slots=True)
class Plan:
    """The settings resolved against gunicorn's own configuration, once, when the master starts."""

    settings: Settings
    worker_kind: str
    slots: int
    entries: int
    connections_limit: int
    statsd_target: tuple[str, int] | str | None
    statsd_prefix: str
    statsd_tags: str
    statsd_tagged: bool
    gunicorn_statsd_active: bool
    prometheus_dir: str | None
    slow_request_timeout: float
    successor: bool
    """Started by gunicorn's USR2 upgrade while the previous master still runs."""
    recorder: RecorderOptions
    per_worker_capacity: int
    """Requests one worker runs at once: 1 (sync), threads (gthread), worker_connections (async)."""
    workers: int = 1
    """gunicorn's ``workers`` setting (the live count can differ: TTIN/TTOU, deaths)."""
    requests_unseen: str | None = None
    """What will be missing because the worker class's requests cannot be recorded (see unseen_requests)."""
    service_name: str = "gunicorn"
    """gunicorn's proc_name: OTLP's default service.name."""
    server_port: int | None = None
    """The TCP port gunicorn listens on, when it binds exactly one (OTLP's server.port)."""
    worker_class_name: str = ""
    """gunicorn's worker class as module.name, for messages about it."""
    max_requests: int = 0
    """gunicorn's ``max_requests`` (0: workers are never recycled)."""
    rejects_seen: bool = False
    """gunicorn's own parser reads the requests, so the ones it rejects are counted (see _worker.rejected)."""

    @classmethod
    def resolve(cls, settings: Settings, cfg: Any, prometheus_dir: str | None) -> Plan:
        kind = worker_kind(cfg)
        threads = max(1, int(getattr(cfg, "threads", 1) or 1))
        worker_connections = int(getattr(cfg, "worker_connections", 1000) or 1000)
        # Requests one worker runs at once; the scoreboard names at most _MAX_ENTRIES of them.
        if kind == "sync":
            concurrency, limit = 1, 1
        elif kind == "gthread":
            concurrency, limit = threads, worker_connections
        elif kind == "uvicorn":
            # uvicorn applies its own limit_concurrency (unset by its gunicorn workers unless a subclass's
            # CONFIG_KWARGS sets it), never gunicorn's worker_connections.
            limit = _uvicorn_limit(cfg) or worker_connections
            concurrency = limit
        else:
            concurrency, limit = worker_connections, worker_connections
        workers = max(1, int(getattr(cfg, "workers", 1) or 1))
        gunicorn_target = getattr(cfg, "statsd_host", None)
        return cls(
            settings=settings,
            worker_kind=kind,
            slots=settings.max_workers or max(16, 4 * workers),
            entries=min(concurrency, _MAX_ENTRIES),
            connections_limit=limit,
            statsd_target=settings.statsd_target or gunicorn_target,
            statsd_prefix=getattr(cfg, "statsd_prefix", "") or "",
            statsd_tags=getattr(cfg, "dogstatsd_tags", "") or "",
            statsd_tagged=settings.dogstatsd
            if settings.dogstatsd is not None
            else bool(getattr(cfg, "dogstatsd_tags", "")),
            gunicorn_statsd_active=gunicorn_target is not None and _uses_gunicorn_statsd(cfg),
            prometheus_dir=prometheus_dir,
            slow_request_timeout=_slow_after(settings, cfg),
            successor="GUNICORN_PID" in os.environ,
            recorder=RecorderOptions(
                redact_query=settings.redact_query,
                queue_time=settings.queue_time,
                exclude_paths=frozenset(settings.exclude_paths),
                routes=settings.route_label,
                route_resolver=settings.route_resolver,
                # The atoms cost a scan of the scoreboard per request: pay it only if an access log uses them.
                access_log_atoms=settings.access_log_atoms and bool(getattr(cfg, "accesslog", None)),
                threaded=kind not in ONE_THREAD_KINDS,
                slow_after=_slow_after(settings, cfg),
                thread_cpu=kind in THREAD_PER_REQUEST_KINDS,
                connections_at_tick=kind == "uvicorn",
            ),
            per_worker_capacity=concurrency,
            workers=workers,
            requests_unseen=_unseen_requests_of(cfg),
            service_name=str(getattr(cfg, "proc_name", None) or "gunicorn"),
            server_port=single_port(getattr(cfg, "bind", None) or []),
            worker_class_name=_class_name(cfg),
            max_requests=max(0, int(getattr(cfg, "max_requests", 0) or 0)),
            rejects_seen=parsed_by_gunicorn(cfg),
        )


def _class_name(cfg: Any) -> str:
    try:
        klass = cfg.worker_class
        return f"{klass.__module__}.{klass.__qualname__}"
    except Exception:  # a class gunicorn cannot load stops gunicorn itself, with its own message
        return "unknown"


def _uvicorn_limit(cfg: Any) -> int:
    try:
        return int(getattr(cfg.worker_class, "CONFIG_KWARGS", {}).get("limit_concurrency") or 0)
    except Exception:  # an odd subclass: fall back to gunicorn's setting
        return 0


def single_port(binds: list[str]) -> int | None:
    """The port of gunicorn's TCP binds when they share one; None for unix sockets, fds or several ports."""
    ports = set()
    for bind in binds:
        if bind.startswith(("unix:", "fd://")) or ":" not in bind:
            return None
        port = bind.rsplit(":", 1)[1]
        if not port.isdigit():
            return None
        ports.add(int(port))
    return ports.pop() if len(ports) == 1 else None


def otlp_arguments(plan: Plan, master_pid: int) -> list[str]:
    """What the /metrics process needs to export over OTLP (see _export.otlp); nothing when OTLP is off."""
    settings = plan.settings
    if not settings.otlp_enabled:
        return []
    return [
        "--otlp",
        settings.otlp_destination(os.environ) or "on",
        "--service-name",
        plan.service_name,
        "--instance-id",
        str(uuid.uuid4()),
        "--master-pid",
        str(master_pid),
        "--server-port",
        str(plan.server_port or 0),
        "--started",
        repr(time.time()),
    ]


def _slow_after(settings: Settings, cfg: Any) -> float:
    """Just before gunicorn's own timeout, so a stuck sync worker's stack is logged before the kill."""
    if settings.slow_request_timeout is not None:
        return settings.slow_request_timeout
    timeout = float(getattr(cfg, "timeout", 30) or 0)
    return round(0.8 * timeout, 3) if timeout > 0 else 30.0


def _unseen_requests_of(cfg: Any) -> str | None:
    try:
        return unseen_requests(cfg.worker_class)
    except Exception:  # a class gunicorn cannot load stops gunicorn itself, with its own message
        return None
