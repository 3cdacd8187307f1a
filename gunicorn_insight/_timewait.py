"""Connections to a TCP listener that were closed in the last minute and sit in TIME_WAIT (Linux).

The end that closes a TCP connection first keeps it in TIME_WAIT for 60 seconds (``TCP_TIMEWAIT_LEN``, fixed
in Linux). A proxy that opens a new connection for each request (nginx without upstream keep-alive speaks
HTTP/1.0 to gunicorn and closes after the response; sync workers close every connection) leaves one such
socket behind per request: on gunicorn's end when gunicorn closed first (its local address is the
listener's), on the proxy's end when the proxy did (its remote address is the listener's; seen here only
when the proxy shares the network namespace, as a proxy on the same host does). Their number says how many
connections were closed in the last minute; their time left says how many were closed in any shorter window.

One sock_diag netlink dump per listener, of the TIME_WAIT sockets of one family whose local or remote port is
the listener's (an in-kernel bytecode filter, so nothing else crosses into user space). Read by the master
every round (the gauge) and by ``doctor --pid`` (how many were closed during its window).
"""

from __future__ import annotations

import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any

from . import _sockdiag as diag

TIME_WAIT_SECONDS = 60.0
"""How long Linux keeps a connection in TIME_WAIT (TCP_TIMEWAIT_LEN: not a setting)."""

_TCP_TIME_WAIT = 6
_INET_DIAG_REQ_BYTECODE = 1
_BC_JMP, _BC_S_GE, _BC_S_LE, _BC_D_GE, _BC_D_LE = 1, 2, 3, 4, 5
_INET_DIAG_REQ_V2 = struct.Struct("=BBBxI")  # family, protocol, extensions, states
_SOCKID = struct.Struct("!HH16s16s")  # source port, destination port, source, destination (network order)
_SOCKID_TAIL = struct.Struct("=III")  # interface, cookie (none: two all-ones words)
_BC_OP = struct.Struct("=BBH")  # code, jump if true, jump if false (or, after a port test, the port)
# One answer: header, then inet_diag_msg up to the time left (expires); then the rest of the message and the
# attributes the kernel adds (alike for every TIME_WAIT socket), skipped.
_RECORD = struct.Struct("=IHHIIBBBB2s2s16s16s12xI")
_STATE, _SPORT, _DPORT, _SOURCE, _DESTINATION, _EXPIRES = 6, 9, 10, 11, 12, 13
_RECORDS: dict[int, struct.Struct] = {}
_MAX_DATAGRAMS = 100_000
"""A bound on one reading (about 1,400 sockets a datagram); Linux keeps at most tcp_max_tw_buckets."""


@dataclass(frozen=True, slots=True)
class TimeWait:
    """A listener's connections in TIME_WAIT: all of them, and those closed within ``recent_seconds``."""

    count: int
    recent: int
    recent_seconds: float
    closed_by_server: int
    """Of ``count``, those on gunicorn's end (gunicorn closed first); the rest are a local client's."""


def _records(length: int) -> struct.Struct:
    """The layout of a datagram made only of answers of ``length`` bytes each."""
    found = _RECORDS.get(length)
    if found is None:
        found = _RECORDS[length] = struct.Struct(_RECORD.format + f"{length - _RECORD.size}x")
    return found


def _port_filter(port: int) -> bytes:
    """Bytecode: local port == port, or remote port == port. The kernel follows "yes" to the next test and
    "no" by its offset; landing exactly on the end accepts, jumping past it rejects."""
    size = _BC_OP.size
    end = 4 * 2 * size + size  # four port tests of two ops each, and one jump
    return b"".join(
        (
            _BC_OP.pack(_BC_S_GE, 2 * size, 5 * size),  # 0: no -> the remote port tests at 20
            _BC_OP.pack(0, 0, port),
            _BC_OP.pack(_BC_S_LE, 2 * size, 3 * size),  # 8: no -> 20
            _BC_OP.pack(0, 0, port),
            _BC_OP.pack(_BC_JMP, size, end - 4 * size),  # 16: the local port matched: to the end, accepted
            _BC_OP.pack(_BC_D_GE, 2 * size, end - 5 * size + 4),  # 20: no -> past the end, rejected
            _BC_OP.pack(0, 0, port),
            _BC_OP.pack(_BC_D_LE, 2 * size, 2 * size + 4),  # 28: yes -> the end; no -> past it
            _BC_OP.pack(0, 0, port),
        )
    )


