"""What a worker's memory, descriptors and threads grow with, told by the master and doctor --pid."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from harness import APPS, Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until
from test_doctor_live import doctor, findings

MIB = 1 << 20


def _status(server: Gunicorn) -> dict[str, Any]:
    with open(Path(server.scoreboard_path).parent / "status.json") as handle:
        document: dict[str, Any] = json.load(handle)
    return document


def _rounds_pass(server: Gunicorn, rounds: int) -> None:
    """Wait until the master has run ``rounds`` more rounds (status.json counts them)."""
    status = Path(server.scoreboard_path).parent / "status.json"
    wait_until(status.exists, timeout=30, what="the first round's status.json", dump=server.process.describe)
    target = _status(server)["rounds"] + rounds
    wait_until(
        lambda: _status(server)["rounds"] >= target, timeout=60, what=f"{rounds} rounds", dump=server.process.describe
    )


def _hold_requests(server: Gunicorn, count: int, megabytes: int) -> list[threading.Thread]:
    """``count`` requests that each allocate ``megabytes`` and hold it until the app's release file exists, opened one
    after another with rounds between them, so the master sees requests in flight at several levels."""
    clients = []
    for number in range(1, count + 1):
        client = threading.Thread(
            target=server.get, args=(f"/hold?mb={megabytes}",), kwargs={"timeout": 150}, daemon=True
        )
        client.start()
        clients.append(client)
        wait_until(
            lambda number=number: server.board().read(0).in_flight >= number,  # type: ignore[misc]
            timeout=30,
            what=f"{number} requests in flight",
            dump=server.process.describe,
        )
        _rounds_pass(server, 3)
    return clients


@pytest.mark.parametrize(
    ("worker_class", "setting"), [("gevent", "worker_connections"), ("gthread", "threads")], ids=["gevent", "gthread"]
)
def test_memory_each_held_request_costs_is_measured(
    process_factory: ProcessFactory, tmp_path: Path, worker_class: str, setting: str
) -> None:
    """Requests each holding 4 MiB: the master measures about 4 MiB per request in flight and doctor --pid
    says what the concurrency setting lets a worker reach; requests holding nothing: no finding."""
    release = tmp_path / "release"

    def holding(megabytes: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        server = start_gunicorn(
            process_factory,
            app="growth_app:app",
            cwd=APPS,
            worker_class=worker_class,
            workers=1,
            args=["--worker-connections", "100", "--threads", "16"],
            env={"GROWTH_APP_RELEASE": str(release)},
        )
        clients = _hold_requests(server, 10, megabytes)
        _rounds_pass(server, 10)
        try:
            estimates = _status(server)["held_memory"]
            _, document = doctor(server, "--window", "0.3")
        finally:
            release.touch()
            for client in clients:
                client.join(timeout=60)
            release.unlink()
        return estimates, document

    estimates, holding_nothing = holding(0)
    assert estimates == []
    assert "live-memory-per-request" not in findings(holding_nothing), holding_nothing
    (held,), document = holding(4)
    assert 3 * MIB <= held["bytes_per_request"] <= 5.5 * MIB, held
    assert held["requests_high"] - held["requests_low"] >= 4, held
    finding = findings(document)["live-memory-per-request"]
    assert "each request held open costs about" in finding["what"], finding
    limit = 100 if setting == "worker_connections" else 16
    assert f"at {setting}={limit} a worker could reach" in finding["what"], finding
    assert f"lower {setting}" in finding["fix"], finding


def _leaky_server(process_factory: ProcessFactory, path: str) -> Gunicorn:
    server = start_gunicorn(process_factory, app="growth_app:app", cwd=APPS, workers=1, args=["--threads", "1"])
    for _ in range(12):  # batches with rounds between them: the worker is seen idle after each
        for _ in range(40):
            assert server.get(path) == 200
        _rounds_pass(server, 3)
    return server


def test_leaked_files_are_named_with_their_rate(process_factory: ProcessFactory) -> None:
    """One file left open per request: the master logs it once and doctor --pid names descriptors at
    about 1,000 per 1,000 requests, of which most are files."""
    server = _leaky_server(process_factory, "/leak-file")
    _, document = doctor(server, "--window", "0.3")
    (leak,) = [item for item in _status(server)["growth"] if item["resource"] == "open_fds"]
    assert 800 <= leak["per_1000"] <= 1100, leak
    assert leak["served"] >= 200, leak
    assert "files" in leak["kinds"].split(", ")[0], leak
    finding = findings(document)["live-leak"]
    assert "holds more open file descriptors with every request it serves" in finding["what"], finding
    assert "ls -l /proc/" in finding["fix"], finding
    assert server.process.output().count("holds more open file descriptors") == 1


def test_leaked_threads_are_named_with_their_rate(process_factory: ProcessFactory) -> None:
    """One thread left running per request: the finding names threads, at about 1,000 per 1,000 requests."""
    server = _leaky_server(process_factory, "/leak-thread")
    _, document = doctor(server, "--window", "0.3")
    grown = {item["resource"]: item for item in _status(server)["growth"]}
    assert 800 <= grown["threads"]["per_1000"] <= 1100, grown
    assert "open_fds" not in grown, grown
    finding = findings(document)["live-leak"]
    assert "holds more threads with every request it serves" in finding["what"], finding


def test_a_worker_that_leaks_nothing_is_not_told_it_does(process_factory: ProcessFactory) -> None:
    """Hundreds of requests that keep nothing: no growth found, no finding, no log line."""
    server = _leaky_server(process_factory, "/")
    _, document = doctor(server, "--window", "0.3")
    assert _status(server)["growth"] == []
    assert "live-leak" not in findings(document), document
    assert "holds more" not in server.process.output()
