"""Servers on one host stalled at the same time, and the frame their stuck requests share.

Each master says in its ``status.json`` whether it is stalled (requests in flight, none finishing, more
waiting) and since when (``stalled_since``). Servers that stall together usually wait on one thing they
share: a database, a lock file, a socket. When two or more of the host's servers are stalled at once, each
stalled server's workers are asked for their requests' stacks (as ``gunicorn-insight stacks`` asks them: one
counter in the scoreboard, no signal), and the frame most of them wait in is named.

Frames are compared by the module's path below its installation root (``site-packages/``, the standard
library's ``lib/pythonX.Y/``) and the function, not by line: two applications in two virtualenvs, with
slightly different versions of the same driver, still wait in the same ``psycopg/cursor.py`` ``execute``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import _scoreboard as sb
from .._discovery import Server, scan
from .stacks import DEFAULT_WAIT, collect
from .views import read_status

_INSTALL_ROOT = re.compile(r".*/(?:site-packages|dist-packages)/|.*/lib/python\d+\.\d+/")


@dataclass
class StalledServer:
    """One stalled server and the stacks of its requests in flight (empty when they could not be had)."""

    server: Server
    since: float
    """Unix time its stall began (its last request finished)."""
    in_flight: int
    stacks: list[list[dict[str, Any]]] = field(default_factory=list)
    """Each request's frames, outermost first, as its worker's watchdog wrote them."""
    silent: str | None = None
    """Why some or all stacks are missing (workers that did not answer, a scoreboard we may not write)."""


@dataclass(frozen=True)
class SharedFrame:
    """A frame (module and function) the stuck requests of several servers are in."""

    module: str
    function: str
    servers: tuple[tuple[StalledServer, dict[str, Any], int], ...]
    """(server, its innermost frame with this module and function, how many of its requests are in it)."""


@dataclass
class HostStalls:
    """Every server of the host stalled right now, and the frame the most of them share (None: none shared)."""

    stalled: list[StalledServer]
    shared: SharedFrame | None


def module_of(path: str) -> str:
    """The frame's file below its installation root, so two virtualenvs' copies of a module compare equal."""
    return _INSTALL_ROOT.sub("", path)


def stalled_servers(servers: Iterable[Server]) -> list[StalledServer]:
    found = []
    for server in servers:
        status = read_status(server.status_path)[0]
        if status is not None and status.stalled_requests and status.stalled_since is not None:
            found.append(StalledServer(server, status.stalled_since, status.stalled_requests))
    return sorted(found, key=lambda item: item.since)


def ask_stacks(stalled: StalledServer, wait: float) -> None:
    """Fill in the server's request stacks, or say why they cannot be had."""
    try:
        board = sb.Scoreboard.attach(stalled.server.scoreboard_path, writable=True)
    except PermissionError:
        stalled.silent = "its scoreboard is not writable for this user (run as the server's user or root)"
        return
    except OSError as error:
        stalled.silent = f"its scoreboard cannot be opened: {error}"
        return
    try:
        collected = collect(stalled.server, board, wait)
    finally:
        board.close()
    silent = [item for item in collected.asked if item.answer is None and not item.gone]
    if silent:
        stalled.silent = (
            f"{len(silent)} worker(s) gave no stack in {collected.waited:.1f}s (C code holding the GIL, or stopped)"
        )
    for item in collected.asked:
        for request in item.answer["requests"] if item.answer is not None else ():
            stack = request.get("stack")
            if isinstance(stack, list) and stack:
                stalled.stacks.append(stack)


def shared_frame(stalled: list[StalledServer]) -> SharedFrame | None:
    """The (module, function) the stuck requests of the most servers are in, at least two; among those, the
    one closest to the innermost frame (the shared resource's own call, not the framework above it)."""
    # key -> server index -> (depth from the innermost frame, that frame, requests in it)
    seen: dict[tuple[str, str], dict[int, tuple[int, dict[str, Any], int]]] = {}
    for index, item in enumerate(stalled):
        for stack in item.stacks:
            keys_in_request = set()
            for depth, frame in enumerate(reversed(stack)):
                key = (module_of(str(frame.get("file"))), str(frame.get("function")))
                if key in keys_in_request:
                    continue  # recursion: one request counts once
                keys_in_request.add(key)
                per_server = seen.setdefault(key, {})
                best = per_server.get(index)
                if best is None:
                    per_server[index] = (depth, frame, 1)
                else:
                    shallowest = min(best[0], depth)
                    per_server[index] = (shallowest, frame if depth < best[0] else best[1], best[2] + 1)
    candidates = [(key, servers) for key, servers in seen.items() if len(servers) >= 2]
    if not candidates:
        return None
    key, servers = min(candidates, key=lambda entry: (-len(entry[1]), max(depth for depth, _, _ in entry[1].values())))
    return SharedFrame(
        key[0],
        key[1],
        tuple((stalled[index], frame, count) for index, (_, frame, count) in sorted(servers.items())),
    )


def find(servers: Iterable[Server] | None = None, wait: float = DEFAULT_WAIT) -> HostStalls | None:
    """The host's stalled servers with their shared frame, when two or more are stalled at once; else None."""
    stalled = stalled_servers(scan().servers if servers is None else servers)
    if len(stalled) < 2:
        return None
    for item in stalled:
        ask_stacks(item, wait)
    return HostStalls(stalled, shared_frame(stalled))
