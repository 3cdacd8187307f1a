"""The process roles' import boundaries, checked in a fresh interpreter per role (sys.modules after import)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Modules that would cost every worker memory (the master forks them all) or that belong to another role.
HEAVY = ("prometheus_client", "http.server", "wsgiref", "rich")
CLI = ("gunicorn_insight.cli",)
MASTER = ("gunicorn_insight._master",)
EXPORT = ("gunicorn_insight._export",)
WORKER = ("gunicorn_insight._worker",)
HOOKS = ("gunicorn_insight._hooks",)

ROLES = {
    # what gunicorn loads through install(): the master and, by fork, every worker
    "plugin": (
        ("gunicorn_insight", "gunicorn_insight.conf"),
        (*HEAVY, *CLI, "opentelemetry", "google.protobuf", "grpc"),
    ),
    "worker": (
        (
            "gunicorn_insight._worker.recorder",
            "gunicorn_insight._worker.watchdog",
            "gunicorn_insight._worker.routes",
            "gunicorn_insight._worker.asgi",
            "gunicorn_insight._worker.loglines",
            "gunicorn_insight._worker.unseen",
            "gunicorn_insight._worker.keepalive",
        ),
        (*HEAVY, *CLI, *MASTER, *EXPORT, *HOOKS, "opentelemetry", "grpc"),
    ),
    "master": (
        ("gunicorn_insight._master.arbiter", "gunicorn_insight._master.loglines"),
        (*HEAVY, *CLI, *HOOKS, "opentelemetry", "google.protobuf", "grpc"),
    ),
    "export": (
        (
            "gunicorn_insight._export.prometheus",
            "gunicorn_insight._export.statsd",
            "gunicorn_insight._export.metrics_link",
            "gunicorn_insight._export.mmapfile",
        ),
        # what the master loads of the export side: no OpenTelemetry (only the metrics process runs it)
        (*HEAVY, *CLI, *MASTER, *WORKER, *HOOKS, "opentelemetry", "grpc"),
    ),
    "metrics process": (
        (
            "gunicorn_insight._export.metrics_process",
            "gunicorn_insight._export.probes",
            "gunicorn_insight._export.otlp",
        ),
        (*CLI, *MASTER, *WORKER, *HOOKS),
    ),
    # The command line reads the files the master and the exporters write (the scoreboard, the run files, the
    # multiprocess directory), never their processes' code.
    "command line": (
        ("gunicorn_insight.cli", "gunicorn_insight.cli.views", "gunicorn_insight._discovery"),
        ("prometheus_client", "opentelemetry", *MASTER, *WORKER, *HOOKS),
    ),
}


def imported_after(modules: tuple[str, ...]) -> list[str]:
    script = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    loaded: list[str] = json.loads(result.stdout)
    return loaded


@pytest.mark.parametrize("role", sorted(ROLES))
def test_role_imports_stay_inside_its_boundary(role: str) -> None:
    """Importing a role's modules loads none of the modules that role must never load."""
    modules, forbidden = ROLES[role]
    loaded = imported_after(modules)
    crossing = [name for name in loaded if any(name == bad or name.startswith(bad + ".") for bad in forbidden)]
    assert crossing == [], f"{role} imports {crossing}"
