"""A DNS server that never answers must not stall the master: tested in a private network namespace.

gunicorn runs under ``unshare -m -n`` with only ``lo`` up and /etc/resolv.conf bind-mounted (in its own
mount namespace, so the host's file is untouched) to a nameserver on 127.0.0.1:53 where a process reads
queries and never replies. StatsD is given by a name only that nameserver could answer.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import EXAMPLES, clean_environment, gunicorn_argv, scoreboard_of
from servers import ProcessFactory, free_port, wait_until

from gunicorn_insight import _scoreboard as sb

# Counts each query it swallows in a file, never answers. It runs inside the namespace.
BLACK_HOLE = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 53))
open(sys.argv[1] + ".ready", "w").close()
while True:
    sock.recv(4096)
    with open(sys.argv[1], "a") as seen:
        seen.write("query\\n")
"""
# timeout:30 attempts:1: one lookup blocks for 30 s, far longer than any wait below.
RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:30 attempts:1\n"


def _namespaces_available() -> str | None:
    try:
        probe = subprocess.run(
            ["unshare", "-m", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unshare cannot run here: {error}"
    if probe.returncode != 0:
        return f"unshare -m -n is not permitted here: {probe.stderr.decode(errors='replace').strip()}"
    return None


def _ready_pids(board_path: str) -> set[int]:
    board = sb.Scoreboard.attach(board_path)
    try:
        return {view.pid for view in board if view.state == sb.READY}
    finally:
        board.close()


@pytest.mark.oldest
def test_unanswered_dns_stalls_neither_forks_nor_shutdown(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """StatsD by a name whose DNS server never answers: a SIGKILLed worker is replaced at once, SIGTERM is quick."""
    reason = _namespaces_available()
    if reason is not None:
        pytest.skip(reason)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(RESOLV_CONF)
    queries = tmp_path / "queries"
    hole = tmp_path / "black_hole.py"
    hole.write_text(BLACK_HOLE)
    argv = gunicorn_argv(
        "-c",
        "python:gunicorn_insight.conf",
        "-b",
        f"127.0.0.1:{free_port()}",
        "-w",
        "2",
        "--chdir",
        str(EXAMPLES),
        "--graceful-timeout",
        "5",
        "app:app",
    )
    script = (
        "set -e; ip link set lo up; "
        f"mount --bind {shlex.quote(str(resolv))} /etc/resolv.conf; "
        # A subshell, so the black hole is not gunicorn's child; it stays in the test's process group.
        f"( {shlex.quote(sys.executable)} {shlex.quote(str(hole))} {shlex.quote(str(queries))} & ); "
        f"while [ ! -e {shlex.quote(str(queries))}.ready ]; do sleep 0.05; done; "
        f"exec {shlex.join(argv)}"
    )
    env = clean_environment(
        {"GUNICORN_INSIGHT_STATSD": "statsd.insight-test.invalid:8125", "GUNICORN_INSIGHT_METRICS_BIND": "off"}
    )
    process = process_factory(["unshare", "-m", "-n", "sh", "-c", script], env=env, cwd=EXAMPLES, name="gunicorn")
    board = wait_until(
        lambda: scoreboard_of(process), timeout=60, what="the master's server.json", dump=process.describe
    )
    wait_until(lambda: len(_ready_pids(board)) == 2, timeout=60, what="2 booted workers", dump=process.describe)
    wait_until(
        lambda: queries.exists() and queries.read_text(),
        timeout=30,
        what="the master to ask the silent nameserver",
        dump=process.describe,
    )

    before = _ready_pids(board)
    victim = min(before)
    killed_at = time.monotonic()
    subprocess.run(["kill", "-KILL", str(victim)], check=True)
    replaced = wait_until(
        lambda: (_ready_pids(board) - before) or None,
        timeout=25,
        what="a new worker in place of the killed one",
        dump=process.describe,
    )
    replaced_after = time.monotonic() - killed_at
    # A lookup under the fork lock holds the replacement for the full 30 s resolver timeout.
    assert replaced_after < 10, f"worker replaced after {replaced_after:.1f}s\n{process.describe()}"
    assert len(replaced) == 1

    stopping_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    status = process.wait(timeout=25)
    stopped_after = time.monotonic() - stopping_at
    assert status == 0, process.describe()
    assert stopped_after < 10, f"SIGTERM took {stopped_after:.1f}s\n{process.describe()}"
    assert "cannot reach StatsD at statsd.insight-test.invalid:8125: the name does not resolve" in process.output()
