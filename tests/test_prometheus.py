"""Prometheus side: directory checks, dead-worker files folded into archives, robust collection.

prometheus_client is imported in a subprocess for each test that needs its multiprocess mode, because the
mode is fixed at import time and must not leak between tests.
"""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
import textwrap
from bisect import bisect_left
from pathlib import Path

import pytest

from gunicorn_insight._export.mmapfile import MetricFile, sample_key
from gunicorn_insight._export.prometheus import (
    MERGE_LOCK,
    bucket_counts,
    merge_lock,
    prepare_directory,
    remove_stale_files,
    usable_files,
)
from gunicorn_insight.settings import ConfigurationError


def run_python(code: str, directory: Path) -> str:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_prepare_directory_creates_and_proves_writable(tmp_path: Path) -> None:
    """A missing directory is created, and the write probe leaves nothing behind."""
    directory = tmp_path / "prom"
    prepare_directory(str(directory))
    assert directory.is_dir()
    assert os.listdir(directory) == []


def test_a_file_in_the_way_is_a_clear_error(tmp_path: Path) -> None:
    """A path that is a file, not a directory, fails at startup with the setting named."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigurationError, match=r"prometheus_dir=.*is not a writable directory"):
        prepare_directory(str(blocker))


def test_the_write_probe_and_the_lock_never_follow_a_planted_symlink(tmp_path: Path) -> None:
    """Symlinks another user plants at the probe and lock names never make us truncate or create a file."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    directory = tmp_path / "shared"
    directory.mkdir()
    for pid in range(os.getpid() - 5, os.getpid() + 5):  # the old probe name was .gunicorn-insight-probe-<pid>
        (directory / f".gunicorn-insight-probe-{pid}").symlink_to(victim)
    elsewhere = tmp_path / "created-through-the-link"
    (directory / MERGE_LOCK).symlink_to(elsewhere)
    prepare_directory(str(directory))
    with pytest.raises(OSError, match="Too many levels of symbolic links"), merge_lock(str(directory), shared=True):
        pass
    assert victim.read_text() == "precious"
    assert not elsewhere.exists()


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(child.stdout)


def test_leftovers_of_gone_processes_are_removed_and_nothing_else(tmp_path: Path) -> None:
    """Startup cleanup removes metric files of dead pids, written by prometheus_client or us, owned by us;
    a user's app.db, look-alike names with other content, live pids, other users' files and symlinks stay."""
    # Real multiprocess files from a process that has since exited, and our own archive of them.
    out = run_python(
        """
        import os
        from prometheus_client import Counter, Gauge, Histogram
        Counter("c", "c").inc()
        Gauge("g", "g", multiprocess_mode="livesum").set(3)
        Histogram("h", "h").observe(0.2)
        print(os.getpid())
    """,
        tmp_path,
    )
    gone = int(out)
    leftovers = {f"counter_{gone}.db", f"gauge_livesum_{gone}.db", f"histogram_{gone}.db"}
    assert leftovers <= set(os.listdir(tmp_path))
    archive = MetricFile(str(tmp_path / f"counter_archive-{_dead_pid()}.db"))
    archive.write(sample_key("c", "c_total", {}, "c"), 4.0)
    archive.close()
    cut_short = tmp_path / f"gauge_all_{_dead_pid()}.db"
    cut_short.write_bytes(b"")  # a kill came before its header
    leftovers |= {os.path.basename(archive.path), cut_short.name}
    # What must stay.
    with sqlite3.connect(tmp_path / "app.db") as database:
        database.execute("create table t (x)")
    with sqlite3.connect(tmp_path / f"counter_{_dead_pid()}.db") as database:  # our name, not our content
        database.execute("create table t (x)")
    live = MetricFile(str(tmp_path / f"counter_{os.getpid()}.db"))  # a live server sharing the directory
    live.write(sample_key("c", "c_total", {}, "c"), 1.0)
    live.close()
    theirs = tmp_path / f"histogram_{_dead_pid()}.db"
    theirs.write_bytes((tmp_path / f"histogram_{gone}.db").read_bytes())
    if os.geteuid() == 0:
        os.chown(theirs, 65534, 65534)
    target = tmp_path / "target"
    target.write_bytes((tmp_path / f"counter_{gone}.db").read_bytes())
    (tmp_path / f"summary_{_dead_pid()}.db").symlink_to(target)
    (tmp_path / "notes.txt").write_text("keep")
    before = set(os.listdir(tmp_path))

    removed = remove_stale_files(str(tmp_path), {os.geteuid()})

    assert {os.path.basename(path) for path in removed} == leftovers
    kept = before - leftovers
    if os.geteuid() != 0:
        kept.discard(theirs.name)  # could not hand it to another user: it is ours, and goes
    assert kept <= set(os.listdir(tmp_path))
    assert (tmp_path / "app.db").stat().st_size > 0
    assert target.exists()


