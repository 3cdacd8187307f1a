"""Finding running servers from their run directories, and choosing one by pid, pidfile, name or Prometheus dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fakes import server_info

from gunicorn_insight import _discovery
from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._discovery import DiscoveryError, Selector
from gunicorn_insight._runfiles import SERVER_FORMAT, encode


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def make_run_dir(root: Path, suffix: str, *, worker_pids: tuple[int, ...] = (), **info: Any) -> Path:
    """A run directory as a master leaves it: server.json and a scoreboard (with these worker pids)."""
    run_dir = root / f"gunicorn-insight-{suffix}"
    run_dir.mkdir()
    board = sb.Scoreboard.create(str(run_dir / "scoreboard"), 4, 1, 8, master_pid=1)
    for slot, pid in enumerate(worker_pids):
        board.assign(slot, now=time.monotonic())
        sb.PID.pack_into(board.buffer, board.offset(slot) + sb.OFF_PID, pid)
    board.close()
    description = encode(server_info(str(run_dir / "scoreboard"), **info))
    (run_dir / "server.json").write_text(json.dumps(description))
    return run_dir


def test_live_server_is_found_and_dead_one_is_stale(tmp_path: Path) -> None:
    """A run dir whose master is alive is a server; one whose master exited (SIGKILL leftovers) is not."""
    live = make_run_dir(tmp_path, "live")
    dead = make_run_dir(tmp_path, "dead", master_pid=dead_pid())
    found = _discovery.scan([str(tmp_path)])
    assert [server.run_dir for server in found.servers] == [str(live)]
    assert found.stale == [str(dead)]


def test_recycled_pid_does_not_make_a_leftover_live(tmp_path: Path) -> None:
    """A live pid that started long after server.json was written belongs to another process: stale."""
    make_run_dir(tmp_path, "old", started=time.time() - 10 * 365 * 86400)
    found = _discovery.scan([str(tmp_path)])
    assert (found.servers, len(found.stale)) == ([], 1)


def test_directories_without_server_json_or_with_garbage_are_ignored(tmp_path: Path) -> None:
    """A master that has not run on_starting yet, or a damaged file, is skipped without an error."""
    (tmp_path / "gunicorn-insight-empty").mkdir()
    (tmp_path / "gunicorn-insight-bad").mkdir()
    (tmp_path / "gunicorn-insight-bad" / "server.json").write_text("{not json")
    (tmp_path / "gunicorn-insight-file").write_text("")
    found = _discovery.scan([str(tmp_path)])
    assert (found.servers, found.stale, found.unreadable) == ([], [], [])


def test_only_server_is_chosen_without_selector(tmp_path: Path) -> None:
    """With exactly one live server and no selector, that server is used."""
    make_run_dir(tmp_path, "one", proc_name="shop")
    assert _discovery.select(Selector(), [str(tmp_path)]).proc_name == "shop"


def test_several_servers_without_selector_is_ambiguous(tmp_path: Path) -> None:
    """Several live servers and no selector: exit status 2 and a list naming each pid, name and binds."""
    make_run_dir(tmp_path, "a", proc_name="shop")
    make_run_dir(tmp_path, "b", proc_name="blog", master_pid=os.getppid(), binds=["unix:/run/blog.sock"])
    with pytest.raises(DiscoveryError) as caught:
        _discovery.select(Selector(), [str(tmp_path)])
    assert caught.value.code == 2
    message = str(caught.value)
    assert "--pid" in message
    assert f"pid {os.getpid()} name 'shop' binds 127.0.0.1:8000" in message
    assert f"pid {os.getppid()} name 'blog' binds unix:/run/blog.sock" in message


@pytest.fixture
def two_servers(tmp_path: Path) -> Path:
    """shop (master: this process) and blog (master: our parent, with worker 424242 in its scoreboard)."""
    make_run_dir(tmp_path, "a", proc_name="shop", prometheus_dir=str(tmp_path / "prom-shop"))
    make_run_dir(
        tmp_path,
        "b",
        proc_name="blog",
        master_pid=os.getppid(),
        worker_pids=(0, 424242),
        prometheus_dir=str(tmp_path / "prom-blog"),
    )
    return tmp_path


def test_select_by_master_pid(two_servers: Path) -> None:
    """--pid with the master's pid picks that server."""
    assert _discovery.select(Selector(pid=os.getppid()), [str(two_servers)]).proc_name == "blog"


def test_select_by_worker_pid(two_servers: Path) -> None:
    """--pid with a worker's pid picks the server whose scoreboard has that worker."""
    assert _discovery.select(Selector(pid=424242), [str(two_servers)]).proc_name == "blog"


def test_select_by_name(two_servers: Path) -> None:
    """--name matches gunicorn's proc_name."""
    assert _discovery.select(Selector(name="shop"), [str(two_servers)]).master_pid == os.getpid()


