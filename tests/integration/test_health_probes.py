"""/healthz and /readyz on the /metrics address: answered by the /metrics process, never by a worker."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from pathlib import Path

from harness import APPS, Gunicorn, start_gunicorn
from servers import ProcessFactory, wait_until

PROBE_BOUND = 2.0
"""Generous on purpose: the machine is shared; what matters is not queueing behind a 60 s request."""


def probe(server: Gunicorn, path: str, timeout: float = 10) -> tuple[int, str, float]:
    """(status, body, seconds) of one probe on a fresh connection to the /metrics address."""
    assert server.metrics_port is not None
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", server.metrics_port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read().decode()
        return response.status, body, time.monotonic() - started
    finally:
        connection.close()


def probe_status(server: Gunicorn, path: str) -> tuple[int, str] | None:
    """The probe's status and body, None while the /metrics port does not answer yet."""
    try:
        status, body, _ = probe(server, path)
    except OSError:
        return None
    return status, body


def wait_for_probe(server: Gunicorn, path: str, status: int, timeout: float = 60) -> str:
    """Poll the probe until it answers ``status``; returns the body."""

    def answered() -> str | None:
        got = probe_status(server, path)
        return got[1] if got is not None and got[0] == status else None

    return wait_until(answered, timeout=timeout, what=f"{path} answering {status}", dump=server.process.describe)


def test_probes_answer_while_every_sync_worker_is_busy(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """Every sync worker blocked in a request: /healthz and /readyz still answer 200 from the /metrics process."""
    release = tmp_path / "release"
    server = start_gunicorn(
        process_factory, app="gated_app:app", cwd=APPS, workers=2, env={"GATED_APP_RELEASE": str(release)}
    )
    clients = [
        threading.Thread(target=server.get, args=("/block",), kwargs={"timeout": 150}, daemon=True) for _ in range(4)
    ]
    try:
        for client in clients:
            client.start()
        wait_until(
            lambda: server.busy_workers() == 2, timeout=30, what="both workers busy", dump=server.process.describe
        )
        latencies = []
        for _ in range(5):
            for path in ("/healthz", "/readyz"):
                status, body, seconds = probe(server, path)
                assert status == 200, (path, body)
                latencies.append(seconds)
        assert "2 workers serving (2 busy)" in probe(server, "/readyz")[1]
        assert server.busy_workers() == 2, "a worker was freed during the probes: they did not run saturated"
        print(
            f"probe latency with every worker busy: max {max(latencies) * 1000:.1f} ms, "
            f"median {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms over {len(latencies)} probes"
        )
        assert max(latencies) < PROBE_BOUND, latencies
    finally:
        release.touch()
        for client in clients:
            client.join(timeout=60)


def test_readyz_is_503_until_a_worker_has_loaded_the_app(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """While the app's import blocks, /readyz says 503 with the reason and /healthz 200; once loaded, 200."""
    gate = tmp_path / "gate"
    server = start_gunicorn(
        process_factory, app="gated_app:app", cwd=APPS, workers=2, wait=False, env={"GATED_APP_IMPORT_GATE": str(gate)}
    )
    try:
        wait_for_probe(server, "/healthz", 200)
        wait_until(
            lambda: (probe_status(server, "/readyz") or (0, ""))[1].startswith("not ready: 2 workers"),
            timeout=60,
            what="both workers booting",
            dump=server.process.describe,
        )
        status, body = probe_status(server, "/readyz") or (0, "")
        assert (status, "still loading the application" in body) == (503, True), body
    finally:
        gate.touch()
    wait_until(
        lambda: probe_status(server, "/readyz") == (200, "ready: 2 workers serving (0 busy)\n"),
        timeout=60,
        what="/readyz 200 once the app is loaded",
        dump=server.process.describe,
    )


def test_stuck_master_fails_healthz_and_dead_workers_fail_readyz(process_factory: ProcessFactory) -> None:
    """Master stopped (SIGSTOP): healthz and /metrics turn 503 when rounds stop; workers killed meanwhile are
    unreaped zombies, which readyz does not count."""
    server = start_gunicorn(process_factory, workers=2)
    wait_until(
        lambda: "last round" in (probe_status(server, "/healthz") or (0, ""))[1],
        timeout=30,
        what="a first exporter round",
        dump=server.process.describe,
    )
    workers = server.worker_pids()
    assert len(workers) == 2
    server.process.send_signal(signal.SIGSTOP)
    try:
        # Live workers keep serving without the master: still ready.
        assert server.get("/") == 200
        status, body = probe_status(server, "/readyz") or (0, "")
        assert (status, body.startswith("ready: 2 workers serving")) == (200, True), body
        body = wait_for_probe(server, "/healthz", 503, timeout=30)
        assert "last exporter round was" in body, body
        # The files hold the last round's numbers: a scrape is refused with the same reason, not served stale.
        status, body = probe_status(server, "/metrics") or (0, "")
        assert (status, "last exporter round was" in body) == (503, True), body
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        body = wait_for_probe(server, "/readyz", 503, timeout=30)
        assert body == "not ready: no live worker\n", body
    finally:
        server.process.send_signal(signal.SIGCONT)
    wait_for_probe(server, "/healthz", 200)  # rounds again after SIGCONT
    wait_for_probe(server, "/readyz", 200)  # gunicorn reaped and replaced the workers
    assert "gunicorn_workers " in wait_for_probe(server, "/metrics", 200)
