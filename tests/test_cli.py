"""status and top against a fake server: a real scoreboard, a recorder writing a request, JSON files beside it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeRequest, server_info, start, status_record
from rich.console import Console

from gunicorn_insight import _discovery
from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._runfiles import STATUS_FORMAT, WorkerExit, encode
from gunicorn_insight._worker.recorder import RequestRecorder
from gunicorn_insight.cli import commands, views


class FakeWorker:
    pass


class ThreadWorker:
    nr_conns = 3


@dataclass
class FakeServer:
    root: Path
    run_dir: Path
    board: sb.Scoreboard
    recorder: RequestRecorder

    def write_status(self, **fields: Any) -> None:
        """status.json as the master writes it, with `fields` (JSON values) laid over it."""
        status = {**encode(status_record()), **fields}
        (self.run_dir / "status.json").write_text(json.dumps(status))

    def server(self) -> _discovery.Server:
        (server,) = _discovery.scan([str(self.root)]).servers
        return server


def fake_server(
    root: Path, *, master_pid: int, worker_class: str = "gthread", threads: int = 4, connections: int = 100
) -> FakeServer:
    run_dir = root / "gunicorn-insight-test"
    run_dir.mkdir()
    board = sb.Scoreboard.create(str(run_dir / "scoreboard"), 4, 4, 8, master_pid=master_pid)
    # Slot 0: a booted gthread-like worker (this process) serving one request; slot 1: still booting.
    board.assign(0, now=time.monotonic() - 90)
    recorder = RequestRecorder(board, 0, ThreadWorker())  # default options: the query is redacted
    recorder.booted()
    sb.RSS.pack_into(board.buffer, board.offset(0) + sb.OFF_RSS, 50 * 1048576)
    board.assign(1, now=time.monotonic())
    info = server_info(
        str(run_dir / "scoreboard"),
        master_pid=master_pid,
        proc_name="shop",
        worker_class=worker_class,
        threads=threads,
        worker_connections=connections,
        connections_limit=connections,
        per_worker_capacity=threads,
        metrics_url="http://127.0.0.1:9180/metrics",
    )
    (run_dir / "server.json").write_text(json.dumps(encode(info)))
    return FakeServer(root, run_dir, board, recorder)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    """A fake live server (master pid: this process) that the CLI's discovery finds."""
    fake = fake_server(tmp_path, master_pid=os.getpid())
    start(fake.recorder, FakeRequest("POST", "/checkout", query="card=4111"))
    monkeypatch.setattr(_discovery, "search_roots", lambda: [str(tmp_path)])
    yield fake
    fake.board.close()


def snapshot_of(fake: FakeServer) -> views.StatusDocument:
    reader = sb.Scoreboard.attach(str(fake.run_dir / "scoreboard"))
    try:
        return views.snapshot(views.take_reading(fake.server(), reader))
    finally:
        reader.close()


def rendered(snap: views.StatusDocument, width: int = 160) -> str:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - closed with console
    console.print(views.render(snap))
    text = console.export_text()
    console.file.close()
    return text


# -- the snapshot ---------------------------------------------------------------------------------------------


def test_busy_worker_shows_its_request_and_elapsed_time(server: FakeServer) -> None:
    """A request in flight makes its worker busy, named by method and redacted path, with elapsed = now - started."""
    time.sleep(0.05)
    snap = snapshot_of(server)
    busy, booting = snap["workers"]
    assert (busy["slot"], busy["pid"], busy["state"]) == (0, os.getpid(), "busy")
    (request,) = busy["requests"]
    assert (request["method"], request["path"], request["client"]) == ("POST", "/checkout?<redacted>", "10.1.2.3:4567")
    assert 0.05 <= request["elapsed"] < 5
    assert (busy["connections"], busy["connections_limit"], busy["rss_bytes"]) == (0, 100, 50 * 1048576)
    assert busy["age"] is not None
    assert 89 < busy["age"] < 95
    assert (booting["state"], booting["pid"], booting["requests"]) == ("booting", None, [])


def test_capacity_is_derived_from_the_worker_class_without_status(server: FakeServer) -> None:
    """Without busy/capacity in status.json: gthread capacity = workers x threads, busy = requests in flight."""
    totals = snapshot_of(server)["totals"]
    assert (
        totals["workers"],
        totals["booting"],
        totals["busy"],
        totals["capacity"],
        totals["in_flight"],
        totals["busy_workers"],
    ) == (2, 1, 1, 8, 1, 1)


