"""Exit classification: one cause per worker exit from the marks, gunicorn's reap line and the cgroup."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._master.forensics import OomCounter, ReapWatcher, classify

BLANK = sb.SlotView(0, 1, 42, sb.READY, 0, 0, 0, 0, 0, 1.0, 2.0, 0, 0, 0, 0, 0, (0, 0, 0, 0), 0.0, "", ())


def view(flags: int = 0, exit_code: int = 0, last_words: str = "") -> sb.SlotView:
    return replace(BLANK, flags=flags, exit_code=exit_code, last_words=last_words)


EXITED = sb.FLAG_EXITED


@pytest.mark.parametrize(
    ("slot", "aborted", "signal", "exit_code", "oom", "cause"),
    [
        (view(sb.FLAG_ABORT_HANDLER | EXITED, 1), True, None, 1, False, "timeout"),
        (view(sb.FLAG_ABORT_HANDLER), True, "SIGKILL", None, False, "timeout"),  # gevent: handler ran, then KILL
        (view(), True, "SIGKILL", None, False, "timeout_kill"),
        (view(), True, "SIGABRT", None, False, "timeout_kill"),  # uvicorn: SIGABRT at its default action
        (view(), False, "SIGKILL", None, False, "killed"),
        (view(), False, "SIGKILL", None, True, "oom"),
        (view(), False, "SIGSEGV", None, False, "signal"),
        (view(EXITED, 255), False, None, 255, False, "crash"),
        (view(), False, None, 7, False, "crash"),
        (view(EXITED | sb.FLAG_MAX_REQUESTS), False, None, None, False, "max_requests"),
        (view(EXITED), False, None, None, False, "graceful"),
        (view(), False, "SIGTERM", None, False, "graceful"),
        (view(EXITED | sb.FLAG_BOOT_FAILED, 3, "ImportError: no app"), False, None, 3, False, "boot_failure"),
    ],
)
def test_each_exit_gets_one_cause(
    slot: sb.SlotView, aborted: bool, signal: str | None, exit_code: int | None, oom: bool, cause: str
) -> None:
    """The decision table: marks first, then gunicorn's abort flag, then its reap line."""
    assert classify(slot, aborted=aborted, signal=signal, exit_code=exit_code, oom=oom).cause == cause


def test_oom_is_only_claimed_when_confirmed() -> None:
    """cause oom only with the cgroup's confirmation; otherwise killed 'from outside gunicorn'."""
    confirmed = classify(view(), aborted=False, signal="SIGKILL", exit_code=None, oom=True)
    unconfirmed = classify(view(), aborted=False, signal="SIGKILL", exit_code=None, oom=False)
    assert (confirmed.cause, confirmed.detail) == (
        "oom",
        "killed by the kernel's OOM killer (the cgroup's oom_kill count rose)",
    )
    assert unconfirmed.cause == "killed"
    assert "not confirmed" in unconfirmed.detail


@pytest.mark.parametrize("signal", ["SIGABRT", "SIGABRT (core dumped)"])
def test_timed_out_worker_dying_of_the_sigabrt_is_not_called_sigkilled(signal: str) -> None:
    """A timed-out worker that died of gunicorn's SIGABRT itself (uvicorn) is described as such, not as SIGKILLed."""
    verdict = classify(view(), aborted=True, signal=signal, exit_code=None, oom=False)
    assert verdict.cause == "timeout_kill"
    assert f"died of that {signal}" in verdict.detail
    assert "SIGKILL" not in verdict.detail + verdict.stack_note


def test_boot_failure_carries_the_exception_summary() -> None:
    """The worker's last words (the boot exception) are the detail of a boot_failure."""
    verdict = classify(
        view(EXITED | sb.FLAG_BOOT_FAILED, 3, "RuntimeError: no DB"), aborted=False, signal=None, exit_code=3, oom=False
    )
    assert verdict.detail == "could not load the application: RuntimeError: no DB"


def test_crash_after_boot_carries_the_exception_summary() -> None:
    """A worker that left with an exception after booting: its summary follows the exit code, quotes made
    single so the exit line's detail stays one field; without last words the detail is the code alone."""
    verdict = classify(view(EXITED, -1, 'KeyError: "tenant"'), aborted=False, signal=None, exit_code=255, oom=False)
    assert (verdict.cause, verdict.detail) == ("crash", "exited with code -1: KeyError: 'tenant'")
    plain = classify(view(EXITED, 9), aborted=False, signal=None, exit_code=9, oom=False)
    assert plain.detail == "exited with code 9"


@pytest.mark.parametrize(
    ("message", "args", "signal"),
    [
        ("Worker (pid:%s) was sent %s!", (123, "SIGKILL"), "SIGKILL"),  # gunicorn 27
        ("Worker (pid:123) was sent SIGKILL! Perhaps out of memory?", (), "SIGKILL"),  # gunicorn 23 formats first
        ("Worker (pid:123) was sent code 139!", (), "SIGSEGV (core dumped)"),  # gunicorn 23, a raw wait status
    ],
)
def test_reap_watcher_reads_both_gunicorn_styles(message: str, args: tuple[object, ...], signal: str) -> None:
    """The reap line is understood whether gunicorn passes arguments or pre-formats the message."""
    watcher = ReapWatcher()
    watcher.observe(message, args)
    assert watcher.take(123) == (signal, None)
    assert watcher.take(123) == (None, None)


