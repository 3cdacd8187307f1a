"""X-Request-Start / X-Queue-Start parsing: every proxy format, and bad values counted, never used."""

from __future__ import annotations

import math

import pytest

from gunicorn_insight._worker.recorder import parse_request_start, request_queue_time

NOW = 1_800_000_000.5


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("t=1800000000.250", 0.25),  # nginx: ${msec}
        ("t=1800000000250000", 0.25),  # Apache: %t (microseconds)
        ("1800000000.25", 0.25),  # plain seconds
        ("1800000000250", 0.25),  # plain milliseconds (Heroku, HAProxy)
        ("1800000000250000000", 0.25),  # nanoseconds
        ("  t=1800000000.5 ", 0.0),
        ("t=1800000000.503", 0.0),  # 3 ms ahead: clocks a few ms apart are not worth discarding
        ("t=1800000000.250,t=1800000000.4", 0.25),  # sent twice: gunicorn's environ joins them, the first counts
        (" t=1800000000.250, t=1800000000.4", 0.25),
    ],
)
def test_formats(header: str, expected: float) -> None:
    """Seconds, milliseconds, microseconds and nanoseconds since the epoch, with or without t=."""
    assert parse_request_start(header, NOW) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "header", ["garbage", "t=", "t=nan", "t=inf", "t=-5", "0", "t=1800000000.6", "t=1800000060.0", "t=1700000000.0"]
)
def test_bad_values_are_flagged(header: str) -> None:
    """Garbage, negative, future and more-than-an-hour-old stamps come back as -1 (invalid), not a duration."""
    assert parse_request_start(header, NOW) == -1.0


def test_header_lookup() -> None:
    """Either header name works; without one the result is NaN (no observation, not invalid)."""
    assert request_queue_time([("HOST", "x"), ("X-QUEUE-START", "t=1800000000.0")], NOW) == pytest.approx(0.5)
    assert math.isnan(request_queue_time([("HOST", "x")], NOW))
    both = [("X-QUEUE-START", "t=1800000000.4"), ("X-REQUEST-START", "t=1800000000.0")]
    assert request_queue_time(both, NOW) == pytest.approx(0.5)  # X-Request-Start first, as in the environ
