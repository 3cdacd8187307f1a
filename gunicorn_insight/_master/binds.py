"""Who else holds the addresses gunicorn is about to bind, and whether a unix socket file still leads here.

gunicorn replaces a unix socket file that exists (it removes it and binds a new one), so a previous server
that is still running keeps serving a file nobody can reach, and when it exits it removes the file: the new
server's. nginx then answers 502 (``connect() to unix:... failed (2: No such file or directory)``). A TCP
port in use makes gunicorn retry and give up with "Connection in use" without saying who uses it. Both are
named here from /proc: the listening socket's inode in ``/proc/net/{unix,tcp,tcp6}``, and the process whose
``/proc/<pid>/fd`` holds it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterable
from typing import Any

from .._report import LOG

_LISTEN_TCP = "0A"  # include/net/tcp_states.h: TCP_LISTEN
_ACCEPTING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix's Flags: a listening socket
_CMDLINE_SHOWN = 120


def listening_unix(path: str, proc: str = "/proc") -> set[int]:
    """Inodes of the listening unix sockets bound to ``path``."""
    found: set[int] = set()
    with contextlib.suppress(OSError), open(f"{proc}/net/unix") as table:
        next(table, None)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & _ACCEPTING:
                found.add(int(fields[6]))
    return found


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp's address: 32-bit words in the host's byte order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[at : at + 4][::-1] for at in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def listening_tcp(host: str, port: int, proc: str = "/proc") -> dict[int, str]:
    """Listening TCP sockets a bind of (host, port) collides with: inode -> the address they listen on.

    A host that is a name rather than an address collides with every listener on the port (gunicorn resolves
    it later; resolving here could stall the start on a slow DNS)."""
    try:
        wanted: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host) if host else None
    except ValueError:
        wanted = None
    found: dict[int, str] = {}
    for table_name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"{proc}/net/{table_name}") as table:
            next(table, None)
            for line in table:
                fields = line.split()
                if len(fields) < 10 or fields[3] != _LISTEN_TCP:
                    continue
                hex_address, _, hex_port = fields[1].partition(":")
                if int(hex_port, 16) != port:
                    continue
                address = _address(hex_address)
                if wanted is None or wanted.is_unspecified or address.is_unspecified or address == wanted:
                    shown = f"[{address}]" if address.version == 6 else str(address)
                    found[int(fields[9])] = f"{shown}:{port}"
    return found


def holders(inodes: Iterable[int], proc: str = "/proc") -> dict[int, str]:
    """pid -> command line of the processes holding any of these sockets (those this process may inspect)."""
    targets = {f"socket:[{inode}]" for inode in inodes}
    found: dict[int, str] = {}
    if not targets:
        return found
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            descriptors = os.listdir(f"{entry.path}/fd")
        except OSError:  # gone, or another user's process
            continue
        for descriptor in descriptors:
            try:
                if os.readlink(f"{entry.path}/fd/{descriptor}") in targets:
                    found[int(entry.name)] = _cmdline(entry.path)
                    break
            except OSError:
                continue
    return found


def _cmdline(process: str) -> str:
    try:
        with open(f"{process}/cmdline", "rb") as file:
            text = file.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "?"
    return text if len(text) <= _CMDLINE_SHOWN else text[: _CMDLINE_SHOWN - 3] + "..."


def _named(found: dict[int, str]) -> str:
    if not found:
        return "a process not visible from here (another user's, or in another container)"
    return ", ".join(f"pid {pid} ({cmdline})" for pid, cmdline in sorted(found.items()))


def taken_binds(binds: Iterable[str | tuple[str, int] | int], *, reuse_port: bool, proc: str = "/proc") -> list[str]:
    """One sentence per address (as gunicorn parsed ``bind``) that another process already listens on."""
    found = []
    for bind in binds:
        if isinstance(bind, str):
            inodes = listening_unix(bind, proc)
            if inodes:
                found.append(
                    f"unix:{bind} is still served by {_named(holders(inodes, proc))}: gunicorn replaces the socket "
                    "file now, and when that process exits it removes the file this server serves (the proxy "
                    "then fails with 'No such file or directory', 502). Stop it first"
                )
        elif isinstance(bind, tuple) and not reuse_port:
            listeners = listening_tcp(bind[0], bind[1], proc)
            if listeners:
                found.append(
                    f"{bind[0] or '*'}:{bind[1]} collides with {', '.join(sorted(set(listeners.values())))}, "
                    f"held by {_named(holders(listeners, proc))}: gunicorn will retry, then stop with "
                    "'Connection in use'"
                )
    return found


def socket_file(path: str) -> tuple[int, int] | None:
    """(device, inode) of a unix socket's file, or None where there is none (any more)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def warn_if_taken(server: Any) -> None:
    """In on_starting, before gunicorn binds: one warning per address another process listens on."""
    if os.environ.get("GUNICORN_FD") or os.environ.get("LISTEN_FDS"):
        return  # inherited sockets (a USR2 upgrade, systemd's socket activation): the old holder is expected
    cfg = server.cfg
    for line in taken_binds(cfg.address, reuse_port=bool(getattr(cfg, "reuse_port", False))):
        LOG.warning("gunicorn-insight: %s", line)


class SocketFiles:
    """The files of this server's unix sockets, checked each round against the file each socket is bound to
    (sock_diag): another process that removes or replaces one (a previous server exiting, a second one
    starting) cuts this server off from new connections."""

    def __init__(self) -> None:
        self._told: set[tuple[str, int, str]] = set()

    def check(self, path: str, bound: int) -> None:
        """``bound``: the inode of the file the listening socket at ``path`` is bound to (sock_diag)."""
        now = socket_file(path)
        state = "removed" if now is None else "ours" if now[1] == bound else "replaced"
        if state == "ours" or (path, bound, state) in self._told:
            return
        self._told.add((path, bound, state))
        if now is None:
            LOG.error(
                "gunicorn-insight: the socket file unix:%s was removed: new connections cannot reach this "
                "server (the proxy fails with 'No such file or directory', 502). Another process removed it "
                "(often a previous gunicorn exiting); restart this one, or send it HUP to bind again",
                path,
            )
        else:
            LOG.error(
                "gunicorn-insight: the socket file unix:%s was replaced, now served by %s: new connections go "
                "there, not to this server",
                path,
                _named(holders(listening_unix(path))),
            )
