"""Rate-limited logging: plugin errors and warnings never flood the error log."""

from __future__ import annotations

import logging

import pytest

from gunicorn_insight._report import RateLimitedLog, report


def test_rate_limit_holds_back_and_then_counts() -> None:
    """One line per key per period; the next allowed line says how many were suppressed."""
    now = [0.0]
    log = RateLimitedLog(period=60, clock=lambda: now[0])
    assert log("k", logging.WARNING, "first")
    assert not log("k", logging.WARNING, "again")
    assert not log("k", logging.WARNING, "again")
    assert log("other", logging.WARNING, "a different key is independent")
    now[0] = 61
    assert log("k", logging.WARNING, "later")


def test_suppressed_count_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    """The line after a quiet period tells the operator how many similar messages were dropped."""
    now = [0.0]
    log = RateLimitedLog(period=10, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="gunicorn.error"):
        log("k", logging.WARNING, "x")
        log("k", logging.WARNING, "x")
        now[0] = 11
        log("k", logging.WARNING, "x")
    assert caplog.records[-1].getMessage().endswith("(1 similar messages suppressed in the last 10s)")


def test_report_logs_with_traceback_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    """report() leaves one error line with the place and the traceback."""
    try:
        raise KeyError("boom")
    except KeyError as error:
        with caplog.at_level(logging.ERROR, logger="gunicorn.error"):
            report("unit test place", error)
    assert "internal error in unit test place (the server keeps running): KeyError('boom')" in caplog.text
    assert caplog.records[-1].exc_info is not None
