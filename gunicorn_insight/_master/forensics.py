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

import logging
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import _scoreboard as sb
from .._cgroup import memory_cgroup_dirs
from .._facts import EXPECTED, FATAL_SIGNALS, Round, Sink
from .._gunicorn import REAP_EXITED, REAP_SENT
from .._report import LOG, report
from .._runfiles import StatusFiles
from .drain import Drainer
from .lifecycle import CrashLoopWatch, EarlyDeath
from .pressure import read_keyed


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

    :meth:`poll` runs every round; the kills it finds are a budget that SIGKILLs may claim for CLAIM_WINDOW
    seconds (the kernel counts the kill before the victim is reaped and gunicorn logs the reap, so a poll can
    fall between the two; rounds can be 0.05 s apart, hence seconds, not rounds), never later: an OOM kill
    from hours ago is never blamed for today's ``kill -9``.
    """

    CLAIM_WINDOW = 2.0

    def __init__(
        self,
        proc_self_cgroup: str = "/proc/self/cgroup",
        cgroup_root: str = "/sys/fs/cgroup",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = _find_oom_file(proc_self_cgroup, cgroup_root)
        self._clock = clock
        self._claimable: deque[float] = deque()  # when each unclaimed kill was seen, oldest first
        self.last = self.read()
        if self.last is None:
            LOG.info(
                "gunicorn-insight: no oom_kill count readable in this process's memory cgroup (%s): a worker "
                "the OOM killer SIGKILLs is counted as cause=killed, not cause=oom",
                self.path or "no memory.events or memory.oom_control found",
            )

    def read(self) -> int | None:
        if self.path is None:
            return None
        return read_keyed(self.path).get("oom_kill")  # every round: a kept file (see _kernelfiles)

    def poll(self) -> None:
        """Kills since the previous poll become claimable; those unclaimed for CLAIM_WINDOW seconds expire."""
        count = self.read()
        before, self.last = self.last, count
        fresh = max(0, count - before) if count is not None and before is not None else 0
        now = self._clock()
        self._claimable.extend([now] * fresh)
        self._expire(now)

    def claim(self) -> bool:
        """Did the kernel OOM-kill something in our cgroup lately that no other exit has claimed?"""
        self._expire(self._clock())
        if self._claimable:
            self._claimable.popleft()
            return True
        return False

    def _expire(self, now: float) -> None:
        while self._claimable and now - self._claimable[0] > self.CLAIM_WINDOW:
            self._claimable.popleft()


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
        if signal.startswith(FATAL_SIGNALS):
            return Verdict(
                "signal",
                f"killed by {signal}",
                "stack: every thread's, written by faulthandler to the error log just before (Fatal Python error)",
            )
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
            "stack: every thread's, written by faulthandler to the error log just before (Fatal Python error: "
            "Aborted); see a slow-request report above if any",
        )
    return Verdict(
        "timeout_kill",
        "gunicorn timed it out (WORKER TIMEOUT), the abort handler never ran, then gunicorn sent SIGKILL",
        "no stack: stuck where Python code cannot run (C code, a "
        "blocked event loop), SIGKILL leaves no chance; see a slow-request report above if any",
    )


@dataclass(frozen=True, slots=True)
class Death:
    """A worker exit as child_exit saw it, kept until the next round judges its cause."""

    pid: int
    slot: int
    snapshot: bytes
    at: float
    aborted: bool
    shutdown: bool = False


class ExitReports:
    """Worker exits from ``child_exit`` to their exit line: queued there without a lock or a log call (it
    can run inside gunicorn 23's SIGCHLD handler), judged by the exporter's next round.

    Judging an exit classifies it, counts the requests it cut short, records it for ``status.json``, logs it
    when a human should know, lets every sink forget the dead process, and feeds the crash-loop watch.
    """

    def __init__(self, board: sb.Scoreboard, drainer: Drainer, status: StatusFiles, sinks: Sequence[Sink]) -> None:
        self._board = board
        self._drainer = drainer
        self._status = status
        self._sinks = sinks
        self._deaths: deque[Death] = deque()
        self.reaps = ReapWatcher()
        self._oom = OomCounter()
        self._crash_loop = CrashLoopWatch()

    def queue(self, death: Death) -> None:
        """Signal-handler safe: one deque append."""
        self._deaths.append(death)

    def queue_unreaped(self) -> None:
        """Exits gunicorn never passed to child_exit, found in the board when the master stops: a boot
        failure (gunicorn halts on exit code 3 or 4) and workers SIGKILLed when graceful_timeout ran out."""
        for view in self._board:
            if view.state == sb.FREE or not view.pid:
                continue
            snapshot = self._board.snapshot(view.index)
            self._board.release(view.index)
            known = bool(view.flags & sb.FLAG_BOOT_FAILED) or view.pid in self.reaps.exit_codes
            self.queue(Death(view.pid, view.index, snapshot, time.monotonic(), False, shutdown=not known))

    def judge(self, facts: Round) -> None:
        """Every exit queued since the last round: its cause counted in ``facts.exits``, and the crash-loop
        state in ``facts``."""
        self._oom.poll()
        while self._deaths:
            death = self._deaths.popleft()
            try:
                facts.exits[self._bury(death, facts)] += 1
                self._watch_crash_loop(facts)
            except Exception as error:
                report("reporting a worker exit", error)
        try:
            if self._crash_loop.tick(facts.at):
                LOG.warning(
                    "gunicorn-insight: crash loop over: fewer than %d early worker deaths in the last %.0fs",
                    self._crash_loop.count,
                    self._crash_loop.window,
                )
            facts.crash_loop = self._crash_loop.looping
        except Exception as error:
            report("watching for crash loops", error)

    def _bury(self, death: Death, facts: Round) -> str:
        """Classify one exit, count the requests it cut short, log it if it needs a human, tidy its files.
        Returns the cause."""
        if death.pid:
            for sink in self._sinks:
                sink.forget_process(death.pid)
        view = sb.parse_slot(death.slot, death.snapshot, self._board.entries)
        self._drainer.count_cut_short(death.slot, view.requests, death.at, facts)
        signal, exit_code = self.reaps.take(death.pid)
        verdict = classify(
            view,
            aborted=death.aborted,
            signal=signal,
            exit_code=exit_code,
            oom=signal == "SIGKILL" and not death.aborted and self._oom.claim(),
            shutdown=death.shutdown,
        )
        uptime = death.at - view.spawned if view.spawned else 0.0
        oldest = view.requests[0] if view.requests else None
        detail = verdict.detail + "".join(f"; {words}" for words in keepalive_words(view))
        self._status.record_exit(
            pid=death.pid,
            slot=death.slot,
            cause=verdict.cause,
            detail=detail,
            uptime=round(uptime, 3),
            served=view.served,
            rss=view.rss,
            request=None if oldest is None else f"{oldest.method} {oldest.path}",
            elapsed=None if oldest is None else round(death.at - oldest.started, 3),
        )
        # An expected exit is worth a line only when it left someone without an answer.
        if verdict.cause in EXPECTED and oldest is None and not view.keepalive_unanswered:
            return verdict.cause
        request = "none"
        if oldest is not None:
            others = len(view.requests) - 1 + view.overflow
            request = (
                f'"{oldest.method} {oldest.path}" client={oldest.client} '
                f"elapsed={death.at - oldest.started:.1f}s thread={oldest.thread}"
                + (f" more_in_flight={others}" if others else "")
            )
        LOG.log(
            logging.WARNING if verdict.cause in EXPECTED else logging.ERROR,
            'gunicorn-insight: worker exited pid=%s slot=%s cause=%s detail="%s" uptime=%.1fs served=%d rss=%s '
            "request=%s%s",
            death.pid,
            death.slot,
            verdict.cause,
            detail,
            uptime,
            view.served,
            _megabytes(view.rss),
            request,
            f' stack="{verdict.stack_note}"' if verdict.stack_note else "",
        )
        return verdict.cause

    def _watch_crash_loop(self, facts: Round) -> None:
        """After _bury: the exit it recorded joins the crash-loop window."""
        exit_ = self._status.exits[-1]
        death = EarlyDeath(facts.at, exit_.pid, exit_.slot, exit_.cause, exit_.detail, exit_.uptime)
        if not self._crash_loop.exited(death, expected=death.cause in EXPECTED):
            return
        facts.crash_loops += 1
        watch = self._crash_loop
        causes = Counter(early.cause for early in watch.deaths)
        LOG.error(
            "gunicorn-insight: crash loop: %d workers died within %.0fs of starting in the last %.0fs (%s); last: "
            'pid=%s slot=%s cause=%s detail="%s" uptime=%.1fs. gunicorn keeps replacing them, so the server '
            'serves little or nothing: fix the cause named in the "worker exited" lines',
            len(watch.deaths),
            watch.young,
            watch.window,
            " ".join(f"{cause}={count}" for cause, count in sorted(causes.items())),
            death.pid,
            death.slot,
            death.cause,
            death.detail,
            death.uptime,
        )


def keepalive_words(view: sb.SlotView) -> list[str]:
    """What the worker's exit did to its idle keep-alive connections (see _worker.keepalive); nothing when it
    held none."""
    closed, unanswered = view.keepalive_closed, view.keepalive_unanswered
    if not closed:
        return []
    connections = f"closed {closed} idle keep-alive connection{'' if closed == 1 else 's'}"
    if not unanswered:
        return [f"{connections}, none with a request waiting"]
    return [f"{connections}, {unanswered} with a request already sent (answered by no one: a proxy's 502)"]


def _megabytes(rss: int) -> str:
    return f"{rss / 1048576:.1f}MiB" if rss else "unknown"
