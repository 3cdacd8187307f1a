"""Why did a worker exit? One cause per exit, decided in the master from what each side left behind.

gunicorn does not pass the exit status to ``child_exit``. The decision uses, most reliable first:

* the worker's own marks in its slot: ``worker_exit`` ran (so it left through Python) with its exit code,
  whether it had booted, whether it reached ``max_requests``, whether gunicorn's SIGABRT handler ran;
* ``worker.aborted``, set by the master when it timed the worker out;
* gunicorn's own reap line ("Worker (pid:N) was sent SIGKILL!", "... exited with code N"), caught by a
  logging filter as gunicorn emits it, just before ``child_exit``;
* the cgroup's ``memory.events`` oom_kill counter, the only way to say "OOM killer" and mean it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from . import _scoreboard as sb
from ._cgroup import memory_cgroup_dirs

CAUSES = ("timeout", "timeout_kill", "killed", "signal", "crash", "max_requests", "graceful", "boot_failure")
EXPECTED = frozenset({"max_requests", "graceful"})
_SENT = re.compile(r"Worker \(pid:(\d+)\) was sent (\w+)")
_EXITED = re.compile(r"Worker \(pid:(\d+)\) exited with code (-?\d+)")


class ReapWatcher(logging.Filter):
    """Reads gunicorn's reap lines as they are logged. Lock-free: it only stores into dicts.

    On gunicorn 23 these lines are logged inside the SIGCHLD handler, so nothing here may block.
    """

    def __init__(self) -> None:
        super().__init__()
        self.signals: dict[int, str] = {}
        self.exit_codes: dict[int, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO and isinstance(record.msg, str) and record.msg.startswith("Worker (pid:"):
            try:
                message = record.getMessage()
            except Exception:
                return True
            if match := _SENT.match(message):
                self.signals[int(match[1])] = match[2]
            elif match := _EXITED.match(message):
                self.exit_codes[int(match[1])] = int(match[2])
        return True

    def take(self, pid: int) -> tuple[str | None, int | None]:
        return self.signals.pop(pid, None), self.exit_codes.pop(pid, None)


class OomCounter:
    """The kernel's count of OOM kills in our cgroup (v2 memory.events, or v1 memory.oom_control)."""

    def __init__(self, proc_self_cgroup: str = "/proc/self/cgroup", cgroup_root: str = "/sys/fs/cgroup") -> None:
        self.path = _find_oom_file(proc_self_cgroup, cgroup_root)
        self.last = self.read()

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

    def confirmed(self) -> bool:
        """Did the kernel OOM-kill something in our cgroup since the last call?"""
        now = self.read()
        before, self.last = self.last, now
        return now is not None and before is not None and now > before


def _find_oom_file(proc_self_cgroup: str, cgroup_root: str) -> str | None:
    for version, directory in memory_cgroup_dirs(proc_self_cgroup, cgroup_root):
        candidate = os.path.join(directory, "memory.events" if version == 2 else "memory.oom_control")
        if os.path.exists(candidate):
            return candidate
    return None


@dataclass(frozen=True, slots=True)
class Verdict:
    cause: str
    detail: str
    stack_note: str


def classify(  # noqa: PLR0911 - one return per cause reads as the decision table it is
    view: sb.SlotView, *, aborted: bool, signal: str | None, exit_code: int | None, oom: bool
) -> Verdict:
    """The one cause of this exit, a human detail, and what to expect about a stack trace."""
    flags = view.flags
    abort_ran = bool(flags & sb.FLAG_ABORT_HANDLER)
    if flags & sb.FLAG_BOOT_FAILED:
        return Verdict("boot_failure", f"could not load the application: {view.last_words}", "")
    if aborted:
        if abort_ran:
            return Verdict("timeout", "gunicorn timed it out (WORKER TIMEOUT) and its abort handler ran",
                           "stack: written to the error log by worker_abort just before")
        return Verdict("timeout_kill", "gunicorn timed it out (WORKER TIMEOUT), the abort handler never ran, "
                       "then gunicorn sent SIGKILL", "no stack: stuck where Python code cannot run (C code, a "
                       "blocked event loop), SIGKILL leaves no chance; see a slow-request report above if any")
    if flags & sb.FLAG_EXITED:
        if flags & sb.FLAG_MAX_REQUESTS:
            return Verdict("max_requests", "recycled after max_requests", "")
        if view.exit_code == 0:
            return Verdict("graceful", "stopped cleanly (TERM, HUP, TTOU or shutdown)", "")
        return Verdict("crash", f"exited with code {view.exit_code}", "stack: see gunicorn's traceback above")
    if signal == "SIGKILL":
        if oom:
            return Verdict("killed", "killed by the OOM killer (the cgroup's oom_kill count rose)",
                           "no stack: SIGKILL runs no Python code")
        return Verdict("killed", "killed by SIGKILL from outside gunicorn (OOM killer not confirmed by the "
                       "cgroup)", "no stack: SIGKILL runs no Python code")
    if signal is not None:
        if signal == "SIGTERM":
            return Verdict("graceful", "stopped by SIGTERM", "")
        return Verdict("signal", f"killed by {signal}", "no stack: the signal ended the process")
    code = exit_code if exit_code is not None else "unknown"
    return Verdict("crash", f"exited with code {code} without running gunicorn's exit path (os._exit?)",
                   "no stack: the process left without a Python exception")
