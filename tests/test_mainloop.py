"""Whether gunicorn's master loop goes round: where the main thread is, judged round by round."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest

from gunicorn_insight._master.mainloop import MainLoopWatch, waiting

# A stand-in for gunicorn's arbiter module: its wait, reached through helpers as gunicorn 26's queue.get is.
ARBITER_SOURCE = """
def sleep(release):
    release.wait()

def wait_for_signals(release):
    return _queue_get(release)

def _queue_get(release):
    return _condition_wait(release)

def _condition_wait(release):
    release.wait()
"""


def _arbiter() -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(ARBITER_SOURCE, os.path.join("site-packages", "gunicorn", "arbiter.py"), "exec"), namespace)
    return namespace


def _in_event_wait(frame: FrameType | None) -> bool:
    return frame is not None and frame.f_code.co_name == "wait" and frame.f_code.co_filename == threading.__file__


def blocking_hook(release: threading.Event) -> None:
    release.wait()


@pytest.fixture
def thread_in() -> Iterator[Callable[[Callable[[threading.Event], Any]], int]]:
    """Runs a function in a thread until the test ends; returns the thread's ident once it is inside."""
    release = threading.Event()
    threads: list[threading.Thread] = []

    def start(function: Callable[[threading.Event], Any]) -> int:
        thread = threading.Thread(target=function, args=(release,), daemon=True)
        thread.start()
        threads.append(thread)
        assert thread.ident is not None
        deadline = time.monotonic() + 5
        while not _in_event_wait(sys._current_frames().get(thread.ident)):
            assert time.monotonic() < deadline, f"{function.__name__} never reached its wait"
            time.sleep(0.01)
        return thread.ident

    yield start
    release.set()
    for thread in threads:
        thread.join(5)


def frame_of(ident: int) -> FrameType:
    return sys._current_frames()[ident]


def test_the_arbiters_wait_is_recognised_however_deep_the_wait_sits(
    thread_in: Callable[[Callable[[threading.Event], Any]], int],
) -> None:
    """Arbiter.sleep (gunicorn <= 25) and wait_for_signals through queue.get (26+) are waiting; a hook is not."""
    arbiter = _arbiter()
    assert waiting(frame_of(thread_in(arbiter["sleep"])))
    assert waiting(frame_of(thread_in(arbiter["wait_for_signals"])))
    assert not waiting(frame_of(thread_in(blocking_hook)))
    assert not waiting(None)


def test_a_blocked_loop_is_reported_once_with_its_stack_and_its_end(
    thread_in: Callable[[Callable[[threading.Event], Any]], int],
) -> None:
    """Unknown (None) until the wait is seen; then 0; outside it for 5 rounds and 5 s: one report naming the
    blocking call; back in the wait: one report of how long it lasted."""
    idle, blocked = thread_in(_arbiter()["sleep"]), thread_in(blocking_hook)
    watch = MainLoopWatch(main_thread=1, report_after=5.0)
    assert watch.observe(0.0, {1: frame_of(blocked)}) == (None, None)
    assert watch.observe(1.0, {1: frame_of(idle)}) == (0.0, None)
    changes = []
    for now in (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0):
        stuck, change = watch.observe(now, {1: frame_of(blocked)})
        assert stuck == now - 1.0
        changes.append(change)
    assert changes[:4] == [None] * 4
    found = changes[4]
    assert found is not None
    assert (found.blocked, found.seconds) == (True, 5.0)
    assert "in blocking_hook" in found.stack
    assert changes[5:] == [None, None]
    stuck, back = watch.observe(9.5, {1: frame_of(idle)})
    assert stuck == 0.0
    assert back is not None
    assert (back.blocked, back.seconds) == (False, 8.5)
