"""The benchmark command (benchmarks/bench.py) still runs end to end; its numbers are not judged here."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_ROWS = ["sync:both", "ref:gunicorn-statsd"]
TINY_RESTARTS = [0, 20]
MODES = ["gunicorn-insight", "plain prometheus_client"]
PER_ROW = (
    "bare_cpu_us_per_request",
    "instrumented_cpu_us_per_request",
    "bare_rps",
    "instrumented_rps",
    "cpu_ratio",
    "throughput_ratio",
)


def load_script(name: str) -> Any:
    """A script under benchmarks/ imported as a module, to call its functions directly."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


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
    """benchmarks/request_path.py's loop (run natively, without cachegrind) puts each request through either hooks."""
    for mode in ("bare", "python", "compiled"):
        argv = [sys.executable, str(ROOT / "benchmarks" / "request_path.py"), "--child", mode, "--requests", "20"]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{mode}: {done.stdout}{done.stderr}"


def test_worker_instructions_reads_the_worker_main_threads_dump(tmp_path: Path) -> None:
    """Only the dump the application asked for, of the thread that serves (-01), is read: not the exit dumps."""
    worker_instructions = load_script("worker_instructions")
    dumps = {
        "plugin.41.1-01": "events: Ir I1mr\nsummary: 5000 70\n",  # the worker's main thread, at the marked request
        "plugin.41-01": "events: Ir I1mr\nsummary: 9000000 900\n",  # the same thread's dump at exit
        "plugin.41-02": "events: Ir I1mr\nsummary: 4000 40\n",  # the watchdog's, at exit
        "plugin.40-01": "events: Ir I1mr\nsummary: 7000000 700\n",  # the master's
        "bare.39.1-01": "events: Ir I1mr\nsummary: 3000 30\n",
    }
    for name, text in dumps.items():
        (tmp_path / name).write_text(f"# callgrind format\nversion: 1\n{text}")
    assert worker_instructions.main_thread_counts(tmp_path, "plugin") == {"Ir": 5000, "I1mr": 70}


def test_worker_instructions_reports_each_layout_and_the_medians(capsys: pytest.CaptureFixture[str]) -> None:
    """With several layouts, each layout's added cost is printed, then the medians of bare and plugin and the
    median of the layouts' added costs (not the difference of the two medians)."""
    worker_instructions = load_script("worker_instructions")
    layouts = [
        {"bare": {"Ir": 1000, "I1mr": 10}, "plugin": {"Ir": 1300, "I1mr": 16}},
        {"bare": {"Ir": 1100, "I1mr": 10}, "plugin": {"Ir": 1150, "I1mr": 12}},
        {"bare": {"Ir": 1200, "I1mr": 12}, "plugin": {"Ir": 1250, "I1mr": 20}},
    ]
    args = SimpleNamespace(worker="uvicorn", requests=1, cache_sim=False)
    worker_instructions.report(args, layouts)
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("layout")] == [
        "layout 0: added instructions +300",
        "layout 1: added instructions +50",
        "layout 2: added instructions +50",
    ]
    assert next(line for line in lines if line.startswith("instructions")).split() == [
        "instructions",
        "1,100",
        "1,250",
        "50",
        "4.5",
    ]


def test_worker_instructions_moves_every_later_object_in_layouts_past_the_first(tmp_path: Path) -> None:
    """Layout 0 runs as is; another one gets a sitecustomize module that keeps ballast made at start."""
    worker_instructions = load_script("worker_instructions")
    assert worker_instructions.ballast_directory(tmp_path, 0) is None
    where = worker_instructions.ballast_directory(tmp_path, 2)
    probe = "import sitecustomize, sys; print(len(sitecustomize._BALLAST), sitecustomize.__file__)"
    env = {**os.environ, "PYTHONPATH": str(where), "WORKER_INSTRUCTIONS_BALLAST": "6000"}
    argv = [sys.executable, "-c", probe]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6000", str(where / "sitecustomize.py")]