def test_capacity_and_listeners_come_from_status_json_when_written(server: FakeServer) -> None:
    """The master's capacity and listeners are used and rendered, a listener's drops beside its queue (none from an
    older master); busy stays the scoreboard's live count."""
    server.write_status(
        busy=3,
        capacity=16,
        listeners=[
            {"name": "127.0.0.1:8000", "backlog": 7, "backlog_max": 2048, "drops": 12},
            {"name": "127.0.0.1:8001", "backlog": 0, "backlog_max": 2048},
        ],
    )
    snap = snapshot_of(server)
    assert (snap["totals"]["busy"], snap["totals"]["capacity"]) == (1, 16)
    assert snap["listeners"] == [
        {"name": "127.0.0.1:8000", "backlog": 7, "backlog_max": 2048, "drops": 12},
        {"name": "127.0.0.1:8001", "backlog": 0, "backlog_max": 2048, "drops": None},
    ]
    assert "backlog 127.0.0.1:8000 7/2048 dropped 12   backlog 127.0.0.1:8001 0/2048" in rendered(snap, width=400)
    assert snap["warnings"] == []


def test_unreadable_status_leaves_listeners_unknown_not_empty(server: FakeServer) -> None:
    """A status.json of another format gives listeners=null (unknown, not 'no backlog') and says why."""
    server.write_status(format=STATUS_FORMAT + 1)
    snap = snapshot_of(server)
    assert snap["listeners"] is None
    assert "backlog" not in rendered(snap)
    (warning,) = snap["warnings"]
    assert f"status.json is format {STATUS_FORMAT + 1}, written by a newer gunicorn-insight;" in warning
    assert "upgrade it" in warning


def test_a_mistyped_status_field_is_named(server: FakeServer) -> None:
    """A field of the wrong type is a warning naming the field and the value, never a guess or a crash."""
    server.write_status(capacity="16")
    (warning,) = snapshot_of(server)["warnings"]
    assert warning.endswith("status.json: capacity is '16', not int")


def test_recent_exits_are_listed_newest_first(server: FakeServer) -> None:
    """recent_exits from status.json appear newest first, with cause and the request that died."""
    older = {
        "time": time.time() - 60,
        "pid": 11,
        "slot": 1,
        "cause": "max_requests",
        "detail": "recycled",
        "request": None,
        "elapsed": None,
        "uptime": 600.0,
        "served": 1000,
        "rss": 0,
    }
    newer = {
        "time": time.time() - 5,
        "pid": 12,
        "slot": 0,
        "cause": "timeout_kill",
        "detail": "WORKER TIMEOUT",
        "request": "GET /report",
        "elapsed": 31.5,
        "uptime": 40.0,
        "served": 3,
        "rss": 0,
    }
    server.write_status(recent_exits=[older, newer])
    snap = snapshot_of(server)
    assert [item["pid"] for item in snap["recent_exits"]] == [12, 11]
    text = rendered(snap)
    assert "timeout_kill" in text
    assert "GET /report" in text
    assert "31.5s" in text


def test_stale_or_missing_status_json_is_a_warning(server: FakeServer) -> None:
    """No status.json, or one not rewritten for a while, is said in the warnings, not hidden."""
    assert "not written yet" in snapshot_of(server)["warnings"][0]
    server.write_status(time=time.time() - 30)
    (warning,) = snapshot_of(server)["warnings"]
    assert "last written 30s ago" in warning


def test_status_age_is_judged_against_the_round_interval(server: FakeServer) -> None:
    """With a 20 s exporter interval (server.json), a 30 s old status.json is normal, 70 s is stale."""
    info = json.loads((server.run_dir / "server.json").read_text())
    (server.run_dir / "server.json").write_text(json.dumps({**info, "interval": 20}))
    server.write_status(time=time.time() - 30)
    assert snapshot_of(server)["warnings"] == []
    server.write_status(time=time.time() - 70)
    assert len(snapshot_of(server)["warnings"]) == 1


def test_totals_say_when_workers_differ_from_what_gunicorn_keeps_and_the_master_loop_is_stuck(
    server: FakeServer,
) -> None:
    """From status.json: "(gunicorn keeps N)" when the live workers differ from it, and the master loop's stuck
    time from 5 s on; neither when all is well."""
    server.write_status(workers_desired=3, master_loop_stuck=12.0)
    text = rendered(snapshot_of(server))
    assert "(gunicorn keeps 3)" in text
    assert "master loop stuck 12.0s" in text
    live = snapshot_of(server)["totals"]["workers"]
    server.write_status(workers_desired=live, master_loop_stuck=0.5)
    text = rendered(snapshot_of(server))
    assert "gunicorn keeps" not in text
    assert "master loop stuck" not in text


def test_human_rendering_has_every_column(server: FakeServer) -> None:
    """The table shows slot, pid, state, request, elapsed, served, conns/limit, RSS MiB and age."""
    text = rendered(snapshot_of(server))
    assert "shop  master" in text
    assert "busy 1/8" in text
    for header in ("slot", "pid", "state", "request", "elapsed", "served", "conns", "RSS MiB", "age"):
        assert header in text
    row = next(line for line in text.splitlines() if "/checkout" in line)
    assert "busy" in row
    assert "0/100" in row
    assert "50.0" in row
    assert "1m3" in row  # age 1m30s-ish


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.04, "0.0s"), (12.34, "12.3s"), (65, "1m05s"), (3725, "1h02m"), (3 * 86400 + 7200, "3d02h")],
)
def test_durations_are_short_and_readable(seconds: float | None, text: str) -> None:
    """Durations keep two units at most, so table columns stay narrow."""
    assert views.duration(seconds) == text