def test_import_before_directory_is_refused(tmp_path: Path) -> None:
    """prometheus_client imported without the variable cannot share metrics: refused with the fix."""
    code = """
        import os, sys
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        import prometheus_client
        from gunicorn_insight._export.prometheus import check_import_order
        try:
            check_import_order("/some/dir")
        except Exception as error:
            print(type(error).__name__, error)
    """
    out = run_python(code, tmp_path)
    assert out.startswith("ConfigurationError prometheus_client was imported before")
    assert "PROMETHEUS_MULTIPROC_DIR=/some/dir" in out


def test_import_after_directory_is_accepted(tmp_path: Path) -> None:
    """prometheus_client imported with PROMETHEUS_MULTIPROC_DIR already set (the right order) passes the check."""
    code = """
        import prometheus_client
        from gunicorn_insight._export.prometheus import check_import_order
        check_import_order("/some/dir")
        print("accepted")
    """
    assert run_python(code, tmp_path) == "accepted\n"


def test_dead_worker_files_are_folded_without_changing_totals(tmp_path: Path) -> None:
    """Counters, histograms and gauges of dead pids merge into archive files; totals stay exact."""
    code = """
        import os, glob
        from prometheus_client import Counter, Gauge, Histogram
        from prometheus_client.values import ValueClass
        from gunicorn_insight._export.prometheus import PrometheusSink
        from gunicorn_insight._export.metrics_process import make_registry
        from prometheus_client import generate_latest

        import prometheus_client.values as values
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        master_value_class = values.ValueClass

        def worker(pid, hits, size, peak):
            # Simulate a worker process: prometheus_client names files after os.getpid().
            values.ValueClass = values.MultiProcessValue(lambda: pid)
            Counter("app_hits", "h", registry=None).inc(hits)
            Histogram("app_size", "s", buckets=(1, 10), registry=None).observe(size)
            Gauge("app_peak", "p", multiprocess_mode="max", registry=None).set(peak)
            Gauge("app_live", "l", multiprocess_mode="livesum", registry=None).set(1)

        worker(101, 2, 0.5, 7)
        worker(102, 3, 5, 3)
        worker(103, 4, 50, 9)
        values.ValueClass = master_value_class
        sink = PrometheusSink(directory, (0.1, 1.0), 1)
        for pid in (101, 102, 103):
            sink.forget_process(pid)
        print(sorted(os.path.basename(p).replace(f"-{os.getpid()}", "-PID")
                     for p in glob.glob(directory + "/*.db")
                     if "_archive" in p or p.endswith(("_101.db", "_102.db", "_103.db"))))
        text = generate_latest(make_registry(directory)).decode()
        for line in text.splitlines():
            if line.startswith("app_"):
                print(line)
    """
    out = run_python(code, tmp_path)
    assert "'counter_archive-PID.db', 'gauge_max_archive-PID.db', 'histogram_archive-PID.db'" in out
    assert "_101" not in out.splitlines()[0]
    assert "app_hits_total 9.0" in out
    assert 'app_size_bucket{le="1.0"} 1.0' in out
    assert 'app_size_bucket{le="10.0"} 2.0' in out
    assert "app_size_count 3.0" in out
    assert "app_size_sum 55.5" in out
    assert "app_peak 9.0" in out
    assert "app_live" not in out


