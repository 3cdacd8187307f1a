"""The master's drain: one Round of facts per call, the single source for every exporter."""

from __future__ import annotations

import math
from itertools import chain

from fakes import FakeRequest, FakeResponse, finish, start

from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._facts import NO_RESPONSE, status_label
from gunicorn_insight._master.drain import Drainer
from gunicorn_insight._worker.recorder import RequestRecorder


class Worker:
    pass


def serve(rec: RequestRecorder, count: int, method: str = "GET", status: str = "200 OK") -> None:
    for _ in range(count):
        req = FakeRequest(method)
        start(rec, req)
        finish(rec, req, {}, FakeResponse(status))


def test_counts_each_request_once(board: sb.Scoreboard) -> None:
    """Requests are counted by (method, status) once: a second collect returns only new ones."""
    drainer = Drainer(board)
    board.assign(0, 0.0)
    rec = RequestRecorder(board, 0, Worker())
    serve(rec, 3)
    serve(rec, 2, "POST", "201 Created")
    first = drainer.collect()
    assert first.requests == {("GET", 200, ""): 3, ("POST", 201, ""): 2}
    assert len(first.durations["GET", ""]) == 3
    serve(rec, 1)
    assert drainer.collect().requests == {("GET", 200, ""): 1}


def test_requests_of_a_dead_worker_are_not_lost(board: sb.Scoreboard) -> None:
    """Records written by a worker that died before the next round are still read after its replacement."""
    drainer = Drainer(board)
    board.assign(0, 0.0)
    serve(RequestRecorder(board, 0, Worker()), 2)
    board.release(0)
    board.assign(0, 0.0)
    serve(RequestRecorder(board, 0, Worker()), 1)
    assert drainer.collect().total_requests == 3


def test_a_free_slot_is_read_once_freed_and_again_once_reassigned(board: sb.Scoreboard) -> None:
    """A slot freed before the round is drained then; after it is left unread, a new worker's counts still come."""
    drainer = Drainer(board)
    board.assign(0, 0.0)
    serve(RequestRecorder(board, 0, Worker()), 2)
    board.release(0)
    assert drainer.collect().total_requests == 2
    assert drainer.collect().total_requests == 0
    board.assign(0, 0.0)
    rec = RequestRecorder(board, 0, Worker())
    serve(rec, 3)
    sb.store(board.buffer, board.offset(0) + sb.OFF_SLOW, sb.SLOW, board.slow(0) + 1)
    board.release(0)
    facts = drainer.collect()
    assert (facts.total_requests, facts.slow) == (3, 1)


def test_lapped_ring_is_counted_as_lost(board: sb.Scoreboard) -> None:
    """If more records arrive than the ring holds between rounds, the excess is reported, not invented."""
    drainer = Drainer(board)
    board.assign(0, 0.0)
    serve(RequestRecorder(board, 0, Worker()), 11)  # ring of 8
    facts = drainer.collect()
    assert (facts.total_requests, facts.lost) == (8, 3)


def test_gauges_track_live_slots_and_zero_departed_ones(board: sb.Scoreboard) -> None:
    """Workers and in-flight come from live slots; a slot that emptied reports 0 connections, not its last value."""
    drainer = Drainer(board)
    board.assign(0, 0.0)
    board.assign(1, 0.0)
    rec = RequestRecorder(board, 1, Worker())
    start(rec, FakeRequest())
    facts = drainer.collect()
    assert (facts.workers, facts.in_flight, facts.connections) == (2, 1, {0: 0, 1: 1})
    board.release(1)
    facts = drainer.collect()
    assert (facts.workers, facts.in_flight, facts.connections) == (1, 0, {0: 0, 1: 0})


def test_durations_by_status_for_otlp_match_the_counts(board: sb.Scoreboard) -> None:
    """by_status splits the same durations by (method, status, route); off (the default) it stays empty."""
    drainer = Drainer(board, by_status=True)
    board.assign(0, 0.0)
    rec = RequestRecorder(board, 0, Worker())
    serve(rec, 3)
    facts = drainer.collect()
    assert {key: len(values) for key, values in facts.status_durations.items()} == {("GET", 200, ""): 3}
    serve(rec, 2, "GET", "404 Not Found")
    serve(rec, 1)
    serve(rec, 4, "POST", "201 Created")
    facts = drainer.collect()
    assert {key: len(values) for key, values in facts.status_durations.items()} == dict(facts.requests)
    assert sorted(chain.from_iterable(facts.status_durations.values())) == sorted(
        chain.from_iterable(facts.durations.values())
    )
    without = Drainer(board)
    serve(rec, 1)
    facts = without.collect()
    assert (facts.total_requests, facts.status_durations) == (1, {})


