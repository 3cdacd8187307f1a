"""The TIME_WAIT reading against the real kernel: a listener's closed connections on either end, its own
port and address only, and how many were closed recently. End to end: tests/integration/test_time_wait.py."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gunicorn_insight._timewait import TimeWait, _port_filter, ephemeral_ports, time_wait

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sock_diag is Linux's")


class Listener(socket.socket):
    closed = 0
    """Connections the server has closed so far."""


@pytest.fixture
def listener() -> Iterator[Listener]:
    """A loopback listener that reads one byte (or the client's FIN) from each connection, then closes it."""
    server = Listener()
    server.bind(("127.0.0.1", 0))
    server.listen(128)

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            connection.settimeout(10)
            connection.recv(1)
            connection.close()
            server.closed += 1

    threading.Thread(target=serve, daemon=True).start()
    yield server
    server.close()


def connect_and_close(listener: Listener, times: int, *, client_first: bool = False) -> None:
    """``times`` connections, each closed by the server first, or by the client; returns once the server has
    closed its end of every one (a client's end enters TIME_WAIT only then)."""
    port = listener.getsockname()[1]
    expected = listener.closed + times
    for _ in range(times):
        client = socket.socket()
        # A port of its own, by bind: connect() alone may hand the client a port whose TIME_WAIT it then
        # takes over (net.ipv4.tcp_tw_reuse=2 on loopback), and the count would depend on the kernel's choice.
        client.bind(("127.0.0.1", 0))
        client.settimeout(10)
        client.connect(("127.0.0.1", port))
        if not client_first:
            client.sendall(b"x")
            client.recv(1)  # the server's FIN: the server closed first
        client.close()  # first, without a byte sent: the server reads our FIN, then closes
    deadline = time.monotonic() + 30
    while listener.closed < expected:
        assert time.monotonic() < deadline, f"the server closed {listener.closed} of {expected} connections"
        time.sleep(0.01)


def wildcard_and_specific(port: int) -> tuple[TimeWait, TimeWait]:
    """The wildcard address's reading and 127.0.0.1's, taken while the table held still around them: an older
    socket's TIME_WAIT on this port number (an earlier listener's, or a client's that had it) can end between
    two readings, and other tests' connections come and go meanwhile."""
    for _ in range(5):
        before = time_wait(socket.AF_INET, "127.0.0.1", port)
        anywhere = time_wait(socket.AF_INET, "0.0.0.0", port)
        after = time_wait(socket.AF_INET, "127.0.0.1", port)
        assert before is not None
        assert anywhere is not None
        assert after is not None
        if before.count == after.count:
            return anywhere, after
    pytest.fail("the TIME_WAIT table changed during each of five rounds of readings")


def test_closed_connections_are_counted_on_either_end(listener: Listener) -> None:
    """Connections the server closed first are counted on its end, then connections the client closed first
    (a proxy on this host) on the client's; all recent; a wildcard address counts the same. Not exact counts:
    the kernel ends a TIME_WAIT early when a new connection reuses its addresses and ports (a SYN to a server's
    TIME_WAIT, net.ipv4.tcp_tw_reuse on loopback), so the reading is a floor of the connections closed."""
    port = listener.getsockname()[1]
    connect_and_close(listener, 50)
    server_only = time_wait(socket.AF_INET, "127.0.0.1", port, recent_seconds=30)
    assert server_only is not None
    assert 0 < server_only.closed_by_server <= 50
    connect_and_close(listener, 50, client_first=True)
    found = time_wait(socket.AF_INET, "127.0.0.1", port, recent_seconds=30)
    assert found is not None
    clients_ends = (found.count - found.closed_by_server) - (server_only.count - server_only.closed_by_server)
    assert 0 < clients_ends <= 50
    assert found.count - 5 <= found.recent <= found.count  # a few may be older: an earlier listener's port
    anywhere, specific = wildcard_and_specific(port)
    assert anywhere.count == specific.count
    assert anywhere.recent == 0  # not asked


def test_another_port_or_address_counts_nothing(listener: Listener) -> None:
    """The kernel's filter keeps other ports out: our 20 closed connections change nothing on another port (an
    earlier socket's TIME_WAIT may sit there); a listener on another local address counts none as its own."""
    port = listener.getsockname()[1]
    other = socket.socket()
    other.bind(("127.0.0.1", 0))  # a port nobody connects to now
    try:
        before = time_wait(socket.AF_INET, "127.0.0.1", other.getsockname()[1])
        connect_and_close(listener, 20)
        after = time_wait(socket.AF_INET, "127.0.0.1", other.getsockname()[1])
    finally:
        other.close()
    ours = time_wait(socket.AF_INET, "127.0.0.1", port)
    assert before is not None
    assert after is not None
    assert ours is not None
    assert ours.closed_by_server > 0
    assert after.count == before.count
    elsewhere = time_wait(socket.AF_INET, "127.0.0.2", port)
    assert elsewhere is not None
    assert elsewhere.closed_by_server == 0


def test_the_bytecode_jumps_land_on_ops_or_past_the_end() -> None:
    """Every "no" jump of the port filter lands on an op the "yes" chain reaches, or past the end (reject):
    what the kernel's audit demands, or it refuses the dump."""
    code = _port_filter(8000)
    ops = {}
    offset = 0
    while offset < len(code):
        kind, yes, no = code[offset], code[offset + 1], int.from_bytes(code[offset + 2 : offset + 4], "little")
        ops[offset] = (kind, yes, no)
        offset += yes
    assert offset == len(code)
    for at, (kind, _yes, no) in ops.items():
        target = at + no
        assert target in ops or target >= len(code), (at, kind, no)


def test_the_ephemeral_port_range_is_read(tmp_path: Path) -> None:
    """ip_local_port_range as the kernel writes it; an unreadable file is None."""
    path = tmp_path / "range"
    path.write_text("32768\t60999\n")
    assert ephemeral_ports(str(path)) == (32768, 60999)
    assert ephemeral_ports(str(tmp_path / "missing")) is None