def test_truncated_file_does_not_break_scrapes(tmp_path: Path) -> None:
    """A zero-byte file left by a SIGKILLed process is skipped instead of failing every scrape."""
    code = """
        import os, threading
        from prometheus_client import Counter, generate_latest
        from gunicorn_insight._export.metrics_process import make_registry
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        Counter("ok", "o", registry=None).inc()
        open(os.path.join(directory, "counter_999.db"), "wb").close()
        print(generate_latest(make_registry(directory)).decode())
    """
    assert "ok_total 1.0" in run_python(code, tmp_path)


def test_sink_writes_every_bucket_so_inf_and_count_are_right(tmp_path: Path) -> None:
    """Durations all under the first bound still yield a cumulative +Inf bucket and a count equal to them."""
    code = """
        import os, threading
        from collections import Counter
        from prometheus_client import generate_latest
        from gunicorn_insight._master.drain import Round
        from gunicorn_insight._export.prometheus import PrometheusSink
        from gunicorn_insight._export.metrics_process import make_registry
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        sink = PrometheusSink(directory, (0.1, 1.0), 1)
        facts = Round(requests=Counter({("GET", 200, ""): 3}))
        facts.durations = {("GET", ""): [0.01, 0.02, 0.1]}
        sink.publish(facts)
        print(generate_latest(make_registry(directory)).decode())
    """
    out = run_python(code, tmp_path)
    assert 'gunicorn_request_duration_seconds_bucket{le="0.1",method="GET"} 3.0' in out
    assert 'gunicorn_request_duration_seconds_bucket{le="+Inf",method="GET"} 3.0' in out
    assert 'gunicorn_request_duration_seconds_count{method="GET"} 3.0' in out
    assert 'gunicorn_requests_total{method="GET",status="200"} 3.0' in out


def test_merge_waits_for_a_scrape_reading_the_directory(tmp_path: Path) -> None:
    """While the /metrics process holds the shared lock, folding a dead worker's file does not start."""
    import threading

    from gunicorn_insight._export.mmapfile import MetricFile, sample_key
    from gunicorn_insight._export.prometheus import PrometheusSink, merge_lock

    dead = MetricFile(str(tmp_path / "counter_4242.db"))
    dead.write(sample_key("hits", "hits_total", {}, "h"), 3.0)
    dead.close()
    sink = PrometheusSink(str(tmp_path), (0.1,), 1)
    merged = threading.Event()
    with merge_lock(str(tmp_path), shared=True):

        def forget() -> None:
            sink.forget_process(4242)
            merged.set()

        merger = threading.Thread(target=forget)
        merger.start()
        assert not merged.wait(0.5)
        assert (tmp_path / "counter_4242.db").exists()
    assert merged.wait(10)
    merger.join()
    assert not (tmp_path / "counter_4242.db").exists()


