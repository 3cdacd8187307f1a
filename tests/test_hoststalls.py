"""Servers stalled together: the frame their stuck requests share, and the doctor finding that names it."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import fakes

from gunicorn_insight._discovery import Server
from gunicorn_insight.cli import livedoctor
from gunicorn_insight.cli.hoststalls import HostStalls, StalledServer, module_of, shared_frame


def frame(file: str, function: str, line: int = 1) -> dict[str, Any]:
    return {"file": file, "line": line, "function": function, "code": None}


def stalled(pid: int, *stacks: list[dict[str, Any]]) -> StalledServer:
    server = Server(f"/dev/shm/gunicorn-insight-{pid}", fakes.server_info("", master_pid=pid))
    return StalledServer(server, since=time.time() - 30, in_flight=len(stacks), stacks=list(stacks))


APP = frame("/srv/shop/app.py", "handler")
EXECUTE_A = frame("/srv/shop/venv/lib/python3.12/site-packages/psycopg/cursor.py", "execute", 730)
EXECUTE_B = frame("/srv/billing/venv/lib/python3.12/site-packages/psycopg/cursor.py", "execute", 741)
WAIT_A = frame("/srv/shop/venv/lib/python3.12/site-packages/psycopg/waiting.py", "wait_conn", 20)


def test_module_paths_compare_across_virtualenvs_and_interpreters() -> None:
    """A module is named below site-packages or the standard library's directory, whichever venv holds it."""
    assert module_of(EXECUTE_A["file"]) == module_of(EXECUTE_B["file"]) == "psycopg/cursor.py"
    assert module_of("/usr/lib/python3.11/socket.py") == "socket.py"
    assert module_of("/srv/shop/app.py") == "/srv/shop/app.py"


def test_the_innermost_frame_shared_by_the_most_servers_is_named() -> None:
    """Two servers in the same driver call from different virtualenvs and lines: that call, not the framework
    frame above it; a third server stalled elsewhere is left out of the group."""
    shop = stalled(10, [APP, EXECUTE_A, WAIT_A], [APP, EXECUTE_A, WAIT_A])
    billing = stalled(20, [frame("/srv/billing/app.py", "view"), EXECUTE_B])
    other = stalled(30, [frame("/srv/other/app.py", "compute")])
    shared = shared_frame([shop, billing, other])
    assert shared is not None
    assert (shared.module, shared.function) == ("psycopg/cursor.py", "execute")
    assert [(item.server.master_pid, found["line"], count) for item, found, count in shared.servers] == [
        (10, 730, 2),
        (20, 741, 1),
    ]


def test_no_frame_in_common_is_no_shared_frame() -> None:
    """Servers stalled in unrelated code, or without stacks, share nothing."""
    assert shared_frame([stalled(10, [APP]), stalled(20, [frame("/srv/b.py", "handler")]), stalled(30)]) is None


def test_the_finding_names_the_servers_since_when_and_the_shared_call() -> None:
    """live-shared-stall: an error naming each server with its stall's start and the call they wait in."""
    shop = stalled(10, [APP, EXECUTE_A])
    billing = stalled(20, [EXECUTE_B])
    stalls = HostStalls([shop, billing], shared_frame([shop, billing]))
    (finding,) = livedoctor.check_shared_stall(replace(live_facts(), host_stalls=stalls))
    assert finding.check == "live-shared-stall"
    assert finding.severity == "error"
    assert finding.what.startswith("2 gunicorn servers on this host are stalled at once")
    assert "pid 10 'app' (127.0.0.1:8000) stalled since " in finding.what
    assert "wait in execute (psycopg/cursor.py): pid 10 1 of 1 request(s) at line 730, pid 20 1 of 1" in finding.what


def test_without_a_shared_frame_the_finding_gives_each_servers_innermost_frame() -> None:
    """Stalled together in unrelated code: still said, with where each one is."""
    stalls = HostStalls([stalled(10, [APP]), stalled(20)], None)
    (finding,) = livedoctor.check_shared_stall(replace(live_facts(), host_stalls=stalls))
    assert "share no frame" in finding.what
    assert "pid 10: handler (/srv/shop/app.py:1); pid 20: no stack" in finding.what


def test_no_host_stalls_no_finding() -> None:
    """One server stalled alone (or none) leaves host_stalls None: nothing to say."""
    assert list(livedoctor.check_shared_stall(live_facts())) == []


def live_facts() -> livedoctor.LiveFacts:
    return livedoctor.LiveFacts(info=fakes.server_info("", master_pid=1), window=3.0)
