"""The master's handle on the /metrics process (see metrics_process): start it, answer it, restart it, stop it.

The process is spawned with ``posix_spawn`` (no fork of the master, so none of gunicorn's or our fork
handlers run) from a fresh interpreter, so nothing the master holds leaks into it but the socket pair
on descriptor 3 and gunicorn's error log on descriptor 2.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import sys
import threading
import time
from collections.abc import Sequence

from .._report import LOG, RateLimitedLog
from ..settings import ConfigurationError, join_host_port

STARTUP_DEADLINE = 30.0
RESTART_EVERY = 5.0
# How long the master's exit waits for the process's last OTLP export: the master removes the embedded
# directory that export reads once it has exited.
EXIT_WAIT = 5.0
"""Seconds between attempts to restart a /metrics process that died."""

_WARN = RateLimitedLog(period=300.0)
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The master's own sys.path, first: whatever --pythonpath, --chdir or the config added, the process imports
# the same gunicorn_insight and prometheus_client as the master.
_BOOTSTRAP = (
    "import sys; sys.path[:0] = sys.argv.pop(1).split('\\n'); "
    "from gunicorn_insight._export.metrics_process import run; run()"
)


class EndpointError(Exception):
    """The /metrics process did not become ready; the message says why."""


class MetricsPortTaken(EndpointError):
    """The default port (metrics_bind not set) is held by another process: the server runs without /metrics.
    The message is the warning to log."""


class MetricsEndpoint:
    """Owns the master's end of the socket pair. Only the exporter thread calls :meth:`serve_requests`."""

    def __init__(
        self,
        address: tuple[str, int] | None,
        directory: str,
        *,
        successor: bool,
        error_fd: int,
        title: str,
        run_dir: str = "",
        optional: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``address`` None: the process only exports over OTLP (see otlp). ``optional``: metrics_bind was
        not set, so a port in use raises :class:`MetricsPortTaken` instead of a :class:`ConfigurationError`."""
        self._bind = join_host_port(*address) if address is not None else ""
        self._extra_args = tuple(extra_args)
        self._directory = directory
        self._successor = successor
        self._optional = optional
        self._error_fd = error_fd
        self._title = title
        self._run_dir = run_dir
        self._sock: socket.socket | None = None
        self._starting: socket.socket | None = None
        self.pending = 0
        """Scrapes that asked for a round and have not been answered."""
        self.pid = 0
        self._last_start = 0.0
        self.url = ""
        try:
            state = self._start()
        except MetricsPortTaken:
            raise
        except EndpointError as error:
            raise ConfigurationError(str(error)) from None
        if state == "waiting":
            LOG.info(
                "gunicorn-insight: %s is still served by the previous master (USR2 upgrade); taking it "
                "over when that master exits",
                self.url,
            )

    def _start(self, fork_lock: threading.Lock | None = None) -> str:
        """Spawn the process and wait for its first line: ``ready``, ``waiting``, ``unavailable`` or ``error``.

        ``fork_lock`` (the master's round lock, which gunicorn's forks wait for) is held only while the
        socket pair is made and the process spawned, so no worker is forked holding a copy of either end;
        waiting for the first line (up to the process's bind retries) happens without it.
        """
        self._last_start = time.monotonic()
        if not sys.executable:
            raise EndpointError(
                "cannot start the /metrics process: sys.executable is empty; set "
                "GUNICORN_INSIGHT_METRICS_BIND=off and serve the directory another way"
            )
        with fork_lock or contextlib.nullcontext():
            ours = self._spawn()
        try:
            line, early = _first_line(ours, STARTUP_DEADLINE)
            state, _, detail = line.partition(" ")
            if state == "unavailable":
                raise MetricsPortTaken(detail)
            if state not in ("ready", "waiting"):
                raise EndpointError(
                    detail
                    if state == "error"
                    else f"the /metrics process (pid {self.pid}) exited before it was ready; its "
                    "error, if any, is in gunicorn's error log"
                )
        except EndpointError:
            ours.close()
            self._starting = None
            raise
        self.url = detail if self._bind else ""
        self._sock = ours  # before _starting is cleared: a fork in between still closes it in the child
        self._starting = None
        self.pending = early.count(b"r")
        return state

    def _spawn(self) -> socket.socket:
        """Start the process; returns the master's end of the socket pair."""
        ours, theirs = socket.socketpair()
        self._starting = ours
        search_path = "\n".join([_PACKAGE_PARENT, *(os.path.abspath(entry or ".") for entry in sys.path)])
        argv = [
            sys.executable,
            "-c",
            _BOOTSTRAP,
            search_path,
            "--directory",
            self._directory,
            "--bind",
            self._bind,
            "--title",
            self._title,
            "--run-dir",
            self._run_dir,
            *(["--successor"] if self._successor else []),
            *(["--optional"] if self._optional else []),
            *self._extra_args,
        ]
        # stderr first: the error log may itself be descriptor 3.
        actions: list[tuple[int, ...]] = [
            (os.POSIX_SPAWN_DUP2, self._error_fd, 2),
            (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),
        ]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd > 3]
        try:
            # A process group of its own: Ctrl-C or a supervisor's signal to gunicorn's group must stop the
            # master, not kill this process under it (the master would restart it while shutting down).
            # It leaves when the master does, through the socket pair.
            self.pid = os.posix_spawn(sys.executable, argv, dict(os.environ), file_actions=actions, setpgroup=0)
        except OSError as error:
            ours.close()
            self._starting = None
            raise EndpointError(f"cannot start the /metrics process ({sys.executable}): {error}") from None
        finally:
            theirs.close()
        return ours

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def take_requests(self) -> None:
        """Count the scrapes that asked for a round since the last call (non-blocking)."""
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data == b"":
            self._gone()
            return
        self.pending += data.count(b"r")

    def answer(self, count: int) -> None:
        """Tell ``count`` waiting scrapes (all asked before the round that just ran) that it is done."""
        count = min(count, self.pending)
        if self._sock is None or not count:
            return
        self.pending -= count
        try:
            self._sock.sendall(b"d" * count)
        except OSError:
            self._gone()

    def _gone(self) -> None:
        self.pending = 0
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        _WARN(
            "metrics-process",
            logging.WARNING,
            f"the /metrics process (pid {self.pid}) exited; restarting it (scrapes of {self.url} fail until then)",
        )

    def restart_if_gone(self, fork_lock: threading.Lock | None = None) -> None:
        """Start a new process if the last one died (see :meth:`_start` for ``fork_lock``)."""
        if self._sock is not None or time.monotonic() - self._last_start < RESTART_EVERY:
            return
        try:
            self._start(fork_lock)
        except EndpointError as error:
            _WARN("metrics-restart", logging.WARNING, f"could not restart the /metrics process: {error}")
        else:
            LOG.info("gunicorn-insight: the /metrics process is back (pid %s) at %s", self.pid, self.url)

    def close(self, wait: float = 0.0) -> None:
        """The process sees the socket close, exports one last time (OTLP) and exits. ``wait``: seconds to
        wait for that, so that what it reads is still there when it reads it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if wait > 0 and self.pid:
            self._wait_exit(wait)

    def _wait_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:  # reaped already (gunicorn's SIGCHLD handler reaps every child)
                return
            if time.monotonic() >= deadline:
                LOG.warning(
                    "gunicorn-insight: the /metrics process (pid %s) was still exporting %gs after the master "
                    "stopped; the master exits without waiting longer, so its last OTLP export may fail",
                    self.pid,
                    timeout,
                )
                return
            time.sleep(0.01)

    def close_in_child(self) -> None:
        """A forked worker must not hold the socket: the process would not notice the master is gone."""
        for sock in (self._sock, self._starting):
            if sock is not None and sock.fileno() >= 0:
                os.close(sock.detach())
        self._sock = self._starting = None


def wait_readable(endpoint: MetricsEndpoint | None, timeout: float, wake_fd: int = -1) -> None:
    """Sleep up to ``timeout`` seconds, waking early when the /metrics process asks for a round or ``wake_fd``
    is readable (the master is stopping)."""
    fds = [fd for fd in (endpoint.fileno() if endpoint is not None else -1, wake_fd) if fd >= 0]
    if not fds:
        time.sleep(timeout)
        return
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    poller.poll(timeout * 1000.0)


def _readable(fd: int, timeout: float) -> bool:
    """poll(), not select(): select() refuses descriptors above 1023, and a master may hold that many."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000.0))


def _first_line(sock: socket.socket, deadline: float) -> tuple[str, bytes]:
    """The process's first line, and whatever it sent after it (a scrape may already have asked)."""
    data = b""
    give_up = time.monotonic() + deadline
    while b"\n" not in data:
        left = give_up - time.monotonic()
        if left <= 0:
            raise EndpointError(f"the /metrics process did not report in {deadline:.0f}s")
        if _readable(sock.fileno(), left):
            chunk = sock.recv(4096)
            if not chunk:
                return "", b""
            data += chunk
    line, _, rest = data.partition(b"\n")
    return line.decode("utf-8", "replace"), rest


def _inheritable_fds() -> list[int]:
    """Descriptors a spawned process would inherit (systemd's LISTEN_FDS, a USR2 parent's listeners)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return []
    found = []
    for fd in fds:
        try:
            if os.get_inheritable(fd):
                found.append(fd)
        except OSError:
            continue  # the directory's own descriptor, already closed
    return found
