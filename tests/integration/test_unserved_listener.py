"""A listener whose queue nobody serves while no worker is in a request: real gunicorn whose idle workers stop
accepting (their heartbeat write blocks on a disk that does not answer, or C code holds the GIL), named once
with what each worker's main thread is doing, in the log and in gunicorn_listen_unserved_seconds."""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import APPS, Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until
from test_cli_live import run_cli

# The worker's heartbeat (gunicorn's notify(), which touches a file under worker_tmp_dir) goes through a
# "disk" the test can make hang: a file lock the test holds. Outside any request, in the worker's own loop.
SLOW_HEARTBEAT_CONFIG = """
import fcntl
import os
import re

import gunicorn_insight


def write_heartbeat_to_slow_disk(path):
    with open(path, "a") as disk:
        fcntl.flock(disk, fcntl.LOCK_EX)  # blocks while the test holds the lock


def hold_the_gil_in_c():
    re.match(r"(a+)+$", "a" * 60 + "b")  # the regex engine never lets go of the GIL


def post_worker_init(worker):
    heartbeat = worker.notify

    def notify():
        if os.path.exists(os.environ["UNSERVED_TRIGGER"]):
            if os.environ.get("UNSERVED_IN_C"):
                hold_the_gil_in_c()
            write_heartbeat_to_slow_disk(os.environ["UNSERVED_DISK"])
        heartbeat()

    worker.notify = notify


gunicorn_insight.install(globals())
"""

NOT_SERVED = (
    r"gunicorn-insight: listener (?P<listener>\S+) not served: (?P<queued>\d+) connections waiting in its accept "
    r"queue \(limit \d+\) for (?P<seconds>[\d.]+)s while no worker is in a request and none finished; "
    r"(?P<ready>\d+) of (?P<workers>\d+) workers ready [^\n]*\n(?P<workers_doing>(?:  [^\n]*\n)+)"
)


@contextlib.contextmanager
def held_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as disk:
        fcntl.flock(disk, fcntl.LOCK_EX)
        yield
        fcntl.flock(disk, fcntl.LOCK_UN)


def start(
    process_factory: ProcessFactory, tmp_path: Path, workers: int, worker_class: str = "sync", **env: str
) -> tuple[Gunicorn, str]:
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(SLOW_HEARTBEAT_CONFIG)
    path = str(tmp_path / "app.sock")
    server = start_gunicorn(
        process_factory,
        app="pressure_app:app",
        cwd=APPS,
        workers=workers,
        worker_class=worker_class,
        config=str(config),
        args=["--timeout", "120", "-b", f"unix:{path}"],
        env={
            "GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": "2",
            "UNSERVED_TRIGGER": str(tmp_path / "trigger"),
            "UNSERVED_DISK": str(tmp_path / "disk"),
            **env,
        },
    )
    # The readiness probe's bare connect can still sit in the TCP queue when a test makes the workers stop
    # accepting. The accept queue is first in, first out: once a later request over TCP is answered, the probe
    # has left it, and only the connections a test sends over the unix socket can wait.
    assert server.get("/") == 200
    return server, path


