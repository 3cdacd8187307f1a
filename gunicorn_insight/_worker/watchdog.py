"""The worker's monitor thread: slow requests with their stacks, a blocked asyncio loop, live connections.

gunicorn never times out a stuck gthread request (the main loop keeps the heartbeat fresh), and a sync
worker stuck in C code is SIGKILLed before any handler runs. A thread of our own sees both in time: every
tick it looks at the requests in flight and, for each that has run past ``slow_request_timeout``, logs the
request and the stack of the thread (or greenlet) serving it, once, like PHP-FPM's slowlog. Nothing is
killed. With nothing slow a tick costs one dict copy.

On demand it answers ``gunicorn-insight stacks`` (and the master, when connections queue while no worker is
in a request): the asker bumps the slot's STACKS_ASKED field in the scoreboard, and the next tick writes the
stack of every request in flight, and of the worker's main thread, to ``stacks-<slot>.json`` in the
run directory (mkstemp, then rename: a reader never sees half a file). No signal is involved, so gunicorn
never sees the question, and a worker that cannot run this thread (stuck in C code holding the GIL) simply
does not answer: the command names it.

It also writes the stack for ``worker_abort``: that runs inside a signal handler, so it uses only
``os.write`` and ``faulthandler`` (both async-signal-safe) on the error log's file descriptor.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

from .._facts import FATAL_SIGNALS
from .._report import LOG, report
from .._runfiles import STACKS_FILE, STACKS_FORMAT, write_json
from .recorder import RequestRecorder

_MAX_TICK = 1.0
_MAX_FRAMES = 100  # the innermost ones: where a request is stuck matters more than how it got there


def write_abort_stack(fd: int, recorder: RequestRecorder | None, pid: int) -> None:
    """Signal-handler safe: one os.write for the header, faulthandler for the frames. No locks, no logging."""
    requests = list(recorder.requests_in_flight().values()) if recorder is not None else []
    serving = ", ".join(f"{request[3]} {request[4]}" for request in requests) or "no request"
    header = f"gunicorn-insight: worker pid={pid} aborted (WORKER TIMEOUT) while serving {serving}; stack:\n"
    os.write(fd, header.encode("utf-8", "replace"))
    faulthandler.dump_traceback(file=fd, all_threads=True)


class Monitor:
    """One per worker process; runs :meth:`tick` every ``interval`` seconds on a real OS thread."""

    def __init__(
        self,
        recorder: RequestRecorder,
        worker: Any,
        slow_after: float,
        *,
        greenlets: str | None = None,
        loop: Any = None,
        stacks_dir: str | None = None,
    ) -> None:
        self._recorder = recorder
        self._stacks_dir = stacks_dir
        # Questions asked before this worker existed were for its predecessor: only newer ones are answered.
        self._stacks_answered = recorder.stacks_asked() if stacks_dir is not None else 0
        self._worker = worker
        self._slow_after = slow_after
        self._greenlets = greenlets
        self._loop = loop
        self._connections: Callable[[], int] | None = None
        self._reported: set[int] = set()
        self._loop_beat = time.monotonic()
        self._loop_blocked_reported = False
        self._main_thread = threading.main_thread().ident or 0
        self.interval = min(_MAX_TICK, slow_after / 4) if slow_after > 0 else _MAX_TICK

    def start(self) -> None:
        greenlets = self._greenlets
        start_thread, sleep = _real_threads(greenlets) if greenlets else (_start_daemon, time.sleep)
        if greenlets:
            self._main_thread = _real_get_ident(greenlets)

        def run() -> None:
            while True:
                sleep(self.interval)
                try:
                    self.tick()
                except Exception as error:
                    report("the worker's watchdog", error)

        start_thread(run)

    def count_connections(self, connections: Callable[[], int]) -> None:
        """Copy ``connections()`` into the worker's ``nr_conns`` every tick (a worker class that does not keep
        it: uvicorn's)."""
        self._connections = connections

    def tick(self) -> None:
        if self._connections is not None:
            self._worker.nr_conns = self._connections()
        self._recorder.refresh_connections()
        if self._stacks_dir is not None:
            asked = self._recorder.stacks_asked()
            if asked != self._stacks_answered:
                self._stacks_answered = asked
                self._answer_stacks(asked)
        if self._slow_after <= 0:
            return
        now = time.monotonic()
        in_flight = self._recorder.requests_in_flight()
        self._reported &= in_flight.keys()
        for key, (start, _entry, current, method, path, _cpu) in in_flight.items():
            if key not in self._reported and now - start >= self._slow_after:
                self._reported.add(key)
                self._recorder.count_slow()
                self._report_slow(method, path, now - start, current)
        if self._loop is not None:
            self._watch_loop(now)

    def _answer_stacks(self, asked: int) -> None:
        """Write every request's stack for ``gunicorn-insight stacks``; a file whose ``asked`` is the question."""
        assert self._stacks_dir is not None
        requests = []
        for start, _entry, current, method, path, _cpu in self._recorder.requests_in_flight().values():
            where, summary, note = self._frames_of(current)
            requests.append(
                {
                    "method": method,
                    "path": path,
                    "started": start,
                    "where": where,
                    "thread": current if type(current) is int else id(current),
                    "stack": _frames_list(summary),
                    "note": note,
                }
            )
        main_summary, main_note = _summary(sys._current_frames().get(self._main_thread))
        answer = {
            "format": STACKS_FORMAT,
            "asked": asked,
            "pid": os.getpid(),
            "slot": self._recorder.slot,
            "monotonic": time.monotonic(),
            "requests": requests,
            # What the worker's own loop is doing (accepting, or blocked outside any request): the master asks
            # for it when connections queue on a listener while no worker is in a request.
            "main_thread": {"stack": _frames_list(main_summary), "note": main_note},
        }
        write_json(os.path.join(self._stacks_dir, STACKS_FILE.format(slot=self._recorder.slot)), answer)

    def _report_slow(self, method: str, path: str, elapsed: float, current: Any) -> None:
        where, stack = self._stack_of(current)
        LOG.warning(
            'gunicorn-insight: slow request pid=%s slot=%s request="%s %s" elapsed=%.1fs %s (not killed; '
            "threshold slow_request_timeout=%gs); stack, most recent call last:\n%s",
            os.getpid(),
            self._recorder.slot,
            method,
            path,
            elapsed,
            where,
            self._slow_after,
            stack,
        )

    def watch_loop(self, loop: Any) -> None:
        """Watch this event loop from now on (uvicorn's worker creates it only when it starts serving)."""
        self._loop_beat = time.monotonic()
        self._loop = loop

    def _stack_of(self, current: Any) -> tuple[str, str]:
        where, summary, note = self._frames_of(current)
        return where, "".join(summary.format()) if summary else f"  ({note})\n"

    def _frames_of(self, current: Any) -> tuple[str, traceback.StackSummary | None, str | None]:
        """Where the request runs, its stack (outermost first), or None and why there is none."""
        frames = sys._current_frames()
        if isinstance(current, asyncio.Task):
            return (f"task={current.get_name()}", *self._task_stack(current, frames))
        if self._loop is not None:
            return "task=asyncio", None, "an asyncio task has no thread of its own; a blocked loop is reported apart"
        if self._greenlets:
            frame = getattr(current, "gr_frame", None)
            if frame is None:  # the greenlet is the one running: its frames are the main thread's
                frame = frames.get(self._main_thread)
            return (f"greenlet={id(current):#x}", *_summary(frame))
        return (f"thread={current}", *_summary(frames.get(current)))

    def _task_stack(
        self, task: asyncio.Task[Any], frames: dict[int, FrameType]
    ) -> tuple[traceback.StackSummary | None, str | None]:
        """The running task's stack is the loop thread's; a suspended one's is its chain of awaits."""
        loop = self._loop
        if loop is not None and asyncio.current_task(loop) is task:
            return _summary(frames.get(self._main_thread))
        try:
            awaiting = _awaits(task.get_coro())
        except Exception:  # the task moved on while we looked: read from another thread, without a lock
            awaiting = []
        if not awaiting:
            return None, "the task has no Python frame now: finished, or not started"
        return traceback.StackSummary.extract((frame, frame.f_lineno) for frame in awaiting[-_MAX_FRAMES:]), None

    def _watch_loop(self, now: float) -> None:
        loop = self._loop
        if loop.is_closed():
            return
        loop.call_soon_threadsafe(self._beat)
        blocked_for = now - self._loop_beat
        if blocked_for < self._slow_after:
            self._loop_blocked_reported = False
        elif not self._loop_blocked_reported:
            self._loop_blocked_reported = True
            LOG.warning(
                "gunicorn-insight: event loop blocked pid=%s slot=%s for %.1fs (no callback ran; every request "
                "of this worker waits); loop thread stack, most recent call last:\n%s",
                os.getpid(),
                self._recorder.slot,
                blocked_for,
                _format(sys._current_frames().get(self._main_thread)),
            )

    def _beat(self) -> None:
        self._loop_beat = time.monotonic()