def test_torn_head_is_ignored_not_recounted_or_lost(board: sb.Scoreboard) -> None:
    """A head read half-written (0, or fewer low bytes) never moves the cursor back: nothing recounted, none lost."""
    drainer = Drainer(board)
    board.assign(0, 0.0)
    rec = RequestRecorder(board, 0, Worker())
    serve(rec, 5)
    assert drainer.collect().total_requests == 5
    head_at = board.offset(0) + sb.OFF_HEAD
    published = bytes(board.buffer[head_at : head_at + 8])
    for torn in (0, 3):  # the zero-fill pack_into makes, and a value behind the cursor
        board.buffer[head_at : head_at + 8] = torn.to_bytes(8, "little")
        facts = drainer.collect()
        assert (facts.total_requests, facts.lost) == (0, 0)
    board.buffer[head_at : head_at + 8] = published
    serve(rec, 2)
    facts = drainer.collect()
    assert (facts.total_requests, facts.lost) == (2, 0)


def test_drained_grows_by_the_requests_finished_and_never_by_a_torn_head(board: sb.Scoreboard) -> None:
    """What the stall watches compare round to round: every slot's records read so far, unmoved by a torn
    head."""
    drainer = Drainer(board)
    board.assign(0, 0.0)
    board.assign(1, 0.0)
    serve(RequestRecorder(board, 0, Worker()), 3)
    serve(RequestRecorder(board, 1, Worker()), 2)
    drainer.collect()
    assert drainer.drained() == 5
    head_at = board.offset(0) + sb.OFF_HEAD
    board.buffer[head_at : head_at + 8] = (0).to_bytes(8, "little")
    drainer.collect()
    assert drainer.drained() == 5


def test_torn_slow_count_is_ignored(board: sb.Scoreboard) -> None:
    """A slow count read as 0 mid-write is not a negative round, and the next real count is not added twice."""
    drainer = Drainer(board)
    board.assign(0, 0.0)
    rec = RequestRecorder(board, 0, Worker())
    rec.count_slow()
    rec.count_slow()
    assert drainer.collect().slow == 2
    slow_at = board.offset(0) + sb.OFF_SLOW
    board.buffer[slow_at : slow_at + 4] = bytes(4)
    assert drainer.collect().slow == 0
    board.buffer[slow_at : slow_at + 4] = (3).to_bytes(4, "little")
    assert drainer.collect().slow == 1


def test_requests_a_worker_died_under_are_counted_once_as_aborted(board: sb.Scoreboard) -> None:
    """Entries left in a dead worker's snapshot count once, status NO_RESPONSE, duration up to the death;
    one post_request already counted (a signal handler had run) is not counted again."""
    drainer = Drainer(board)
    board.assign(0, 0.0)
    rec = RequestRecorder(board, 0, Worker())
    serve(rec, 2)
    killed, aborted = FakeRequest("POST"), FakeRequest("GET")
    start(rec, killed)
    start(rec, aborted)
    rec.mark(sb.FLAG_ABORT_HANDLER)  # worker_abort ran; gunicorn answers 500 and post_request counts it
    finish(rec, aborted, {}, FakeResponse(None))
    view = board.read(0)
    (started,) = [request.started for request in view.requests if request.method == "POST"]
    facts = drainer.collect()
    assert drainer.count_cut_short(0, view.requests, started + 31.5, facts) == 1
    assert facts.requests == {("GET", 200, ""): 2, ("GET", 500, ""): 1, ("POST", NO_RESPONSE, ""): 1}
    assert facts.durations["POST", ""] == [31.5]
    assert status_label(NO_RESPONSE) == "aborted"


def test_client_closed_requests_are_counted_apart_and_with_the_rest(board: sb.Scoreboard) -> None:
    """A record marked client closed counts in requests and durations as usual, and in client_closed."""
    drainer = Drainer(board)
    board.assign(0, 0.0)
    rec = RequestRecorder(board, 0, Worker())
    serve(rec, 2)
    base = board.ring_offset(0)
    for n in range(2, 5):  # three more records, the way post_request writes them, two of them hang-ups
        outcome = sb.RECORD_CLIENT_CLOSED if n < 4 else 0
        sb.RING.pack_into(board.buffer, base + n * sb.RING_SIZE, 0.5, sb.NO_QUEUE_TIME, 200, 0, 0, outcome, 0.1)
    sb.store(board.buffer, board.offset(0) + sb.OFF_HEAD, sb.HEAD_CONNS, 5, 0)
    facts = drainer.collect()
    assert facts.requests == {("GET", 200, ""): 5}
    assert facts.client_closed == {("GET", ""): 2}
    assert len(facts.durations["GET", ""]) == 5