# -- the command ------------------------------------------------------------------------------------------------


def test_recent_exits_in_status_json_are_the_master_s_records_field_for_field() -> None:
    """status --json's recent_exits items (ExitFacts) have exactly the fields of the master's WorkerExit."""
    assert list(views.ExitFacts.__annotations__) == [field.name for field in dataclasses.fields(WorkerExit)]


def test_status_json_has_the_documented_keys(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    """status --json prints one object with the top-level and per-worker keys docs/cli.md documents."""
    assert commands.main(["status", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert list(document) == [
        "format",
        "time",
        "server",
        "totals",
        "listeners",
        "workers",
        "recent_exits",
        "status_age",
        "warnings",
    ]
    assert list(document["workers"][0]) == [
        "slot",
        "pid",
        "state",
        "requests",
        "in_flight",
        "untracked_in_flight",
        "waiting",
        "served",
        "connections",
        "connections_limit",
        "rss_bytes",
        "age",
        "booted_after",
        "slow_requests",
        "marks",
    ]
    assert list(document["totals"]) == [
        "workers",
        "booting",
        "busy",
        "capacity",
        "busy_workers",
        "in_flight",
        "waiting",
        "connections",
        "served",
        "desired",
        "master_loop_stuck",
    ]
    assert document["workers"][0]["requests"][0]["path"] == "/checkout?<redacted>"
    assert document["server"]["run_dir"] == str(server.run_dir)


def test_status_selects_by_worker_pid(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    """status --pid accepts a worker's pid (here this process, which the fake scoreboard has in slot 0)."""
    assert commands.main(["status", "--pid", str(os.getpid())]) == 0
    assert "/checkout?<redacted>" in capsys.readouterr().out


def test_status_without_server_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No server: exit 1 and the plugin hint on stderr."""
    monkeypatch.setattr(_discovery, "search_roots", lambda: [str(tmp_path)])
    assert commands.main(["status"]) == 1
    assert "is it started with the plugin?" in capsys.readouterr().err


def test_permission_denied_on_the_scoreboard_says_who_to_run_as(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A scoreboard this user may not read: exit 1, naming the file and suggesting the owner or root."""

    def denied(path: str, *, writable: bool = False) -> sb.Scoreboard:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(sb.Scoreboard, "attach", denied)
    assert commands.main(["status"]) == 1
    error = capsys.readouterr().err
    assert "permission denied reading the scoreboard" in error
    assert "run as the server's user" in error
    assert "or as root" in error


def test_top_renders_the_requested_number_of_frames(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    """top --iterations N without a terminal prints N frames one after the other, then exits 0."""
    assert commands.main(["top", "--iterations", "2", "--interval", "0.05"]) == 0
    out = capsys.readouterr().out
    assert out.count("gunicorn-insight top") == 2
    assert out.count("/checkout?<redacted>") == 2


def test_top_exits_0_on_ctrl_c(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C is how top ends: exit status 0, no traceback."""

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("gunicorn_insight.cli.commands.time.sleep", interrupted)
    assert commands.main(["top"]) == 0


def test_top_exits_1_when_the_server_goes_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """When the master exits while top watches, top says so and exits 1."""
    master = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fake = fake_server(tmp_path, master_pid=master.pid)
    monkeypatch.setattr(_discovery, "search_roots", lambda: [str(tmp_path)])

    def stop() -> None:
        master.kill()
        master.wait()  # reaped: a zombie would still answer kill(pid, 0)

    timer = threading.Timer(0.3, stop)
    timer.start()
    try:
        assert commands.main(["top", "--interval", "0.05"]) == 1
    finally:
        timer.cancel()
        stop()
        fake.board.close()
    assert f"gunicorn (master pid {master.pid}, shop) has exited" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--interval", "0"], "must be a positive number of seconds"), (["--iterations", "0"], "must be at least 1")],
)
def test_top_refuses_nonsense_options(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--interval 0 or --iterations 0 is a usage error (exit 2) that says what to give instead."""
    assert commands.main(["top", *argv]) == 2
    assert message in capsys.readouterr().err


def test_selectors_are_mutually_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    """--pid and --name together are refused by the parser (exit 2)."""
    with pytest.raises(SystemExit) as caught:
        commands.main(["status", "--pid", "1", "--name", "x"])
    assert caught.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_version_names_the_package_and_what_it_runs_with() -> None:
    """`gunicorn-insight --version` (the installed console script) prints one line with the versions and exits 0."""
    from importlib import metadata

    from gunicorn_insight import __version__

    script = Path(sys.executable).parent / "gunicorn-insight"
    result = subprocess.run(
        [str(script), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "40"},
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith(f"gunicorn-insight {__version__} (gunicorn {metadata.version('gunicorn')}, ")
    assert f"prometheus_client {metadata.version('prometheus_client')}" in line
