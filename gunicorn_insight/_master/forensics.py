"""Why did a worker exit? One cause per exit, decided in the master from what each side left behind.

gunicorn does not pass the exit status to ``child_exit``. The decision uses, most reliable first:

* the worker's own marks in its slot: ``worker_exit`` ran (so it left through Python) with its exit code,
  whether it had booted, whether it reached ``max_requests``, whether gunicorn's SIGABRT handler ran;
* ``worker.aborted``, set by the master when it timed the worker out;
* gunicorn's own reap line ("Worker (pid:N) was sent SIGKILL!", "... exited with code N"), caught by a
  logging filter as gunicorn emits it, just before ``child_exit``;
* the cgroup's oom_kill counter (v2 ``memory.events``, v1 ``memory.oom_control``), the only way to say
  "OOM killer" and mean it: a SIGKILL it confirms is the cause ``oom``, one it does not is ``killed``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _scoreboard as sb
from .._cgroup import memory_cgroup_dirs
from .._gunicorn import REAP_EXITED, REAP_SENT
from .._report import LOG


class ReapWatcher:
    """Reads gunicorn's reap lines as gunicorn logs them, before any log level can drop them.

    It wraps the error/warning/info methods of gunicorn's logger object (the records would never exist
    with ``--log-level critical`` if we listened as a logging filter). On gunicorn 23 these lines are
    logged inside the SIGCHLD handler, so observing takes no lock: a regex and a dict store.
    """

    def __init__(self) -> None:
        self.signals: dict[int, str] = {}
        self.exit_codes: dict[int, int] = {}

    def watch(self, log: Any) -> None:
        for level in ("error", "warning", "info"):
            original = getattr(log, level, None)
            if original is None or getattr(original, "__gunicorn_insight__", False):
                continue
            setattr(log, level, self._observing(original))

    def _observing(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def observed(msg: Any, *args: Any, **kwargs: Any) -> Any:
            self.observe(msg, args)
            return original(msg, *args, **kwargs)

        observed.__gunicorn_insight__ = True  # type: ignore[attr-defined]
        return observed

    def observe(self, msg: Any, args: tuple[Any, ...]) -> None:
        if not (isinstance(msg, str) and msg.startswith("Worker (pid:")):
            return
        try:
            message = msg % args if args else msg
        except (TypeError, ValueError):
            return
        if match := REAP_SENT.match(message):
            self.signals[int(match[1])] = match[3] or _signal_name(int(match[2]))
        elif match := REAP_EXITED.match(message):
            self.exit_codes[int(match[1])] = int(match[2])

    def take(self, pid: int) -> tuple[str | None, int | None]:
        return self.signals.pop(pid, None), self.exit_codes.pop(pid, None)


def _signal_name(status: int) -> str:
    """gunicorn 23 logs "was sent code 139!" for a wait status it cannot name: 128 is the core-dump bit."""
    number = status & 0x7F
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    return f"{name} (core dumped)" if status & 0x80 else name


class OomCounter:
    """The kernel's count of OOM kills in our own cgroup (v2 memory.events, or v1 memory.oom_control).

    :meth:`poll` runs every round; the kills it finds are a budget that SIGKILLs may claim in that round and
    the next one (the kernel counts the kill before the victim is reaped, so a poll can fall between the two),
    never later: an OOM kill from hours ago is never blamed for today's ``kill -9``.
    """

    def __init__(self, proc_self_cgroup: str = "/proc/self/cgroup", cgroup_root: str = "/sys/fs/cgroup") -> None:
        self.path = _find_oom_file(proc_self_cgroup, cgroup_root)
        self.last = self.read()
        if self.last is None:
            LOG.info(
                "gunicorn-insight: no oom_kill count readable in this process's memory cgroup (%s): a worker "
                "the OOM killer SIGKILLs is counted as cause=killed, not cause=oom",
                self.path or "no memory.events or memory.oom_control found",
            )
        self._previous_round = 0
        self._this_round = 0

    def read(self) -> int | None:
        if self.path is None:
            return None
        try:
            with open(self.path) as handle:
                for line in handle:
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            return None
        return None

    def poll(self) -> None:
        """Kills since the previous poll become claimable; those unclaimed for a whole round expire."""
        now = self.read()
        before, self.last = self.last, now
        fresh = max(0, now - before) if now is not None and before is not None else 0
        self._previous_round, self._this_round = self._this_round, fresh

    def claim(self) -> bool:
        """Did the kernel OOM-kill something in our cgroup lately that no other exit has claimed?"""
        if self._previous_round > 0:
            self._previous_round -= 1
            return True
        if self._this_round > 0:
            self._this_round -= 1
            return True
        return False


def _find_oom_file(proc_self_cgroup: str, cgroup_root: str) -> str | None:
    for version, directory in memory_cgroup_dirs(proc_self_cgroup, cgroup_root, include_root=False):
        candidate = os.path.join(directory, "memory.events" if version == 2 else "memory.oom_control")
        if os.path.exists(candidate):
            return candidate
    return None


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why a worker exited: one cause from a fixed set, a detail for people, and a note on its stack."""

    cause: str
    detail: str
    stack_note: str


