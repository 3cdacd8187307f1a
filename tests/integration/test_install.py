"""install(globals()) in a user's own gunicorn.conf.py: their hooks keep running, ours count requests."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from harness import Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until

CONFIG = """
import os

MARKS = {marks!r}

def _mark(text):
    with open(MARKS, "a") as handle:
        handle.write(text + "\\n")

def pre_request(worker, req):
    _mark("pre " + req.path)

def post_request(worker, req, environ):
    _mark("post " + req.path)

def post_fork(server, worker):
    _mark("post_fork")

import gunicorn_insight
gunicorn_insight.install(globals())
"""


@pytest.mark.oldest
def test_user_hooks_are_chained_and_gunicorn_validates_them(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """gunicorn accepts the chained hooks; the user's pre/post_request and post_fork still run, in order."""
    marks = tmp_path / "marks.txt"
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(CONFIG.format(marks=str(marks)))
    server = start_gunicorn(process_factory, config=str(config), workers=1)
    for path in ("/a", "/b"):
        assert server.get(path) == 404
    assert server.total("gunicorn_requests_total", status="404") == 2
    assert marks.read_text().splitlines() == ["post_fork", "pre /a", "post /a", "pre /b", "post /b"]


LATE_CONFIG = """
import sys

import gunicorn_insight
gunicorn_insight.install(globals())

MARKS = {marks!r}

def _mark(text):
    with open(MARKS, "a") as handle:
        handle.write(text + "\\n")

{late}
"""

LATE_POST_REQUEST = """
def post_request(worker, req, environ, resp):
    _mark("post " + req.path)
"""

# A second source: hooks kept in a module of their own, imported after install() (the config's own file
# is the only one gunicorn reads; -c, GUNICORN_CMD_ARGS="--config" and the default file exclude each other).
HOOKS_MODULE = """
MARKS = {marks!r}

def _mark(text):
    with open(MARKS, "a") as handle:
        handle.write(text + "\\n")

def pre_request(worker, req):
    _mark("pre " + req.path)

def post_request(worker, req, environ, resp):
    _mark("post " + req.path)
"""

IMPORTED_HOOKS = """
sys.path.insert(0, {directory!r})
from team_hooks import pre_request, post_request
"""

LATE_ON_STARTING = """
def on_starting(server):
    _mark("on_starting")
"""


def serve_and_check(server: Gunicorn, marks: Path, requests: int = 20) -> None:
    for n in range(requests):
        assert server.get(f"/r{n}") == 404
    server.wait_for_value("gunicorn_requests_total", requests, status="404")
    assert server.total("gunicorn_requests_in_flight") == 0
    board = server.board()
    try:
        assert [view.requests for view in board if view.requests] == []
        assert sum(view.served for view in board) == requests
    finally:
        board.close()


@pytest.mark.parametrize("compiled", ["1", "0"])
def test_post_request_defined_after_install_is_chained(
    process_factory: ProcessFactory, tmp_path: Path, compiled: str
) -> None:
    """A post_request defined below install() is chained, not a replacement: counts exact, nothing stuck."""
    marks = tmp_path / "marks.txt"
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(LATE_CONFIG.format(marks=str(marks), late=LATE_POST_REQUEST))
    server = start_gunicorn(
        process_factory, config=str(config), workers=1, env={"GUNICORN_INSIGHT_COMPILED_HOOKS": compiled}
    )
    serve_and_check(server, marks)
    assert marks.read_text().splitlines() == [f"post /r{n}" for n in range(20)]
    server.process.wait_for_log(r"post_request defined after install\(\); chained", timeout=10)


