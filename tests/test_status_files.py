"""server.json and status.json: replaced atomically, never written through a link someone planted."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

from gunicorn_insight._runfiles import write_json


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    """The file is replaced whole, readable by every user's CLI, and nothing else stays in the directory."""
    target = tmp_path / "status.json"
    write_json(str(target), {"a": 1})
    write_json(str(target), {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["status.json"]


def test_write_json_never_follows_a_symlink_at_a_predictable_name(tmp_path: Path) -> None:
    """With --user the run directory belongs to the workers' user: links planted there (at the old temporary
    name, status.json.<pid>.tmp) must not make the root master truncate another file."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for pid in range(os.getpid() - 5, os.getpid() + 5):
        (run_dir / f"status.json.{pid}.tmp").symlink_to(victim)
    write_json(str(run_dir / "status.json"), {"a": 1})
    assert victim.read_text() == "precious"
    assert json.loads((run_dir / "status.json").read_text()) == {"a": 1}


def test_a_link_at_the_temporary_name_is_removed_not_followed(tmp_path: Path) -> None:
    """A link planted at this thread's own temporary name is replaced by a file of the master's own; what it
    pointed to is untouched, and no temporary stays."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / f".status.json.{os.getpid()}.{threading.get_ident()}.tmp").symlink_to(victim)
    write_json(str(run_dir / "status.json"), {"a": 1})
    assert victim.read_text() == "precious"
    assert json.loads((run_dir / "status.json").read_text()) == {"a": 1}
    assert os.listdir(run_dir) == ["status.json"]


def test_two_threads_writing_at_once_each_replace_it_whole(tmp_path: Path) -> None:
    """Writers in two threads (the exporter's rounds, the main thread's stop) never share a temporary: every
    read sees one writer's whole file."""
    target = tmp_path / "status.json"
    errors: list[BaseException] = []

    def write(value: int) -> None:
        try:
            for _ in range(300):
                write_json(str(target), {"writer": value, "pad": "x" * 4096})
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(value,)) for value in (1, 2)]
    for thread in threads:
        thread.start()
    for _ in range(300):
        if target.exists():
            assert json.loads(target.read_text())["writer"] in (1, 2)
    for thread in threads:
        thread.join()
    assert errors == []
    assert os.listdir(tmp_path) == ["status.json"]