def test_select_by_pidfile(two_servers: Path) -> None:
    """--pidfile reads the master's pid from gunicorn's pidfile."""
    pidfile = two_servers / "blog.pid"
    pidfile.write_text(f"{os.getppid()}\n")
    assert _discovery.select(Selector(pidfile=str(pidfile)), [str(two_servers)]).proc_name == "blog"


def test_missing_pidfile_says_what_to_check(two_servers: Path) -> None:
    """A pidfile that does not exist is an error naming the file and the alternative."""
    with pytest.raises(DiscoveryError, match=r"pidfile .*nope.pid does not exist.*--pid"):
        _discovery.select(Selector(pidfile=str(two_servers / "nope.pid")), [str(two_servers)])


def test_select_by_prometheus_dir_through_a_symlink(two_servers: Path) -> None:
    """--prometheus-dir matches the server's directory, whatever path (symlink) the operator uses for it."""
    (two_servers / "prom-blog").mkdir()
    (two_servers / "alias").symlink_to(two_servers / "prom-blog")
    chosen = _discovery.select(Selector(prometheus_dir=str(two_servers / "alias")), [str(two_servers)])
    assert chosen.proc_name == "blog"


def test_selector_matching_nothing_lists_the_running_servers(two_servers: Path) -> None:
    """A name no server has: exit 1, and the servers that do run are listed."""
    with pytest.raises(DiscoveryError) as caught:
        _discovery.select(Selector(name="nope"), [str(two_servers)])
    assert caught.value.code == 1
    assert "matches name 'nope'" in str(caught.value)
    assert "name 'shop'" in str(caught.value)


def test_dead_pid_selector_says_so(two_servers: Path) -> None:
    """--pid of a process that does not exist says exactly that."""
    pid = dead_pid()
    with pytest.raises(DiscoveryError, match=f"no process {pid} is running"):
        _discovery.select(Selector(pid=pid), [str(two_servers)])


def test_nothing_running_suggests_the_plugin(tmp_path: Path) -> None:
    """No live server: exit 1 with a hint about starting gunicorn with the plugin."""
    with pytest.raises(DiscoveryError) as caught:
        _discovery.select(Selector(), [str(tmp_path)])
    assert caught.value.code == 1
    assert "no running gunicorn with gunicorn-insight found; is it started with the plugin?" in str(caught.value)


def test_unreadable_run_dir_suggests_running_as_its_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's run dir (mkdtemp makes it 0700) is reported with its owner, not silently skipped."""
    make_run_dir(tmp_path, "theirs")

    def denied(path: str) -> Any:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(_discovery, "read_record", lambda kind, path: denied(path))
    with pytest.raises(DiscoveryError) as caught:
        _discovery.select(Selector(), [str(tmp_path)])
    owner = _discovery.user_name(os.getuid())
    assert f"permission denied reading 1 run directory owned by {owner}" in str(caught.value)
    assert f"sudo -u {owner}" in str(caught.value)


def test_search_roots_are_dev_shm_and_the_temp_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Discovery looks where _hooks puts run dirs: /dev/shm, and the temporary directory as fallback."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert _discovery.search_roots() == [os.path.realpath("/dev/shm"), os.path.realpath(tmp_path)]


@pytest.mark.parametrize(("written", "says"), [(SERVER_FORMAT + 1, "a newer"), (SERVER_FORMAT - 1, "an older")])
def test_a_live_server_of_another_format_is_named_not_hidden(tmp_path: Path, written: int, says: str) -> None:
    """A live master whose server.json is another format: select() says which side is newer and what to do."""
    run_dir = make_run_dir(tmp_path, "other")
    path = run_dir / "server.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format": written, "version": "9.9"}))
    found = _discovery.scan([str(tmp_path)])
    assert (found.servers, found.stale) == ([], [])
    ((where, why),) = found.incompatible
    assert where == str(run_dir)
    assert why.startswith(f"{path} is format {written}")
    with pytest.raises(DiscoveryError) as caught:
        _discovery.select(Selector(), [str(tmp_path)])
    message = str(caught.value)
    assert f"{path} is format {written}, written by {says} gunicorn-insight (9.9)" in message
    assert f"reads format {SERVER_FORMAT}" in message


def test_a_server_json_missing_a_field_is_refused_naming_it(tmp_path: Path) -> None:
    """A server.json of the right format with a field missing is not guessed at: the field is named."""
    run_dir = make_run_dir(tmp_path, "short")
    path = run_dir / "server.json"
    raw = json.loads(path.read_text())
    del raw["scoreboard"]
    path.write_text(json.dumps(raw))
    ((_, why),) = _discovery.scan([str(tmp_path)]).incompatible
    assert why == f"{path} has no field 'scoreboard'"
