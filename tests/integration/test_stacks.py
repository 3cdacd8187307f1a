"""gunicorn-insight stacks against a real gunicorn: the workers' own watchdogs report where each request is."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
from pathlib import Path

import pytest
from harness import APPS, Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until
from test_cli_live import run_cli

from gunicorn_insight import _scoreboard as sb


def fire(server: Gunicorn, path: str) -> None:
    def send() -> None:
        with contextlib.suppress(OSError, http.client.HTTPException):
            server.get(path, timeout=120)

    threading.Thread(target=send, daemon=True).start()


def wait_in_flight(server: Gunicorn, path: str, count: int) -> dict[int, int]:
    """{worker pid: requests for `path` in flight} once the scoreboard shows `count` of them."""

    def serving() -> dict[int, int] | None:
        board = server.board()
        try:
            found = {
                view.pid: sum(1 for request in view.requests if request.path == path)
                for view in board
                if view.state == sb.READY
            }
        finally:
            board.close()
        found = {pid: number for pid, number in found.items() if number}
        return found if sum(found.values()) == count else None

    return wait_until(serving, timeout=30, what=f"{count} x {path} in flight", dump=server.process.describe)


def release(tmp_path: Path) -> None:
    """Let the /wait requests finish: the first byte of the file they watch becomes 1 (written in place: the
    app maps the file, and a truncated mapping would be a SIGBUS)."""
    with open(tmp_path / "release", "r+b") as file:
        file.write(b"\1")


def start(
    process_factory: ProcessFactory, tmp_path: Path, worker_class: str, *args: str, app: str = "stacks_app:app"
) -> Gunicorn:
    (tmp_path / "release").write_bytes(b"\0")
    return start_gunicorn(
        process_factory,
        app=app,
        cwd=APPS,
        worker_class=worker_class,
        workers=2,
        metrics=False,
        args=["--timeout", "120", *args],
        env={"STACKS_APP_RELEASE": str(tmp_path / "release")},
    )


@pytest.mark.parametrize(("worker_class", "threads", "requests"), [("sync", "1", 2), ("gthread", "3", 3)])
def test_stacks_names_the_function_each_request_is_in(
    process_factory: ProcessFactory, tmp_path: Path, worker_class: str, threads: str, requests: int
) -> None:
    """stacks --json groups the identical stacks of requests blocked in one function, each with its request."""
    server = start(process_factory, tmp_path, worker_class, "--threads", threads)
    for _ in range(requests):
        fire(server, "/wait")
    serving = wait_in_flight(server, "/wait", requests)
    try:
        result = run_cli("stacks", "--pid", str(server.pid), "--json")
        text = run_cli("stacks", "--pid", str(server.pid))
    finally:
        release(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["format"] == 1
    assert document["server"]["master_pid"] == server.pid
    assert all(worker["answered"] for worker in document["workers"]), document["workers"]
    assert {worker["pid"] for worker in document["workers"]} >= set(serving)
    waiting = [group for group in document["groups"] if any(r["path"] == "/wait" for r in group["requests"])]
    # Requests at the same line of the same code: one group per worker class's call path.
    assert sum(group["count"] for group in waiting) == requests
    assert len(waiting) == 1, waiting
    (group,) = waiting
    functions = [frame["function"] for frame in group["stack"]]
    assert "app" in functions
    assert functions.index("wait_in_known_function") == functions.index("app") + 1
    innermost = group["stack"][-1]
    assert innermost["file"].endswith("stacks_app.py")
    assert innermost["code"] == "time.sleep(0.05)"
    assert {r["pid"] for r in group["requests"]} == set(serving)
    assert all(r["method"] == "GET" and r["elapsed"] > 0 for r in group["requests"])
    assert all(r["where"].startswith("thread=") for r in group["requests"])
    assert text.returncode == 0, text.stderr
    assert "wait_in_known_function" in text.stdout
    assert f"{requests} request(s) with this stack" in text.stdout
    assert "GET /wait" in text.stdout


@pytest.mark.parametrize(
    ("worker_class", "app", "where", "function"),
    [
        ("gevent", "stacks_app:app", "greenlet=0x", "wait_in_known_function"),
        ("uvicorn_worker.UvicornWorker", "stacks_app:asgi_app", "task=", "wait_in_known_coroutine"),
    ],
)
def test_stacks_of_greenlets_and_tasks(
    process_factory: ProcessFactory, tmp_path: Path, worker_class: str, app: str, where: str, function: str
) -> None:
    """On gevent and uvicorn each request's stack is its greenlet's or its task's, named as such."""
    server = start(process_factory, tmp_path, worker_class, app=app)
    for _ in range(2):
        fire(server, "/wait")
    wait_in_flight(server, "/wait", 2)
    try:
        result = run_cli("stacks", "--pid", str(server.pid), "--json")
    finally:
        release(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    requests = [(r, group) for group in document["groups"] for r in group["requests"] if r["path"] == "/wait"]
    assert len(requests) == 2, document
    for request, group in requests:
        assert request["where"].startswith(where), request
        assert function in [frame["function"] for frame in group["stack"]], group


def test_stacks_of_one_worker_by_its_pid(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """stacks --pid <worker> asks that worker alone."""
    server = start(process_factory, tmp_path, "sync")
    fire(server, "/wait")
    (busy,) = wait_in_flight(server, "/wait", 1)
    try:
        result = run_cli("stacks", "--pid", str(busy), "--json")
    finally:
        release(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert [worker["pid"] for worker in document["workers"]] == [busy]
    assert [group["count"] for group in document["groups"]] == [1]


def test_a_worker_holding_the_gil_is_named_as_not_answering(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """A sync worker stuck in C code holding the GIL cannot answer: named with its request; exit status 1."""
    server = start(process_factory, tmp_path, "sync")
    fire(server, "/regex")
    (stuck,) = wait_in_flight(server, "/regex", 1)
    fire(server, "/wait")
    (waiting,) = wait_in_flight(server, "/wait", 1)
    try:
        result = run_cli("stacks", "--pid", str(server.pid), "--json", "--wait", "2")
        text = run_cli("stacks", "--pid", str(server.pid), "--wait", "2")
    finally:
        release(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    document = json.loads(result.stdout)
    by_pid = {worker["pid"]: worker for worker in document["workers"]}
    assert by_pid[waiting]["answered"] is True
    silent = by_pid[stuck]
    assert silent["answered"] is False
    assert "GIL" in silent["reason"]
    assert [(r["method"], r["path"]) for r in silent["unanswered_requests"]] == [("GET", "/regex")]
    (group,) = document["groups"]
    assert [r["pid"] for r in group["requests"]] == [waiting]
    assert text.returncode == 1
    assert f"worker pid {stuck} slot" in text.stdout
    assert "serving GET /regex" in text.stdout