def test_host_pressure_and_lifecycle_are_exported_and_absent_stays_absent(tmp_path: Path) -> None:
    """Throttling, quota, cgroup memory, PSI, per-worker switches and swap, boot histogram, stall and crash-loop
    metrics are written with their units; readings the kernel did not give (no quota, no limit) are no series."""
    code = """
        import os
        from prometheus_client import generate_latest
        from gunicorn_insight._master.drain import Round
        from gunicorn_insight._master.pressure import CpuThrottling, HostPressure
        from gunicorn_insight._export.prometheus import PrometheusSink
        from gunicorn_insight._export.metrics_process import make_registry
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        sink = PrometheusSink(directory, (0.1, 1.0), 1)
        host = HostPressure(throttling=CpuThrottling(100, 25, 1.5), memory_usage=300, memory_working_set=200,
                            pressure={("cpu", "some"): 2.5, ("memory", "full"): 0.25})
        facts = Round(workers=2, ready_workers=1, booting_workers=1, boot_durations=[0.7], stalled_requests=2,
                      stalls=1, crash_loop=True, crash_loops=1, host=host, context_switches={0: (40, 3)},
                      swap={0: 4096}, connections={0: 1, 1: 0}, pids={0: 10}, desired_workers=2, master_loop_stuck=6.5,
                      open_fds={0: 12}, fd_limits={0: 1024}, threads={0: 7})
        sink.publish(facts)
        print(generate_latest(make_registry(directory)).decode())
    """
    out = run_python(code, tmp_path)
    for line in (
        "gunicorn_cgroup_cpu_periods_total 100.0",
        "gunicorn_cgroup_cpu_throttled_periods_total 25.0",
        "gunicorn_cgroup_cpu_throttled_seconds_total 1.5",
        "gunicorn_cgroup_memory_usage_bytes 300.0",
        "gunicorn_cgroup_memory_working_set_bytes 200.0",
        'gunicorn_pressure_waiting_seconds_total{resource="cpu"} 2.5',
        'gunicorn_pressure_stalled_seconds_total{resource="memory"} 0.25',
        'gunicorn_worker_context_switches_total{kind="voluntary",worker="0"} 40.0',
        'gunicorn_worker_context_switches_total{kind="involuntary",worker="0"} 3.0',
        'gunicorn_worker_swap_bytes{worker="0"} 4096.0',
        "gunicorn_workers_ready 1.0",
        "gunicorn_workers_booting 1.0",
        "gunicorn_workers_desired 2.0",
        "gunicorn_master_loop_stuck_seconds 6.5",
        'gunicorn_worker_open_fds{worker="0"} 12.0',
        'gunicorn_worker_max_fds{worker="0"} 1024.0',
        'gunicorn_worker_threads{worker="0"} 7.0',
        'gunicorn_worker_boot_duration_seconds_bucket{le="1.0"} 1.0',
        "gunicorn_worker_boot_duration_seconds_count 1.0",
        "gunicorn_stalled_requests 2.0",
        "gunicorn_stalls_total 1.0",
        "gunicorn_worker_crash_loop 1.0",
        "gunicorn_worker_crash_loops_total 1.0",
    ):
        assert line in out, line
    for absent in (
        "gunicorn_cgroup_cpu_quota_cores ",
        "gunicorn_cgroup_memory_limit_bytes ",
        'gunicorn_pressure_waiting_seconds_total{resource="io"}',
        'gunicorn_worker_swap_bytes{worker="1"}',
        'gunicorn_worker_open_fds{worker="1"}',
        'gunicorn_worker_threads{worker="1"}',
        'gunicorn_worker_context_switches_total{kind="voluntary",worker="1"}',
    ):
        assert absent not in out, absent


def test_no_host_reading_writes_no_host_series(tmp_path: Path) -> None:
    """A round without host readings (no cgroup, no PSI) leaves every cgroup and pressure metric out, not 0;
    nor is a worker count gunicorn keeps written where none was read."""
    code = """
        import os
        from prometheus_client import generate_latest
        from gunicorn_insight._master.drain import Round
        from gunicorn_insight._export.prometheus import PrometheusSink
        from gunicorn_insight._export.metrics_process import make_registry
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        PrometheusSink(directory, (0.1, 1.0), 1).publish(Round(workers=1, ready_workers=1))
        print(generate_latest(make_registry(directory)).decode())
    """
    out = run_python(code, tmp_path)
    assert "gunicorn_workers_ready 1.0" in out
    samples = [line for line in out.splitlines() if line and not line.startswith("#")]
    assert not [line for line in samples if line.startswith(("gunicorn_cgroup_", "gunicorn_pressure_"))]
    assert "gunicorn_workers_desired" not in out
    assert "gunicorn_master_loop_stuck_seconds" not in out


