"""The master's judgement of what workers' memory, descriptors and threads grow with (_master.growth)."""

from __future__ import annotations

import os
from pathlib import Path

from gunicorn_insight._master.growth import (
    MIN_SERVED,
    GrowthWatch,
    HeldMemoryWatch,
    descriptor_kinds,
)

MIB = 1 << 20
BASE = 40 * MIB


def _held(points: list[tuple[int, int]], pid: int = 7) -> HeldMemoryWatch:
    watch = HeldMemoryWatch()
    for in_flight, rss in points:
        watch.observe(0, pid, in_flight, rss)
    return watch


def test_memory_following_requests_in_flight_gives_the_cost_of_one() -> None:
    """RSS rising 4 MiB with each request in flight (plus page noise): the slope is 4 MiB, with its spread."""
    noise = [0, 300_000, -200_000, 100_000]
    points = [(count, BASE + count * 4 * MIB + noise[count % 4]) for count in (0, 0, 1, 2, 3, 4, 5, 6, 6, 6)]
    (held,) = _held(points).estimates()
    assert abs(held.bytes_per_request - 4 * MIB) < 0.1 * MIB
    assert (held.requests_low, held.requests_high, held.rounds) == (0, 6, 10)
    assert abs(held.idle_bytes - BASE) < MIB


def test_no_estimate_without_enough_variation_or_relation() -> None:
    """Too few requests in flight at once, memory that does not follow them, or an effect lost in the noise:
    nothing is reported."""
    narrow = [(count % 3, BASE + (count % 3) * 4 * MIB) for count in range(20)]
    assert _held(narrow).estimates() == ()
    unrelated = [(count % 8, BASE + (7 - count % 8) * 4 * MIB) for count in range(20)]  # falls as they rise
    assert _held(unrelated).estimates() == ()
    tiny = [(count % 8, BASE + (count % 8) * 100_000) for count in range(20)]  # 700 kB across the spread
    assert _held(tiny).estimates() == ()
    flat = [(count % 8, BASE) for count in range(20)]
    assert _held(flat).estimates() == ()


def test_an_estimate_lasts_the_workers_life_and_not_longer() -> None:
    """Memory kept after the requests finish breaks the relation later: the estimate stays; a new worker
    in the slot starts with none."""
    watch = _held([(count, BASE + count * 4 * MIB) for count in (0, 1, 2, 3, 4, 5, 6, 7)])
    for _ in range(200):
        watch.observe(0, 7, 0, BASE + 28 * MIB)
    (held,) = watch.estimates()
    assert abs(held.bytes_per_request - 4 * MIB) < 0.1 * MIB
    watch.observe(0, 8, 0, BASE)
    assert watch.estimates() == ()


def _growth(values: list[int | None], resource: str = "open_fds", in_flight: int = 0) -> GrowthWatch:
    """A worker seen ready, then one idle round after each 50 requests with ``values`` of ``resource``."""
    watch = GrowthWatch()
    watch.observe(0, 9, ready=True, served=0, in_flight=0, readings={resource: 10})
    for number, value in enumerate(values, start=1):
        watch.observe(0, 9, ready=True, served=number * 50, in_flight=in_flight, readings={resource: value})
    return watch


def test_a_descriptor_per_request_is_found_once_with_its_rate(tmp_path: Path) -> None:
    """One descriptor more per request, held while idle: found, at 1,000 per 1,000 requests, told once."""
    watch = GrowthWatch(proc=str(tmp_path))
    watch.observe(0, 9, ready=True, served=0, in_flight=0, readings={"open_fds": 10})
    told = []
    for number in range(1, 11):
        told += watch.observe(
            0, 9, ready=True, served=number * 50, in_flight=0, readings={"open_fds": 10 + number * 50}
        )
    assert [growth.resource for growth in told] == ["open_fds"]
    (found,) = watch.found()
    assert (found.at_ready, found.now, found.served, found.per_1000) == (10, 510, 500, 1000.0)
    assert found.served >= MIN_SERVED


def test_what_levels_off_or_is_held_by_running_requests_is_not_growth() -> None:
    """A pool that fills once, growth too small, readings taken while requests run, or unreadable: nothing."""
    assert _growth([40, 40, 40, 40, 40, 40, 40, 40], "threads").found() == ()  # filled with the first requests
    assert _growth([30, 50, 70, 90, 110, 110, 110, 110, 110, 110]).found() == ()  # rose, then stopped
    assert _growth([12, 13, 14, 15, 16, 17, 18, 19]).found() == ()  # 9 more: below the minimum
    assert _growth([10 + n * 50 for n in range(1, 11)], in_flight=1).found() == ()  # never idle
    assert _growth([None] * 10).found() == ()


def test_memory_growth_counts_in_bytes() -> None:
    """Memory rising 0.2 MiB a request while idle is named with its rate per 1,000 requests."""
    watch = GrowthWatch()
    watch.observe(0, 9, ready=True, served=0, in_flight=0, readings={"memory_bytes": BASE})
    for number in range(1, 11):
        watch.observe(
            0, 9, ready=True, served=number * 100, in_flight=0, readings={"memory_bytes": BASE + number * 20 * MIB}
        )
    (found,) = watch.found()
    assert found.resource == "memory_bytes"
    assert abs(found.per_1000 - 200 * MIB) < 1
    assert "about 200.0 MiB more per 1,000 requests" in found.what()


def test_descriptor_kinds_are_counted_from_the_links(tmp_path: Path) -> None:
    """Files, sockets and pipes counted from /proc/<pid>/fd's links; an unreadable directory says nothing."""
    fd = tmp_path / "5" / "fd"
    fd.mkdir(parents=True)
    for number, target in enumerate(["/srv/a.log", "/srv/b.log", "socket:[123]", "pipe:[9]", "/srv/c"]):
        os.symlink(target, fd / str(number))
    assert descriptor_kinds(5, str(tmp_path)) == "3 files, 1 pipe, 1 socket"
    assert descriptor_kinds(6, str(tmp_path)) == ""
