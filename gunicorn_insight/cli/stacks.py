"""``gunicorn-insight stacks``: the Python stack of every request in flight, asked of the workers themselves.

Each worker's watchdog thread (gunicorn_insight._worker.watchdog) can read its own process's frames. This
command bumps the STACKS_ASKED field of each chosen worker's scoreboard slot (one store, the only write it
makes), then reads the ``stacks-<slot>.json`` files the watchdogs write into the run directory, until every
worker has answered or ``--wait`` runs out. No signal is sent and nothing in the worker waits for this
command, so it cannot stop or hang a worker; no ptrace either, unlike py-spy. A worker whose watchdog did not
run in time (stuck in C code that holds the GIL, stopped, swapping) does not answer: it is named, with the
requests the scoreboard says it is serving.

Identical stacks (same files, lines and functions) are grouped, largest group first: a hundred requests
waiting on the same database call read as one stack.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.text import Text

from .. import _scoreboard as sb
from .._discovery import Server
from .._runfiles import read_stacks_answer

FORMAT = 1
"""Version of the ``stacks --json`` document; bumped only if a key changes meaning."""
DEFAULT_WAIT = 3.0
"""A watchdog looks at the question once a second at most: three rounds of it."""
_POLL = 0.05


@dataclass
class Asked:
    """One worker the question went to, and what came back."""

    slot: int
    pid: int
    number: int
    scoreboard_requests: tuple[sb.InFlight, ...]
    answer: dict[str, Any] | None = None
    gone: bool = False


@dataclass
class Collected:
    """Every worker asked, and those not asked because they could not answer yet (still booting)."""

    asked: list[Asked]
    booting: list[tuple[int, int]] = field(default_factory=list)
    """(slot, pid) of workers still loading the application: their watchdog is not running yet."""
    waited: float = 0.0


def collect(server: Server, board: sb.Scoreboard, wait: float, only_pid: int | None = None) -> Collected:
    """Ask every ready worker (or only ``only_pid``) for its stacks and wait up to ``wait`` seconds."""
    started = time.monotonic()
    result = Collected(asked=[])
    for view in board:
        if view.state == sb.FREE or not view.pid or (only_pid is not None and view.pid != only_pid):
            continue
        if view.state == sb.BOOTING:
            result.booting.append((view.index, view.pid))
            continue
        number = board.ask_stacks(view.index)
        result.asked.append(Asked(view.index, view.pid, number, view.requests))
    deadline = started + wait
    while True:
        for item in result.asked:
            if item.answer is not None or item.gone:
                continue
            item.answer = read_stacks_answer(server.run_dir, item.slot, item.pid, item.number)
            if item.answer is None and board.read(item.slot).pid != item.pid:
                item.gone = True  # it exited meanwhile: it will never answer
        pending = [item for item in result.asked if item.answer is None and not item.gone]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(_POLL)
    result.waited = time.monotonic() - started
    return result


def _frames(request: dict[str, Any]) -> list[dict[str, Any]]:
    stack = request.get("stack")
    return stack if isinstance(stack, list) else []


def _key(request: dict[str, Any]) -> tuple[Any, ...]:
    frames = _frames(request)
    if not frames:
        return ("note", request.get("note"))
    return tuple((frame.get("file"), frame.get("line"), frame.get("function")) for frame in frames)


def document(server: Server, collected: Collected, now: float | None = None) -> dict[str, Any]:
    """The JSON document ``stacks --json`` prints and the text view draws (keys documented in docs/cli.md)."""
    now = time.monotonic() if now is None else now
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    workers = []
    for item in collected.asked:
        answered = item.answer is not None
        workers.append(
            {
                "slot": item.slot,
                "pid": item.pid,
                "answered": answered,
                "reason": None if answered else _silence(item, collected.waited),
                "requests": len(item.answer["requests"]) if item.answer is not None else len(item.scoreboard_requests),
                "main_thread": _main_thread(item.answer),
                "unanswered_requests": []
                if answered or item.gone
                else [
                    {"method": r.method, "path": r.path, "client": r.client, "elapsed": round(now - r.started, 3)}
                    for r in item.scoreboard_requests
                ],
            }
        )
        if item.answer is None:
            continue
        for request in item.answer["requests"]:
            group = groups.setdefault(
                _key(request), {"count": 0, "stack": _frames(request), "note": request.get("note"), "requests": []}
            )
            group["count"] += 1
            group["requests"].append(
                {
                    "pid": item.pid,
                    "slot": item.slot,
                    "method": request.get("method"),
                    "path": request.get("path"),
                    "where": request.get("where"),
                    "elapsed": round(now - float(request.get("started", now)), 3),
                }
            )
    ordered = sorted(
        groups.values(), key=lambda group: (-group["count"], -max(r["elapsed"] for r in group["requests"]))
    )
    for group in ordered:
        group["requests"].sort(key=lambda r: -r["elapsed"])
    return {
        "format": FORMAT,
        "time": time.time(),
        "server": {"master_pid": server.master_pid, "proc_name": server.proc_name, "binds": server.binds},
        "waited": round(collected.waited, 3),
        "groups": ordered,
        "workers": workers,
        "booting": [{"slot": slot, "pid": pid} for slot, pid in collected.booting],
    }


def _main_thread(answer: dict[str, Any] | None) -> dict[str, Any] | None:
    """The worker's main thread as its watchdog saw it (None: no answer, or a watchdog too old to say)."""
    main = answer.get("main_thread") if answer is not None else None
    if not isinstance(main, dict):
        return None
    stack = main.get("stack")
    return {"stack": stack if isinstance(stack, list) else [], "note": main.get("note")}


