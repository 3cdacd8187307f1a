"""gunicorn-insight stacks with a worker played by this process: the question, the watchdog's answer, grouping."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes import FakeRequest, start
from test_cli import FakeServer, ThreadWorker, fake_server

from gunicorn_insight import _discovery
from gunicorn_insight._runfiles import STACKS_FILE, STACKS_FORMAT, read_stacks_answer
from gunicorn_insight._worker.watchdog import Monitor
from gunicorn_insight.cli import commands
from gunicorn_insight.cli import stacks as _stacks


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    """A fake live server whose slot 0 is this process, serving a request on this thread."""
    fake = fake_server(tmp_path, master_pid=os.getpid())
    start(fake.recorder, FakeRequest("POST", "/checkout", query="card=4111"))
    monkeypatch.setattr(_discovery, "search_roots", lambda: [str(tmp_path)])
    yield fake
    fake.board.close()


def ticking(monitor: Monitor, done: threading.Event) -> threading.Thread:
    """The watchdog's loop, faster than its real one, until `done`."""

    def run() -> None:
        while not done.wait(0.02):
            monitor.tick()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_watchdog_answers_with_the_requests_stack(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    """stacks bumps the slot's counter; the watchdog's answer holds the request and the stack of its thread."""
    monitor = Monitor(server.recorder, ThreadWorker(), 0, stacks_dir=str(server.run_dir))
    done = threading.Event()
    thread = ticking(monitor, done)
    try:
        assert commands.main(["stacks", "--json", "--wait", "10"]) == 0
    finally:
        done.set()
        thread.join()
    document = json.loads(capsys.readouterr().out)
    assert server.board.stacks_asked(0) == 1
    (worker,) = document["workers"]
    assert (worker["slot"], worker["pid"], worker["answered"]) == (0, os.getpid(), True)
    (group,) = document["groups"]
    (request,) = group["requests"]
    assert (request["method"], request["path"]) == ("POST", "/checkout?<redacted>")
    assert request["where"] == f"thread={threading.get_ident()}"
    functions = [frame["function"] for frame in group["stack"]]
    # This thread was inside the command, waiting for the answer, when the watchdog looked.
    assert functions.index("run_stacks") < functions.index("collect")
    assert group["stack"][-1]["file"].endswith("stacks.py")


def test_no_answer_is_named_with_the_scoreboards_requests(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a watchdog running the worker is named as silent, with its request; exit status 1."""
    assert commands.main(["stacks", "--wait", "0.2"]) == 1
    out = capsys.readouterr().out
    assert f"worker pid {os.getpid()} slot 0: no answer in 0.2s" in out
    assert "holds the GIL" in out
    assert "serving POST /checkout?<redacted>" in out


def test_only_an_answer_to_this_question_from_this_pid_counts(server: FakeServer) -> None:
    """An answer to an earlier question, or from the slot's previous worker, is not taken for the answer."""
    path = server.run_dir / STACKS_FILE.format(slot=0)

    def answer(number: int = 5, **fields: object) -> dict[str, object] | None:
        path.write_text(json.dumps({"format": STACKS_FORMAT, "asked": 5, "pid": os.getpid(), "requests": [], **fields}))
        return read_stacks_answer(str(server.run_dir), 0, os.getpid(), number)

    assert answer() is not None
    assert answer(asked=6) is not None  # a later question answered covers this one
    assert answer(asked=4) is None
    assert answer(pid=os.getpid() + 1) is None
    assert answer(format=STACKS_FORMAT + 1) is None
    assert answer(0xFFFFFFFF, asked=0) is not None  # the counter wrapped past 2**32 - 1


def test_a_new_worker_does_not_answer_its_predecessors_question(server: FakeServer) -> None:
    """The watchdog starts from the slot's counter: a question asked before it existed gets no answer from it."""
    server.board.ask_stacks(0)
    monitor = Monitor(server.recorder, ThreadWorker(), 0, stacks_dir=str(server.run_dir))
    monitor.tick()
    assert not (server.run_dir / STACKS_FILE.format(slot=0)).exists()
    asked = server.board.ask_stacks(0)
    monitor.tick()
    answer = json.loads((server.run_dir / STACKS_FILE.format(slot=0)).read_text())
    assert (answer["asked"], answer["pid"], answer["slot"]) == (asked, os.getpid(), 0)


def test_identical_stacks_are_grouped_largest_first(server: FakeServer) -> None:
    """Requests with the same frames make one group; groups are ordered by size, requests by elapsed time."""

    def request(path: str, started: float, lines: tuple[int, ...]) -> dict[str, object]:
        stack = [{"file": "app.py", "line": line, "function": f"f{line}", "code": None} for line in lines]
        return {"method": "GET", "path": path, "started": started, "where": "thread=1", "stack": stack, "note": None}

    answers = [
        {"requests": [request("/a", 10.0, (1, 2)), request("/b", 5.0, (1, 3))]},
        {"requests": [request("/c", 8.0, (1, 2))]},
    ]
    collected = _stacks.Collected(
        asked=[_stacks.Asked(slot, 100 + slot, 1, (), answer=answer, gone=False) for slot, answer in enumerate(answers)]
    )
    document = _stacks.document(server.server(), collected, now=20.0)
    assert [group["count"] for group in document["groups"]] == [2, 1]
    first = document["groups"][0]
    assert [(r["path"], r["pid"], r["elapsed"]) for r in first["requests"]] == [("/c", 101, 12.0), ("/a", 100, 10.0)]
    assert [frame["line"] for frame in first["stack"]] == [1, 2]
    assert [worker["slot"] for worker in document["workers"]] == [0, 1]
