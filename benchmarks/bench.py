#!/usr/bin/env python3
"""Benchmark gunicorn-insight against bare gunicorn and against what people use instead.

    python benchmarks/bench.py [--pairs 5] [--duration 5] [--connections 8] [--rows ROWSPEC]
                               [--restarts 0,1000,5000] [--json benchmarks/results.json]
                               [--plot docs/img/benchmark.png] [--tiny] [--pin]

Three measurements, all on real processes (docs/performance.md explains them and holds the results):

1. Overhead. For each row (worker class x exporter configuration, plus two reference rows) gunicorn
   serves ``benchmarks/hello.py`` with 2 workers, alternately bare and instrumented, ``--pairs`` times.
   Each run: wait until every worker has booted, 1 s of unmeasured warm-up load, then a fixed-concurrency
   load from a separate process (wrk, or a Python fallback). CPU = utime+stime of the master and its
   workers from /proc, read just before and after the measured load. Each pair gives a ratio
   instrumented / bare for CPU per request and for throughput. Each run waits for a quiet machine, and a
   pair is measured again when other processes used the CPUs meanwhile, or when one gthread worker got
   all the keep-alive connections (see FOREIGN_CPU_LIMIT and WORKER_SHARE_LIMIT).
2. Scrape cost. 8 workers with ``--max-requests 1``; GET /metrics after N worker restarts, for the
   plugin's embedded /metrics and for plain prometheus_client multiprocess mode.
3. Memory. VmRSS of instrumented workers minus bare workers after warm-up (sync, both exporters).

Every process started here runs in its own session and is killed as a group on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import glob
import hashlib
import http.client
import http.server
import importlib.metadata
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# One process toolkit for the tests and the benchmark: starting, watching and stopping processes, ports.
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from servers import Process, free_port, free_udp_port, port_accepts  # noqa: E402 -- found through the line above
from servers import wait_until as _wait_until  # noqa: E402 -- likewise

STATSD_JS = ROOT / ".tools" / "statsd" / "node_modules" / "statsd" / "stats.js"
CLK_TCK = os.sysconf("SC_CLK_TCK")

DEFAULT_JSON = HERE / "results.json"
DEFAULT_PLOT = ROOT / "docs" / "img" / "benchmark.png"
DEFAULT_RESTARTS = "0,1000,5000"
TINY_ROWS = "sync:both,ref:gunicorn-statsd"
TINY_RESTARTS = "0,20"

# Other processes on the machine (another test suite, a neighbour) change both CPU per request and throughput.
# A run during which they used more than this share of one core is contended: its pair is measured again.
FOREIGN_CPU_LIMIT = 0.10
DEFAULT_ATTEMPTS = 4
# gthread keeps keep-alive connections on the worker that accepted them; now and then one worker accepts all of
# wrk's connections, the other idles, and CPU per request doubles (threads fighting for one GIL). Such a run
# measures that accident, not the plugin: when one worker did more than this share of the workers' CPU, the
# pair is measured again too.
WORKER_SHARE_LIMIT = 0.75
QUIET_LIMIT = 0.10  # before each run: wait until the whole machine is this busy at most (cores) ...
QUIET_TIMEOUT = 120.0  # ... for at most this long, then measure anyway (the pair may then be repeated)

OVERHEAD_WORKERS = 2
SCRAPE_WORKERS = 8
SCRAPES = 5
CHURN_CLIENTS = 8
WARMUP_SECONDS = 1.0

# Budgets the plugin promises (docs/performance.md compares against them).
CPU_BUDGET = 1.05  # sync, everything on: median CPU per request at most 5% above bare
SCRAPE_BUDGET = 2.0  # scrape time at the most restarts at most 2x the time at 0 restarts
RSS_BUDGET_KIB = 3 * 1024  # RSS added per worker, sync, both exporters: at most 3 MiB

# ---------------------------------------------------------------------------------------------------------
# What each row runs. "{statsd}" and "{metrics}" are replaced by the StatsD sink's address and a free port.

# The `everything` row: both exporters plus EVERY optional feature of gunicorn_insight.Settings that is off by
# default. Extend this dict when a feature lands (one GUNICORN_INSIGHT_* variable per feature). Features that are
# on by default (redact_query, slow_request_timeout, queue_time) are already in every instrumented row.
# OTLP to a receiver in this process (its CPU is the benchmark's, not gunicorn's), exporting every second rather
# than every minute so that a run of a few seconds pays for several exports and their rounds.
OTLP_ENV = {"GUNICORN_INSIGHT_OTLP": "{otlp}", "OTEL_METRIC_EXPORT_INTERVAL": "1000"}
EVERYTHING_EXTRA_ENV: dict[str, str] = {
    "GUNICORN_INSIGHT_DOGSTATSD": "true",  # per-worker StatsD values as DogStatsD tags instead of names
    "GUNICORN_INSIGHT_ROUTE_LABEL": "true",  # hello.py names its route in the environ, as a framework would
    "GUNICORN_INSIGHT_ACCESS_LOG_ATOMS": "true",  # X-Gunicorn-Busy / X-Gunicorn-Queue-Ms request headers
    "GUNICORN_INSIGHT_EXCLUDE_PATHS": "/healthz",  # never requested here: every request pays the check
    **OTLP_ENV,
}

PLUGIN_CONFIGS: dict[str, dict[str, str]] = {
    "statsd": {"GUNICORN_INSIGHT_STATSD": "{statsd}", "GUNICORN_INSIGHT_METRICS_BIND": "off"},
    "prometheus": {"GUNICORN_INSIGHT_METRICS_BIND": "{metrics}"},
    "both": {"GUNICORN_INSIGHT_STATSD": "{statsd}", "GUNICORN_INSIGHT_METRICS_BIND": "{metrics}"},
    "otlp": {**OTLP_ENV, "GUNICORN_INSIGHT_METRICS_BIND": "off"},
    "everything": {
        "GUNICORN_INSIGHT_STATSD": "{statsd}",
        "GUNICORN_INSIGHT_METRICS_BIND": "{metrics}",
        **EVERYTHING_EXTRA_ENV,
    },
}
WORKER_CLASSES: dict[str, tuple[str, ...]] = {"sync": (), "gthread": ("--threads", "4"), "gevent": (), "uvicorn": ()}
# What -k gets for a row's worker, where it is not the row's name.
WORKER_CLASS_ARGUMENT = {"uvicorn": "uvicorn_worker.UvicornWorker"}
# The application each worker class serves: the cheapest there is of its kind (WSGI, or ASGI for uvicorn's).
APPS = {"uvicorn": "hello_asgi:app"}
# Reference rows and the worker class each runs on: the first two on sync, like the field notes' baseline
# figures; FastAPI's usual metrics middleware on uvicorn's worker, serving a FastAPI hello app both ways.
REFERENCES = {"gunicorn-statsd": "sync", "prometheus-recipe": "sync", "fastapi-instrumentator": "uvicorn"}
# The packages a row's worker class or reference needs beyond gunicorn, and where they come from.
ROW_PACKAGES = {
    "gevent": ("gevent",),
    "uvicorn": ("uvicorn", "uvicorn-worker"),
    "fastapi-instrumentator": ("fastapi", "prometheus-fastapi-instrumentator"),
}
PLUGIN_CONF = "python:gunicorn_insight.conf"
RECIPE_CONF = HERE / "recipe_prometheus.conf.py"


class BenchError(RuntimeError):
    """Something the benchmark cannot go on from; the message says what and shows the process output."""


@dataclass(frozen=True)
class Row:
    worker: str  # sync, gthread, gevent, uvicorn, or "ref"
    config: str  # a PLUGIN_CONFIGS key, or a REFERENCES entry for worker "ref"

    @property
    def name(self) -> str:
        return f"{self.worker}:{self.config}"

    @property
    def worker_class(self) -> str:
        return REFERENCES[self.config] if self.is_reference else self.worker

    @property
    def is_reference(self) -> bool:
        return self.worker == "ref"


ALL_ROWS: tuple[Row, ...] = (
    *(Row(worker, config) for worker in WORKER_CLASSES for config in PLUGIN_CONFIGS),
    *(Row("ref", name) for name in REFERENCES),
)


def parse_rows(spec: str) -> list[Row]:
    """``sync:both,ref:gunicorn-statsd``; shell-style wildcards work (``sync:*``, ``*:both``); ``all``; ``none``."""
    if spec.strip() in ("", "all"):
        return list(ALL_ROWS)
    if spec.strip() == "none":
        return []
    chosen: list[Row] = []
    for part in (item.strip() for item in spec.split(",")):
        if not part:
            continue
        matches = [row for row in ALL_ROWS if fnmatch.fnmatchcase(row.name, part)]
        if not matches:
            valid = ", ".join(row.name for row in ALL_ROWS)
            raise BenchError(f"--rows: {part!r} matches no row; rows are: {valid}")
        chosen.extend(row for row in matches if row not in chosen)
    return chosen


def parse_restarts(spec: str) -> list[int]:
    try:
        values = sorted({int(item) for item in spec.split(",") if item.strip()})
    except ValueError:
        raise BenchError(f"--restarts {spec!r}: give comma-separated integers, e.g. 0,1000,5000") from None
    if not values or values[0] < 0:
        raise BenchError(f"--restarts {spec!r}: give at least one restart count >= 0")
    return values


# ---------------------------------------------------------------------------------------------------------
# Polling and processes


def wait_until(predicate: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.02) -> T:
    """The toolkit's wait_until, failing as the benchmark fails everywhere: with a BenchError."""
    try:
        return _wait_until(predicate, timeout=timeout, what=what, interval=interval)
    except AssertionError as error:
        raise BenchError(str(error)) from None