def _awaits(coro: Any) -> list[FrameType]:
    """A suspended coroutine's frames, outermost first, following what each awaits (Task.get_stack stops at the
    task's own coroutine)."""
    frames: list[FrameType] = []
    for _ in range(200):
        if coro is None or len(frames) >= 100:
            break
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            frames.append(frame)
        elif not hasattr(coro, "cr_await"):
            break  # a frameless awaitable that says nothing of what it awaits (the layer's Serving does)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


_NO_FRAME = "no Python frame: the thread has finished or is outside Python"


def _summary(frame: FrameType | None) -> tuple[traceback.StackSummary | None, str | None]:
    if frame is None:
        return None, _NO_FRAME
    return traceback.extract_stack(frame, limit=_MAX_FRAMES), None


def _frames_list(summary: traceback.StackSummary | None) -> list[dict[str, Any]]:
    return [
        {"file": frame.filename, "line": frame.lineno, "function": frame.name, "code": frame.line}
        for frame in summary or ()
    ]


def _format(frame: FrameType | None) -> str:
    summary, note = _summary(frame)
    return "".join(summary.format()) if summary else f"  ({note})\n"


def _start_daemon(target: Callable[[], None]) -> None:
    threading.Thread(target=target, name="gunicorn-insight-watchdog", daemon=True).start()