def classify(  # noqa: PLR0911 - one return per cause reads as the decision table it is
    view: sb.SlotView,
    *,
    aborted: bool,
    signal: str | None,
    exit_code: int | None,
    oom: bool,
    shutdown: bool = False,
) -> Verdict:
    """The one cause of this exit, a human detail, and what to expect about a stack trace."""
    flags = view.flags
    abort_ran = bool(flags & sb.FLAG_ABORT_HANDLER)
    if flags & sb.FLAG_BOOT_FAILED:
        return Verdict("boot_failure", f"could not load the application: {view.last_words}", "")
    if aborted:
        return _timed_out(abort_ran, signal)
    if shutdown and not flags & sb.FLAG_EXITED:
        if view.requests:
            return Verdict(
                "graceful",
                "stopped at shutdown: gunicorn SIGKILLed it when graceful_timeout ran out before its requests finished",
                "no stack: SIGKILL runs no Python code",
            )
        return Verdict("graceful", "stopped at shutdown", "")
    if flags & sb.FLAG_EXITED:
        if flags & sb.FLAG_MAX_REQUESTS:
            return Verdict("max_requests", "recycled after max_requests", "")
        if view.exit_code == 0:
            return Verdict("graceful", "stopped cleanly (TERM, HUP, TTOU or shutdown)", "")
        return Verdict(
            "crash", f"exited with code {view.exit_code}{_last_words(view)}", "stack: see gunicorn's traceback above"
        )
    if signal == "SIGKILL":
        if oom:
            return Verdict(
                "oom",
                "killed by the kernel's OOM killer (the cgroup's oom_kill count rose)",
                "no stack: SIGKILL runs no Python code",
            )
        return Verdict(
            "killed",
            "killed by SIGKILL from outside gunicorn (OOM killer not confirmed by the cgroup)",
            "no stack: SIGKILL runs no Python code",
        )
    if signal is not None:
        if signal == "SIGTERM":
            return Verdict("graceful", "stopped by SIGTERM", "")
        return Verdict("signal", f"killed by {signal}", "no stack: the signal ended the process")
    code = exit_code if exit_code is not None else "unknown"
    return Verdict(
        "crash",
        f"exited with code {code} without running gunicorn's exit path (os._exit?)",
        "no stack: the process left without a Python exception",
    )


def _last_words(view: sb.SlotView) -> str:
    """``: Type: message`` of the exception the worker left with, when it left one; quotes made single so
    the exit line's detail="..." stays one field."""
    return f": {view.last_words.replace(chr(34), chr(39))}" if view.last_words else ""


def _timed_out(abort_ran: bool, signal: str | None) -> Verdict:
    """gunicorn timed the worker out: what ended it, read from its abort mark and the signal it died of."""
    if abort_ran:
        return Verdict(
            "timeout",
            "gunicorn timed it out (WORKER TIMEOUT) and its abort handler ran",
            "stack: written to the error log by worker_abort just before",
        )
    if signal is not None and signal.startswith("SIGABRT"):
        # uvicorn's workers put SIGABRT back to its default action: the timeout's SIGABRT itself ends them.
        return Verdict(
            "timeout_kill",
            f"gunicorn timed it out (WORKER TIMEOUT) and it died of that {signal} "
            "(no abort handler: the worker class leaves SIGABRT at its default action)",
            "no stack: the signal's default action runs no Python code; see a slow-request report above if any",
        )
    return Verdict(
        "timeout_kill",
        "gunicorn timed it out (WORKER TIMEOUT), the abort handler never ran, then gunicorn sent SIGKILL",
        "no stack: stuck where Python code cannot run (C code, a "
        "blocked event loop), SIGKILL leaves no chance; see a slow-request report above if any",
    )
