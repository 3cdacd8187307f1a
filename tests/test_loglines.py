"""gunicorn.log.* counting: the master's wrapper of gunicorn's logger object, the worker's lock-free count
into its slot, and the drain's increases. End to end: tests/integration/test_statsd_export.py."""

from __future__ import annotations

import threading
from typing import Any

from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._master.drain import Drainer
from gunicorn_insight._master.loglines import LogLineWatch
from gunicorn_insight._worker.loglines import log_line_counters


class FakeLogger:
    """The four methods gunicorn's statsd logger counts, plus one it does not."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def critical(self, msg: str, *args: Any) -> None:
        self.lines.append(msg % args)

    def error(self, msg: str, *args: Any) -> None:
        self.lines.append(msg % args)

    def warning(self, msg: str, *args: Any) -> None:
        self.lines.append(msg % args)

    def exception(self, msg: str, *args: Any) -> None:
        self.lines.append(msg % args)

    def info(self, msg: str, *args: Any) -> None:
        self.lines.append(msg % args)


def test_the_master_counts_each_level_once_and_still_logs() -> None:
    """critical/error/warning/exception are counted, info is not; a second watch does not count twice."""
    log, watch = FakeLogger(), LogLineWatch()
    watch.watch(log)
    watch.watch(log)
    log.warning("w %s", 1)
    log.warning("w %s", 2)
    log.error("e")
    log.exception("x")
    log.critical("c")
    log.info("i")
    assert log.lines == ["w 1", "w 2", "e", "x", "c", "i"]
    assert watch.take() == {"warning": 2, "error": 1, "exception": 1, "critical": 1}
    assert watch.take() == {}


def test_a_worker_counts_into_its_slot_from_many_threads_exactly(board: sb.Scoreboard) -> None:
    """8 threads x 2000 lines: the slot's counters are exact (no lost update), other slots untouched."""
    log, watch = FakeLogger(), LogLineWatch()
    watch.watch(log)
    log.warning("logged in the master before the fork")
    watch.in_worker(log_line_counters(board.buffer, board.offset(2)).count)
    assert watch.take() == {}  # the master's queue is not the worker's to send

    def many() -> None:
        for _ in range(2000):
            log.warning("w")
            log.error("e")

    threads = [threading.Thread(target=many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert board.log_lines(2) == (0, 16000, 16000, 0)
    assert board.read(2).log_lines == (0, 16000, 16000, 0)
    assert board.log_lines(1) == (0, 0, 0, 0)


def test_a_line_logged_while_another_publishes_is_published_by_the_holder(board: sb.Scoreboard) -> None:
    """A caller that finds the publishing lock taken (a signal handler interrupting a count) does not wait;
    its line is published by the next count that gets the lock."""
    counter = log_line_counters(board.buffer, board.offset(0))
    counter._publishing.acquire()
    counter.count(0)  # would deadlock if it waited
    assert board.log_lines(0) == (0, 0, 0, 0)
    counter._publishing.release()
    counter.count(3)
    assert board.log_lines(0) == (1, 0, 0, 1)


def test_the_drain_adds_increases_across_workers_and_ignores_a_smaller_read(board: sb.Scoreboard) -> None:
    """Slot counters outlive workers (assign keeps them); the drain reports what grew since its last round."""
    drainer = Drainer(board)
    counter = log_line_counters(board.buffer, board.offset(1))
    counter.count(2)
    counter.count(2)
    assert drainer.collect().log_lines == {"warning": 2}
    board.assign(1, 0.0)  # a new worker in the slot: its counts go on from the slot's
    log_line_counters(board.buffer, board.offset(1)).count(1)
    assert board.log_lines(1) == (0, 1, 2, 0)
    assert drainer.collect().log_lines == {"error": 1}
    sb.store(board.buffer, board.offset(1) + sb.OFF_LOG_LINES + 16, sb.COUNTER, 1)  # a torn, smaller read
    assert drainer.collect().log_lines == {}
