"""gunicorn's USR2 binary upgrade: the new master takes over /metrics when the old one leaves."""

from __future__ import annotations

import os
import re
import signal

from harness import Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until


def test_usr2_successor_takes_over_the_metrics_port(process_factory: ProcessFactory) -> None:
    """The successor starts while the old master holds the port, then serves /metrics once it quits."""
    server = start_gunicorn(process_factory, workers=1, script=True)
    for _ in range(3):
        server.get("/")
    assert server.total("gunicorn_requests_total") == 3
    server.process.send_signal(signal.SIGUSR2)
    handover = server.process.wait_for_log(r"still served by the previous master \(USR2 upgrade\)", timeout=30)
    starts = re.findall(r"\[(\d+)\] \[INFO\] Starting gunicorn", server.process.output())
    successor = int(starts[-1])
    assert successor != server.pid
    os.kill(server.pid, signal.SIGTERM)  # the operator retires the old master
    server.process.wait(timeout=30)
    wait_until(
        lambda: _serves(server), timeout=30, what="the successor to serve /metrics", dump=server.process.describe
    )
    assert handover
    for _ in range(2):
        server.get("/")
    # The old master handed its counts over when it exited (see test_deployments for the counters' test).
    wait_until(
        lambda: server.total("gunicorn_requests_total") == 3 + 2,
        timeout=30,
        what="the successor to count on from the old master's requests",
        dump=server.process.describe,
    )
    os.kill(successor, signal.SIGTERM)


def _serves(server: Gunicorn) -> bool:
    try:
        server.metrics_text()
    except OSError:
        return False
    return True
