"""install(globals()) in a user's own gunicorn.conf.py: their hooks keep running, ours count requests."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import start_gunicorn
from servers import ProcessFactory

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
    server = start_gunicorn(process_factory, config=str(config), workers=1, env={
        "GUNICORN_INSIGHT_EXCLUDE_PATHS": "/counted",  # not read: the Settings object is used as it is
    })
    for path in ("/counted", "/skipped", "/counted"):
        server.get(path)
    server.wait_for_value("gunicorn_requests_total", 2)
    assert server.total("gunicorn_requests_total") == 2
    assert "GUNICORN_INSIGHT_EXCLUDE_PATHS, GUNICORN_INSIGHT_METRICS_BIND are not read" in server.process.output()
