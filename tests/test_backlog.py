"""Listen-queue depth from the kernel: TCP_INFO for TCP, sock_diag for unix sockets; drops per TCP listener
(SO_MEMINFO) and the namespace's overflows (netstat)."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from gunicorn_insight._master import backlog as backlog_module
from gunicorn_insight._master.backlog import ListenerDrops, backlog, listen_drops, listen_overflows


def test_tcp_accept_queue_depth_and_limit() -> None:
    """Connections not yet accepted are counted against the listen() backlog."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(7)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        assert backlog(listener) == (3, 7)
        for client in clients:
            client.close()


def test_unix_accept_queue_depth_and_limit(tmp_path: Path) -> None:
    """A unix listener's queue is read through sock_diag (UNIX_DIAG_RQLEN)."""
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(9)
        clients = []
        for _ in range(4):
            client = socket.socket(socket.AF_UNIX)
            client.connect(path)
            clients.append(client)
        assert backlog(listener) == (4, 9)
        for client in clients:
            client.close()


def test_unsupported_socket_family_is_absent_not_an_error() -> None:
    """A socket the kernel cannot describe yields None, never an exception."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert backlog(udp) is None


def test_listen_overflows_from_netstat(tmp_path: Path) -> None:
    """ListenOverflows is read from the TcpExt table; a missing file gives None."""
    netstat = tmp_path / "netstat"
    netstat.write_text(
        "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 17 18\nIpExt: InNoRoutes\nIpExt: 0\n"
    )
    assert listen_overflows(str(netstat)) == 17
    assert listen_overflows(str(tmp_path / "missing")) is None


def test_a_full_tcp_accept_queue_drops_at_its_own_listener() -> None:
    """Connection attempts past a full accept queue are dropped and counted at that listener, not at another."""
    with socket.socket() as full, socket.socket() as other:
        for listener in (full, other):
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
        if listen_drops(full) is None:
            pytest.skip("this kernel has no SO_MEMINFO (Linux 4.12 and later)")
        assert listen_drops(full) == 0
        clients = []
        try:
            for _ in range(6):  # the queue holds backlog + 1: the rest of the SYNs are dropped
                client = socket.socket()
                client.setblocking(False)
                clients.append(client)
                client.connect_ex(full.getsockname())
            deadline = time.monotonic() + 5
            while not listen_drops(full) and time.monotonic() < deadline:
                time.sleep(0.01)  # the SYNs go through loopback's softirq, usually before connect returns
            dropped = listen_drops(full)
            assert dropped is not None
            assert dropped >= 3, dropped
            assert listen_drops(other) == 0
        finally:
            for client in clients:
                client.close()


def test_drops_are_absent_for_a_unix_listener() -> None:
    """A unix socket refuses at once when its queue is full (nothing is dropped): no count, not 0."""
    with socket.socket(socket.AF_UNIX) as listener:
        assert listen_drops(listener) is None


def test_a_listeners_drops_rise_from_its_first_round_and_restart_with_a_new_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A listener's drops are the rise of its socket's own count: the first round sets the start (an inherited
    socket's earlier drops are not reported), and a new socket under the same name starts again."""
    counts = iter([40, 43, 43, 50, 53])  # the new socket counts from more than the old one did
    monkeypatch.setattr(backlog_module, "listen_drops", lambda sock: next(counts))
    drops = ListenerDrops()
    with socket.socket() as first, socket.socket() as second:
        seen = [drops.rise("http://x", sock) for sock in (first, first, first, second, second)]
    assert seen == [0, 3, 0, 0, 3]


def test_a_listener_without_a_drop_count_has_none_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the kernel gives no count there is none (absent, not 0), and it is said once what stands in."""
    monkeypatch.setattr(backlog_module, "listen_drops", lambda sock: None)
    drops = ListenerDrops()
    with caplog.at_level(logging.INFO), socket.socket() as sock:
        assert drops.rise("http://x", sock) is None
        assert drops.rise("http://x", sock) is None
    (line,) = [record.getMessage() for record in caplog.records if "no drop count" in record.getMessage()]
    assert "listener http://x" in line
    assert "gunicorn_listen_overflows_total" in line
