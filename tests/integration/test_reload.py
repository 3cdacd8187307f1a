"""HUP (reload) and TTIN/TTOU (scaling) keep the scoreboard consistent and the counts exact."""

from __future__ import annotations

import signal

from harness import start_gunicorn
from servers import ProcessFactory, wait_until


def test_reload_replaces_workers_without_losing_counts(process_factory: ProcessFactory) -> None:
    """After HUP the new workers take free slots, old slots are released, and every request is counted."""
    server = start_gunicorn(process_factory, workers=2)
    for _ in range(5):
        server.get("/")
    old = set(server.worker_pids())
    server.process.send_signal(signal.SIGHUP)
    wait_until(
        lambda: not old & set(server.worker_pids()) and len(server.worker_pids()) == 2,
        timeout=30,
        what="the old workers to be replaced",
        dump=server.process.describe,
    )
    server.wait_for_workers(2)
    for _ in range(5):
        server.get("/")
    assert server.total("gunicorn_requests_total") == 10
    server.wait_for_value("gunicorn_workers", 2)
    board = server.board()
    try:
        live = {view.pid for view in board if view.pid}
        assert live == set(server.worker_pids())
        assert max(view.index for view in board if view.generation) <= 3  # at most 2 x workers slots used
    finally:
        board.close()


def test_scaling_up_and_down_follows_the_worker_count(process_factory: ProcessFactory) -> None:
    """TTIN adds a worker with its own slot, TTOU removes one; gunicorn_workers and the number gunicorn keeps
    (gunicorn_workers_desired) follow."""
    server = start_gunicorn(process_factory, workers=2)
    server.wait_for_value("gunicorn_workers_desired", 2)
    server.process.send_signal(signal.SIGTTIN)
    server.wait_for_workers(3)
    server.wait_for_value("gunicorn_workers", 3)
    server.wait_for_value("gunicorn_workers_desired", 3)
    server.process.send_signal(signal.SIGTTOU)
    server.wait_for_value("gunicorn_workers", 2)
    server.wait_for_value("gunicorn_workers_desired", 2)
    assert server.ready_workers() == 2
