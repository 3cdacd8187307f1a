"""Listen-queue depth of each listening socket, read by the master (Linux).

TCP: ``getsockopt(TCP_INFO)`` on a listening socket reports the accept queue in ``tcpi_unacked`` and its
limit in ``tcpi_sacked``. Unix sockets: the kernel's sock_diag netlink interface answers, for one socket
inode, ``UNIX_DIAG_RQLEN`` = (queued connections, limit), and ``UNIX_DIAG_VFS``, the inode of the file the
socket is bound to. Elsewhere the values are simply absent.
TIME_WAIT per TCP listener: see _timewait.
Drops: ``getsockopt(SO_MEMINFO)`` on a TCP listener gives the socket's own ``sk_drops``, the packets the
kernel dropped at it: a SYN, or the ACK that completes a handshake, arriving while its accept queue was full
(what ``TcpExt: ListenDrops`` counts for the whole namespace), or one dropped for memory. Linux 4.12 and later.
Overflows are the namespace's count, every listener's on the host, ``TcpExt: ListenOverflows`` in
/proc/net/netstat.
"""

from __future__ import annotations

import os
import socket
import struct
import sys

from .. import _kernelfiles as kernelfiles
from .. import _sockdiag as diag
from .._report import LOG
from .._timewait import time_wait

_TCP_INFO = struct.Struct("8B24I")
_UNACKED, _SACKED = 8 + 4, 8 + 5  # field positions after the eight one-byte fields

_SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)  # Linux's number: Python's socket module has no name for it
_MEMINFO_DROPS = 8  # SK_MEMINFO_DROPS, in the array of u32 SO_MEMINFO fills
_MEMINFO = struct.Struct(f"={_MEMINFO_DROPS + 1}I")
_TCP_LISTEN = 10
_UDIAG_SHOW_VFS = 0x02
_UDIAG_SHOW_RQLEN = 0x10
_UNIX_DIAG_VFS = 1
_UNIX_DIAG_RQLEN = 4
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, inode, show, cookie[2]
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")  # family, type, state, pad, inode, cookie[2]
_NO_COOKIE = 0xFFFFFFFF


def tcp_backlog(sock: socket.socket) -> tuple[int, int] | None:
    if not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = _TCP_INFO.unpack(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size))
    except (OSError, struct.error):
        return None
    return info[_UNACKED], info[_SACKED]


def unix_listener(sock: socket.socket) -> tuple[tuple[int, int] | None, int | None]:
    """From one sock_diag query: the accept queue (queued connections, limit), and the inode of the file the
    listening unix socket is bound to (what ``stat(path)`` shows while the file is its own). Each is None
    where the kernel does not say (an abstract socket has no file, no sock_diag gives nothing)."""
    found = _unix_diag(sock, _UDIAG_SHOW_RQLEN | _UDIAG_SHOW_VFS)
    queue, vfs = found.get(_UNIX_DIAG_RQLEN), found.get(_UNIX_DIAG_VFS)
    return (
        None if queue is None or len(queue) < 8 else struct.unpack_from("=II", queue),
        None if vfs is None or len(vfs) < 4 else int(struct.unpack_from("=I", vfs)[0]),
    )


def unix_backlog(sock: socket.socket) -> tuple[int, int] | None:
    return unix_listener(sock)[0]


def _unix_diag(sock: socket.socket, show: int) -> dict[int, bytes]:
    """The attributes sock_diag gives about one listening unix socket: attribute type -> payload."""
    if not sys.platform.startswith("linux"):
        return {}
    try:
        inode = os.fstat(sock.fileno()).st_ino
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, diag.NETLINK_SOCK_DIAG) as netlink:
            netlink.settimeout(1.0)
            netlink.send(
                diag.request(
                    _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, inode, show, _NO_COOKIE, _NO_COOKIE)
                )
            )
            return _parse_unix_diag(netlink.recv(65536))
    except (OSError, struct.error):
        return {}


def _parse_unix_diag(data: bytes) -> dict[int, bytes]:
    length, kind, _flags, _seq, _pid = diag.NLMSGHDR.unpack_from(data, 0)
    if kind == diag.NLMSG_ERROR:
        return {}
    found = {}
    offset = diag.NLMSGHDR.size + _UNIX_DIAG_MSG.size
    end = min(length, len(data))
    while offset + diag.RTATTR.size <= end:
        size, attribute = diag.RTATTR.unpack_from(data, offset)
        if size < diag.RTATTR.size:
            break
        found[attribute] = data[offset + diag.RTATTR.size : offset + size]
        offset += (size + 3) & ~3
    return found


def backlog(sock: socket.socket) -> tuple[int, int] | None:
    """(connections waiting to be accepted, the queue's limit), or None where the platform cannot tell."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return tcp_backlog(sock)
    if sock.family == socket.AF_UNIX:
        return unix_backlog(sock)
    return None


def listen_drops(sock: socket.socket) -> int | None:
    """The packets the kernel dropped at this TCP listener since it was opened (see the module's docstring); None
    for a unix socket, or where the kernel has no SO_MEMINFO."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not sys.platform.startswith("linux"):
        return None
    try:
        return int(_MEMINFO.unpack(sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size))[_MEMINFO_DROPS])
    except (OSError, struct.error):
        return None


class ListenerDrops:
    """Each TCP listener's drops round by round: the rise of its socket's count since the last round."""

    def __init__(self) -> None:
        # listener -> (its socket's inode, its count at the last round): a count is the socket's own since it was
        # opened, so a listener replaced under the same name (a HUP with a new bind) starts again from 0.
        self._last: dict[str, tuple[int, int]] = {}
        self._told = False  # a listener gave no count (an older kernel): said once

    def rise(self, name: str, sock: socket.socket) -> int | None:
        """Drops since the last round; 0 at a socket's first round, which only sets the start (one inherited over
        a USR2 re-exec or from systemd brings drops from before this master). None where the kernel gives no
        count."""
        dropped = listen_drops(sock)
        if dropped is None:
            if not self._told and sock.fileno() >= 0:  # still open: the kernel has no count to give
                self._told = True
                LOG.info(
                    "gunicorn-insight: the kernel gives no drop count for listener %s (SO_MEMINFO, Linux 4.12 and "
                    "later): gunicorn_listen_drops_total is absent, and gunicorn_listen_overflows_total, the "
                    "network namespace's count (any server's listeners), stands in for it",
                    name,
                )
            return None
        try:
            inode = os.fstat(sock.fileno()).st_ino
        except OSError:
            return None
        last = self._last.get(name)
        self._last[name] = (inode, dropped)
        return max(0, dropped - last[1]) if last is not None and last[0] == inode else 0


def listener_time_wait(sock: socket.socket) -> int | None:
    """This TCP listener's connections closed in the last minute, in TIME_WAIT on either end (see _timewait)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return None
    found = time_wait(sock.family, host, port)
    return None if found is None else found.count


def listen_overflows(path: str = "/proc/net/netstat") -> int | None:
    """The network namespace's count of connections dropped because an accept queue was full."""
    data = kernelfiles.read(path)
    if data is None:
        return None
    lines = data.split(b"\n")
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith(b"TcpExt:"):
            try:
                return int(values.split()[names.split().index(b"ListenOverflows")])
            except (ValueError, IndexError):
                return None
    return None