def test_scrapes_read_only_regular_metric_files(tmp_path: Path) -> None:
    """A user's app.db and a symlink planted under a metric file's name are not scraped; real files are."""
    real = MetricFile(str(tmp_path / "counter_1.db"))
    real.write(sample_key("c", "c_total", {}, "c"), 1.0)
    real.close()
    with sqlite3.connect(tmp_path / "app.db") as database:
        database.execute("create table t (x)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret").write_bytes((tmp_path / "counter_1.db").read_bytes())
    (tmp_path / "counter_2.db").symlink_to(elsewhere / "secret")
    assert usable_files(str(tmp_path)) == [str(tmp_path / "counter_1.db")]


def test_rejected_requests_time_wait_and_drops_are_exported_and_absent_where_unseen(tmp_path: Path) -> None:
    """Rejected requests add up by reason, every reason present at 0 from the start where gunicorn parses; the
    TIME_WAIT gauge and the drops counter are per listener, drops present at 0 from a listener's first round; a
    worker class gunicorn does not parse for gets no rejected series."""
    code = """
        import os
        from collections import Counter
        from prometheus_client import generate_latest
        from gunicorn_insight._master.drain import Round
        from gunicorn_insight._export.prometheus import PrometheusSink
        from gunicorn_insight._export.metrics_process import make_registry
        directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        sink = PrometheusSink(directory, (0.1, 1.0), 1, rejects_seen=True)
        sink.publish(
            Round(
                rejected=Counter(framing=2),
                time_wait={"http://127.0.0.1:8000": 300},
                listen_drops={"http://127.0.0.1:8000": 0, "http://127.0.0.1:8001": 0},
            )
        )
        sink.publish(
            Round(rejected=Counter(framing=1, invalid_header_name=1), listen_drops={"http://127.0.0.1:8000": 4})
        )
        print(generate_latest(make_registry(directory)).decode())
        print("UNSEEN")
        other = os.path.join(directory, "unseen")
        os.mkdir(other)
        PrometheusSink(other, (0.1, 1.0), 1).publish(Round())
        print(generate_latest(make_registry(other)).decode())
    """
    seen, unseen = run_python(code, tmp_path).split("UNSEEN")
    assert 'gunicorn_requests_rejected_total{reason="framing"} 3.0' in seen
    assert 'gunicorn_requests_rejected_total{reason="invalid_header_name"} 1.0' in seen
    assert 'gunicorn_requests_rejected_total{reason="other"} 0.0' in seen
    assert 'gunicorn_listen_time_wait{listener="http://127.0.0.1:8000"} 300.0' in seen
    assert 'gunicorn_listen_drops_total{listener="http://127.0.0.1:8000"} 4.0' in seen
    assert 'gunicorn_listen_drops_total{listener="http://127.0.0.1:8001"} 0.0' in seen
    assert "gunicorn_requests_rejected_total" not in unseen
    assert "gunicorn_listen_drops_total" not in unseen


def test_bucket_counts_place_every_value_where_bisect_puts_it() -> None:
    """Counting a round's durations from one sort gives each bucket what a bisect per value gives: values on a
    bound, between, below, above, infinite, and (counted one by one) NaN."""
    bounds = (0.005, 0.01, 0.1, 1.0, 10.0)

    def one_by_one(values: list[float]) -> list[int]:
        counts = [0] * (len(bounds) + 1)
        for value in values:
            counts[bisect_left(bounds, value)] += 1
        return counts

    values = [0.0, 0.001, 0.005, 0.0050001, 0.01, 0.05, 0.1, 1.0, 9.99, 10.0, 10.5, 1e9, math.inf] * 3
    assert bucket_counts(bounds, values, sum(values)) == one_by_one(values)
    with_nan = [*values, math.nan, 0.02]
    assert bucket_counts(bounds, with_nan, sum(with_nan)) == one_by_one(with_nan)
    assert bucket_counts(bounds, [], 0.0) == [0] * 6