def _request(family: int, port: int) -> bytes:
    bytecode = _port_filter(port)
    attribute = diag.RTATTR.pack(diag.RTATTR.size + len(bytecode), _INET_DIAG_REQ_BYTECODE) + bytecode
    body = (
        _INET_DIAG_REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 1 << _TCP_TIME_WAIT)
        + _SOCKID.pack(0, 0, b"", b"")
        + _SOCKID_TAIL.pack(0, 0xFFFFFFFF, 0xFFFFFFFF)
        + attribute
    )
    return diag.request(body, diag.NLM_F_REQUEST | diag.NLM_F_DUMP)


def time_wait(family: int, host: str, port: int, recent_seconds: float = 0.0) -> TimeWait | None:
    """The connections of the listener ``host:port`` in TIME_WAIT on either end, and how many were closed in
    the last ``recent_seconds``; None where the kernel will not say.

    gunicorn's end: the local port is the listener's (and the local address, unless it listens on a wildcard).
    A client's end in this network namespace: the remote port is the listener's and the remote address is the
    listener's own, a loopback address, or one gunicorn's end was seen to use (a proxy on this host)."""
    if not sys.platform.startswith("linux") or family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        listening = socket.inet_pton(family, host.partition("%")[0])
    except (OSError, ValueError):
        return None
    width = len(listening)
    wildcard = not listening.strip(b"\0")
    raw_port = port.to_bytes(2, "big")
    rows: list[tuple[Any, ...]] = []
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, diag.NETLINK_SOCK_DIAG) as netlink:
            netlink.settimeout(1.0)
            netlink.send(_request(family, port))
            for _ in range(_MAX_DATAGRAMS):
                done = _answers(netlink.recv(1 << 17), rows)
                if done is None:
                    return None
                if done:
                    break
            else:
                return None
    except (OSError, struct.error):
        return None
    server_end = [row for row in rows if row[_SPORT] == raw_port and (wildcard or row[_SOURCE][:width] == listening)]
    own = {listening} | {row[_SOURCE][:width] for row in server_end}
    client_end = [
        row
        for row in rows
        if row[_DPORT] == raw_port
        and row[_SPORT] != raw_port
        and ((address := row[_DESTINATION][:width]) in own or _is_loopback(address))
    ]
    young_after_ms = (TIME_WAIT_SECONDS - recent_seconds) * 1000.0
    recent = sum(1 for row in server_end + client_end if row[_EXPIRES] >= young_after_ms) if recent_seconds > 0 else 0
    return TimeWait(len(server_end) + len(client_end), recent, recent_seconds, len(server_end))


_V6_LOOPBACK = bytes(15) + b"\1"
_V4_MAPPED = bytes(10) + b"\xff\xff"


def _is_loopback(address: bytes) -> bool:
    """127.0.0.0/8, ::1, or ::ffff:127.x.y.z, from the packed address."""
    if len(address) == 4:
        return address[0] == 127
    return address == _V6_LOOPBACK or (address[:12] == _V4_MAPPED and address[12] == 127)


def _answers(data: bytes, rows: list[tuple[Any, ...]]) -> bool | None:
    """Add one datagram's TIME_WAIT answers to ``rows``; True once the dump is over, None on an error."""
    if not data:
        return None
    first, kind = diag.NLMSGHDR.unpack_from(data, 0)[:2] if len(data) >= diag.NLMSGHDR.size else (0, 0)
    if kind == diag.SOCK_DIAG_BY_FAMILY and first >= _RECORD.size and first % 4 == 0 and len(data) % first == 0:
        found = list(_records(first).iter_unpack(data))
        if all(row[0] == first and row[1] == diag.SOCK_DIAG_BY_FAMILY for row in found):
            rows.extend(row for row in found if row[_STATE] == _TCP_TIME_WAIT)  # the usual datagram: in bulk
            return False
    offset = 0
    while offset + diag.NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = diag.NLMSGHDR.unpack_from(data, offset)
        if kind == diag.NLMSG_DONE:
            return True
        if kind == diag.NLMSG_ERROR or length < diag.NLMSGHDR.size:
            return None
        if kind == diag.SOCK_DIAG_BY_FAMILY and length >= _RECORD.size and offset + _RECORD.size <= len(data):
            row = _RECORD.unpack_from(data, offset)
            if row[_STATE] == _TCP_TIME_WAIT:
                rows.append(row)
        offset += (length + 3) & ~3
    return False


def ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int] | None:
    """The range the kernel picks a connection's local port from (the proxy's side of each connection)."""
    try:
        with open(path) as handle:
            low, high = (int(part) for part in handle.read().split()[:2])
    except (OSError, ValueError):
        return None
    return (low, high) if high >= low else None