@pytest.mark.parametrize("compiled", ["1", "0"])
def test_request_hooks_imported_from_another_module_after_install(
    process_factory: ProcessFactory, tmp_path: Path, compiled: str
) -> None:
    """Both request hooks replaced by a module imported after install(): both chained, the user's run too."""
    marks = tmp_path / "marks.txt"
    (tmp_path / "team_hooks.py").write_text(HOOKS_MODULE.format(marks=str(marks)))
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(LATE_CONFIG.format(marks=str(marks), late=IMPORTED_HOOKS.format(directory=str(tmp_path))))
    server = start_gunicorn(
        process_factory, config=str(config), workers=2, env={"GUNICORN_INSIGHT_COMPILED_HOOKS": compiled}
    )
    serve_and_check(server, marks)
    lines = marks.read_text().splitlines()
    assert sorted(lines) == sorted([f"pre /r{n}" for n in range(20)] + [f"post /r{n}" for n in range(20)])
    server.process.wait_for_log(r"pre_request, post_request defined after install\(\); chained", timeout=10)


def test_on_starting_defined_after_install_still_starts_the_plugin(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """A later on_starting runs, and the plugin still starts (before the first fork) and counts."""
    marks = tmp_path / "marks.txt"
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(LATE_CONFIG.format(marks=str(marks), late=LATE_ON_STARTING + LATE_POST_REQUEST))
    server = start_gunicorn(process_factory, config=str(config), workers=1)
    serve_and_check(server, marks, requests=3)
    assert marks.read_text().splitlines() == ["on_starting", "post /r0", "post /r1", "post /r2"]


def test_on_starting_and_pre_fork_both_replaced_refuses_to_start(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """With no master-side hook of ours left the server refuses to boot, naming the hooks and the fix."""
    marks = tmp_path / "marks.txt"
    config = tmp_path / "gunicorn.conf.py"
    late = LATE_ON_STARTING + "\ndef pre_fork(server, worker):\n    pass\n"
    config.write_text(LATE_CONFIG.format(marks=str(marks), late=late))
    server = start_gunicorn(process_factory, config=str(config), workers=1, wait=False)
    assert server.process.wait(timeout=60) != 0
    assert "on_starting and pre_fork were replaced after gunicorn_insight.install(globals())" in server.process.output()


def test_hook_defined_after_install_is_chained_again_after_hup(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """A HUP re-reads the config (the late hook replaces ours again): on_reload chains it for the new workers."""
    marks = tmp_path / "marks.txt"
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(LATE_CONFIG.format(marks=str(marks), late=LATE_POST_REQUEST))
    server = start_gunicorn(process_factory, config=str(config), workers=1)
    old = set(server.worker_pids())
    server.process.send_signal(signal.SIGHUP)
    server.process.wait_for_log(r"post_request defined after install\(\) in the reloaded config; chained", timeout=30)
    wait_until(
        lambda: not old & set(server.worker_pids()) and len(server.worker_pids()) == 1,
        timeout=30,
        what="the old worker to be replaced",
        dump=server.process.describe,
    )
    server.wait_for_workers(1)
    serve_and_check(server, marks, requests=5)
    assert marks.read_text().splitlines() == [f"post /r{n}" for n in range(5)]


SETTINGS_CONFIG = """
import os
import gunicorn_insight

gunicorn_insight.install(globals(), gunicorn_insight.Settings(
    metrics_bind=os.environ["INSIGHT_TEST_METRICS_BIND"], exclude_paths=("/skipped",),
))
"""


def test_install_takes_a_settings_object_as_given(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """install(globals(), Settings(...)) serves with that object's settings; the environment's are named, unused."""
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(SETTINGS_CONFIG)
    server = start_gunicorn(
        process_factory,
        config=str(config),
        workers=1,
        env={
            "GUNICORN_INSIGHT_EXCLUDE_PATHS": "/counted",  # not read: the Settings object is used as it is
        },
        interval=None,  # no GUNICORN_INSIGHT_INTERVAL: the warning below names every variable set
    )
    for path in ("/counted", "/skipped", "/counted"):
        server.get(path)
    server.wait_for_value("gunicorn_requests_total", 2)
    assert server.total("gunicorn_requests_total") == 2
    assert "GUNICORN_INSIGHT_EXCLUDE_PATHS, GUNICORN_INSIGHT_METRICS_BIND are not read" in server.process.output()
