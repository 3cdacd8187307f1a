"""An error that stops the server at startup reaches gunicorn's configured error log, not only stderr."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from harness import EXAMPLES, clean_environment, gunicorn_argv
from servers import ProcessFactory, free_port


@pytest.mark.oldest
def test_metrics_port_in_use_is_written_to_the_error_logfile(process_factory: ProcessFactory, tmp_path: Path) -> None:
    """With --error-logfile, the /metrics port being taken is in that file as well as on stderr; exit 1."""
    error_log = tmp_path / "error.log"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        argv = gunicorn_argv(
            "-c",
            "python:gunicorn_insight.conf",
            "-b",
            f"127.0.0.1:{free_port()}",
            "--chdir",
            str(EXAMPLES),
            "--error-logfile",
            str(error_log),
            "app:app",
        )
        env = clean_environment({"GUNICORN_INSIGHT_METRICS_BIND": f"127.0.0.1:{port}"})
        process = process_factory(argv, env=env, cwd=EXAMPLES, name="gunicorn")
        assert process.wait(timeout=60) == 1
    message = f"metrics_bind=127.0.0.1:{port} cannot be bound (Address already in use)"
    assert message in process.output()
    logged = error_log.read_text()
    assert f"[ERROR] Error: {message}" in logged, logged
    assert "Booting worker" not in logged


def test_error_is_printed_once_when_the_error_log_is_stderr(process_factory: ProcessFactory) -> None:
    """Without --error-logfile the error log is stderr: the message is not printed twice."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        argv = gunicorn_argv(
            "-c", "python:gunicorn_insight.conf", "-b", f"127.0.0.1:{free_port()}", "--chdir", str(EXAMPLES), "app:app"
        )
        env = clean_environment({"GUNICORN_INSIGHT_METRICS_BIND": f"127.0.0.1:{port}"})
        process = process_factory(argv, env=env, cwd=EXAMPLES, name="gunicorn")
        assert process.wait(timeout=60) == 1
    assert process.output().count(f"metrics_bind=127.0.0.1:{port} cannot be bound") == 1