def test_reap_watcher_reads_exit_codes() -> None:
    """'exited with code N' gives the exit status gunicorn does not pass to child_exit."""
    watcher = ReapWatcher()
    watcher.observe("Worker (pid:%s) exited with code %s.", (9, 7))
    assert watcher.take(9) == (None, 7)


def test_reap_watcher_sees_lines_a_log_level_would_drop() -> None:
    """It wraps the logger's methods, so even at --log-level critical the reap lines are read."""
    logged: list[str] = []

    class Log:
        def error(self, msg: str, *args: object) -> None:
            logged.append(msg % args)

    log = Log()
    watcher = ReapWatcher()
    watcher.watch(log)
    watcher.watch(log)  # a second watch (a HUP re-running on_starting's path) must not wrap twice
    log.error("Worker (pid:%s) was sent %s!", 5, "SIGTERM")
    assert logged == ["Worker (pid:5) was sent SIGTERM!"]
    assert watcher.take(5) == ("SIGTERM", None)


def test_oom_counter_reads_cgroup_v2(tmp_path: Path) -> None:
    """memory.events' oom_kill counter rising between two reads confirms an OOM kill."""
    proc = tmp_path / "cgroup"
    proc.write_text("0::/app.slice\n")
    events = tmp_path / "root" / "app.slice" / "memory.events"
    events.parent.mkdir(parents=True)
    (tmp_path / "root" / "cgroup.controllers").write_text("cpu memory\n")  # what marks a v2 mount
    events.write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    counter = OomCounter(str(proc), str(tmp_path / "root"))
    counter.poll()
    assert not counter.claim()
    events.write_text("low 0\nhigh 0\nmax 4\noom 3\noom_kill 3\n")
    counter.poll()
    assert counter.claim()
    assert counter.claim()  # two kills this round: two exits may say OOM
    assert not counter.claim()
    counter.poll()
    assert not counter.claim()  # nothing new: an old kill is never blamed for a later SIGKILL


def test_oom_kill_stays_claimable_for_a_window_of_seconds(tmp_path: Path) -> None:
    """A kill counted before its victim's reap is logged can be claimed for CLAIM_WINDOW seconds however many
    rounds pass meanwhile (rounds can be 0.05 s apart), and not after."""
    proc = tmp_path / "cgroup"
    proc.write_text("0::/app.slice\n")
    events = tmp_path / "root" / "app.slice" / "memory.events"
    events.parent.mkdir(parents=True)
    (tmp_path / "root" / "cgroup.controllers").write_text("cpu memory\n")  # what marks a v2 mount
    events.write_text("oom 0\noom_kill 0\n")
    now = [100.0]
    counter = OomCounter(str(proc), str(tmp_path / "root"), clock=lambda: now[0])
    events.write_text("oom 2\noom_kill 2\n")
    counter.poll()  # both kills seen; their exits are reaped later
    for _ in range(30):  # 30 rounds of 0.05 s
        now[0] += 0.05
        counter.poll()
    assert counter.claim()
    now[0] += OomCounter.CLAIM_WINDOW
    counter.poll()
    assert not counter.claim()  # the second kill was never claimed and has expired


def test_oom_counter_reads_cgroup_v1(tmp_path: Path) -> None:
    """cgroup v1 keeps the count in memory.oom_control."""
    proc = tmp_path / "cgroup"
    proc.write_text("5:cpu:/x\n4:memory:/docker/abc\n")
    control = tmp_path / "root" / "memory" / "docker" / "abc" / "memory.oom_control"
    control.parent.mkdir(parents=True)
    control.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    counter = OomCounter(str(proc), str(tmp_path / "root"))
    control.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 5\n")
    counter.poll()
    assert counter.claim()


def test_no_cgroup_means_never_confirmed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without a readable cgroup the counter never claims an OOM kill, and says so once at startup."""
    with caplog.at_level(logging.INFO, logger="gunicorn.error"):
        counter = OomCounter(str(tmp_path / "missing"), str(tmp_path))
    counter.poll()
    assert counter.path is None
    assert not counter.claim()
    assert "no oom_kill count readable" in caplog.text
    assert "counted as cause=killed, not cause=oom" in caplog.text


def test_counter_file_without_oom_kill_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A v1 memory.oom_control without the oom_kill line (kernel before 4.13) is named in the startup line."""
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/old\n")
    control = tmp_path / "root" / "memory" / "old" / "memory.oom_control"
    control.parent.mkdir(parents=True)
    control.write_text("oom_kill_disable 0\nunder_oom 0\n")
    with caplog.at_level(logging.INFO, logger="gunicorn.error"):
        counter = OomCounter(str(proc), str(tmp_path / "root"))
    assert counter.path == str(control)
    assert f"memory cgroup ({control})" in caplog.text


def test_shutdown_kill_names_the_cut_off_request() -> None:
    """A worker SIGKILLed when graceful_timeout ran out is a graceful exit that says what was cut off."""
    busy = replace(BLANK, requests=(sb.InFlight("GET", "/slow", "1.2.3.4:5", 1.0, 7),))
    verdict = classify(busy, aborted=False, signal=None, exit_code=None, oom=False, shutdown=True)
    assert verdict.cause == "graceful"
    assert "graceful_timeout ran out" in verdict.detail
    quiet = classify(BLANK, aborted=False, signal=None, exit_code=None, oom=False, shutdown=True)
    assert (quiet.cause, quiet.detail) == ("graceful", "stopped at shutdown")
