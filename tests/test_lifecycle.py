"""Stall and crash-loop detection: the decisions the master takes each round, on made-up rounds."""

from __future__ import annotations

from gunicorn_insight._master.lifecycle import CrashLoopWatch, EarlyDeath, StallWatch, UnservedEnd, UnservedWatch


def test_stall_needs_quiet_heads_in_flight_and_unmet_demand() -> None:
    """In flight, no ring head moving for `after` seconds, demand waiting: a stall, reported once."""
    watch = StallWatch(after=5.0)
    assert watch.observe(0.0, heads=10, in_flight=2, unmet_demand=True) is None
    assert watch.observe(4.9, heads=10, in_flight=2, unmet_demand=True) is None
    change = watch.observe(5.5, heads=10, in_flight=2, unmet_demand=True)
    assert change is not None
    assert change.started
    assert change.quiet_for == 5.5
    assert watch.stalled
    assert watch.observe(8.0, heads=10, in_flight=2, unmet_demand=True) is None  # once per stall
    ended = watch.observe(9.0, heads=11, in_flight=1, unmet_demand=False)
    assert ended is not None
    assert not ended.started
    assert ended.resumed
    assert ended.quiet_for == 9.0
    assert not watch.stalled


def test_a_lone_slow_request_on_an_idle_server_is_no_stall() -> None:
    """Nothing waiting behind it: the watchdog's slow-request report covers it, the stall watch stays quiet."""
    watch = StallWatch(after=1.0)
    for second in range(10):
        assert watch.observe(float(second), heads=3, in_flight=1, unmet_demand=False) is None
    assert not watch.stalled


def test_completions_keep_resetting_the_clock() -> None:
    """A server whose requests keep finishing is never stalled, however long each one is in flight."""
    watch = StallWatch(after=2.0)
    for second in range(10):
        assert watch.observe(float(second), heads=second, in_flight=4, unmet_demand=True) is None


def test_the_clock_starts_when_requests_arrive_not_at_the_last_completion() -> None:
    """An idle hour, then requests stuck for less than `after`: not yet a stall."""
    watch = StallWatch(after=5.0)
    watch.observe(0.0, heads=7, in_flight=0, unmet_demand=False)
    assert watch.observe(3600.0, heads=7, in_flight=2, unmet_demand=True) is None
    assert watch.observe(3603.0, heads=7, in_flight=2, unmet_demand=True) is None
    change = watch.observe(3605.0, heads=7, in_flight=2, unmet_demand=True)
    assert change is not None
    assert change.started


def test_in_flight_dropping_to_zero_ends_a_stall() -> None:
    """The stuck workers were killed (timeout): nothing in flight, the stall is over."""
    watch = StallWatch(after=1.0)
    watch.observe(0.0, heads=0, in_flight=1, unmet_demand=True)
    assert watch.observe(2.0, heads=0, in_flight=1, unmet_demand=True) is not None
    change = watch.observe(3.0, heads=0, in_flight=0, unmet_demand=True)
    assert change is not None
    assert not change.started
    assert not change.resumed  # ended by the requests going away, not by one finishing


def death(at: float, uptime: float = 1.0, cause: str = "crash") -> EarlyDeath:
    return EarlyDeath(at, pid=int(at) + 100, slot=0, cause=cause, detail="exited with code 1", uptime=uptime)


def test_crash_loop_after_repeated_early_deaths() -> None:
    """The third unexpected death within a minute of boot, inside the window, begins a crash loop, once."""
    watch = CrashLoopWatch(young=60.0, window=300.0, count=3)
    assert not watch.exited(death(0.0), expected=False)
    assert not watch.exited(death(10.0), expected=False)
    assert watch.exited(death(20.0), expected=False)
    assert watch.looping
    assert not watch.exited(death(30.0), expected=False)  # already looping: not a new loop
    assert not watch.tick(100.0)
    assert watch.tick(335.0)  # all four deaths are older than the window now
    assert not watch.looping


def test_old_workers_and_expected_exits_are_no_crash_loop() -> None:
    """Workers recycled by max_requests, stopped gracefully, or dying after a long life do not count."""
    watch = CrashLoopWatch(young=60.0, window=300.0, count=3)
    for at in range(0, 50, 5):
        assert not watch.exited(death(float(at), cause="max_requests"), expected=True)
        assert not watch.exited(death(float(at), uptime=3600.0), expected=False)
    assert not watch.looping


def test_deaths_spread_wider_than_the_window_are_no_crash_loop() -> None:
    """One early death every 200 s never puts three in a 300 s window."""
    watch = CrashLoopWatch(young=60.0, window=300.0, count=3)
    for at in range(0, 2000, 200):
        assert not watch.exited(death(float(at)), expected=False)


def test_a_queue_nobody_serves_while_nothing_is_in_flight_is_due_once() -> None:
    """Queued connections, nothing in flight, no head moving: seconds climb per listener, due once at
    `after`, and the episode's end is reported when the queue is served."""
    watch = UnservedWatch(after=5.0)
    queue = {"unix:/run/app.sock": (3, 128), "http://0.0.0.0:80": (0, 128)}
    watch.observe(0.0, heads=7, in_flight=0, listeners=queue)  # the first round: whether heads move is unknown
    assert watch.observe(1.0, heads=7, in_flight=0, listeners=queue)[0] == {
        "unix:/run/app.sock": 0.0,
        "http://0.0.0.0:80": 0.0,
    }
    unserved, ended = watch.observe(5.0, heads=7, in_flight=0, listeners=queue)
    assert unserved["unix:/run/app.sock"] == 4.0
    assert (ended, watch.due(5.0)) == ([], [])
    watch.observe(6.0, heads=7, in_flight=0, listeners=queue)
    assert watch.due(6.0) == [("unix:/run/app.sock", 5.0)]
    watch.reported("unix:/run/app.sock")
    assert watch.due(7.0) == []  # once per episode
    unserved, ended = watch.observe(8.0, heads=8, in_flight=0, listeners=queue)
    assert unserved["unix:/run/app.sock"] == 0.0
    assert ended == [UnservedEnd("unix:/run/app.sock", 7.0)]
    assert not watch.unserved


def test_requests_in_flight_or_finishing_or_an_empty_queue_are_not_unserved() -> None:
    """A request in flight (a stall's business), heads moving, or nothing queued: never due."""
    watch = UnservedWatch(after=1.0)
    for second in range(10):
        busy = second % 2 == 0
        watch.observe(
            float(second), heads=second if not busy else 0, in_flight=1 if busy else 0, listeners={"l": (2, 8)}
        )
        assert watch.due(float(second)) == []
    idle = UnservedWatch(after=1.0)
    for second in range(10):
        assert idle.observe(float(second), heads=3, in_flight=0, listeners={"l": (0, 8)}) == ({"l": 0.0}, [])
    assert not idle.unserved
