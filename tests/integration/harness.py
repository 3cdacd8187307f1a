"""Start a real gunicorn with gunicorn-insight and talk to it: requests, /metrics, the scoreboard."""

from __future__ import annotations

import glob
import http.client
import os
import re
import signal
import sys
import tempfile
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gunicorn
from prometheus_client.parser import text_string_to_metric_families
from servers import Process, ProcessFactory, free_port, wait_until

from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._discovery import is_live
from gunicorn_insight._runfiles import ContractError, ServerInfo, read_record

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
APPS = Path(__file__).resolve().parent / "apps"
GUNICORN_VERSION = tuple(int(part) for part in gunicorn.__version__.split(".")[:2])
TEST_INTERVAL = 0.1
"""The plugin's interval in the servers start_gunicorn starts, unless the test asks for another. A scrape
waits for the master's next round, and tests scrape often: at the default 0.5 s, that waiting was most of many
tests' time. Tests of the default's behaviour end to end pass interval=None (the plugin's default)."""


@dataclass
class Gunicorn:
    process: Process
    port: int
    metrics_port: int | None
    scoreboard_path: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, path: str = "/", timeout: float = 30) -> int:
        """One request on a fresh connection; returns the status code."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def metrics_text(self) -> str:
        assert self.metrics_port is not None, "this server was started without /metrics"
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as response:
            return str(response.read().decode())

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        found = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return found

    def value(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels, None when absent."""
        return self.samples().get((name, tuple(sorted(labels.items()))))

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include these."""
        return sum(
            value
            for (sample, sample_labels), value in self.samples().items()
            if sample == name and set(labels.items()) <= set(sample_labels)
        )

    def wait_for_value(self, name: str, expected: float, timeout: float = 30, **labels: str) -> None:
        wait_until(
            lambda: self.total(name, **labels) == expected,
            timeout=timeout,
            what=f"{name}{labels or ''} == {expected}",
            dump=lambda: f"last value {self.total(name, **labels)}\n{self.process.describe()}",
        )

    def board(self) -> sb.Scoreboard:
        return sb.Scoreboard.attach(self.scoreboard_path)

    def busy_workers(self) -> int:
        """Live workers with a request in flight, read from the scoreboard as the access-log atoms read it."""
        board = self.board()
        try:
            return board.busy_workers()
        finally:
            board.close()

    def ready_workers(self) -> int:
        board = self.board()
        try:
            return sum(1 for view in board if view.state == sb.READY)
        finally:
            board.close()

    def wait_for_workers(self, count: int, timeout: float = 60) -> None:
        what = f"{count} booted workers in the scoreboard"

        def booted() -> bool:
            _assert_starting(self.process, what)
            return self.ready_workers() == count

        wait_until(booted, timeout=timeout, what=what, dump=self.process.describe)

    def children(self) -> list[int]:
        """Every live child of the master: the workers and the plugin's /metrics process."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                state, parent = stat.rsplit(")", 1)[1].split()[:2]
                if int(parent) == self.pid and state != "Z":
                    pids.append(int(entry))
        return pids

    def worker_pids(self) -> list[int]:
        """The children that are workers, not the /metrics process."""
        return [pid for pid in self.children() if not _is_metrics_process(pid)]

    def metrics_pid(self) -> int:
        (pid,) = [pid for pid in self.children() if _is_metrics_process(pid)]
        return pid


# gunicorn's words for a listening port someone else holds (it retries the bind for 5 s, then exits), and the
# plugin's for a taken metrics_bind.
_PORT_CLASH = re.compile(r"Connection in use: \('127\.0\.0\.1', \d+\)|cannot be bound \(Address already in use\)")
_START_ATTEMPTS = 3


class PortClash(AssertionError):
    """A free_port() was taken by another process before the server bound it: start again on fresh ports."""


def _assert_starting(process: Process, waiting_for: str) -> None:
    """Fail at once when the process died or lost a port race, instead of waiting out the deadline."""
    alive = process.alive()  # before reading the output, so a process that just died has all of it there
    clash = _PORT_CLASH.search(process.output())
    if clash is not None:
        raise PortClash(f"{process.name} lost a port to another process ({clash[0]}) while waiting for {waiting_for}")
    if not alive:
        process.assert_alive(waiting_for)


