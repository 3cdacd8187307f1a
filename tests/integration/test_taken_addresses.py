"""Two servers on one unix socket, and a TCP port already in use: the holder is named, the cut-off server told."""

from __future__ import annotations

import re
from pathlib import Path

from harness import start_gunicorn
from servers import ProcessFactory


def test_a_second_server_on_the_same_unix_socket_names_the_first_and_the_first_is_told(
    process_factory: ProcessFactory, tmp_path: Path
) -> None:
    """The new server warns that the old one (its master's pid) still serves the file; the old one logs that
    its socket file now leads to the new one."""
    path = tmp_path / "app.sock"
    first = start_gunicorn(process_factory, workers=1, args=["-b", f"unix:{path}"], metrics=False)
    second = start_gunicorn(process_factory, workers=1, args=["-b", f"unix:{path}"], metrics=False)
    second.process.wait_for_log(rf"unix:{re.escape(str(path))} is still served by [^\n]*pid {first.pid} \(", timeout=30)
    first.process.wait_for_log(
        rf"the socket file unix:{re.escape(str(path))} was replaced, now served by [^\n]*pid {second.pid} \(",
        timeout=30,
    )


def test_a_tcp_port_in_use_is_named_before_gunicorn_gives_up(process_factory: ProcessFactory) -> None:
    """gunicorn only says "Connection in use"; the warning before it names the process holding the port."""
    first = start_gunicorn(process_factory, workers=1, metrics=False)
    second = start_gunicorn(
        process_factory, workers=1, args=["-b", f"127.0.0.1:{first.port}"], metrics=False, wait=False
    )
    second.process.wait_for_log(
        rf"127\.0\.0\.1:{first.port} collides with 127\.0\.0\.1:{first.port}, held by [^\n]*pid {first.pid} \(",
        timeout=30,
    )
