"""Everyday deployments that must not break the server or destroy data: a shared multiprocess directory,
a user's files in it, privilege drop with --user, --daemon."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from harness import APPS, start_gunicorn
from servers import ProcessFactory


def test_a_second_server_keeps_the_first_ones_files_and_the_users_app_db(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """Two servers sharing one prometheus_dir: the second's startup removes neither the first's live files
    nor a user's app.db; the first keeps exporting every count."""
    shared = tmp_path / "multiproc"
    shared.mkdir()
    with sqlite3.connect(shared / "app.db") as database:
        database.execute("create table orders (id integer)")
    env = {"GUNICORN_INSIGHT_PROMETHEUS_DIR": str(shared)}
    first = start_gunicorn(process_factory, app="metrics_app:app", cwd=APPS, env=env)
    for _ in range(5):
        assert first.get("/") == 200
    first.wait_for_value("app_hits_total", 5)
    first.wait_for_value("gunicorn_requests_total", 5)

    second = start_gunicorn(process_factory, app="metrics_app:app", cwd=APPS, env=env)
    assert second.get("/") == 200

    assert first.get("/") == 200
    # Both servers' files are in the directory both /metrics processes read: the totals are the sums.
    first.wait_for_value("app_hits_total", 7)
    first.wait_for_value("gunicorn_requests_total", 7)
    with sqlite3.connect(shared / "app.db") as database:
        assert database.execute("select count(*) from orders").fetchone() == (0,)