class Supervisor:
    """Owns every process the benchmark starts, so that one call stops them all, whatever happened."""

    def __init__(self, workdir: Path, server_cpus: set[int] | None = None) -> None:
        self.workdir = workdir
        self.server_cpus = server_cpus  # --pin: the CPUs gunicorn may run on; None: any
        self._processes: list[Process] = []
        self._serial = 0

    def start(
        self, argv: Sequence[str], *, name: str, env: Mapping[str, str] | None = None, cwd: Path = HERE
    ) -> Process:
        self._serial += 1
        log_path = self.workdir / f"{self._serial:04d}-{name}.log"
        # Process lays its env over ours; None removes a variable, so the child gets exactly `env`.
        given = dict(env if env is not None else os.environ)
        process = Process(argv, env={**dict.fromkeys(os.environ), **given}, cwd=cwd, log_path=log_path, name=name)
        self._processes.append(process)
        return process

    def stop(self, process: Process) -> None:
        process.stop()
        with contextlib.suppress(ValueError):
            self._processes.remove(process)
        process.log_path.unlink(missing_ok=True)

    def stop_all(self) -> None:
        while self._processes:
            self._processes.pop().stop()


# Where every gunicorn of this invocation imports gunicorn_insight from (see snapshot_package).
_PACKAGE_PATH: list[str] = []


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our own GUNICORN_INSIGHT_*, PROMETHEUS_MULTIPROC_DIR or GUNICORN_CMD_ARGS must not leak into a run."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GUNICORN_INSIGHT_") and key not in ("PROMETHEUS_MULTIPROC_DIR", "GUNICORN_CMD_ARGS")
    }
    if _PACKAGE_PATH:
        env["PYTHONPATH"] = os.pathsep.join([*_PACKAGE_PATH, *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


def snapshot_package(workdir: Path, timeout: float = 300.0) -> dict[str, Any]:
    """Freeze gunicorn_insight as it is now: every gunicorn of this invocation imports the copy.

    A full run takes half an hour and starts gunicorn a hundred times; the package may be edited meanwhile,
    and rows measured against different code would not compare. The copy must import and configure
    cleanly; while it does not (someone is half way through an edit), copy again until `timeout`.
    """
    destination = workdir / "package"
    check = f"import gunicorn_insight.conf as conf; assert conf.__file__.startswith({str(destination)!r})"
    last_error = ""

    def copied_and_importable() -> bool:
        nonlocal last_error
        shutil.rmtree(destination, ignore_errors=True)
        shutil.copytree(
            ROOT / "gunicorn_insight", destination / "gunicorn_insight", ignore=shutil.ignore_patterns("__pycache__")
        )
        env = clean_environment({"PYTHONPATH": str(destination), "GUNICORN_INSIGHT_METRICS_BIND": "off"})
        result = subprocess.run(
            [sys.executable, "-c", check], env=env, cwd=workdir, capture_output=True, text=True, timeout=60, check=False
        )
        last_error = result.stderr.strip()
        if result.returncode != 0:
            print(
                f"bench: gunicorn_insight does not import right now (mid-edit?); retrying:\n{last_error}",
                file=sys.stderr,
                flush=True,
            )
        return result.returncode == 0

    try:
        wait_until(copied_and_importable, timeout=timeout, what="an importable gunicorn_insight", interval=15)
    except BenchError:
        raise BenchError(f"gunicorn_insight did not import for {timeout:.0f}s:\n{last_error}") from None
    _PACKAGE_PATH[:] = [str(destination)]
    return code_measured(destination / "gunicorn_insight")


# ---------------------------------------------------------------------------------------------------------
# /proc


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    text = Path(f"/proc/{pid}/stat").read_text()
    return text.rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """Direct children of `pid` (gunicorn forks workers from its main thread)."""
    try:
        return [int(item) for item in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        pass  # kernel without CONFIG_PROC_CHILDREN: scan /proc
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(_stat_fields(int(entry))[1]) == pid:
                    found.append(int(entry))
    return found


@dataclass(frozen=True)
class CpuSnapshot:
    ticks: int
    workers: dict[int, int]  # pid -> utime+stime ticks of each worker


def busiest_worker_share(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """The largest share of the workers' CPU that one worker used between the two snapshots."""
    used = [after.workers.get(pid, ticks) - ticks for pid, ticks in before.workers.items()]
    return max(used) / sum(used) if sum(used) > 0 else 0.0


def cpu_snapshot(master: int, workers: Sequence[int]) -> CpuSnapshot:
    """utime+stime of the master and every live child (the workers and the plugin's /metrics process),
    plus the master's reaped children (cutime+cstime).

    Fields after the command name: state is [0], utime [11], stime [12], cutime [13], cstime [14].
    The reaped-children part only moves if a child dies during the window (then its time still counts).
    """
    fields = _stat_fields(master)
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    per_worker = {}
    helpers = 0
    for pid in {*workers, *children(master)}:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            child = _stat_fields(pid)
            used = int(child[11]) + int(child[12])
            if pid in workers:
                per_worker[pid] = used
            else:
                helpers += used
    return CpuSnapshot(ticks + helpers + sum(per_worker.values()), per_worker)


def machine_busy_ticks() -> int:
    """All CPUs' non-idle time since boot (/proc/stat). Compared with gunicorn's share during a run, it shows
    whether something else (another test suite, a noisy neighbour) competed for the cores."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    guest = sum(values[8:10])  # guest time is already counted in user/nice
    return sum(values) - idle - guest


@dataclass(frozen=True)
class Memory:
    rss_kib: int
    """VmRSS: what the budget is about. Counts pages shared with the master (imports done before fork)."""
    private_kib: int | None
    """Private_Clean + Private_Dirty from smaps_rollup: what this worker alone costs (None if unavailable)."""


def worker_memory(pid: int) -> Memory | None:
    fields: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for name in ("status", "smaps_rollup"):
            with contextlib.suppress(FileNotFoundError):
                for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                    key, _, rest = line.partition(":")
                    if rest.strip().endswith("kB"):
                        fields[key] = int(rest.split()[0])
    if "VmRSS" not in fields:
        return None
    private = None
    if "Private_Clean" in fields and "Private_Dirty" in fields:
        private = fields["Private_Clean"] + fields["Private_Dirty"]
    return Memory(fields["VmRSS"], private)


# ---------------------------------------------------------------------------------------------------------
# StatsD sink: the real daemon if it is there, otherwise a socket that discards. Its CPU is never counted.


class _OtlpDiscard(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)  # an empty body is an empty ExportMetricsServiceResponse
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """One export a second per server is not news."""


_OTLP_RECEIVER: list[str] = []


def otlp_receiver_url() -> str:
    """An OTLP/HTTP receiver in this process that accepts and discards, started on first use."""
    if not _OTLP_RECEIVER:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OtlpDiscard)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True).start()
        _OTLP_RECEIVER.append(f"http://127.0.0.1:{server.server_address[1]}/v1/metrics")
    return _OTLP_RECEIVER[0]


class StatsdSink:
    def __init__(self, supervisor: Supervisor, prefer: str) -> None:
        self.port = 0
        self.description = ""
        self._process: Process | None = None
        self._socket: socket.socket | None = None
        self._stop = threading.Event()
        node = shutil.which("node")
        if prefer != "python" and node and STATSD_JS.is_file():
            self._start_daemon(supervisor, node)
        elif prefer == "statsd":
            raise BenchError(f"--sink statsd: node or {STATSD_JS} is missing (scripts/test-all installs both)")
        else:
            self._start_discarding()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start_daemon(self, supervisor: Supervisor, node: str) -> None:
        self.port, mgmt_port = free_udp_port(), free_port()
        config = {
            "address": "127.0.0.1",
            "port": self.port,
            "mgmt_address": "127.0.0.1",
            "mgmt_port": mgmt_port,
            "backends": [],
            "flushInterval": 10_000,  # no backend: a flush only resets, memory stays flat
        }
        config_path = supervisor.workdir / "statsd-config.js"
        config_path.write_text(json.dumps(config))  # a JSON object is a valid JS expression for statsd
        process = supervisor.start([node, str(STATSD_JS), str(config_path)], name="statsd")
        self._process = process

        # The management port accepting says nothing about the UDP socket (its bind is asynchronous too):
        # send empty datagrams until statsd counts one.
        def counted_probe() -> bool:
            if not process.alive():
                raise BenchError(f"the statsd daemon exited\n{process.describe()}")
            if not port_accepts(mgmt_port):
                return False
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"", ("127.0.0.1", self.port))
            return _statsd_packets(mgmt_port) > 0

        wait_until(counted_probe, timeout=30, what="the statsd daemon to receive a UDP probe", interval=0.1)
        version = _npm_version(STATSD_JS)
        self.description = f"statsd daemon {version} (node {_command_output([node, '--version'])})"

    def _start_discarding(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.2)
        self._socket = sock
        self.port = sock.getsockname()[1]
        threading.Thread(target=self._discard, args=(sock,), name="statsd-sink", daemon=True).start()
        self.description = "Python UDP socket that discards (the statsd daemon was not found)"

    def _discard(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                sock.recv(65536)

    def cpu_seconds(self) -> float:
        """The daemon's CPU so far (the Python sink runs in this process and is counted with it)."""
        if self._process is None:
            return 0.0
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = _stat_fields(self._process.pid)
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        return 0.0

    def close(self) -> None:
        self._stop.set()
        if self._socket is not None:
            self._socket.close()


def _statsd_packets(mgmt_port: int) -> int:
    try:
        with socket.create_connection(("127.0.0.1", mgmt_port), timeout=1) as conn:
            conn.sendall(b"counters\n")
            reply = b""
            while b"END" not in reply:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return 0
    match = re.search(r"statsd\.packets_received'?\s*:\s*(\d+)", reply.decode(errors="replace"))
    return int(match[1]) if match else 0


def _npm_version(stats_js: Path) -> str:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return str(json.loads((stats_js.parent / "package.json").read_text())["version"])
    return "?"


def _command_output(argv: Sequence[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    return "?"


# ---------------------------------------------------------------------------------------------------------
# gunicorn


def gunicorn_version() -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", importlib.metadata.version("gunicorn"))[:2])


@dataclass(frozen=True)
class Launch:
    """What one gunicorn run needs beyond the common arguments."""

    app: str = "hello:app"
    config: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    prometheus_dir: bool = False  # a fresh PROMETHEUS_MULTIPROC_DIR, set before gunicorn starts


_BOOTING = re.compile(r"Booting worker with pid")
_ANNOUNCE = re.compile(r"gunicorn-insight: .*\(worker class \S+, .*scoreboard (?P<board>\S+)\)")
_BIND_CLASH = re.compile(r"address already in use|cannot be bound|Can't connect to", re.IGNORECASE)
_START_ATTEMPTS = 3


class GunicornServer:
    """gunicorn on free loopback ports; knows its workers and counts their restarts from its log."""

    def __init__(
        self,
        supervisor: Supervisor,
        launch: Launch,
        *,
        worker_class: str,
        workers: int,
        statsd: str,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.supervisor = supervisor
        self.launch = launch
        self.worker_class = worker_class
        self.workers = workers
        self.statsd = statsd
        self.extra_args = tuple(extra_args)
        self.port = 0
        self.metrics_port: int | None = None
        self.process: Process | None = None
        self.ready_dir = Path(tempfile.mkdtemp(prefix="ready-", dir=supervisor.workdir))
        self.prometheus_dir: str | None = None
        self._log_offset = 0
        self._boots = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _argv_env(self) -> tuple[list[str], dict[str, str]]:
        self.port = free_port()
        uses_metrics = any("{metrics}" in value for value in self.launch.env.values())
        self.metrics_port = free_port() if uses_metrics else None

        def fill(value: str) -> str:
            value = value.replace("{otlp}", otlp_receiver_url()) if "{otlp}" in value else value
            return value.replace("{statsd}", self.statsd).replace("{metrics}", f"127.0.0.1:{self.metrics_port}")

        env = {key: fill(value) for key, value in self.launch.env.items()}
        env["BENCH_READY_DIR"] = str(self.ready_dir)
        if self.launch.prometheus_dir:
            self.prometheus_dir = tempfile.mkdtemp(prefix="multiproc-", dir=self.supervisor.workdir)
            env["PROMETHEUS_MULTIPROC_DIR"] = self.prometheus_dir
        argv = [sys.executable, "-m", "gunicorn"]
        if gunicorn_version() >= (24, 0):
            argv.append("--no-control-socket")  # gunicorn >= 24 shares one control socket path per user
        if self.launch.config:
            argv += ["-c", self.launch.config]
        argv += [
            "-b",
            f"127.0.0.1:{self.port}",
            "-w",
            str(self.workers),
            "-k",
            WORKER_CLASS_ARGUMENT.get(self.worker_class, self.worker_class),
            *WORKER_CLASSES[self.worker_class],
            "--chdir",
            str(HERE),
            "--graceful-timeout",
            "5",
            *map(fill, self.launch.args),
            *self.extra_args,
            self.launch.app,
        ]  # no --access-logfile: gunicorn's access log is off by default, and stays off
        return argv, clean_environment(env)

    def start(self, timeout: float = 60.0) -> list[int]:
        """Start and wait until every worker has booted; retries on fresh ports when one was taken."""
        for attempt in range(1, _START_ATTEMPTS + 1):
            argv, env = self._argv_env()
            self.process = self.supervisor.start(argv, env=env, name="gunicorn")
            if self.supervisor.server_cpus:
                # Set before the master forks anything (it does so only after loading its config and binding),
                # so its workers and its /metrics process inherit it.
                os.sched_setaffinity(self.process.pid, self.supervisor.server_cpus)
            self._log_offset = self._boots = 0
            try:
                workers = self.wait_booted(timeout)
            except BenchError:
                clash = _BIND_CLASH.search(self.process.output()) and not self.process.alive()
                if not clash or attempt == _START_ATTEMPTS:
                    raise
                self.supervisor.stop(self.process)
                continue
            if self.launch.env and self.prometheus_dir is None and self.metrics_port is not None:
                announce = _ANNOUNCE.search(self.process.output())
                if announce:  # the embedded default keeps the multiprocess files next to the scoreboard
                    self.prometheus_dir = os.path.join(os.path.dirname(announce["board"]), "prometheus")
            return workers
        raise AssertionError("unreachable")

    def wait_booted(self, timeout: float = 60.0) -> list[int]:
        """Poll until `workers` live children have each left their boot marker; returns their pids."""
        process = self.process
        assert process is not None

        def booted() -> list[int] | None:
            if not process.alive():
                raise BenchError(f"gunicorn exited while starting\n{process.describe()}")
            # Other children (the plugin's /metrics process) leave no marker; cpu_snapshot counts them too.
            pids = [pid for pid in children(process.pid) if (self.ready_dir / str(pid)).exists()]
            return sorted(pids) if len(pids) == self.workers else None

        try:
            pids = wait_until(booted, timeout=timeout, what=f"{self.workers} booted gunicorn workers")
        except BenchError as error:
            raise BenchError(f"{error}\n{process.describe()}") from None
        if not port_accepts(self.port):
            raise BenchError(f"gunicorn's workers booted but port {self.port} refuses\n{process.describe()}")
        return pids

    def restarts(self) -> int:
        """Workers booted beyond the initial ones, counted from the log (read incrementally)."""
        assert self.process is not None
        with contextlib.suppress(FileNotFoundError), open(self.process.log_path, errors="replace") as log:
            log.seek(self._log_offset)
            text = log.read()
            complete = text.rfind("\n") + 1  # a half-written last line is read again next time
            self._boots += len(_BOOTING.findall(text[:complete]))
            self._log_offset += len(text[:complete].encode())
        return max(0, self._boots - self.workers)

    def describe(self, tail: int = 40) -> str:
        return self.process.describe(tail) if self.process is not None else "gunicorn is not running"

    def stop(self) -> None:
        if self.process is not None:
            self.supervisor.stop(self.process)
            self.process = None
        shutil.rmtree(self.ready_dir, ignore_errors=True)
        if self.launch.prometheus_dir and self.prometheus_dir:
            shutil.rmtree(self.prometheus_dir, ignore_errors=True)


@contextlib.contextmanager
def running(server: GunicornServer, timeout: float = 60.0) -> Iterator[list[int]]:
    try:
        yield server.start(timeout)
    finally:
        server.stop()


def launch_for(row: Row, instrumented: bool) -> Launch:
    if row.config == "fastapi-instrumentator":
        if not instrumented:
            return Launch(app="hello_fastapi:app")
        return Launch(app="hello_fastapi:app", env={"BENCH_INSTRUMENTATOR": "1"}, prometheus_dir=True)
    app = APPS.get(row.worker_class, Launch.app)
    if not instrumented:
        return Launch(app=app)
    if row.config == "gunicorn-statsd":
        return Launch(args=("--statsd-host", "{statsd}"))
    if row.config == "prometheus-recipe":
        return Launch(config=str(RECIPE_CONF), prometheus_dir=True)
    return Launch(app=app, config=PLUGIN_CONF, env=PLUGIN_CONFIGS[row.config])


# ---------------------------------------------------------------------------------------------------------
# Load generation: wrk, or a Python fallback in a separate process


@dataclass
class LoadResult:
    requests: int
    seconds: float
    rps: float
    errors: int
    p50_ms: float | None
    p99_ms: float | None


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _seconds(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> LoadResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h),", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if done is None or rate is None:
        raise BenchError(f"cannot read wrk's output:\n{output}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    latency = {
        pct: _seconds(number, unit) * 1000
        for pct, number, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)
    }
    return LoadResult(
        requests=int(done[1]),
        seconds=_seconds(done[2], done[3]),
        rps=float(rate[1]),
        errors=errors + (int(non_2xx[1]) if non_2xx else 0),
        p50_ms=latency.get("50"),
        p99_ms=latency.get("99"),
    )


class LoadGenerator:
    def __init__(self, supervisor: Supervisor, prefer: str, connections: int) -> None:
        self.supervisor = supervisor
        self.connections = connections
        self.wrk = shutil.which("wrk") if prefer != "python" else None
        if prefer == "wrk" and self.wrk is None:
            raise BenchError("--load wrk: wrk is not installed (apt-get install wrk)")
        if self.wrk is None and prefer == "auto":
            print(
                "bench: wrk not found; using the Python load generator (fewer requests per second, so numbers "
                "are not comparable with wrk runs). Install wrk: apt-get install wrk",
                file=sys.stderr,
            )

    @property
    def description(self) -> str:
        if self.wrk:
            return f"wrk -t{min(2, self.connections)} -c{self.connections} -d<duration>s --latency"
        return f"Python load generator, {self.connections} threads, one new connection per request"

    def run(self, url: str, seconds: float) -> LoadResult:
        if self.wrk:
            threads = min(2, self.connections)  # wrk refuses fewer connections than threads
            duration = f"{max(1, round(seconds))}s" if seconds >= 1 else f"{max(1, round(seconds * 1000))}ms"
            argv = [self.wrk, f"-t{threads}", f"-c{self.connections}", f"-d{duration}", "--latency", url]
        else:
            argv = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--python-load",
                url,
                str(self.connections),
                str(seconds),
            ]
        process = self.supervisor.start(argv, name="load")
        try:
            try:
                status = process.wait(seconds + 60)
            except AssertionError as error:  # the toolkit's timeout
                raise BenchError(str(error)) from None
            output = process.output()
            if status != 0:
                raise BenchError(f"the load generator failed\n{process.describe()}")
        finally:
            self.supervisor.stop(process)
        if self.wrk:
            return parse_wrk(output)
        return LoadResult(**json.loads(output.strip().splitlines()[-1]))


def python_load(url: str, connections: int, seconds: float) -> LoadResult:
    """The fallback generator: `connections` threads, each a new connection per request (sync closes them)."""
    target = urllib.parse.urlsplit(url)
    host, port, path = target.hostname or "127.0.0.1", target.port or 80, target.path or "/"
    latencies: list[list[float]] = [[] for _ in range(connections)]
    errors = [0] * connections
    start = time.monotonic()
    deadline = start + seconds

    def client(index: int) -> None:
        while time.monotonic() < deadline:
            began = time.perf_counter()
            conn = http.client.HTTPConnection(host, port, timeout=10)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                if response.status >= 400:
                    errors[index] += 1
                    continue
            except (OSError, http.client.HTTPException):
                errors[index] += 1
                continue
            finally:
                conn.close()
            latencies[index].append(time.perf_counter() - began)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    merged = sorted(value for per_thread in latencies for value in per_thread)

    def percentile(q: float) -> float | None:
        return merged[min(len(merged) - 1, int(q * len(merged)))] * 1000 if merged else None

    return LoadResult(len(merged), elapsed, len(merged) / elapsed, sum(errors), percentile(0.5), percentile(0.99))


# ---------------------------------------------------------------------------------------------------------
# 1. Overhead: alternating bare / instrumented runs


@dataclass
class Run:
    row: str
    mode: str  # "bare" or "instrumented"
    pair: int
    requests: int
    seconds: float
    rps: float
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    cpu_seconds: float
    cpu_us_per_request: float
    machine_busy_seconds: float  # every process on the machine, the load generator and the sink included
    busiest_worker_share: float  # 0.5 is an even split between 2 workers
    load_cpu_seconds: float  # the load generator's (wrk's) own CPU
    foreign_cpu_seconds: float  # machine busy minus gunicorn, load generator, sink and this script
    worker_rss_kib: list[int]
    worker_private_kib: list[int]
    workers_changed: bool
    attempt: int = 1  # which attempt at this pair was kept (earlier ones were disturbed)
    contended: bool = False  # still over FOREIGN_CPU_LIMIT after the last attempt
    unbalanced: bool = False  # still over WORKER_SHARE_LIMIT after the last attempt


def measure_run(ctx: Context, row: Row, instrumented: bool, pair: int) -> Run:
    server = GunicornServer(
        ctx.supervisor,
        launch_for(row, instrumented),
        worker_class=row.worker_class,
        workers=OVERHEAD_WORKERS,
        statsd=ctx.sink.address,
    )
    with running(server) as workers:
        ctx.load.run(server.url, min(WARMUP_SECONDS, ctx.duration))  # imports, caches, first connections
        memory = [found for found in map(worker_memory, workers) if found is not None]
        ours_before, busy_before = own_cpu_seconds(ctx.sink), machine_busy_ticks()
        before = cpu_snapshot(server.pid, workers)
        load = ctx.load.run(server.url, ctx.duration)
        after = cpu_snapshot(server.pid, workers)
        ours_after, busy_after = own_cpu_seconds(ctx.sink), machine_busy_ticks()
        changed = not set(workers) <= set(children(server.pid))
    if load.requests <= 0:
        raise BenchError(f"{row.name} ({'instrumented' if instrumented else 'bare'}): no request completed")
    cpu = (after.ticks - before.ticks) / CLK_TCK
    busy = (busy_after - busy_before) / CLK_TCK
    load_cpu = ours_after.load - ours_before.load
    return Run(
        row=row.name,
        mode="instrumented" if instrumented else "bare",
        pair=pair,
        requests=load.requests,
        seconds=load.seconds,
        rps=load.rps,
        errors=load.errors,
        p50_ms=load.p50_ms,
        p99_ms=load.p99_ms,
        cpu_seconds=cpu,
        cpu_us_per_request=cpu / load.requests * 1e6,
        machine_busy_seconds=busy,
        load_cpu_seconds=round(load_cpu, 3),
        busiest_worker_share=round(busiest_worker_share(before, after), 3),
        foreign_cpu_seconds=round(max(0.0, busy - cpu - (ours_after.total - ours_before.total)), 3),
        worker_rss_kib=[m.rss_kib for m in memory],
        worker_private_kib=[m.private_kib for m in memory if m.private_kib is not None],
        workers_changed=changed,
    )


@dataclass(frozen=True)
class OwnCpu:
    load: float  # children this script has reaped: the load generator processes
    total: float  # that, plus this script itself and the StatsD daemon


def own_cpu_seconds(sink: StatsdSink) -> OwnCpu:
    children_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    self_usage = resource.getrusage(resource.RUSAGE_SELF)
    load = children_usage.ru_utime + children_usage.ru_stime
    return OwnCpu(load, load + self_usage.ru_utime + self_usage.ru_stime + sink.cpu_seconds())


def wait_for_quiet_machine(window: float = 0.5, timeout: float = QUIET_TIMEOUT) -> bool:
    """Poll until the machine is nearly idle over `window`; False if it never was within `timeout`."""

    def quiet() -> bool:
        before = machine_busy_ticks()
        time.sleep(window)  # the measurement window itself, not a wait for something to happen
        return (machine_busy_ticks() - before) / CLK_TCK / window <= QUIET_LIMIT

    try:
        wait_until(quiet, timeout=timeout, what="a quiet machine", interval=0)
        return True
    except BenchError:
        return False


def measure_pair(ctx: Context, row: Row, pair: int, label: str) -> list[Run]:
    """Bare and instrumented back to back, in alternating order; again (up to ctx.attempts) when disturbed."""
    # Odd pairs bare first, even pairs instrumented first: back to back, the second run of two bare ones measured
    # 1.5% less CPU per request than the first (docs/performance.md), which favoured the instrumented side.
    order = (False, True) if pair % 2 else (True, False)
    for attempt in range(1, ctx.attempts + 1):
        runs = []
        for instrumented in order:
            # Before each run, not each pair: a neighbour that resumes during the second run would always
            # land on the instrumented side. A single attempt (--tiny, CI) measures whatever it gets.
            if ctx.attempts > 1 and not wait_for_quiet_machine():
                print(f"  {label} the machine did not go quiet in {QUIET_TIMEOUT:.0f}s; measuring anyway", flush=True)
            runs.append(measure_run(ctx, row, instrumented, pair))
            runs[-1].attempt = attempt
        for run in runs:
            note = " (a worker was replaced during the load)" if run.workers_changed else ""
            print(
                f"  {label} {row.name:<24} pair {pair} {run.mode:<12} {run.rps:9.0f} req/s "
                f"{run.cpu_us_per_request:8.1f} us CPU/request  foreign CPU {run.foreign_cpu_seconds:5.2f}s  "
                f"busiest worker {run.busiest_worker_share:4.0%}{note}",
                flush=True,
            )
        foreign = max(run.foreign_cpu_seconds / run.seconds for run in runs)
        share = max(run.busiest_worker_share for run in runs)
        if foreign <= FOREIGN_CPU_LIMIT and share <= WORKER_SHARE_LIMIT:
            return runs
        if attempt < ctx.attempts:
            why = (
                f"other processes used {foreign:.0%} of a core"
                if foreign > FOREIGN_CPU_LIMIT
                else f"one worker did {share:.0%} of the work"
            )
            print(f"  {label} {why} during this pair: measuring it again", flush=True)
    print(f"  {label} still disturbed after {ctx.attempts} attempt(s); keeping the last one (marked)", flush=True)
    for run in runs:
        run.contended = foreign > FOREIGN_CPU_LIMIT
        run.unbalanced = share > WORKER_SHARE_LIMIT
    return runs


@dataclass
class Spread:
    median: float
    min: float
    max: float
    values: list[float]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), list(values))


@dataclass
class RowResult:
    row: str
    worker_class: str
    config: str
    reference: bool
    pairs: int
    bare_cpu_us_per_request: Spread | None
    instrumented_cpu_us_per_request: Spread | None
    bare_rps: Spread | None
    instrumented_rps: Spread | None
    cpu_ratio: Spread | None
    throughput_ratio: Spread | None
    rss_kib_bare_median: float | None
    rss_kib_instrumented_median: float | None
    rss_kib_added: float | None
    private_kib_added: float | None
    repeated_pairs: int  # pairs measured more than once because an attempt was disturbed
    disturbed_pairs: int  # pairs still contended or unbalanced after the last attempt (kept, marked)
    runs: list[Run]


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _difference(minuend: float | None, subtrahend: float | None) -> float | None:
    return None if minuend is None or subtrahend is None else minuend - subtrahend


def summarize(row: Row, runs: Sequence[Run]) -> RowResult:
    bare = {run.pair: run for run in runs if run.mode == "bare"}
    instrumented = {run.pair: run for run in runs if run.mode == "instrumented"}
    pairs = sorted(set(bare) & set(instrumented))  # a ratio only from two adjacent runs of the same pair
    rss_bare = _median([kib for run in bare.values() for kib in run.worker_rss_kib])
    rss_instrumented = _median([kib for run in instrumented.values() for kib in run.worker_rss_kib])
    private_bare = _median([kib for run in bare.values() for kib in run.worker_private_kib])
    private_instrumented = _median([kib for run in instrumented.values() for kib in run.worker_private_kib])
    return RowResult(
        row=row.name,
        worker_class=row.worker_class,
        config=row.config,
        reference=row.is_reference,
        pairs=len(pairs),
        bare_cpu_us_per_request=Spread.of([run.cpu_us_per_request for run in bare.values()]),
        instrumented_cpu_us_per_request=Spread.of([run.cpu_us_per_request for run in instrumented.values()]),
        bare_rps=Spread.of([run.rps for run in bare.values()]),
        instrumented_rps=Spread.of([run.rps for run in instrumented.values()]),
        cpu_ratio=Spread.of([instrumented[p].cpu_us_per_request / bare[p].cpu_us_per_request for p in pairs]),
        throughput_ratio=Spread.of([instrumented[p].rps / bare[p].rps for p in pairs]),
        rss_kib_bare_median=rss_bare,
        rss_kib_instrumented_median=rss_instrumented,
        rss_kib_added=_difference(rss_instrumented, rss_bare),
        private_kib_added=_difference(private_instrumented, private_bare),
        repeated_pairs=len({run.pair for run in runs if run.attempt > 1}),
        disturbed_pairs=len({run.pair for run in runs if run.contended or run.unbalanced}),
        runs=list(runs),
    )


def measure_overhead(ctx: Context, rows: Sequence[Row], pairs: int) -> list[RowResult]:
    runs: dict[Row, list[Run]] = {row: [] for row in rows}
    total = pairs * len(rows)
    done = 0
    # Pair-major order: pair 1 of every row, then pair 2, ... so slow drift of the machine (thermal, noisy
    # neighbours) spreads over all rows instead of landing on the last ones. Within a pair, bare and
    # instrumented back to back, which first alternating from pair to pair (see measure_pair).
    for pair in range(1, pairs + 1):
        for row in rows:
            done += 1
            runs[row] += measure_pair(ctx, row, pair, f"[{done}/{total}]")
    return [summarize(row, runs[row]) for row in rows]


# ---------------------------------------------------------------------------------------------------------
# 2. Scrape cost under worker churn


@dataclass
class ScrapePoint:
    mode: str
    target_restarts: int
    restarts: int
    db_files: int
    scrape_ms: Spread
    response_bytes: int
    churn_seconds: float


class Churner:
    """Client threads sending GET / on new connections as fast as workers die and respawn."""

    def __init__(self, url: str, clients: int) -> None:
        target = urllib.parse.urlsplit(url)
        self._address = (target.hostname or "127.0.0.1", target.port or 80)
        self._clients = clients
        self.errors = 0

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """True when `done` came true, False when `timeout` ran out first (the caller reports how far it got)."""
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                conn = http.client.HTTPConnection(*self._address, timeout=10)
                try:
                    conn.request("GET", "/")
                    conn.getresponse().read()
                except (OSError, http.client.HTTPException):
                    self.errors += 1  # not atomic across threads; only ever reported as "some"
                finally:
                    conn.close()

        threads = [threading.Thread(target=client, daemon=True) for _ in range(self._clients)]
        for thread in threads:
            thread.start()
        try:
            wait_until(done, timeout=timeout, what="worker restarts", interval=0.05)
            return True
        except BenchError:
            return False
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=15)


def settle(server: GunicornServer, patient: bool, window: float = 0.2, timeout: float = 30.0) -> None:
    """Wait until every worker has booted and master plus workers are idle (<= 1 clock tick per window).

    Freshly forked workers keep a CPU busy for a while after they import the app (page faults, the rest of
    gunicorn's worker init); a scrape timed then measures the machine's contention, not the scrape.
    """
    workers = server.wait_booted()

    def idle() -> bool:
        before = cpu_snapshot(server.pid, workers)
        time.sleep(window)  # the measurement window itself, not a wait for something to happen
        return cpu_snapshot(server.pid, workers).ticks - before.ticks <= 1

    with contextlib.suppress(BenchError):  # a machine that never goes idle is measured as it is
        wait_until(idle, timeout=timeout, what="an idle server", interval=0)
    if patient:
        wait_for_quiet_machine(timeout=timeout)  # other processes' bursts would be timed too


def timed_get(port: int, path: str, server: GunicornServer) -> tuple[float, int]:
    """Seconds from connect to last byte, and the body size. Anything but a 200 stops the benchmark."""
    began = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise BenchError(
                f"GET {path} on port {port} answered {response.status}: {body[:200]!r}\n{server.describe(tail=80)}"
            )
    finally:
        conn.close()
    return time.perf_counter() - began, len(body)


def measure_scrape(ctx: Context, mode: str, targets: Sequence[int]) -> list[ScrapePoint]:
    # The same app in both modes: it counts every request in its own prometheus_client Counter, so each
    # worker leaves a counter file. With the plugin, its master merges dead workers' files and serves /metrics;
    # without, the app's own /metrics route merges every file ever written.
    if mode == "gunicorn-insight":
        launch = Launch(app="prom_app:app", config=PLUGIN_CONF, env={"GUNICORN_INSIGHT_METRICS_BIND": "{metrics}"})
    else:
        launch = Launch(app="prom_app:app", prometheus_dir=True)
    server = GunicornServer(
        ctx.supervisor,
        launch,
        worker_class="sync",
        workers=SCRAPE_WORKERS,
        statsd=ctx.sink.address,
        extra_args=("--max-requests", "1"),
    )
    points: list[ScrapePoint] = []
    with running(server):
        scrape_port = server.metrics_port if mode == "gunicorn-insight" else server.port
        if scrape_port is None or server.prometheus_dir is None:
            raise BenchError(f"{mode}: cannot tell where /metrics or its files are\n{server.describe()}")
        churner = Churner(server.url, CHURN_CLIENTS)
        for target in targets:
            began = time.monotonic()
            if server.restarts() < target:
                # Generous: gunicorn spawns at most about 20 workers a second (a random 0-100 ms sleep each).
                reached = churner.run_until(lambda t=target: server.restarts() >= t, timeout=60 + target / 4)
                if not reached:
                    print(
                        f"  {mode}: only {server.restarts()} of {target} restarts in time; measuring there", flush=True
                    )
            churn_seconds = time.monotonic() - began
            server.wait_booted()
            # One untimed scrape first: it lets the plugin fold the last deaths in (as its exporter does every
            # interval anyway) and warms the page cache equally in both modes.
            timed_get(scrape_port, "/metrics", server)
            settle(server, ctx.attempts > 1)
            # Counted after the warm-up scrape: in plain mode every scrape is a request, which recycles a
            # worker too, and the plugin has merged the last dead workers' files by now.
            restarts = server.restarts()
            files = len(glob.glob(os.path.join(server.prometheus_dir, "*.db")))
            times: list[float] = []
            size = 0
            for _ in range(SCRAPES):
                settle(server, ctx.attempts > 1)
                seconds, size = timed_get(scrape_port, "/metrics", server)
                times.append(seconds * 1000)
            point = ScrapePoint(
                mode=mode,
                target_restarts=target,
                restarts=restarts,
                db_files=files,
                scrape_ms=Spread(statistics.median(times), min(times), max(times), times),
                response_bytes=size,
                churn_seconds=round(churn_seconds, 1),
            )
            points.append(point)
            print(
                f"  {mode:<24} {point.restarts:6d} restarts  {point.db_files:6d} *.db files  "
                f"scrape {point.scrape_ms.median:9.2f} ms (median of {SCRAPES})",
                flush=True,
            )
    return points


# ---------------------------------------------------------------------------------------------------------
# Report: table, JSON, plot


@dataclass
class Context:
    supervisor: Supervisor
    sink: StatsdSink
    load: LoadGenerator
    duration: float
    attempts: int  # > 1: wait for a quiet machine before each run, and measure disturbed pairs again


def _fmt(spread: Spread | None, digits: int = 3) -> str:
    if spread is None:
        return "-"
    return f"{spread.median:.{digits}f} [{spread.min:.{digits}f}, {spread.max:.{digits}f}]"


def budgets(
    rows: Sequence[RowResult], scrape: Sequence[ScrapePoint], pinned: bool = False
) -> dict[str, dict[str, Any]]:
    by_name = {row.row: row for row in rows}
    everything = by_name.get("sync:everything")
    cpu = everything.cpu_ratio.median if everything and everything.cpu_ratio else None
    insight = sorted((p for p in scrape if p.mode == "gunicorn-insight"), key=lambda p: p.restarts)
    scrape_ratio = None
    if len(insight) >= 2 and insight[0].target_restarts == 0:
        scrape_ratio = insight[-1].scrape_ms.median / insight[0].scrape_ms.median
    both = by_name.get("sync:both")
    rss = both.rss_kib_added if both else None

    def verdict(value: float | None, limit: float) -> str:
        return "not measured" if value is None else ("met" if value <= limit else "MISSED")

    # The budget is defined for gunicorn sharing the machine's cores with its load, as measured without --pin.
    cpu_verdict = "not judged (--pin)" if pinned and cpu is not None else verdict(cpu, CPU_BUDGET)
    return {
        "cpu": {
            "what": "sync:everything, median CPU per request instrumented / bare",
            "value": cpu,
            "limit": CPU_BUDGET,
            "verdict": cpu_verdict,
        },
        "scrape": {
            "what": f"gunicorn-insight scrape time at {insight[-1].restarts if insight else '?'} restarts "
            "/ at 0 restarts",
            "value": scrape_ratio,
            "limit": SCRAPE_BUDGET,
            "verdict": verdict(scrape_ratio, SCRAPE_BUDGET),
        },
        "rss": {
            "what": "sync:both, RSS added per worker (KiB)",
            "value": rss,
            "limit": RSS_BUDGET_KIB,
            "verdict": verdict(rss, RSS_BUDGET_KIB),
        },
    }


def print_report(
    rows: Sequence[RowResult], scrape: Sequence[ScrapePoint], verdicts: Mapping[str, Any], meta: Mapping[str, Any]
) -> None:
    print(
        f"\nOverhead, instrumented / bare ({meta['load_generator']}, {OVERHEAD_WORKERS} workers, "
        f"{meta['settings']['duration']} s per run)"
    )
    header = (
        f"{'row':<26}{'pairs':>5}{'rep':>4}  {'bare us/req':>11}  {'instr us/req':>12}  "
        f"{'CPU/request ratio median [min, max]':<36}  {'req/s ratio median [min, max]':<30}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        bare = f"{row.bare_cpu_us_per_request.median:.1f}" if row.bare_cpu_us_per_request else "-"
        inst = f"{row.instrumented_cpu_us_per_request.median:.1f}" if row.instrumented_cpu_us_per_request else "-"
        repeated = f"{row.repeated_pairs}" + ("!" if row.disturbed_pairs else "")
        print(
            f"{row.row:<26}{row.pairs:>5}{repeated:>4}  {bare:>11}  {inst:>12}  {_fmt(row.cpu_ratio):<36}  "
            f"{_fmt(row.throughput_ratio):<30}"
        )
    print("rep: pairs measured again after a disturbed attempt; '!': some pair was still disturbed (see the JSON)")
    if scrape:
        print(f"\nScrape cost: GET /metrics, {SCRAPE_WORKERS} workers, --max-requests 1, median of {SCRAPES}")
        print(f"{'mode':<26}{'restarts':>9}{'*.db files':>12}{'scrape ms median [min, max]':>34}")
        for point in scrape:
            print(f"{point.mode:<26}{point.restarts:>9}{point.db_files:>12}{_fmt(point.scrape_ms, 2):>34}")
    print("\nBudgets")
    for name, budget in verdicts.items():
        value = budget["value"]
        shown = "-" if value is None else f"{value:.3f}" if name != "rss" else f"{value:.0f} KiB"
        print(f"  {name:<7} {budget['verdict']:<13} {shown:>10}  (limit {budget['limit']}; {budget['what']})")


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "os": _os_release(),
        "clock_ticks_per_second": CLK_TCK,
    }


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


def code_measured(package: Path) -> dict[str, Any]:
    """Which plugin code ran: the commit, whether the working tree differed from it, and a content hash."""
    digest = hashlib.sha256()
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    commit = _command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _command_output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "gunicorn_insight"])
    return {"commit": commit, "package_modified_since_commit": bool(dirty), "package_sha256": digest.hexdigest()[:16]}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in (
        "gunicorn",
        "gunicorn-insight",
        "prometheus_client",
        "statsd",
        "gevent",
        "uvicorn",
        "uvicorn-worker",
        "fastapi",
        "prometheus-fastapi-instrumentator",
    ):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _plot_overhead(axes: Any, rows: Sequence[RowResult]) -> None:
    # Top to bottom in the order of the table; reference rows (orange squares) at the bottom.
    measured = [row for row in rows if row.cpu_ratio is not None]
    for position, row in enumerate(reversed(measured)):
        ratio = row.cpu_ratio
        assert ratio is not None
        color, marker = ("tab:orange", "s") if row.reference else ("tab:blue", "o")
        axes.errorbar(
            [ratio.median],
            [position],
            xerr=[[ratio.median - ratio.min], [ratio.max - ratio.median]],
            fmt=marker,
            color=color,
            capsize=4,
        )
        axes.annotate(
            f"{ratio.median:.2f}",
            (ratio.max, position),
            textcoords="offset points",
            xytext=(6, -3),
            fontsize="small",
            color=color,
        )
    axes.set_yticks(range(len(measured)), [row.row for row in reversed(measured)])
    axes.set_ylim(-0.7, len(measured) - 0.3)
    axes.axvline(1.0, color="grey", linewidth=0.8)
    axes.axvline(CPU_BUDGET, color="red", linestyle="--", label=f"budget: {CPU_BUDGET:.2f} x bare")
    axes.plot([], [], "o", color="tab:blue", label="gunicorn-insight")
    axes.plot([], [], "s", color="tab:orange", label="reference: gunicorn --statsd-host, prometheus_client recipe")
    axes.set_xlabel("CPU per request, instrumented / bare (median, min-max over pairs)")
    axes.set_title(f"Overhead on a hello-world app ({OVERHEAD_WORKERS} workers)")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize="small", ncol=2, frameon=False)
    axes.grid(axis="x", alpha=0.3)
    axes.margins(x=0.12)


