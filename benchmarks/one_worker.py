#!/usr/bin/env python3
"""One worker's CPU per request, bare against gunicorn-insight, in alternating rounds: the steadier timing.

    python benchmarks/one_worker.py [--worker uvicorn|sync|gthread|gevent] [--config everything]
                                    [--app hello|fastapi] [--rounds 12] [--seconds 4] [--connections 4]
                                    [--json PATH]

bench.py's rows run two workers on the same two cores as wrk; on a 2-core VM which worker takes which
connection, and what runs beside it, moves a row's pairs by 15% either way, wider than a 5% budget. Here
gunicorn runs one worker, alone on the last CPU this process may use; its master, the plugin's /metrics
process, wrk and the StatsD sink share the first. Each round starts a server bare or instrumented (the
order alternates ABBA), loads it for 1 s unmeasured, then ``--seconds`` with wrk, and reads the CPU time
each process spent meanwhile in nanoseconds (``/proc/PID/schedstat``, where ``stat`` counts 10 ms ticks).

Reported per side: the worker's CPU per request, and the server's (worker, master and the plugin's helper
processes), median and lowest of the rounds. The lowest is the least disturbed; a ratio of medians is the
budget's measure, given with its 95% interval (the rounds of each side resampled): a round's CPU per request
moves by about 5% on this kind of machine, so 30 rounds still leave the ratio uncertain by about a point
either way. Beside it, the median of the rounds' own ratios (each round's two sides run back to back), whose
interval is narrower: a slow spell moves both sides of a round. The configurations and applications are
bench.py's (``--config`` is one of its plugin configurations, ``everything`` exporting to StatsD, /metrics and
OTLP with every optional feature on, or ``fastapi-instrumentator``, FastAPI's usual metrics middleware, in the
plugin's place); ``--app fastapi`` serves FastAPI's hello on both sides instead of the row's plain ASGI one,
which is what the instrumentator is measured on. Needs 2 CPUs or more, and wrk.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench  # noqa: E402 -- the benchmark's servers, sinks and load, found through the line above

WARMUP_SECONDS = 1.0
SIDES = ("bare", "plugin")
BOOTSTRAP_RESAMPLES = 4000
APPS = {"hello": None, "fastapi": "hello_fastapi:app"}  # None: the row's own (bench.APPS)


@dataclass
class Round:
    side: str  # "bare" or "plugin"
    requests: int
    worker_us: float  # the worker's CPU per request
    server_us: float  # the worker's, the master's and its other children's


def cpu_ns(pid: int) -> int:
    """Nanoseconds the process's threads have run (the first field of schedstat is the main thread's only;
    the threads' own files add up to the whole process)."""
    total = 0
    for thread in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{thread}/schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended between the listing and the read
    return total


def server_cpu_ns(master: int, worker: int) -> tuple[int, int]:
    """(the worker's, everything of the server's): the master, the worker and the master's other children."""
    helpers = sum(cpu_ns(pid) for pid in bench.children(master) if pid != worker)
    own = cpu_ns(worker)
    return own, own + cpu_ns(master) + helpers


def place(master: int, worker: int, worker_cpu: int, other_cpu: int) -> None:
    """The worker alone on worker_cpu; the master and its other children beside the load."""
    os.sched_setaffinity(master, {other_cpu})
    for pid in bench.children(master):
        os.sched_setaffinity(pid, {worker_cpu} if pid == worker else {other_cpu})


def one_round(
    side: str, launch: bench.Launch, args: argparse.Namespace, context: tuple[bench.Supervisor, bench.StatsdSink]
) -> Round:
    supervisor, sink = context
    server = bench.GunicornServer(supervisor, launch, worker_class=args.worker, workers=1, statsd=sink.address)
    load = bench.LoadGenerator(supervisor, "wrk", args.connections)
    with bench.running(server) as workers:
        (worker,) = workers
        place(server.pid, worker, args.cpus[1], args.cpus[0])
        load.run(server.url, WARMUP_SECONDS)
        worker_before, server_before = server_cpu_ns(server.pid, worker)
        result = load.run(server.url, args.seconds)
        worker_after, server_after = server_cpu_ns(server.pid, worker)
    if result.errors or result.requests == 0:
        raise bench.BenchError(f"{side}: {result.requests} requests, {result.errors} errors")
    per_request = 1e-3 / result.requests  # nanoseconds per run to microseconds per request
    worker_us, server_us = (worker_after - worker_before) * per_request, (server_after - server_before) * per_request
    return Round(side, result.requests, worker_us, server_us)


