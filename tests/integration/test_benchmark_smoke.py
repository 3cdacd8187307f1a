"""The benchmark command (benchmarks/bench.py) still runs end to end; its numbers are not judged here."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TINY_ROWS = ["sync:both", "ref:gunicorn-statsd"]
TINY_RESTARTS = [0, 20]
MODES = ["gunicorn-insight", "plain prometheus_client"]
PER_ROW = (
    "bare_cpu_us_per_request", "instrumented_cpu_us_per_request", "bare_rps", "instrumented_rps", "cpu_ratio",
    "throughput_ratio",
)


def test_tiny_benchmark_reports_every_row_and_the_scrape_section(tmp_path: Path) -> None:
    """`bench.py --tiny` exits 0 with JSON holding both tiny rows (positive numbers) and every scrape point."""
    argv = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--tiny", "--json", str(tmp_path / "r.json")]
    plotting = importlib.util.find_spec("matplotlib") is not None  # without it the benchmark skips the plot
    if plotting:
        argv += ["--plot", str(tmp_path / "p.png")]
    bench = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = bench.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the benchmark then stops the gunicorn process groups it started.
        bench.send_signal(signal.SIGTERM)
        output, _ = bench.communicate(timeout=60)
        raise AssertionError(f"bench.py --tiny did not finish in 240 s\n{output}") from None
    assert bench.returncode == 0, output

    report = json.loads((tmp_path / "r.json").read_text())
    rows = {row["row"]: row for row in report["rows"]}
    assert list(rows) == TINY_ROWS, output
    for name, row in rows.items():
        assert row["pairs"] == 1, (name, row)
        for key in PER_ROW:
            assert row[key]["median"] > 0, (name, key, row[key])
    assert report["memory"]["rss_kib_bare_median"] > 0
    assert report["memory"]["rss_kib_instrumented_median"] > 0

    points = report["scrape"]["points"]
    assert [(point["mode"], point["target_restarts"]) for point in points] == [
        (mode, target) for mode in MODES for target in TINY_RESTARTS
    ]
    for point in points:
        assert point["restarts"] >= point["target_restarts"], point
        assert point["db_files"] > 0, point
        assert point["response_bytes"] > 0, point
        assert point["scrape_ms"]["median"] > 0, point
    if plotting:
        assert (tmp_path / "p.png").stat().st_size > 0


def test_request_path_loop_records_every_request() -> None:
    """benchmarks/request_path.py's loop (run natively, without cachegrind) puts each request through the hooks."""
    for mode in ("bare", "plugin"):
        argv = [sys.executable, str(ROOT / "benchmarks" / "request_path.py"), "--child", mode, "--requests", "20"]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{mode}: {done.stdout}{done.stderr}"


def test_request_path_reads_cachegrind_summaries() -> None:
    """The four totals are read from cachegrind's summary, whatever its column padding."""
    spec = importlib.util.spec_from_file_location("request_path", ROOT / "benchmarks" / "request_path.py")
    assert spec is not None
    assert spec.loader is not None
    request_path = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(request_path)
    summary = ("==7== I   refs:      508,493,093\n==7== I1  misses:      3,421,252\n==7== LLi misses:  17,924\n"
               "==7== D1  misses:      5,686,145  (  5,145,420 rd   +    540,725 wr)\n"
               "==7== LL misses:         283,713  (     87,532 rd   +    196,181 wr)\n")
    assert request_path.parse_summary(summary) == {
        "I refs": 508_493_093, "I1 misses": 3_421_252, "D1 misses": 5_686_145, "LL misses": 283_713}


def load_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench  # its dataclasses look their module up while being created
    spec.loader.exec_module(bench)
    return bench


def test_pin_is_a_diagnostic_that_writes_no_results_by_default() -> None:
    """--pin leaves benchmarks/results.json and the plot alone, and its CPU ratio is never judged against the budget."""
    bench = load_bench()
    args = bench.parse_args(["--pin"])
    assert (args.json, args.plot) == (None, None)
    everything = SimpleNamespace(row="sync:everything", cpu_ratio=SimpleNamespace(median=1.2))
    assert bench.budgets([everything], [], pinned=True)["cpu"]["verdict"] == "not judged (--pin)"
    assert bench.budgets([everything], [], pinned=False)["cpu"]["verdict"] == "MISSED"


def test_pin_splits_the_cpus_or_says_why_it_cannot() -> None:
    """pin_cpus keeps the first allowed CPU for the load and gives the rest to gunicorn; on one CPU it refuses."""
    script = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); import importlib.util as u\n"
        "spec = u.spec_from_file_location('bench', sys.argv[2]); bench = u.module_from_spec(spec)\n"
        "sys.modules['bench'] = bench; spec.loader.exec_module(bench)\n"
        "cpus = sorted(os.sched_getaffinity(0))\n"
        "if sys.argv[3] == 'one': os.sched_setaffinity(0, cpus[:1])\n"
        "try:\n    split = bench.pin_cpus()\n"
        "except bench.BenchError as error:\n    print('refused', error); raise SystemExit\n"
        "print('split', split == {'load': cpus[:1], 'server': cpus[1:]}, sorted(os.sched_getaffinity(0)) == cpus[:1])\n"
    )
    bench_dir, bench_py = str(ROOT / "benchmarks"), str(ROOT / "benchmarks" / "bench.py")
    one = subprocess.run([sys.executable, "-c", script, bench_dir, bench_py, "one"], capture_output=True, text=True,
                         timeout=60, check=True)
    assert one.stdout.startswith("refused --pin needs at least 2 CPUs"), one.stdout + one.stderr
    if len(os.sched_getaffinity(0)) >= 2:
        split = subprocess.run([sys.executable, "-c", script, bench_dir, bench_py, "all"], capture_output=True,
                               text=True, timeout=60, check=True)
        assert split.stdout.strip() == "split True True", split.stdout + split.stderr
