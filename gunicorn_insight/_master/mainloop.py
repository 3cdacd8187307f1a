"""Whether gunicorn's own master loop still goes round, judged by the exporter thread each round.

gunicorn's arbiter runs one loop in the main thread: wait up to a second for a signal, then kill the workers
past their timeout and replace the dead ones. While something blocks that loop (a server hook doing slow I/O,
a disk that stalls, a lock), no signal is handled and no worker is killed or replaced, and gunicorn logs
nothing about it. Each round the exporter's thread looks at where the main thread is: inside the arbiter's
wait (``Arbiter.sleep`` up to gunicorn 25, ``Arbiter.wait_for_signals`` since) means the loop is idle and
well. Seen elsewhere round after round for ``report_after`` seconds, the loop is blocked, and the main
thread's stack says where.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass
from types import FrameType

WAITS = frozenset({"sleep", "wait_for_signals"})
"""The arbiter's methods that wait for signals (the loop's idle place)."""
ARBITER_FILE = os.path.join("gunicorn", "arbiter.py")
_DEPTH = 6  # frames above the innermost searched for the wait: queue.get and threading's wait sit over it
_MIN_SAMPLES = 5  # rounds in a row outside the wait before a blocked loop is reported
_MAX_FRAMES = 30


def waiting(frame: FrameType | None) -> bool:
    """The main thread waits for signals in gunicorn's arbiter (innermost frame, or a few frames above it)."""
    for _ in range(_DEPTH):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name in WAITS and code.co_filename.endswith(ARBITER_FILE):
            return True
        frame = frame.f_back
    return False


@dataclass(frozen=True, slots=True)
class LoopChange:
    blocked: bool
    """True: the loop has just been found blocked; False: the blocked loop went round again."""
    seconds: float
    """How long it has been blocked (when found), or was (when it went round)."""
    stack: str = ""
    """The main thread's stack when found blocked, most recent call last."""


class MainLoopWatch:
    """Samples the main thread once per round. Until the wait has been seen once, nothing is known (a gunicorn
    whose wait is named otherwise, or a loop blocked from the start): ``stuck_for`` is None then, never 0."""

    def __init__(self, main_thread: int, report_after: float = 5.0) -> None:
        self._main_thread = main_thread
        self.report_after = report_after
        self.recognised = False
        self._last_waiting = 0.0
        self._outside = 0
        self.blocked = False

    def observe(self, now: float, frames: dict[int, FrameType]) -> tuple[float | None, LoopChange | None]:
        """(seconds since the loop was last seen waiting, or None while unknown; a change to report)."""
        frame = frames.get(self._main_thread)
        if waiting(frame):
            self.recognised = True
            change = LoopChange(blocked=False, seconds=now - self._last_waiting) if self.blocked else None
            self._last_waiting, self._outside, self.blocked = now, 0, False
            return 0.0, change
        if not self.recognised:
            return None, None
        self._outside += 1
        stuck = now - self._last_waiting
        if not self.blocked and self._outside >= _MIN_SAMPLES and stuck >= self.report_after:
            self.blocked = True
            return stuck, LoopChange(blocked=True, seconds=stuck, stack=format_stack(frame))
        return stuck, None


def format_stack(frame: FrameType | None) -> str:
    if frame is None:
        return "  (no Python frame: the main thread is outside Python)\n"
    return "".join(traceback.extract_stack(frame, limit=_MAX_FRAMES).format())