def plot(rows: Sequence[RowResult], scrape: Sequence[ScrapePoint], meta: Mapping[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server or in CI
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "bench: matplotlib is not installed, so no plot (pip install -e '.[bench]'); the table and "
            "JSON are complete",
            file=sys.stderr,
        )
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 6.5), gridspec_kw={"width_ratios": [1.25, 1]})
    _plot_overhead(left, rows)
    for mode, color in (("gunicorn-insight", "tab:blue"), ("plain prometheus_client", "tab:orange")):
        points = sorted((p for p in scrape if p.mode == mode), key=lambda p: p.restarts)
        if not points:
            continue
        xs, ys = [p.restarts for p in points], [p.scrape_ms.median for p in points]
        right.plot(xs, ys, "o-", color=color, label=mode)
        for point in points:
            right.annotate(
                f"{point.db_files} files",
                (point.restarts, point.scrape_ms.median),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize="small",
                color=color,
            )
    right.set_xlabel(f"worker restarts (--max-requests 1, {SCRAPE_WORKERS} workers)")
    right.set_ylabel(f"GET /metrics, ms (median of {SCRAPES})")
    right.set_title("Scrape time under worker churn")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize="small", ncol=2, frameon=False)
    right.margins(x=0.1)
    right.grid(alpha=0.3)
    right.set_ylim(bottom=0)
    host = meta["machine"]
    figure.suptitle(
        f"gunicorn-insight {meta['versions']['gunicorn-insight']} benchmark, {meta['date']}: "
        f"{host['cpu_model']}, {host['nproc']} cores, gunicorn {meta['versions']['gunicorn']}, "
        f"Python {meta['versions']['python']}",
        fontsize="medium",
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# ---------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, help="bare/instrumented pairs per row (default 5)")
    parser.add_argument("--duration", type=float, help="seconds of measured load per run (default 5)")
    parser.add_argument("--connections", type=int, default=8, help="concurrent connections (default 8)")
    parser.add_argument(
        "--rows",
        help="comma-separated rows, wildcards allowed, e.g. sync:both,gthread:*,ref:gunicorn-statsd (default all)",
    )
    parser.add_argument(
        "--restarts", help=f"restart counts for the scrape measurement (default {DEFAULT_RESTARTS}); 'none' skips it"
    )
    parser.add_argument(
        "--json", help=f"results file (default {DEFAULT_JSON.relative_to(ROOT)}; with --tiny: none; '' for none)"
    )
    parser.add_argument(
        "--plot", help=f"PNG plot (default {DEFAULT_PLOT.relative_to(ROOT)}; with --tiny: none; '' for none)"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help=f"CI smoke run: 1 pair, 1 s loads, rows {TINY_ROWS}, restarts {TINY_RESTARTS}",
    )
    parser.add_argument(
        "--attempts",
        type=int,
        help=f"tries per pair when other processes interfere or one gthread worker takes all the "
        f"connections (default {DEFAULT_ATTEMPTS}; --tiny: 1, and no waiting for a quiet machine)",
    )
    parser.add_argument(
        "--load", choices=("auto", "wrk", "python"), default="auto", help="load generator (default: wrk when installed)"
    )
    parser.add_argument(
        "--sink",
        choices=("auto", "statsd", "python"),
        default="auto",
        help="StatsD sink (default: the statsd daemon when node and .tools/statsd are there)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="diagnostic: gunicorn on every CPU but the first, the load generator, the StatsD sink and "
        "this script on the first (needs 2+ CPUs). Shows the overhead without the load "
        "competing for the server's cores and caches; the CPU budget is judged without it, so "
        "--json and --plot default to none",
    )
    parser.add_argument("--python-load", nargs=3, metavar=("URL", "CONNECTIONS", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # --tiny only fills in what was not given explicitly.
    tiny = args.tiny
    args.pairs = args.pairs if args.pairs is not None else (1 if tiny else 5)
    args.duration = args.duration if args.duration is not None else (1.0 if tiny else 5.0)
    args.rows = args.rows if args.rows is not None else (TINY_ROWS if tiny else "all")
    args.restarts = args.restarts if args.restarts is not None else (TINY_RESTARTS if tiny else DEFAULT_RESTARTS)
    args.attempts = args.attempts if args.attempts is not None else (1 if tiny else DEFAULT_ATTEMPTS)
    no_default_files = tiny or args.pin
    args.json = Path(args.json) if args.json else (None if no_default_files or args.json == "" else DEFAULT_JSON)
    args.plot = Path(args.plot) if args.plot else (None if no_default_files or args.plot == "" else DEFAULT_PLOT)
    if args.pairs < 1 or args.duration <= 0 or args.connections < 1 or args.attempts < 1:
        parser.error("--pairs, --duration, --connections and --attempts must be positive")
    return args


class Interrupted(KeyboardInterrupt):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_on_signal(signum: int, _frame: Any) -> None:
    # Every stop signal becomes an exception, so that the `finally` blocks stop every process we started.
    raise Interrupted(signum)


def pin_cpus() -> dict[str, list[int]]:
    """--pin: this process (so the StatsD sink and the load generator it starts) on the first allowed CPU;
    returns that split, for gunicorn to be put on the others."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise BenchError(
            f"--pin needs at least 2 CPUs to split between gunicorn and its load; this process may "
            f"run on {len(cpus)} ({cpus}). Leave --pin out, or run on a larger machine."
        )
    os.sched_setaffinity(0, cpus[:1])
    return {"load": cpus[:1], "server": cpus[1:]}


def run(args: argparse.Namespace) -> int:
    rows = parse_rows(args.rows)
    restarts = [] if args.restarts.strip() == "none" else parse_restarts(args.restarts)
    for row in rows:
        for package in ROW_PACKAGES.get(row.worker_class, ()) + ROW_PACKAGES.get(row.config, ()):
            try:
                importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                raise BenchError(
                    f"row {row.name} needs {package}: pip install -e '.[bench]', or leave it out with --rows"
                ) from None
    pinned = pin_cpus() if args.pin else None
    workdir = Path(tempfile.mkdtemp(prefix="gunicorn-insight-bench-"))
    supervisor = Supervisor(workdir, set(pinned["server"]) if pinned else None)
    sink: StatsdSink | None = None
    try:
        code = snapshot_package(workdir)
        sink = StatsdSink(supervisor, args.sink)
        load = LoadGenerator(supervisor, args.load, args.connections)
        ctx = Context(supervisor, sink, load, args.duration, args.attempts)
        started = time.monotonic()
        meta: dict[str, Any] = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": shlex.join(["python", os.path.relpath(Path(sys.argv[0]).resolve(), ROOT), *sys.argv[1:]]),
            "machine": machine(),
            "versions": versions(),
            "code": code,
            "load_generator": load.description,
            "statsd_sink": sink.description,
            "settings": {
                "pairs": args.pairs,
                "duration": args.duration,
                "connections": args.connections,
                "attempts": args.attempts,
                "foreign_cpu_limit": FOREIGN_CPU_LIMIT,
                "worker_share_limit": WORKER_SHARE_LIMIT,
                "warmup": min(WARMUP_SECONDS, args.duration),
                "workers": OVERHEAD_WORKERS,
                "rows": [row.name for row in rows],
                "restarts": restarts,
                "scrape_workers": SCRAPE_WORKERS,
                "everything_extra_env": EVERYTHING_EXTRA_ENV,
                "pinned_cpus": pinned,
            },
        }
        placement = f"; pinned: gunicorn on CPUs {pinned['server']}, the rest on {pinned['load']}" if pinned else ""
        print(
            f"bench: {len(rows)} rows x {args.pairs} pairs; load: {load.description}; sink: {sink.description}"
            f"{placement}",
            flush=True,
        )
        results = measure_overhead(ctx, rows, args.pairs)
        scrape: list[ScrapePoint] = []
        if restarts:
            print(f"bench: scrape cost after {', '.join(map(str, restarts))} restarts", flush=True)
            for mode in ("gunicorn-insight", "plain prometheus_client"):
                scrape += measure_scrape(ctx, mode, restarts)
        meta["elapsed_seconds"] = round(time.monotonic() - started)
    finally:
        supervisor.stop_all()
        if sink is not None:
            sink.close()
        shutil.rmtree(workdir, ignore_errors=True)
    verdicts = budgets(results, scrape, pinned=pinned is not None)
    both = next((row for row in results if row.row == "sync:both"), None)
    report = {
        "meta": meta,
        "rows": [asdict(row) for row in results],
        "memory": {
            "row": "sync:both",
            "rss_kib_added_per_worker": both.rss_kib_added if both else None,
            "rss_kib_bare_median": both.rss_kib_bare_median if both else None,
            "rss_kib_instrumented_median": both.rss_kib_instrumented_median if both else None,
            "private_kib_added_per_worker": both.private_kib_added if both else None,
        },
        "scrape": {"workers": SCRAPE_WORKERS, "scrapes": SCRAPES, "points": [asdict(p) for p in scrape]},
        "budgets": verdicts,
    }
    print_report(results, scrape, verdicts, meta)
    if both is not None and both.rss_kib_added is not None:
        private = f"{both.private_kib_added:.0f} KiB" if both.private_kib_added is not None else "unknown"
        print(
            f"\nRSS added per worker (sync:both): {both.rss_kib_added:.0f} KiB "
            f"(bare {both.rss_kib_bare_median:.0f} KiB, instrumented {both.rss_kib_instrumented_median:.0f} KiB); "
            f"private memory added: {private}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"bench: results written to {args.json}")
    if args.plot is not None and plot(results, scrape, meta, args.plot):
        print(f"bench: plot written to {args.plot}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.python_load:
        url, connections, seconds = args.python_load
        print(json.dumps(asdict(python_load(url, int(connections), float(seconds)))))
        return 0
    # SIGINT too: a background job of a non-interactive shell starts with SIGINT ignored, and Python then
    # leaves it ignored.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_on_signal)
    try:
        return run(args)
    except BenchError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        name = interrupt.args[0] if interrupt.args else "SIGINT"
        print(f"bench: stopped by {name}; every process it started was stopped", file=sys.stderr)
        return 128 + (interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