def _is_metrics_process(pid: int) -> bool:
    """Its command line names its module, or (with setproctitle installed) its title says what it is."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"gunicorn_insight._export.metrics_process" in command or b"gunicorn-insight: metrics" in command


def scoreboard_of(process: Process) -> str | None:
    """The scoreboard of the master with this pid, found the way the CLI finds it: its server.json."""
    _assert_starting(process, "its server.json")
    for path in glob.glob("/dev/shm/gunicorn-insight-*/server.json") + glob.glob(
        os.path.join(tempfile.gettempdir(), "gunicorn-insight-*", "server.json")
    ):
        try:
            info = read_record(ServerInfo, path)
        except (OSError, ContractError):
            continue  # another user's, or another version's: not this master's
        # is_live, as the CLI does: a run directory a SIGKILLed master left behind can name a recycled pid.
        if info.master_pid == process.pid and is_live(info):
            return info.scoreboard
    return None


def clean_environment(extra: Mapping[str, str | None] | None = None) -> dict[str, str | None]:
    """The test runner's own GUNICORN_INSIGHT_* / PROMETHEUS_MULTIPROC_DIR must not leak into servers."""
    env: dict[str, str | None] = {
        key: None for key in os.environ if key.startswith("GUNICORN_INSIGHT_") or key == "PROMETHEUS_MULTIPROC_DIR"
    }
    env["GUNICORN_CMD_ARGS"] = None
    env.update(extra or {})
    return env


def gunicorn_argv(*args: str, script: bool = False) -> list[str]:
    """``python -m gunicorn``, or the console script: USR2 re-executes argv, and re-running gunicorn's
    __main__.py by path puts gunicorn's own ``http`` package in front of the standard library's."""
    command = [str(Path(sys.executable).parent / "gunicorn")] if script else [sys.executable, "-m", "gunicorn"]
    if GUNICORN_VERSION >= (24, 0):
        command.append("--no-control-socket")  # gunicorn >= 24 shares one control socket path per user
    return [*command, *args]


def start_gunicorn(
    process_factory: ProcessFactory,
    *,
    app: str = "app:app",
    worker_class: str = "sync",
    workers: int = 2,
    args: Sequence[str] = (),
    env: Mapping[str, str | None] | None = None,
    config: str = "python:gunicorn_insight.conf",
    cwd: Path = EXAMPLES,
    metrics: bool = True,
    wait: bool = True,
    script: bool = False,
    launcher: Sequence[str] = (),
    interval: float | None = TEST_INTERVAL,
) -> Gunicorn:
    """gunicorn on a free port with the plugin; waits until every worker has booted.

    ``launcher`` goes before gunicorn's command line: a program that prepares the process, then execs the rest.
    Another process can take a port between free_port() and gunicorn's bind: that start is stopped and
    retried on fresh ports (up to three times), so a busy machine does not fail an unrelated test.
    """
    for attempt in range(1, _START_ATTEMPTS + 1):
        port = free_port()
        metrics_port = free_port() if metrics else None
        metrics_bind = f"127.0.0.1:{metrics_port}" if metrics else "off"
        # The second name is for a config that builds its own Settings object, which reads no environment.
        extra: dict[str, str | None] = {
            "GUNICORN_INSIGHT_METRICS_BIND": metrics_bind,
            "INSIGHT_TEST_METRICS_BIND": metrics_bind,
        }
        if interval is not None:
            extra["GUNICORN_INSIGHT_INTERVAL"] = str(interval)
        extra.update(env or {})
        argv = [
            *launcher,
            *gunicorn_argv(
                "-c",
                config,
                "-b",
                f"127.0.0.1:{port}",
                "-w",
                str(workers),
                "-k",
                worker_class,
                "--chdir",
                str(cwd),
                "--graceful-timeout",
                "5",
                *args,
                app,
                script=script,
            ),
        ]
        process = process_factory(argv, env=clean_environment(extra), cwd=cwd, name="gunicorn")
        # Quick shutdown at teardown. A request still in flight would hold the master for graceful_timeout,
        # after SIGTERM and even after SIGQUIT (uvicorn's and gunicorn's asgi workers ignore SIGQUIT, a gthread
        # request holds the exit): 0.25 s after the signal the workers get SIGKILL, and the master cleans up
        # after them. SIGTERM, not SIGQUIT: idle sync, gthread and uvicorn workers leave at once on it.
        process.teardown_signal = signal.SIGTERM
        process.teardown_grace = 0.25
        if not wait:
            return Gunicorn(process, port, metrics_port, "")
        try:
            return _ready(process, port, metrics_port, workers)
        except PortClash:
            if attempt == _START_ATTEMPTS:
                raise
            process.stop(signal.SIGKILL)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _ready(process: Process, port: int, metrics_port: int | None, workers: int) -> Gunicorn:
    board = wait_until(
        lambda: scoreboard_of(process), timeout=30, what="the master's server.json", dump=process.describe
    )
    server = Gunicorn(process, port, metrics_port, board)
    # A connect alone could reach whoever else holds the port; the booted workers prove gunicorn bound it.
    server.wait_for_workers(workers)
    process.wait_for_port(port, timeout=30)
    return server
