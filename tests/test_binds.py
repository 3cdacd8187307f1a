"""Who holds an address gunicorn is about to bind, and whether a unix socket file still leads here."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gunicorn_insight._master import backlog
from gunicorn_insight._master.binds import SocketFiles, listening_tcp, listening_unix, taken_binds


@pytest.fixture
def unix_listener(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "app.sock")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)
        sock.listen()
        yield path


@pytest.fixture
def tcp_listener() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock.getsockname()[1]


def test_a_listening_unix_socket_is_found_with_its_holder(unix_listener: str, tmp_path: Path) -> None:
    """/proc/net/unix lists the listener; the warning names this very process as the holder (it holds it)."""
    assert listening_unix(unix_listener)
    assert not listening_unix(str(tmp_path / "other.sock"))
    (line,) = taken_binds([unix_listener], reuse_port=False)
    assert line.startswith(f"unix:{unix_listener} is still served by pid {os.getpid()} (")
    assert "No such file or directory" in line


def test_a_tcp_port_in_use_collides_by_address(tcp_listener: int) -> None:
    """127.0.0.1:port collides with the same address and with the wildcard, not with another address; with
    reuse_port nothing is said (SO_REUSEPORT binds share the port on purpose)."""
    assert set(listening_tcp("127.0.0.1", tcp_listener).values()) == {f"127.0.0.1:{tcp_listener}"}
    assert listening_tcp("0.0.0.0", tcp_listener)
    assert listening_tcp("localhost", tcp_listener)  # a name: every listener on the port
    assert not listening_tcp("127.0.0.2", tcp_listener)
    (line,) = taken_binds([("127.0.0.1", tcp_listener)], reuse_port=False)
    assert f"collides with 127.0.0.1:{tcp_listener}" in line
    assert taken_binds([("127.0.0.1", tcp_listener)], reuse_port=True) == []


def test_holders_are_named_from_their_descriptors(tcp_listener: int) -> None:
    """A child process holding the socket is named with its pid and command line."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child keeps the inherited listener until told to go
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    try:
        (line,) = taken_binds([("127.0.0.1", tcp_listener)], reuse_port=False)
        assert f"pid {pid} (" in line
    finally:
        os.close(write)
        os.waitpid(pid, 0)


def test_a_replaced_or_removed_socket_file_is_told_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The socket's own file (sock_diag's inode) is fine; a new file at the path is 'replaced', a missing one
    'removed', each said once."""
    path = str(tmp_path / "app.sock")
    files = SocketFiles()
    with socket.socket(socket.AF_UNIX) as ours, caplog.at_level(logging.ERROR, logger="gunicorn.error"):
        ours.bind(path)
        ours.listen()
        queue, bound = backlog.unix_listener(ours)
        assert queue is not None  # the one query answers both
        assert bound == os.stat(path).st_ino
        files.check(path, bound)
        assert caplog.records == []
        os.remove(path)
        with socket.socket(socket.AF_UNIX) as theirs:
            theirs.bind(path)
            theirs.listen()
            files.check(path, bound)
            files.check(path, bound)
        os.remove(path)
        files.check(path, bound)
        files.check(path, bound)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert f"the socket file unix:{path} was replaced, now served by pid {os.getpid()} (" in messages[0]
    assert f"the socket file unix:{path} was removed" in messages[1]
