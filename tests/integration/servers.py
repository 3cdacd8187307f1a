"""Run real servers in tests: the reference StatsD daemon, Prometheus, nginx and arbitrary processes.

Nothing here is a mock. Every class starts the real binary on free 127.0.0.1 ports with its files in a
working directory of its own, waits for it to be ready with a deadline (never a blind sleep), and puts
its captured output and generated config into the assertion message when a wait fails.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

STATSD_JS_ENV = "INSIGHT_TEST_STATSD_JS"

# A port taken by someone else between free_port() and the server's bind shows up as one of these in the
# server's output; start() then retries on fresh ports instead of failing the test.
_ADDRESS_IN_USE = re.compile(r"address already in use|EADDRINUSE", re.IGNORECASE)
_START_ATTEMPTS = 3


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    dump: Callable[[], str] | None = None,
    interval: float = 0.05,
) -> T:
    """Poll `predicate` until it returns something truthy, and return that.

    Exceptions raised by the predicate propagate at once: a predicate can fail fast (e.g. "the process
    died") instead of burning the whole timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        time.sleep(min(interval, remaining))
    message = f"timed out after {timeout}s waiting for {what}"
    if dump is not None:
        message += "\n" + dump()
    raise AssertionError(message)


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path} does not exist>"


def _section(title: str, body: str) -> str:
    return f"----- {title} -----\n{body.rstrip()}\n"


