"""What an exiting gthread worker drops: its idle keep-alive connections, and requests already sent on them.

gunicorn's gthread worker keeps idle keep-alive connections in a deque (``_keep`` on gunicorn 23,
``keepalived_conns`` from 24). How a stopping worker treats them depends on the version:

- 23: the run loop ends as soon as the worker stops (``max_requests``, TERM): the deque is left as it is, and
  the process exit closes those sockets. A request a proxy sent on one after the loop stopped polling is never
  read: the kernel resets the connection and the proxy answers 502.
- 24 to 26: the worker keeps polling its connections until they are gone or ``graceful_timeout`` runs out, and
  answers a request that arrives meanwhile; only when ``graceful_timeout`` ends first are the rest left to the exit.
- 27: the same for at most 2 s, after which the worker closes them itself, before ``worker_exit``: nothing is
  left here to see (a request arriving in the instant of that close is lost unseen).

So this is read in ``worker_exit``, once, when nothing will read those sockets again. It only looks: a peek
(``MSG_PEEK``) never takes a byte off a socket.
"""

from __future__ import annotations

import fcntl
import socket
import ssl
import struct
import sys
import termios
from collections import deque
from dataclasses import dataclass
from typing import Any

from .. import _scoreboard as sb

_DEQUES = ("keepalived_conns", "_keep")  # gunicorn >= 24, gunicorn 23
_PEEK = 8  # "OPTIONS " and "CONNECT " are the longest method tokens with their space
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_LAST_DATA_RECV = 52  # struct tcp_info: tcpi_last_data_recv, u32 milliseconds since data last arrived
_TCP_INFO_BYTES = _LAST_DATA_RECV + 4
_FIONREAD = struct.Struct("i")
_MOST = 0xFFFF  # the scoreboard's counts are 16-bit; a worker holds at most worker_connections anyway


@dataclass(frozen=True, slots=True)
class Unanswered:
    """A request that had arrived on an idle keep-alive connection of an exiting worker."""

    method: str
    """From the request's first bytes, one of sb.METHODS ("other" when unknown or encrypted)."""
    waited: float
    """Seconds since its bytes arrived (TCP's own clock), 0.0 where the kernel does not say (a unix socket)."""


@dataclass(frozen=True, slots=True)
class Dropped:
    idle: int
    """Idle keep-alive connections still open: the exit closes them."""
    unanswered: tuple[Unanswered, ...]


def dropped(worker: Any) -> Dropped | None:
    """The idle keep-alive connections an exiting worker still holds, and the requests waiting on them; None
    for a worker class that keeps no such connections where this can see them (all but gthread)."""
    connections = _idle_connections(worker)
    if connections is None:
        return None
    waiting = [request for request in map(_waiting_request, connections[:_MOST]) if request is not None]
    return Dropped(min(len(connections), _MOST), tuple(waiting))


def _idle_connections(worker: Any) -> list[Any] | None:
    for name in _DEQUES:
        found = getattr(worker, name, None)
        if isinstance(found, deque):
            for _ in range(3):
                try:
                    return list(found)
                except RuntimeError:  # changed while copied: a pool thread still finishing a request
                    continue
            return None
    return None


def _waiting_request(connection: Any) -> Unanswered | None:
    sock = getattr(connection, "sock", None)
    if not isinstance(sock, socket.socket):
        return None
    try:
        if sock.fileno() < 0:
            return None
        start = _buffered(connection) or _peek(sock)
    except OSError:  # reset by the peer, or closed under us: nothing to answer
        return None
    if not start:
        return None
    return Unanswered(_method(start), _waited(sock))


def _buffered(connection: Any) -> bytes:
    """Bytes gunicorn's parser already read past the last request (a pipelined request), still unparsed."""
    buffer = getattr(getattr(getattr(connection, "parser", None), "unreader", None), "buf", None)
    value = getattr(buffer, "getvalue", None)
    if value is None:
        return b""
    data = value()
    return data[:_PEEK] if isinstance(data, bytes) else b""


def _peek(sock: socket.socket) -> bytes:
    if isinstance(sock, ssl.SSLSocket):
        # Encrypted: how many bytes wait says a request came, not which method (a TLS record is never a method).
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(_FIONREAD.size))
        return b"\0" if _FIONREAD.unpack(raw)[0] > 0 else b""
    try:
        return sock.recv(_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return b""  # nothing has arrived; b"" from recv itself means the peer closed: no request either


def _method(start: bytes) -> str:
    token = start.split(b" ", 1)[0].decode("ascii", "replace")
    return token if token in sb.METHOD_INDEX else "other"


def _waited(sock: socket.socket) -> float:
    if _TCP_INFO is None:
        return 0.0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_BYTES)
    except OSError:  # not TCP
        return 0.0
    if len(info) < _TCP_INFO_BYTES:
        return 0.0
    return int.from_bytes(info[_LAST_DATA_RECV:_TCP_INFO_BYTES], sys.byteorder) / 1000.0
