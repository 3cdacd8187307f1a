"""/metrics has limits: idle connections cannot shut scrapes out, and a scrape flood cannot multiply rounds."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until

IDLE_CONNECTIONS = 1000
SERVER_FILES = 1024
"""The server's open-file limit: systemd's default soft limit."""


@contextlib.contextmanager
def open_file_limit(soft: int) -> Iterator[None]:
    """This process's soft open-file limit (inherited by what it starts) for the duration."""
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < soft:
        pytest.skip(f"the open-file hard limit ({hard}) is below the {soft} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (before, hard))


def _rounds(server: Gunicorn) -> int:
    status = json.loads(Path(server.scoreboard_path).with_name("status.json").read_text())
    return int(status["rounds"])


def test_idle_connections_neither_block_scrapes_nor_stay_open(process_factory: ProcessFactory) -> None:
    """1,000 connections that send nothing (server limit 1,024 files): a scrape answers; silent ones are closed."""
    with open_file_limit(SERVER_FILES):
        server = start_gunicorn(process_factory, workers=1)
    assert server.metrics_port is not None
    idle: list[socket.socket] = []
    with open_file_limit(IDLE_CONNECTIONS + 512):
        try:
            for _ in range(IDLE_CONNECTIONS):
                sock = socket.socket()
                sock.settimeout(10)
                with contextlib.suppress(OSError):  # refused or reset when the server sheds the oldest
                    sock.connect(("127.0.0.1", server.metrics_port))
                idle.append(sock)
            server.get("/")
            assert server.total("gunicorn_requests_total") == 1
            silent = socket.create_connection(("127.0.0.1", server.metrics_port), timeout=30)
            idle.append(silent)
            # The server drops a connection that stays silent: the read sees EOF (or a reset), not our timeout.
            with contextlib.suppress(ConnectionResetError):
                assert silent.recv(1) == b""
        finally:
            for sock in idle:
                sock.close()


def test_a_scrape_flood_does_not_multiply_rounds(process_factory: ProcessFactory) -> None:
    """Scrapes as fast as 8 clients can send them: rounds stay at most one per interval."""
    interval = 0.2
    server = start_gunicorn(process_factory, workers=1, env={"GUNICORN_INSIGHT_INTERVAL": str(interval)})
    assert server.metrics_port is not None
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    wait_until(
        lambda: os.path.exists(os.path.join(os.path.dirname(server.scoreboard_path), "status.json")),
        timeout=30,
        what="status.json",
        dump=server.process.describe,
    )
    scrapes = 0
    lock = threading.Lock()

    def scrape(count: int) -> None:
        nonlocal scrapes
        for _ in range(count):
            with urllib.request.urlopen(url, timeout=30) as response:
                assert b"gunicorn_workers" in response.read()
            with lock:
                scrapes += 1

    clients = [threading.Thread(target=scrape, args=(15,)) for _ in range(8)]
    before, started = _rounds(server), time.monotonic()
    for client in clients:
        client.start()
    for client in clients:
        client.join(120)
    rounds, elapsed = _rounds(server) - before, time.monotonic() - started
    assert scrapes == 120
    assert rounds <= elapsed / interval + 3, (
        f"{rounds} rounds in {elapsed:.2f}s for {scrapes} scrapes\n{server.process.describe()}"
    )