class Process:
    """A subprocess in its own session (so its whole process group can be signalled), started at once.

    stdout and stderr go to one log file rather than pipes: a chatty process can never block on a full
    pipe that nobody reads, and the log survives the process for post-mortem dumps.

    `env` entries are laid over the current environment; a value of None removes the variable.
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.argv = [os.fspath(arg) for arg in argv]
        self.name = name or Path(self.argv[0]).name
        full_env = dict(os.environ)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        self.env = full_env
        self._owns_log = log_path is None
        if log_path is None:
            fd, raw_path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log")
            os.close(fd)
            log_path = raw_path
        self.log_path = Path(log_path)
        self._final_output: str | None = None
        self.teardown_signal: int = signal.SIGTERM
        """What the fixture that started it sends at teardown; a test that is done with a server wants it gone
        at once, not a graceful shutdown that waits for requests still in flight (gunicorn: SIGQUIT)."""
        self.teardown_grace: float | None = None
        """Seconds the leader gets at teardown, after teardown_signal, before the rest of its process group is
        SIGKILLed (None: no such limit). For a gunicorn master: workers that outlive SIGQUIT (uvicorn's ignore
        it, a gthread request in flight holds the interpreter's exit) would hold it for graceful_timeout."""
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                env=full_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid: int = self._popen.pid

    def __repr__(self) -> str:
        return f"<Process {self.name} pid={self.pid} returncode={self._popen.returncode}>"

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        if self._final_output is not None:
            return self._final_output
        return _read_text(self.log_path)

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def alive(self) -> bool:
        return self._popen.poll() is None

    def describe(self, tail: int | None = None) -> str:
        """Command line, state and output (its last ``tail`` lines when given), for failure messages."""
        state = "running" if self.alive() else f"exited with {self._popen.returncode}"
        output = self.output()
        if tail is not None:
            output = "\n".join(output.splitlines()[-tail:])
        return _section(f"{self.name} (pid {self.pid}, {state}): {shlex.join(self.argv)}", output)

    def assert_alive(self, waiting_for: str) -> None:
        """Fail with the exit status and output if the process has exited (for readiness predicates)."""
        if not self.alive():
            raise AssertionError(
                f"{self.name} exited with status {self._popen.returncode} while waiting for {waiting_for}\n"
                + self.describe()
            )

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own; returns its exit status."""
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {self.name} to exit\n{self.describe()}"
            ) from None

    def wait_for_port(self, port: int, timeout: float, host: str = "127.0.0.1") -> None:
        """Wait until a TCP connection to host:port succeeds; fails at once if the process dies."""
        what = f"{self.name} to accept TCP connections on {host}:{port}"

        def accepting() -> bool:
            self.assert_alive(what)
            return port_accepts(port, host)

        wait_until(accepting, timeout=timeout, what=what, dump=self.describe)

    def wait_for_log(self, regex: str | re.Pattern[str], timeout: float, *, since: int = 0) -> re.Match[str]:
        """Wait until `regex` matches the output (from character offset `since`); returns the match.

        A string pattern is compiled with re.MULTILINE so that ^ and $ anchor to log lines. The process
        dying first is a failure unless the pattern is already in its final output.
        """
        pattern = re.compile(regex, re.MULTILINE) if isinstance(regex, str) else regex
        what = f"{self.name} to log {pattern.pattern!r}"

        def matched() -> re.Match[str] | None:
            exited = not self.alive()
            match = pattern.search(self.output(), since)
            if match is None and exited:
                self.assert_alive(what)
            return match

        return wait_until(matched, timeout=timeout, what=what, dump=self.describe)

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the process only (not its group), e.g. SIGHUP or SIGTTIN to a gunicorn master."""
        if self.alive():
            self._popen.send_signal(sig)

    def _signal_group(self, sig: int) -> None:
        # The group id is the leader's pid (start_new_session), and the kernel does not reuse a pid while
        # a group of that id still has members, so this cannot hit an unrelated process.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _kill_followers(self) -> None:
        """SIGKILL every process of the group but the leader, which stays to clean up after them."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.pid:
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # gone meanwhile
            group = int(stat.rsplit(")", 1)[1].split()[2])  # after the name: state, ppid, pgrp
            if group == self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10, *, grace: float | None = None) -> int:
        """Send `sig` to the whole process group, SIGKILL it after `timeout`; always reaps. Idempotent.

        With `grace`, the rest of the group is SIGKILLed when the leader has not exited `grace` seconds after
        `sig`; the leader keeps the rest of `timeout`. Returns the leader's exit status (negative signal number
        if a signal ended it).
        """
        if self._popen.poll() is None:
            self._signal_group(sig)
            if grace is not None:
                try:
                    self._popen.wait(grace)
                except subprocess.TimeoutExpired:
                    self._kill_followers()
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._popen.wait()
        # Children the leader left behind (e.g. workers of a master killed with SIGKILL) must not outlive
        # the test.
        self._signal_group(signal.SIGKILL)
        if self._owns_log and self._final_output is None:
            self._final_output = _read_text(self.log_path)
            self.log_path.unlink(missing_ok=True)
        return self._popen.returncode

    def __enter__(self) -> Process:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _Workdir:
    """A server's working directory: the caller's, or a temporary one removed when the server stops."""

    def __init__(self, workdir: str | os.PathLike[str] | None, prefix: str) -> None:
        self._owned = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix=prefix)
        self.path = Path(workdir)
        self.path.mkdir(parents=True, exist_ok=True)

    def cleanup(self) -> None:
        if self._owned:
            shutil.rmtree(self.path, ignore_errors=True)


def _require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(f"{name} is not installed: run scripts/test-all, which installs it")
    return path


_S = TypeVar("_S", bound="_Server")


class _Server:
    """Shared lifecycle: start with retries on port clashes, stop, context manager, failure dumps."""

    _name = "server"

    def __init__(self, workdir: str | os.PathLike[str] | None) -> None:
        self._workdir = _Workdir(workdir, prefix=f"gi-{self._name}-")
        self.workdir = self._workdir.path
        self.process: Process | None = None
        self._final_dump: str | None = None
        # Set when start() failed; its AssertionError already carried the full dump.
        self.start_error: str | None = None

    def _launch(self) -> Process:
        raise NotImplementedError

    def _wait_ready(self, process: Process, timeout: float) -> None:
        raise NotImplementedError

    def _extra_dump(self) -> str:
        return ""

    def start(self, timeout: float = 30) -> None:
        if self.process is not None:
            raise RuntimeError(f"{self._name} already started")
        for attempt in range(1, _START_ATTEMPTS + 1):
            process = self._launch()
            self.process = process
            try:
                self._wait_ready(process, timeout)
                return
            except AssertionError as error:
                clash = _ADDRESS_IN_USE.search(process.output() + self._extra_dump())
                process.stop(signal.SIGKILL)
                if clash is None or attempt == _START_ATTEMPTS:
                    # The readiness waits dump the process output; the config and log files come here.
                    self.start_error = f"{self._name} did not become ready: {error}\n{self._extra_dump()}"
                    self._final_dump = self.dump()
                    raise AssertionError(self.start_error) from None
                self.process = None

    def dump(self) -> str:
        """Captured output plus config and log files, for failure messages."""
        if self._final_dump is not None:
            return self._final_dump
        parts = [self.process.describe() if self.process else f"{self._name} was never started\n"]
        parts.append(self._extra_dump())
        return "".join(parts)

    def output(self) -> str:
        return self.process.output() if self.process else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def stop(self, timeout: float = 10) -> None:
        if self.process is not None and self._final_dump is None:
            self.process.stop(timeout=timeout)
            self._final_dump = self.dump()
        self._workdir.cleanup()

    def __enter__(self: _S) -> _S:
        if self.process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------------
# node's util.inspect output


class JsArray(list[Any]):
    """A list parsed from util.inspect output; `omitted` counts the items hidden as `... N more items`."""

    omitted: int = 0

    @property
    def total(self) -> int:
        return len(self) + self.omitted


class _InspectParser:
    """Recursive-descent parser for the subset of JS literal syntax util.inspect prints for plain data.

    Handles objects with bare or quoted keys ('single', "double" or `backtick` quoted, whichever node
    picked to avoid escaping), arrays including the aligned multi-column layout and the `... N more items`
    tail, numbers (1e+21, -0, NaN, Infinity), strings, booleans, null and undefined.
    """

    _TOKEN = re.compile(
        r"""
        (?P<more>\.\.\.\ (?P<count>\d+)\ more\ items?)
        | (?P<number>-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
        | (?P<word>-?[A-Za-z_$][A-Za-z0-9_$]*)
        | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|`(?:[^`\\]|\\.)*`)
        | (?P<punct>[{}\[\],:])
        """,
        re.VERBOSE | re.DOTALL,
    )
    _WORDS: Mapping[str, Any] = {
        "true": True,
        "false": False,
        "null": None,
        "undefined": None,
        "NaN": math.nan,
        "Infinity": math.inf,
        "-Infinity": -math.inf,
    }
    _ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]+\}|u[0-9a-fA-F]{4}|.)", re.DOTALL)
    _SIMPLE_ESCAPES: Mapping[str, str] = {
        "n": "\n",
        "t": "\t",
        "r": "\r",
        "b": "\b",
        "f": "\f",
        "v": "\v",
        "0": "\0",
    }

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            match = self._TOKEN.match(text, pos)
            if match is None:
                raise ValueError(f"cannot parse util.inspect output at {text[pos : pos + 40]!r}")
            kind = match.lastgroup
            assert kind is not None
            self.tokens.append((kind, match.group("count") if kind == "more" else match.group(kind)))
            pos = match.end()
        self.index = 0
        self.text = text

    @classmethod
    def _unquote(cls, literal: str) -> str:
        def replace(match: re.Match[str]) -> str:
            escape = match.group(1)
            if escape[0] == "x" and len(escape) == 3:
                return chr(int(escape[1:], 16))
            if escape.startswith("u{"):
                return chr(int(escape[2:-1], 16))
            if escape[0] == "u" and len(escape) == 5:
                return chr(int(escape[1:], 16))
            return cls._SIMPLE_ESCAPES.get(escape, escape)

        return cls._ESCAPE.sub(replace, literal[1:-1])

    def _next(self) -> tuple[str, str]:
        if self.index >= len(self.tokens):
            raise ValueError(f"unexpected end of util.inspect output: {self.text!r}")
        token = self.tokens[self.index]
        self.index += 1
        return token

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def _expect(self, punct: str) -> None:
        token = self._next()
        if token != ("punct", punct):
            raise ValueError(f"expected {punct!r}, got {token[1]!r} in {self.text!r}")

    def parse(self) -> Any:
        value = self._value()
        if self._peek() is not None:
            raise ValueError(f"trailing data after value in {self.text!r}")
        return value

    def _value(self) -> Any:
        kind, text = self._next()
        if kind == "number":
            number = float(text)
            return int(number) if number.is_integer() and "e" not in text.lower() and text != "-0" else number
        if kind == "string":
            return self._unquote(text)
        if kind == "word":
            if text not in self._WORDS:
                raise ValueError(f"unexpected word {text!r} in {self.text!r}")
            return self._WORDS[text]
        if (kind, text) == ("punct", "{"):
            return self._object()
        if (kind, text) == ("punct", "["):
            return self._array()
        raise ValueError(f"unexpected {text!r} in {self.text!r}")

    def _object(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while True:
            token = self._next()
            if token == ("punct", "}"):
                return result
            kind, text = token
            if kind == "more":
                # Objects are not truncated by default, but a tail like this must not break the parse.
                pass
            else:
                if kind == "string":
                    key = self._unquote(text)
                elif kind in ("word", "number"):
                    key = text
                else:
                    raise ValueError(f"unexpected {text!r} as object key in {self.text!r}")
                self._expect(":")
                result[key] = self._value()
            token = self._next()
            if token == ("punct", "}"):
                return result
            if token != ("punct", ","):
                raise ValueError(f"expected ',' or '}}', got {token[1]!r} in {self.text!r}")

    def _array(self) -> JsArray:
        result = JsArray()
        while True:
            peek = self._peek()
            if peek == ("punct", "]"):
                self.index += 1
                return result
            if peek is not None and peek[0] == "more":
                self.index += 1
                result.omitted += int(peek[1])
            else:
                result.append(self._value())
            token = self._next()
            if token == ("punct", "]"):
                return result
            if token != ("punct", ","):
                raise ValueError(f"expected ',' or ']', got {token[1]!r} in {self.text!r}")


def parse_node_inspect(text: str) -> Any:
    """Parse what node's util.inspect prints for plain data (dicts, JsArray lists, numbers, strings)."""
    return _InspectParser(text).parse()


# --------------------------------------------------------------------------------------------------------
# The reference StatsD daemon


class StatsdDaemon(_Server):
    """The real statsd daemon (npm `statsd`), UDP and management ports on free 127.0.0.1 ports.

    No backend is loaded and the flush interval is an hour, so nothing is reset during a test: counters
    accumulate and every timer value stays available through the management interface.
    """

    _name = "statsd"

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        stats_js: str | os.PathLike[str] | None = None,
        node: str = "node",
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        stats_js = stats_js or os.environ.get(STATSD_JS_ENV)
        if not stats_js or not Path(stats_js).is_file():
            raise AssertionError(
                f"the statsd daemon was not found ({STATSD_JS_ENV}={stats_js!r}): run scripts/test-all, "
                "which installs it under .tools/statsd and exports that variable"
            )
        self.stats_js = Path(stats_js).resolve()
        self.node = _require_binary(node)
        super().__init__(workdir)
        self.extra_config = dict(extra_config or {})
        self.config_path = self.workdir / "statsd-config.js"
        self.port = 0
        self.mgmt_port = 0
        # Empty datagrams sent to prove the UDP socket is bound; each one counts in statsd.packets_received.
        self.probe_packets = 0

    @property
    def udp_address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _launch(self) -> Process:
        # A fixed "port" in extra_config lets a test bring a daemon back on the address a server already uses.
        self.port = int(self.extra_config.get("port") or free_udp_port())
        self.mgmt_port = free_port()
        config = {
            "address": "127.0.0.1",
            "port": self.port,
            "mgmt_address": "127.0.0.1",
            "mgmt_port": self.mgmt_port,
            "backends": [],
            "flushInterval": 3_600_000,
            "deleteIdleStats": False,
            **self.extra_config,
        }
        # A JSON object is a valid JS expression, which is all statsd's config loader evaluates.
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")
        return Process(
            [self.node, str(self.stats_js), str(self.config_path)],
            cwd=self.workdir,
            log_path=self.workdir / "statsd.log",
            name="statsd",
        )

    def _wait_ready(self, process: Process, timeout: float) -> None:
        process.wait_for_port(self.mgmt_port, timeout)
        # The management port accepting says nothing about the UDP socket: its bind is asynchronous too.
        # An empty datagram bumps statsd.packets_received and creates no metric, so it is a harmless probe.
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:

            def probe_counted() -> bool:
                process.assert_alive("statsd to receive a UDP probe")
                sock.sendto(b"", self.udp_address)
                self.probe_packets += 1
                try:
                    reply = self.command("counters", timeout=1)
                except OSError:
                    # Whoever else holds a clashing management port accepts but never answers like statsd.
                    return False
                counters = parse_node_inspect(reply)
                return isinstance(counters, dict) and counters.get("statsd.packets_received", 0) >= 1

            wait_until(
                probe_counted,
                timeout=max(deadline - time.monotonic(), 1),
                what="statsd to receive a UDP probe",
                dump=process.describe,
                interval=0.1,
            )
        # Probes still in flight would land after this point and skew packets_received unpredictably.
        self.probe_packets = int(self.counters().get("statsd.packets_received", 0))

    def _extra_dump(self) -> str:
        return _section(f"statsd config {self.config_path}", _read_text(self.config_path))

    def send(self, *lines: str) -> None:
        """Send each line as its own UDP datagram (what most StatsD clients do)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for line in lines:
                sock.sendto(line.encode(), self.udp_address)

    def command(self, command: str, timeout: float = 10) -> str:
        """Send a management command (counters, gauges, timers, stats, ...); returns the reply up to END."""
        with socket.create_connection(("127.0.0.1", self.mgmt_port), timeout=timeout) as conn:
            conn.sendall(command.encode() + b"\n")
            buffer = b""
            while True:
                lines = buffer.decode(errors="replace").split("\n")
                if "END" in lines:
                    return "\n".join(lines[: lines.index("END")])
                chunk = conn.recv(65536)
                if not chunk:
                    raise ConnectionError(
                        f"statsd closed the management connection before END; got {buffer!r}\n{self.dump()}"
                    )
                buffer += chunk

    def _dict(self, command: str) -> dict[str, Any]:
        reply = self.command(command)
        try:
            parsed = parse_node_inspect(reply)
        except ValueError as error:
            raise AssertionError(f"unparseable statsd reply to {command!r}: {error}\n{reply}") from error
        if not isinstance(parsed, dict):
            raise AssertionError(f"statsd reply to {command!r} is not an object:\n{reply}")
        return parsed

    def counters(self) -> dict[str, float]:
        """Counters accumulated since start (sample rates applied), including statsd's own statsd.* ones."""
        return {key: float(value) for key, value in self._dict("counters").items()}

    def gauges(self) -> dict[str, float]:
        return {key: float(value) for key, value in self._dict("gauges").items()}

    def timers(self) -> dict[str, list[float]]:
        """Raw timer values; only the first 100 of each are visible (node truncates), see timer_counts()."""
        return {key: [float(item) for item in values] for key, values in self._dict("timers").items()}

    def timer_counts(self) -> dict[str, int]:
        """How many values each timer received, counting those node's output hides as `... N more items`."""
        counts: dict[str, int] = {}
        for key, values in self._dict("timers").items():
            counts[key] = values.total if isinstance(values, JsArray) else len(values)
        return counts

    def bad_lines(self) -> float:
        """statsd's own count of malformed lines (statsd.bad_lines_seen)."""
        return self.counters().get("statsd.bad_lines_seen", 0.0)


# --------------------------------------------------------------------------------------------------------
# Prometheus


def _duration(seconds: float) -> str:
    milliseconds = round(seconds * 1000)
    if milliseconds <= 0:
        raise ValueError(f"duration must be positive, got {seconds}")
    return f"{milliseconds // 1000}s" if milliseconds % 1000 == 0 else f"{milliseconds}ms"


class PrometheusServer(_Server):
    """The real `prometheus` binary scraping `targets` ("host:port") as one job, API on a free port."""

    _name = "prometheus"

    def __init__(
        self,
        targets: Sequence[str],
        *,
        job_name: str = "test",
        scrape_interval: float = 1.0,
        metrics_path: str = "/metrics",
        workdir: str | os.PathLike[str] | None = None,
        binary: str = "prometheus",
    ) -> None:
        self.binary = _require_binary(binary)
        super().__init__(workdir)
        self.targets = list(targets)
        self.job_name = job_name
        self.scrape_interval = scrape_interval
        self.metrics_path = metrics_path
        self.config_path = self.workdir / "prometheus.yml"
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _launch(self) -> Process:
        self.port = free_port()
        interval = _duration(self.scrape_interval)
        # JSON is YAML, and json.dumps quotes target strings safely.
        config = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "scrape_configs": [
                {
                    "job_name": self.job_name,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")
        return Process(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=info",
            ],
            cwd=self.workdir,
            log_path=self.workdir / "prometheus.log",
            name="prometheus",
        )

    def _wait_ready(self, process: Process, timeout: float) -> None:
        def ready() -> bool:
            process.assert_alive("prometheus to be ready")
            try:
                status, _ = self._get("/-/ready", timeout=1)
            except OSError:
                return False
            return status == 200

        wait_until(ready, timeout=timeout, what="prometheus /-/ready", dump=process.describe, interval=0.1)

    def _extra_dump(self) -> str:
        return _section(f"prometheus config {self.config_path}", _read_text(self.config_path))

    def _get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET an /api/v1 endpoint and return its `data`, failing on anything but status "success"."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = self._get(f"/api/v1/{path}{query}")
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if status != 200 or not isinstance(payload, dict) or payload.get("status") != "success":
            raise AssertionError(f"prometheus /api/v1/{path}{query} answered {status}: {body!r}")
        return payload["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (a scalar or string result comes back as one element)."""
        data = self.api("query", {"query": promql})
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_value(self, promql: str) -> float | None:
        """The value of a single-element result, None when empty; more than one element is an error."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise AssertionError(f"{promql!r} returned {len(result)} series, expected one: {result}")
        return float(result[0]["value"][1])

    def targets_status(self) -> list[dict[str, Any]]:
        """The active targets as /api/v1/targets reports them (health, lastError, scrapeUrl, ...)."""
        active: list[dict[str, Any]] = self.api("targets")["activeTargets"]
        return active

    def targets_up(self) -> bool:
        """True once every configured target has been scraped successfully at least once."""
        active = self.targets_status()
        return len(active) == len(self.targets) and all(target["health"] == "up" for target in active)


# --------------------------------------------------------------------------------------------------------
# nginx


class Nginx(_Server):
    """The real nginx in the foreground as a reverse proxy to `upstream`, on a free 127.0.0.1 port.

    `upstream` is "127.0.0.1:PORT" or "unix:/path/to.sock". Every path nginx writes (pid, logs, temp
    files) is inside the working directory, so it runs as root without touching /var.
    """

    _name = "nginx"

    def __init__(
        self,
        upstream: str,
        *,
        extra_location_directives: str = "",
        extra_server_directives: str = "",
        extra_upstream_directives: str = "",
        workdir: str | os.PathLike[str] | None = None,
        binary: str = "nginx",
    ) -> None:
        self.binary = _require_binary(binary)
        super().__init__(workdir)
        self.upstream = upstream
        self.extra_location_directives = extra_location_directives
        self.extra_server_directives = extra_server_directives
        self.extra_upstream_directives = extra_upstream_directives
        self.config_path = self.workdir / "nginx.conf"
        self.error_log_path = self.workdir / "error.log"
        self.access_log_path = self.workdir / "access.log"
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> str:
        work = self.workdir
        # A root master drops its workers to `nobody`, who cannot traverse a 0700 pytest tmp dir to reach
        # a unix socket that root created; keeping the workers as root avoids that.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return f"""\
{user}worker_processes 1;
pid {work / "nginx.pid"};
error_log {self.error_log_path} info;

events {{
    worker_connections 1024;
}}

http {{
    access_log {self.access_log_path};
    client_body_temp_path {work / "client_body_temp"};
    proxy_temp_path {work / "proxy_temp"};
    fastcgi_temp_path {work / "fastcgi_temp"};
    uwsgi_temp_path {work / "uwsgi_temp"};
    scgi_temp_path {work / "scgi_temp"};

    upstream app {{
        server {self.upstream};
{_indent(self.extra_upstream_directives, 8)}
    }}

    server {{
        listen 127.0.0.1:{self.port};
{_indent(self.extra_server_directives, 8)}
        location / {{
            proxy_pass http://app;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_redirect off;
{_indent(self.extra_location_directives, 12)}
        }}
    }}
}}
"""

    def _launch(self) -> Process:
        self.port = free_port()
        self.config_path.write_text(self._config())
        return Process(
            [self.binary, "-p", f"{self.workdir}/", "-c", str(self.config_path), "-g", "daemon off;"],
            cwd=self.workdir,
            log_path=self.workdir / "nginx.out",
            name="nginx",
        )

    def _wait_ready(self, process: Process, timeout: float) -> None:
        # A connect alone can be answered by whoever else holds the port: nginx keeps retrying a busy bind
        # for 2.5s before giving up. It writes its pid file only once every listen socket is bound.
        pid_file = self.workdir / "nginx.pid"

        def bound() -> bool:
            process.assert_alive("nginx to bind its port and write its pid file")
            try:
                return pid_file.read_text().strip() == str(process.pid)
            except FileNotFoundError:
                return False

        wait_until(bound, timeout=timeout, what=f"nginx to write {pid_file}", dump=process.describe)
        process.wait_for_port(self.port, timeout)

    def _extra_dump(self) -> str:
        return (
            _section(f"nginx config {self.config_path}", _read_text(self.config_path))
            + _section(f"nginx error log {self.error_log_path}", _read_text(self.error_log_path))
            + _section(f"nginx access log {self.access_log_path}", _read_text(self.access_log_path))
        )


def _indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line.strip() for line in text.strip().splitlines())


# --------------------------------------------------------------------------------------------------------
# Signatures of the conftest factory fixtures, for annotating tests.


class ProcessFactory(Protocol):
    def __call__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
    ) -> Process: ...


class PrometheusFactory(Protocol):
    def __call__(
        self,
        targets: Sequence[str],
        *,
        job_name: str = "test",
        scrape_interval: float = 1.0,
        metrics_path: str = "/metrics",
    ) -> PrometheusServer: ...


class NginxFactory(Protocol):
    def __call__(
        self,
        upstream: str,
        *,
        extra_location_directives: str = "",
        extra_server_directives: str = "",
        extra_upstream_directives: str = "",
    ) -> Nginx: ...


def process_starter(workdir: Path, processes: list[Process]) -> ProcessFactory:
    """A ProcessFactory logging each process to its own file under ``workdir`` and keeping it in
    ``processes`` so whoever owns the list can stop them all."""
    serial = itertools.count(1)

    def start(
        argv: Sequence[str | os.PathLike[str]],
        env: Mapping[str, str | None] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
    ) -> Process:
        label = name or Path(os.fspath(argv[0])).name
        process = Process(argv, env=env, cwd=cwd, log_path=workdir / f"process-{next(serial)}-{label}.log", name=label)
        processes.append(process)
        return process

    return start
