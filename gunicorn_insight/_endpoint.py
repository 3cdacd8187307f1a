"""The master's handle on the /metrics process (see _http): start it, answer it, restart it, stop it.

The process is spawned with ``posix_spawn`` (no fork of the master, so none of gunicorn's or our fork
handlers run) from a fresh interpreter, so nothing the master holds leaks into it but the socket pair
on descriptor 3 and gunicorn's error log on descriptor 2.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import time
from collections.abc import Callable, Sequence

from ._safety import LOG, RateLimitedLog
from .settings import ConfigurationError, join_host_port

STARTUP_DEADLINE = 30.0
RESTART_EVERY = 5.0
"""Seconds between attempts to restart a /metrics process that died."""

_WARN = RateLimitedLog(period=300.0)
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The master's own sys.path, first: whatever --pythonpath, --chdir or the config added, the process imports
# the same gunicorn_insight and prometheus_client as the master.
_BOOTSTRAP = (
    "import sys; sys.path[:0] = sys.argv.pop(1).split('\\n'); from gunicorn_insight._http import run; run()"
)


class EndpointError(Exception):
    """The /metrics process did not become ready; the message says why."""


class MetricsEndpoint:
    """Owns the master's end of the socket pair. Only the exporter thread calls :meth:`serve_requests`."""

    def __init__(self, address: tuple[str, int] | None, directory: str, *, successor: bool, error_fd: int,
                 title: str, extra_args: Sequence[str] = ()) -> None:
        # No address: the process only exports over OTLP (see _otlp).
        self._bind = join_host_port(*address) if address is not None else ""
        self._extra_args = tuple(extra_args)
        self._directory = directory
        self._successor = successor
        self._error_fd = error_fd
        self._title = title
        self._sock: socket.socket | None = None
        self._unanswered = 0
        self.pid = 0
        self._last_start = 0.0
        self.url = ""
        try:
            state = self._start()
        except EndpointError as error:
            raise ConfigurationError(str(error)) from None
        if state == "waiting":
            LOG.info("gunicorn-insight: %s is still served by the previous master (USR2 upgrade); taking it "
                     "over when that master exits", self.url)

    def _start(self) -> str:
        """Spawn the process and wait for its first line: ``ready``, ``waiting`` or ``error``."""
        self._last_start = time.monotonic()
        if not sys.executable:
            raise EndpointError("cannot start the /metrics process: sys.executable is empty; set "
                                "GUNICORN_INSIGHT_METRICS_BIND=off and serve the directory another way")
        ours, theirs = socket.socketpair()
        search_path = "\n".join([_PACKAGE_PARENT, *(os.path.abspath(entry or ".") for entry in sys.path)])
        argv = [sys.executable, "-c", _BOOTSTRAP, search_path, "--directory", self._directory,
                "--bind", self._bind, "--title", self._title, *(["--successor"] if self._successor else []),
                *self._extra_args]
        # stderr first: the error log may itself be descriptor 3.
        actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_DUP2, self._error_fd, 2),
                                          (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3)]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds() if fd > 3]
        try:
            # A process group of its own: Ctrl-C or a supervisor's signal to gunicorn's group must stop the
            # master, not kill this process under it (the master would restart it while shutting down).
            # It leaves when the master does, through the socket pair.
            self.pid = os.posix_spawn(sys.executable, argv, dict(os.environ), file_actions=actions, setpgroup=0)
        except OSError as error:
            ours.close()
            raise EndpointError(f"cannot start the /metrics process ({sys.executable}): {error}") from None
        finally:
            theirs.close()
        try:
            line, early = _first_line(ours, STARTUP_DEADLINE)
        except EndpointError:
            ours.close()
            raise
        state, _, detail = line.partition(" ")
        if state not in ("ready", "waiting"):
            ours.close()
            raise EndpointError(detail if state == "error" else
                                f"the /metrics process (pid {self.pid}) exited before it was ready; its error, "
                                "if any, is in gunicorn's error log")
        self.url = detail if self._bind else ""
        self._sock = ours
        self._unanswered = early.count(b"r")
        return state

    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def serve_requests(self, run_round: Callable[[], None]) -> None:
        """Answer the scrapes that asked for a round (one ``d`` per ``r``), after running one round."""
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data == b"":
            self._gone()
            return
        asked, self._unanswered = self._unanswered + (data or b"").count(b"r"), 0
        if asked:
            run_round()
            try:
                sock.sendall(b"d" * asked)
            except OSError:
                self._gone()

    def _gone(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        _WARN("metrics-process", logging.WARNING,
              f"the /metrics process (pid {self.pid}) exited; restarting it (scrapes of {self.url} fail until then)")

    def restart_if_gone(self) -> None:
        """Called with the master's round lock held, so no worker is forked holding a half-made socket."""
        if self._sock is not None or time.monotonic() - self._last_start < RESTART_EVERY:
            return
        try:
            self._start()
        except EndpointError as error:
            _WARN("metrics-restart", logging.WARNING, f"could not restart the /metrics process: {error}")
        else:
            LOG.info("gunicorn-insight: the /metrics process is back (pid %s) at %s", self.pid, self.url)

    def close(self) -> None:
        """The process sees the socket close and exits."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close_in_child(self) -> None:
        """A forked worker must not hold the socket: the process would not notice the master is gone."""
        if self._sock is not None:
            os.close(self._sock.detach())
            self._sock = None


def wait_readable(endpoint: MetricsEndpoint | None, timeout: float) -> None:
    """Sleep up to ``timeout`` seconds, waking early when the /metrics process asks for a round."""
    fd = endpoint.fileno() if endpoint is not None else -1
    if fd < 0:
        time.sleep(timeout)
        return
    _readable(fd, timeout)


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