def test_request_cpu_is_summed_per_request_or_shared_from_the_worker(board: sb.Scoreboard) -> None:
    """Records carrying CPU are summed by (method, status, route); NaN ones share the slot's CPU by duration."""
    drainer = Drainer(board)
    board.assign(0, 0.0)
    base = board.ring_offset(0)
    for n, (duration, status, cpu) in enumerate([(0.5, 200, 0.4), (0.5, 200, 0.1), (1.0, 500, 0.25)]):
        sb.RING.pack_into(board.buffer, base + n * sb.RING_SIZE, duration, sb.NO_QUEUE_TIME, status, 0, 0, 0, cpu)
    sb.store(board.buffer, board.offset(0) + sb.OFF_HEAD, sb.HEAD_CONNS, 3, 0)
    assert drainer.collect().request_cpu == {("GET", 200, ""): 0.5, ("GET", 500, ""): 0.25}

    worker_cpu = iter([10.0, 10.9])  # the worker's utime + stime at two rounds, idle at the first
    drainer._cpu = lambda index, pid: next(worker_cpu) if index == 1 else 0.0  # type: ignore[method-assign]
    board.assign(1, 0.0)
    sb.store(board.buffer, board.offset(1) + sb.OFF_STATE, sb.STATE, sb.READY)
    drainer.collect()  # the first reading of the slot's CPU
    base = board.ring_offset(1)
    for n, (duration, method) in enumerate([(0.2, 0), (0.1, 1)]):
        sb.RING.pack_into(
            board.buffer, base + n * sb.RING_SIZE, duration, sb.NO_QUEUE_TIME, 200, method, 0, 0, math.nan
        )
    sb.store(board.buffer, board.offset(1) + sb.OFF_HEAD, sb.HEAD_CONNS, 2, 0)
    shared = drainer.collect().request_cpu
    assert shared.keys() == {("GET", 200, ""), ("POST", 200, "")}
    assert abs(shared["GET", 200, ""] - 0.6) < 1e-9
    assert abs(shared["POST", 200, ""] - 0.3) < 1e-9


def test_worker_cpu_waits_for_the_requests_in_flight(board: sb.Scoreboard) -> None:
    """Rounds in which requests run and none finishes keep the worker's CPU for them; idle rounds drop it."""
    drainer = Drainer(board)
    worker_cpu = iter([1.0, 1.5, 3.0, 4.0, 4.2])
    drainer._cpu = lambda index, pid: next(worker_cpu) if index == 0 else 0.0  # type: ignore[method-assign]
    board.assign(0, 0.0)
    rec = RequestRecorder(board, 0, Worker())
    drainer.collect()  # idle: 1.0
    req = FakeRequest()
    start(rec, req)
    drainer.collect()  # in flight, none finished: 1.5 stays for it
    drainer.collect()  # still running: 3.0
    finish(rec, req, {}, FakeResponse("200 OK"))
    sb.RING.pack_into(board.buffer, board.ring_offset(0), 2.0, sb.NO_QUEUE_TIME, 200, 0, 0, 0, math.nan)
    assert drainer.collect().request_cpu == {("GET", 200, ""): 3.0}  # 4.0 - 1.0
    assert drainer.collect().request_cpu == {}  # idle again: 0.2 is nobody's


def test_a_ready_workers_cpu_counts_from_when_it_became_ready(board: sb.Scoreboard) -> None:
    """The first round may come while a request already runs: its share starts at the worker's ready moment
    (the CPU it recorded then), not at that round, and the boot's CPU is no request's."""
    drainer = Drainer(board)
    worker_cpu = iter([1.5, 2.0])
    drainer._cpu = lambda index, pid: next(worker_cpu) if index == 0 else 0.0  # type: ignore[method-assign]
    board.assign(0, 0.0)
    rec = RequestRecorder(board, 0, Worker())
    sb.store(board.buffer, board.offset(0) + sb.OFF_BOOT_CPU, sb.BOOT_CPU, 0.75)  # what booted() stores
    sb.store(board.buffer, board.offset(0) + sb.OFF_STATE, sb.STATE, sb.READY)
    req = FakeRequest()
    start(rec, req)
    assert drainer.collect().request_cpu == {}  # the first round: the request is running
    finish(rec, req, {}, FakeResponse("200 OK"))
    sb.RING.pack_into(board.buffer, board.ring_offset(0), 1.0, sb.NO_QUEUE_TIME, 200, 0, 0, 0, math.nan)
    assert drainer.collect().request_cpu == {("GET", 200, ""): 1.25}  # 2.0 - 0.75


def test_any_nan_reads_as_none_and_each_duration_is_counted_once(board: sb.Scoreboard) -> None:
    """A round of one key, with the NaN workers write or another NaN (the sign flipped) for "no queue header"
    and "no CPU of its own": none is a queue time, the one number is; each duration is in both lists once."""
    drainer = Drainer(board, by_status=True)
    board.assign(0, 0.0)
    base = board.ring_offset(0)
    records = [(0.3, math.nan, math.nan), (0.1, -math.nan, -math.nan), (0.2, 0.05, math.nan), (0.4, math.nan, math.nan)]
    for n, (duration, queue, cpu) in enumerate(records):
        sb.RING.pack_into(board.buffer, base + n * sb.RING_SIZE, duration, queue, 200, 0, 0, 0, cpu)
    sb.store(board.buffer, board.offset(0) + sb.OFF_HEAD, sb.HEAD_CONNS, len(records), 0)
    facts = drainer.collect()
    assert (facts.queue_times, facts.queue_invalid) == ([0.05], 0)
    assert facts.requests == {("GET", 200, ""): 4}
    assert sorted(facts.durations["GET", ""]) == sorted(facts.status_durations["GET", 200, ""]) == [0.1, 0.2, 0.3, 0.4]
    # No CPU of their own: a share of the worker's (none yet, a first reading), never a NaN sum.
    assert facts.request_cpu == {("GET", 200, ""): 0.0}