def _real_threads(library: str) -> tuple[Callable[[Callable[[], None]], None], Callable[[float], None]]:
    """gevent and eventlet patch threading into greenlets; a watchdog must be a real thread to see a stuck hub
    (and a green watchdog's own frames would pass for the request's)."""
    start_new_thread = _original(library, "_thread", "start_new_thread")
    sleep = _original(library, "time", "sleep")
    return (lambda target: start_new_thread(target, ())), sleep


def _real_get_ident(library: str) -> int:
    return int(_original(library, "_thread", "get_ident")())


def _original(library: str, module: str, name: str) -> Any:
    """The function as it was before ``library`` ("gevent" or "eventlet") monkey-patched ``module``."""
    if library == "eventlet":
        from eventlet import patcher

        return getattr(patcher.original(module), name)
    from gevent import monkey

    return monkey.get_original(module, name)


def dump_stacks_on_fatal_signals(fd: int) -> list[str]:
    """Have faulthandler write every thread's Python stack to ``fd`` (the error log) when the worker dies of a
    fatal signal, for the signals nobody else handles. A handler already installed from Python keeps its
    signal (gunicorn's SIGABRT handler, which runs worker_abort): faulthandler would take it, dump a misleading
    "Fatal Python error" for a timeout and run it only afterwards. A C handler (getsignal says None) is
    called by faulthandler after its dump. Returns the signals now covered.

    faulthandler writes to a duplicate of ``fd``: gunicorn reopens its log files on USR1, and a dump must go
    to the (rotated) log, never to whatever reuses the old descriptor number."""
    import signal

    numbers = [getattr(signal, name) for name in FATAL_SIGNALS if hasattr(signal, name)]
    before = {number: signal.getsignal(number) for number in numbers}
    faulthandler.enable(file=os.dup(fd), all_threads=True)
    covered = []
    for number, handler in before.items():
        if callable(handler) or handler == signal.SIG_IGN:
            signal.signal(number, handler)  # put the owner's handler back, in front of faulthandler's
        else:
            covered.append(signal.Signals(number).name)
    return covered