def request_over_unix(path: str, results: list[int]) -> None:
    """One GET over the unix socket in a thread; its status lands in ``results`` once served."""

    def send() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(120)
            client.connect(path)
            with client:
                client.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
                status_line = client.makefile("rb").readline()
                results.append(int(status_line.split()[1]))

    threading.Thread(target=send, daemon=True).start()


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_idle_workers_blocked_outside_a_request_are_named_with_their_main_thread(
    process_factory: ProcessFactory, tmp_path: Path, worker_class: str
) -> None:
    """Both workers blocked in their heartbeat write, connections queued on the unix socket: one line names the
    listener, the queue, and each worker's blocked frame; the gauge climbs, then the line saying it is served
    again, and the gauge is back at 0."""
    server, path = start(process_factory, tmp_path, workers=2, worker_class=worker_class)
    listener = f"unix:{path}"
    results: list[int] = []
    with held_lock(tmp_path / "disk"):
        (tmp_path / "trigger").touch()
        for _ in range(5):  # two are served (one per worker, which then blocks in its heartbeat); three queue
            request_over_unix(path, results)
        # Each worker blocks in its heartbeat once it goes round its loop: a sync worker after a request or when
        # woken with nothing left to accept, a gthread worker within a second (maybe holding a connection it
        # accepted): none to two are served, the rest wait.
        match = server.process.wait_for_log(NOT_SERVED, timeout=30)
        served = len(results)
        assert match["listener"] == listener
        assert 1 <= int(match["queued"]) <= 5 - served, (match[0], served)
        assert (match["ready"], match["workers"]) == ("2", "2")
        assert float(match["seconds"]) >= 2
        doing = match["workers_doing"]
        # Both workers wait in the same frame: one stack under both their names, or two when they came to it
        # from different places of gunicorn's loop (a sync worker notifies before and after its select).
        head = r"slot=\d pid=\d+ connections=\d+/\d+ served=\d+"
        groups = re.findall(rf"^  ((?:{head}(?:; )?)+): main thread", doing, re.M)
        assert sorted(re.findall(r"slot=(\d)", " ".join(groups))) == ["0", "1"], doing
        assert doing.count("in write_heartbeat_to_slow_disk\n") == len(groups), doing
        assert doing.count("fcntl.flock(disk, fcntl.LOCK_EX)") == len(groups), doing
        assert len(results) == served
        wait_until(
            lambda: (server.value("gunicorn_listen_unserved_seconds", listener=listener) or 0) >= 3,
            timeout=30,
            what="gunicorn_listen_unserved_seconds >= 3",
            dump=server.process.describe,
        )
        # `stacks` shows the same: no request in flight, each main thread in the blocked frame.
        stacks = run_cli("stacks", "--pid", str(server.pid), "--json")
        assert stacks.returncode == 0, stacks.stdout + stacks.stderr
        workers = json.loads(stacks.stdout)["workers"]
        assert [worker["main_thread"]["stack"][-1]["function"] for worker in workers] == [
            "write_heartbeat_to_slow_disk"
        ] * 2, workers
        text = run_cli("stacks", "--pid", str(server.pid)).stdout
        assert "2 worker(s) with no request in flight (pid " in text, text
        assert "main thread in write_heartbeat_to_slow_disk at " in text, text
        (tmp_path / "trigger").unlink()
    server.process.wait_for_log(rf"listener {re.escape(listener)} is served again after [\d.]+s", timeout=30)
    wait_until(lambda: len(results) == 5, timeout=30, what="the queued requests served", dump=server.process.describe)
    server.wait_for_value("gunicorn_listen_unserved_seconds", 0, listener=listener)
    assert server.process.output().count(" not served: ") == 1
    tcp = f"http://127.0.0.1:{server.port}"
    assert server.value("gunicorn_listen_unserved_seconds", listener=tcp) == 0  # its queue stayed empty


def test_a_worker_whose_watchdog_cannot_answer_is_named_as_such(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """A worker stuck in C code holding the GIL outside a request cannot give its stack: the line says so."""
    server, path = start(process_factory, tmp_path, workers=1, UNSERVED_IN_C="1")
    results: list[int] = []
    (tmp_path / "trigger").touch()
    for _ in range(3):
        request_over_unix(path, results)
    match = server.process.wait_for_log(NOT_SERVED, timeout=60)
    assert match["listener"] == f"unix:{path}"
    assert re.search(r"no answer from its watchdog thread in [\d.]+s: .*holds the GIL", match["workers_doing"]), match[
        0
    ]


def test_an_idle_server_with_an_empty_queue_is_not_unserved(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """Idle workers with nothing queued, past the threshold several times over: no line, the gauge stays 0."""
    server, path = start(process_factory, tmp_path, workers=2)
    listener = f"unix:{path}"
    results: list[int] = []
    for _ in range(3):
        request_over_unix(path, results)
    wait_until(lambda: len(results) == 3, timeout=30, what="3 requests served", dump=server.process.describe)
    status = Path(server.scoreboard_path).parent / "status.json"
    # the master writes it at its first round, which three quick requests can precede (written whole: a rename)
    wait_until(status.exists, timeout=30, what="the master's first status.json", dump=server.process.describe)
    first = json.loads(status.read_text())
    wait_until(  # 6 s of rounds: three times the 2 s threshold
        lambda: json.loads(status.read_text())["monotonic"] - first["monotonic"] >= 6,
        timeout=60,
        what="6 s of the master's rounds",
        dump=server.process.describe,
    )
    assert server.value("gunicorn_listen_unserved_seconds", listener=listener) == 0
    assert " not served: " not in server.process.output()