def _innermost(main: dict[str, Any]) -> str:
    frames = main["stack"]
    if not frames:
        return f"({main['note']})"
    frame = frames[-1]
    code = f": {frame['code']}" if frame.get("code") else ""
    return f"in {frame.get('function')} at {frame.get('file')}:{frame.get('line')}{code}"


def _idle_workers(doc: dict[str, Any]) -> dict[str, list[str]]:
    """Workers with no request, grouped by where their main thread is (their own loop: accepting, or blocked
    outside any request)."""
    idle: dict[str, list[str]] = {}
    for worker in doc["workers"]:
        if worker["answered"] and not worker["requests"] and worker["main_thread"] is not None:
            idle.setdefault(_innermost(worker["main_thread"]), []).append(f"pid {worker['pid']} slot {worker['slot']}")
    return idle


def _silence(item: Asked, waited: float) -> str:
    if item.gone:
        return "exited before answering"
    return (
        f"no answer in {waited:.1f}s: its watchdog thread did not run, so the worker is most likely stuck in C "
        "code that holds the GIL (a regex, a C extension), stopped, or starved of CPU; py-spy dump --native "
        f"--pid {item.pid} can see C frames (it needs ptrace rights)"
    )


def render(console: Console, doc: dict[str, Any]) -> None:
    """Text for a terminal or a log: lines are never wrapped, so a stack can be copied as it is."""

    def line(text: str, style: str | None = None) -> None:
        console.print(Text(text, style=style or ""), soft_wrap=True)

    server = doc["server"]
    requests = sum(group["count"] for group in doc["groups"])
    answered = sum(1 for worker in doc["workers"] if worker["answered"])
    line(
        f"{server['proc_name']}  master {server['master_pid']}  {', '.join(server['binds']) or '-'}: "
        f"{requests} request(s) in flight, {len(doc['groups'])} distinct stack(s); "
        f"{answered} of {len(doc['workers'])} worker(s) answered in {doc['waited']:.1f}s",
        "bold",
    )
    for group in doc["groups"]:
        line("")
        line(f"{group['count']} request(s) with this stack:", "bold cyan")
        for request in group["requests"]:
            line(
                f"  pid {request['pid']} slot {request['slot']} {request['where']}  "
                f"{request['method']} {request['path']}  {request['elapsed']:.1f}s"
            )
        line("  most recent call last:")
        if not group["stack"]:
            line(f"    ({group['note']})")
        for frame in group["stack"]:
            line(f'    File "{frame["file"]}", line {frame["line"]}, in {frame["function"]}')
            if frame.get("code"):
                line(f"      {frame['code']}")
    for where, names in _idle_workers(doc).items():
        line("")
        line(f"{len(names)} worker(s) with no request in flight ({', '.join(names)}), main thread {where}")
    for worker in doc["workers"]:
        if worker["answered"]:
            continue
        line("")
        line(f"worker pid {worker['pid']} slot {worker['slot']}: {worker['reason']}", "bold red")
        for request in worker["unanswered_requests"]:
            line(
                f"  serving {request['method']} {request['path']} from {request['client']} "
                f"for {request['elapsed']:.1f}s"
            )
    for booting in doc["booting"]:
        line(f"worker pid {booting['pid']} slot {booting['slot']}: still booting, not asked")
    if not doc["workers"] and not doc["booting"]:
        line("no live worker to ask")


def unanswered(doc: dict[str, Any]) -> Sequence[dict[str, Any]]:
    return [worker for worker in doc["workers"] if not worker["answered"]]