def ratio_interval(bare: list[float], plugin: list[float], resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """The 95% interval of the ratio of medians, by resampling each side's rounds (seeded: the same rounds give
    the same interval). A budget is met beyond doubt only when the interval ends below it."""
    draw = random.Random(0).choices
    ratios = sorted(
        statistics.median(draw(plugin, k=len(plugin))) / statistics.median(draw(bare, k=len(bare)))
        for _ in range(resamples)
    )
    return ratios[int(resamples * 0.025)], ratios[int(resamples * 0.975) - 1]


def paired_ratio(
    bare: list[float], plugin: list[float], resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float, float]:
    """The median of the rounds' own ratios, each round's plugin side over its bare side (run back to back,
    ABBA), and its 95% interval by resampling the pairs (seeded). A slow spell of the machine moves both sides
    of a pair, so the pairs spread less than the sides do: a narrower interval than ratio_interval's, for the
    same rounds."""
    ratios = [mine / theirs for theirs, mine in zip(bare, plugin, strict=True)]
    draw = random.Random(0).choices
    medians = sorted(statistics.median(draw(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), medians[int(resamples * 0.025)], medians[int(resamples * 0.975) - 1]


def summary(rounds: list[Round]) -> dict[str, dict[str, float]]:
    result = {}
    for side in SIDES:
        mine = [item for item in rounds if item.side == side]
        result[side] = {
            "worker_median_us": statistics.median(item.worker_us for item in mine),
            "worker_lowest_us": min(item.worker_us for item in mine),
            "server_median_us": statistics.median(item.server_us for item in mine),
            "server_lowest_us": min(item.server_us for item in mine),
        }
    return result


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=sorted(bench.WORKER_CLASSES), default="uvicorn")
    parser.add_argument(
        "--config",
        choices=sorted([*bench.PLUGIN_CONFIGS, "fastapi-instrumentator"]),
        default="everything",
        help="the plugin's configuration (bench.py's), or the FastAPI instrumentator in its place",
    )
    parser.add_argument(
        "--app",
        choices=sorted(APPS),
        default="hello",
        help="the row's own application (hello), or FastAPI's hello (benchmarks/hello_fastapi.py) on both sides",
    )
    parser.add_argument("--rounds", type=int, default=12, help="rounds per side (default 12)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured load per round (default 4)")
    parser.add_argument("--connections", type=int, default=4, help="wrk's connections (default 4)")
    parser.add_argument("--json", metavar="PATH", help="write every round and the summary here")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0 or args.connections < 1:
        parser.error("--rounds and --connections must be at least 1, --seconds above 0")
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        parser.error(f"needs 2 CPUs (one for the worker, one for the rest); this process may run on {allowed}")
    if shutil.which("wrk") is None:
        parser.error("needs wrk (Debian: apt-get install wrk)")
    if (args.app == "fastapi" or args.config == "fastapi-instrumentator") and args.worker != "uvicorn":
        parser.error("FastAPI's application and its instrumentator run on --worker uvicorn")
    args.cpus = (allowed[0], allowed[-1])
    return args


def main() -> int:
    args = arguments()
    os.sched_setaffinity(0, {args.cpus[0]})  # this process, so the sink and wrk it starts, beside the master
    row = bench.Row(args.worker, args.config)
    launches = {"bare": bench.launch_for(row, False), "plugin": bench.launch_for(row, True)}
    if APPS[args.app] is not None:
        launches = {side: replace(launch, app=APPS[args.app]) for side, launch in launches.items()}
    workdir = Path(tempfile.mkdtemp(prefix="gunicorn-insight-one-worker-"))
    supervisor = bench.Supervisor(workdir)
    rounds: list[Round] = []
    sink: bench.StatsdSink | None = None
    try:
        code = bench.snapshot_package(workdir)
        sink = bench.StatsdSink(supervisor, "auto")
        print(
            f"one_worker: {row.name}, {args.rounds} rounds per side of {args.seconds:g} s, wrk -c{args.connections}; "
            f"worker on CPU {args.cpus[1]}, the rest on CPU {args.cpus[0]}; sink: {sink.description}",
            flush=True,
        )
        for number in range(args.rounds):
            for side in SIDES if number % 2 == 0 else SIDES[::-1]:
                bench.wait_for_quiet_machine()
                item = one_round(side, launches[side], args, (supervisor, sink))
                rounds.append(item)
                print(
                    f"  round {number + 1:2} {side:6} {item.requests:7} requests  worker {item.worker_us:6.1f} µs"
                    f"  server {item.server_us:6.1f} µs per request",
                    flush=True,
                )
    except bench.BenchError as error:
        print(f"one_worker: error: {error}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop_all()
        if sink is not None:
            sink.close()
        shutil.rmtree(workdir, ignore_errors=True)
    result = summary(rounds)
    for measure in ("worker", "server"):
        bare, plugin = result["bare"], result["plugin"]
        median_ratio = plugin[f"{measure}_median_us"] / bare[f"{measure}_median_us"]
        lowest_ratio = plugin[f"{measure}_lowest_us"] / bare[f"{measure}_lowest_us"]
        values = {side: [getattr(r, f"{measure}_us") for r in rounds if r.side == side] for side in SIDES}
        low, high = ratio_interval(values["bare"], values["plugin"])
        paired, paired_low, paired_high = paired_ratio(values["bare"], values["plugin"])
        result[measure] = {
            "ratio": median_ratio,
            "interval_low": low,
            "interval_high": high,
            "paired_ratio": paired,
            "paired_interval_low": paired_low,
            "paired_interval_high": paired_high,
        }
        print(
            f"{measure:6}: bare {bare[f'{measure}_median_us']:.1f} µs (lowest {bare[f'{measure}_lowest_us']:.1f}), "
            f"plugin {plugin[f'{measure}_median_us']:.1f} µs (lowest {plugin[f'{measure}_lowest_us']:.1f}): "
            f"ratio {median_ratio:.3f} by medians (95% interval {low:.3f} to {high:.3f}), {lowest_ratio:.3f} by the "
            f"lowest; paired rounds' median ratio {paired:.3f} (95% interval {paired_low:.3f} to {paired_high:.3f})"
        )
    if args.json:
        document = {"row": row.name, "code": code, "settings": vars(args), "rounds": [asdict(r) for r in rounds]}
        Path(args.json).write_text(json.dumps({**document, "summary": result}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
