"""Listen-queue depth from the kernel: TCP_INFO for TCP, sock_diag for unix sockets, netstat overflows."""

from __future__ import annotations

import socket
from pathlib import Path

from gunicorn_insight._master.backlog import backlog, listen_overflows


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
