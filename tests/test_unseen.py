"""AcceptWatch (gunicorn_insight._worker.unseen) with stand-in listeners and recorder: when it marks, when not."""

from __future__ import annotations

import socket
from typing import Any

from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._worker.unseen import AFTER_SECONDS, ENOUGH_CONNECTIONS, AcceptWatch


class Listener:
    """Like gunicorn's listener object: takes attributes of its own, accepts through a method of its class."""

    def __init__(self) -> None:
        self.accepted = 0

    def accept(self) -> tuple[str, int]:
        self.accepted += 1
        return ("connection", self.accepted)


class Recorder:
    def __init__(self) -> None:
        self.recorded = False
        self.marks: list[int] = []

    def recorded_any(self) -> bool:
        return self.recorded

    def mark(self, flag: int) -> None:
        self.marks.append(flag)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def watch(recorder: Recorder, clock: Clock) -> AcceptWatch:
    fake: Any = recorder  # the two methods AcceptWatch calls, without a scoreboard
    return AcceptWatch(fake, clock)


def test_connections_without_a_request_mark_the_slot_once_then_the_listener_is_its_own() -> None:
    """Enough accepts over long enough with nothing recorded: one mark, and accept is the class's again."""
    recorder, clock, listener = Recorder(), Clock(), Listener()
    watcher = watch(recorder, clock)
    assert watcher.install([listener]) == 1
    for _ in range(ENOUGH_CONNECTIONS):
        assert listener.accept()[0] == "connection"  # the wrapper hands back what accept returned
    assert recorder.marks == []  # enough connections, but all within the first instant
    clock.now += AFTER_SECONDS
    listener.accept()
    assert recorder.marks == [sb.FLAG_REQUESTS_UNSEEN]
    assert "accept" not in vars(listener)
    listener.accept()
    assert recorder.marks == [sb.FLAG_REQUESTS_UNSEEN]
    assert listener.accepted == ENOUGH_CONNECTIONS + 2


def test_a_recorded_request_takes_the_wrapper_off_without_a_mark() -> None:
    """A class that calls the hooks pays for one or two wrapped accepts, and is never marked."""
    recorder, clock, listener = Recorder(), Clock(), Listener()
    watch(recorder, clock).install([listener])
    listener.accept()
    recorder.recorded = True
    listener.accept()
    assert "accept" not in vars(listener)
    clock.now += AFTER_SECONDS
    for _ in range(2 * ENOUGH_CONNECTIONS):
        listener.accept()
    assert recorder.marks == []


def test_a_listener_that_takes_no_attribute_is_left_alone() -> None:
    """A plain socket (slots, no instance attributes) cannot be wrapped: nothing is counted, nothing breaks."""
    with socket.socket() as plain:
        assert watch(Recorder(), Clock()).install([plain]) == 0