def test_worker_instructions_plugin_side_is_the_shipped_configuration_with_a_slow_tick() -> None:
    """per_request_conf installs the hooks gunicorn_insight.conf installs, and only stretches the watchdog's tick."""
    script = (
        "import sys; sys.path.insert(0, 'benchmarks')\n"
        "import gunicorn_insight.conf as shipped\n"
        "from gunicorn_insight._worker import watchdog\n"
        "tick = watchdog._MAX_TICK\n"
        "import per_request_conf as measured\n"
        "def hooks(module):\n"
        "    return sorted(name for name, value in vars(module).items() if hasattr(value, '__gunicorn_insight__'))\n"
        "print(tick, watchdog._MAX_TICK, hooks(shipped) == hooks(measured), len(hooks(measured)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    shipped_tick, measured_tick, same_hooks, count = done.stdout.split()
    assert (float(shipped_tick), float(measured_tick), same_hooks) == (1.0, 3600.0, "True")
    assert int(count) > 5


def test_worker_instructions_counts_a_real_uvicorn_worker() -> None:
    """Under callgrind, gunicorn-insight adds instructions to a real uvicorn worker's requests, and both dumps come."""
    missing = [tool for tool in ("valgrind", "cc") if shutil.which(tool) is None]
    if missing or not Path("/usr/include/valgrind/callgrind.h").exists():
        pytest.skip(f"needs valgrind with callgrind.h and a C compiler (missing: {missing or ['callgrind.h']})")
    # 200 requests, not fewer: averaged over 20 a side's count moves by about 10,000 instructions per request
    # from run to run (work done once, such as uvicorn's tick, shared by few requests), more than the layer adds.
    argv = [sys.executable, str(ROOT / "benchmarks" / "worker_instructions.py"), "--requests", "200"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith("instructions"))
    bare, plugin = (int(field.replace(",", "")) for field in row.split()[1:3])
    assert plugin > bare > 100_000, done.stdout


def test_one_worker_times_a_pinned_worker_in_alternating_rounds() -> None:
    """one_worker.py serves real requests from one pinned worker per side and reports both sides' CPU per request."""
    if len(os.sched_getaffinity(0)) < 2 or shutil.which("wrk") is None:
        pytest.skip("needs 2 CPUs and wrk")
    argv = [sys.executable, str(ROOT / "benchmarks" / "one_worker.py"), "--worker", "sync", "--config", "statsd"]
    argv += ["--rounds", "1", "--seconds", "1", "--connections", "2"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    rounds = [line.split() for line in done.stdout.splitlines() if line.lstrip().startswith("round")]
    assert sorted(fields[2] for fields in rounds) == ["bare", "plugin"], done.stdout
    assert all(int(fields[3]) > 0 and float(fields[6]) > 0 for fields in rounds), done.stdout
    assert any(line.startswith("worker: bare") and "95% interval" in line for line in done.stdout.splitlines()), (
        done.stdout
    )


def test_one_worker_gives_the_ratio_an_interval_from_its_rounds() -> None:
    """The ratio's 95% interval brackets the ratio of medians, is the same for the same rounds, and is a point when
    every round agrees."""
    one_worker = load_script("one_worker")
    bare, plugin = [100.0, 96.0, 104.0, 99.0, 101.0, 98.0], [105.0, 101.0, 110.0, 103.0, 106.0, 104.0]
    low, high = one_worker.ratio_interval(bare, plugin)
    assert low < statistics.median(plugin) / statistics.median(bare) < high
    assert (low, high) == one_worker.ratio_interval(bare, plugin)
    assert one_worker.ratio_interval([100.0] * 5, [105.0] * 5) == (1.05, 1.05)


def test_one_worker_pairs_each_rounds_two_sides() -> None:
    """Rounds whose speed drifts but whose plugin side costs 5% more each time: the paired ratio is 1.05 exactly,
    where the ratio of medians spreads with the drift; pairs are taken in order, not sorted."""
    one_worker = load_script("one_worker")
    bare = [100.0, 120.0, 90.0, 110.0, 95.0, 130.0]
    plugin = [value * 1.05 for value in bare]
    assert one_worker.paired_ratio(bare, plugin) == pytest.approx((1.05, 1.05, 1.05))
    low, high = one_worker.ratio_interval(bare, plugin)
    assert high - low > 0.1
    assert one_worker.paired_ratio([100.0, 200.0], [200.0, 100.0])[0] == pytest.approx(1.25)


def test_request_path_reads_cachegrind_summaries() -> None:
    """The four totals are read from cachegrind's summary, whatever its column padding."""
    request_path = load_script("request_path")
    summary = (
        "==7== I   refs:      508,493,093\n==7== I1  misses:      3,421,252\n==7== LLi misses:  17,924\n"
        "==7== D1  misses:      5,686,145  (  5,145,420 rd   +    540,725 wr)\n"
        "==7== LL misses:         283,713  (     87,532 rd   +    196,181 wr)\n"
    )
    assert request_path.parse_summary(summary) == {
        "I refs": 508_493_093,
        "I1 misses": 3_421_252,
        "D1 misses": 5_686_145,
        "LL misses": 283_713,
    }


def test_pin_is_a_diagnostic_that_writes_no_results_by_default() -> None:
    """--pin leaves benchmarks/results.json and the plot alone, and its CPU ratio is never judged against the budget."""
    bench = load_script("bench")
    args = bench.parse_args(["--pin"])
    assert (args.json, args.plot) == (None, None)
    everything = SimpleNamespace(row="sync:everything", cpu_ratio=SimpleNamespace(median=1.2))
    assert bench.budgets([everything], [], pinned=True)["cpu"]["verdict"] == "not judged (--pin)"
    assert bench.budgets([everything], [], pinned=False)["cpu"]["verdict"] == "MISSED"


def test_pin_splits_the_cpus_or_says_why_it_cannot() -> None:
    """pin_cpus keeps the first allowed CPU for the load and gives the rest to gunicorn; on one CPU it refuses."""
    bench = load_script("bench")
    cpus = sorted(os.sched_getaffinity(0))
    try:
        os.sched_setaffinity(0, cpus[:1])
        with pytest.raises(bench.BenchError, match="--pin needs at least 2 CPUs"):
            bench.pin_cpus()
        if len(cpus) >= 2:
            os.sched_setaffinity(0, cpus)
            assert bench.pin_cpus() == {"load": cpus[:1], "server": cpus[1:]}
            assert sorted(os.sched_getaffinity(0)) == cpus[:1]
    finally:
        os.sched_setaffinity(0, cpus)  # this test's thread only; the rest of the suite runs where it did
