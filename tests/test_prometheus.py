"""Prometheus side: directory checks, dead-worker files folded into archives, robust collection.

prometheus_client is imported in a subprocess for each test that needs its multiprocess mode, because the
mode is fixed at import time and must not leak between tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gunicorn_insight._prometheus import prepare_directory
from gunicorn_insight.settings import ConfigurationError


def run_python(code: str, directory: Path) -> str:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_prepare_directory_creates_and_clears(tmp_path: Path) -> None:
    """A missing directory is created; stale .db files from a previous run are removed, others kept."""
    directory = tmp_path / "prom"
    prepare_directory(str(directory), clear=True)
    (directory / "counter_123.db").write_bytes(b"x")
    (directory / "notes.txt").write_text("keep")
    prepare_directory(str(directory), clear=True)
    assert sorted(os.listdir(directory)) == ["notes.txt"]


def test_prepare_directory_keeps_files_for_a_successor_master(tmp_path: Path) -> None:
    """clear=False (a USR2 successor) leaves the live parent's files alone."""
    (tmp_path / "counter_1.db").write_bytes(b"x")
    prepare_directory(str(tmp_path), clear=False)
    assert os.listdir(tmp_path) == ["counter_1.db"]


def test_a_file_in_the_way_is_a_clear_error(tmp_path: Path) -> None:
    """A path that is a file, not a directory, fails at startup with the setting named."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigurationError, match=r"prometheus_dir=.*is not a writable directory"):
        prepare_directory(str(blocker), clear=True)


def test_import_before_directory_is_refused(tmp_path: Path) -> None:
    """prometheus_client imported without the variable cannot share metrics: refused with the fix."""
    code = """
        import os, sys
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        import prometheus_client
        from gunicorn_insight._prometheus import check_import_order
        try:
            check_import_order("/some/dir")
        except Exception as error:
            print(type(error).__name__, error)
    """
    out = run_python(code, tmp_path)
    assert out.startswith("ConfigurationError prometheus_client was imported before")
    assert "PROMETHEUS_MULTIPROC_DIR=/some/dir" in out


def test_dead_worker_files_are_folded_without_changing_totals(tmp_path: Path) -> None:
    """Counters, histograms and gauges of dead pids merge into archive files; totals stay exact."""
    code = """
        import os, glob
        from prometheus_client import Counter, Gauge, Histogram
        from prometheus_client.values import ValueClass
        from gunicorn_insight._prometheus import PrometheusSink
        from gunicorn_insight._http import make_registry
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
        from gunicorn_insight._http import make_registry
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
        from gunicorn_insight._drain import Round
        from gunicorn_insight._prometheus import PrometheusSink
        from gunicorn_insight._http import make_registry
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

    from gunicorn_insight._mmapfile import MetricFile, sample_key
    from gunicorn_insight._prometheus import PrometheusSink, merge_lock

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
