#!/usr/bin/env python3
"""Instructions per request in a real gunicorn worker, counted by callgrind: bare against gunicorn-insight.

    python benchmarks/worker_instructions.py [--worker uvicorn|sync] [--requests 2000] [--cache-sim]
                                             [--layouts 1] [--shipped-tick] [--keep DIR]

bench.py times whole servers, and on a small VM its pairs spread wider than the overhead it looks for;
request_path.py counts a loop that imitates a worker, and misses what only a real one does. This runs the
real thing under ``valgrind --tool=callgrind``: gunicorn's master and one worker serving the benchmark's
application (benchmarks/hello.py or hello_asgi.py, through counted.py), bare, then with the plugin
(``-c python:per_request_conf``: the shipped configuration, see below) and the route label on. The
application zeroes callgrind's counters at request WARMUP and dumps them ``--requests`` requests later
(callgrind's client requests, through a small C helper built here), so the worker's start and exit are
left out. Threads are counted apart and the figure is the worker's main thread, which serves every request.

Valgrind makes a worker a hundred times slower, so work paced by the clock counts a hundred times its
share per request. The plugin's is the watchdog's tick (at most once a second), which also has the event
loop run a heartbeat callback: per_request_conf.py stretches the tick to an hour so the figure is the
requests' own cost; ``--shipped-tick`` keeps the shipped tick (``-c python:gunicorn_insight.conf``).
uvicorn's own tick (every 0.1 s) runs on both sides and still adds a little noise between runs.

``--cache-sim`` also counts first-level cache misses, instruction and data, which is where an added code
path costs more time than its instructions suggest: the interpreter's hot loop and the server's data no
longer fit beside it.
Under valgrind every request lasts longer than the hooks' hang-up check threshold (1 ms), so the check
runs for each one here and for few at full speed: the plugin's figure is a little high (about a hundred
instructions on uvicorn; on sync about 1,500 and a system call). On sync the plugin also replaces
gunicorn's default ``pre_request``, which logs each request at debug level: the figure is net of that.
The counts are deterministic up to the timers in the worker (hash seed fixed), but they depend on where
objects land in memory: dicts whose keys hash by address collide or not, and the type attribute cache picks a
slot by a name's address. Valgrind runs a process at the same addresses every time, so each build draws one
layout and keeps it, and a change anywhere (even the extension's optimisation level) can move the added
count by 2,500 instructions on uvicorn. ``--layouts N`` counts both sides in N layouts (the first as is, the
others with a different amount of ballast allocated at interpreter start, through a ``sitecustomize``
module, so that every later object lands elsewhere) and reports each layout's added cost and the medians.
Needs valgrind (Debian: ``valgrind``, which has callgrind.h) and a C compiler.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The tests' and the benchmark's one process toolkit (see bench.py).
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from servers import free_port, wait_until  # noqa: E402 -- found through the line above

WARMUP = 300
START_TIMEOUT = 300.0  # gunicorn's master and its worker, both under valgrind
START_ATTEMPTS = 3
HELPER_SOURCE = """
#include <valgrind/callgrind.h>
void counted_zero(void) { CALLGRIND_ZERO_STATS; }
void counted_dump(void) { CALLGRIND_DUMP_STATS; }
"""
WORKERS = {"sync": ("sync", "counted:app"), "uvicorn": ("uvicorn_worker.UvicornWorker", "counted:asgi_app")}
PLUGIN_ENV = {"GUNICORN_INSIGHT_ROUTE_LABEL": "true", "GUNICORN_INSIGHT_EXCLUDE_PATHS": "/healthz"}
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
BALLAST_STEP = 3000  # objects of assorted sizes per layout past the first
BALLAST_SOURCE = """\"\"\"worker_instructions.py --layouts: objects of assorted sizes made at interpreter start and
kept, so that every object made later (interned names, types, each request's objects) lands elsewhere.\"\"\"
import os

_BALLAST = [("x" * (n % 96), object(), (n,)) for n in range(int(os.environ["WORKER_INSTRUCTIONS_BALLAST"]))]
"""


def build_helper(directory: Path) -> Path:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        sys.exit("worker_instructions: no C compiler (Debian: apt-get install gcc)")
    source, library = directory / "counted.c", directory / "counted.so"
    source.write_text(HELPER_SOURCE)
    command = [compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(source)]
    built = subprocess.run(command, capture_output=True, check=False)
    if built.returncode != 0:
        sys.exit(f"worker_instructions: the callgrind helper did not build:\n{built.stderr.decode()}")
    return library


def serve(port: int, requests: int, keep_alive: bool, deadline: float) -> None:
    """``requests`` requests, each answered in full before the next; one connection for all with keep-alive."""
    connection = None
    for _ in range(requests):
        if connection is None:
            connection = socket.create_connection(("127.0.0.1", port), timeout=max(1.0, deadline - time.monotonic()))
        connection.sendall(REQUEST)
        answer = b""
        while not answer.endswith(b"hello"):
            chunk = connection.recv(65536)
            if not chunk:
                raise ConnectionError(f"the server closed the connection after {answer!r}")
            answer += chunk
        if not keep_alive:
            connection.close()
            connection = None
    if connection is not None:
        connection.close()


def main_thread_counts(directory: Path, label: str) -> dict[str, int]:
    """The worker's main thread's event totals in the dump the application asked for (callgrind dumps the
    calling thread there; with --separate-threads each thread has its own file)."""
    dumps = list(directory.glob(f"{label}.*.1-01"))
    if len(dumps) != 1:
        sys.exit(f"worker_instructions: no callgrind dump for {label} in {directory} (was the worker killed?)")
    text = dumps[0].read_text(errors="replace")
    events = re.search(r"^events: (.*)$", text, re.MULTILINE)
    summary = re.search(r"^summary: (.*)$", text, re.MULTILINE)
    if events is None or summary is None:
        sys.exit(f"worker_instructions: {dumps[0]} is not a callgrind dump")
    return {name: int(value) for name, value in zip(events.group(1).split(), summary.group(1).split(), strict=True)}


def ballast_directory(directory: Path, layout: int) -> Path | None:
    """Where layout's sitecustomize module is (None for layout 0, which runs as is)."""
    if layout == 0:
        return None
    where = directory / f"layout{layout}"
    where.mkdir(exist_ok=True)
    (where / "sitecustomize.py").write_text(BALLAST_SOURCE)
    return where


def run(mode: str, args: argparse.Namespace, directory: Path, helper: Path, layout: int = 0) -> dict[str, int]:
    worker_class, app = WORKERS[args.worker]
    env = {key: value for key, value in os.environ.items() if not key.startswith("GUNICORN_INSIGHT_")}
    ballast = ballast_directory(directory, layout)
    env.update(
        PYTHONHASHSEED="0",
        PYTHONPATH=os.pathsep.join([*([str(ballast)] if ballast else []), str(ROOT), str(HERE)]),
        COUNTED_HELPER=str(helper),
        COUNTED_WARMUP=str(WARMUP),
        COUNTED_COUNT=str(args.requests),
        WORKER_INSTRUCTIONS_BALLAST=str(layout * BALLAST_STEP),
    )
    label = mode if layout == 0 else f"{mode}-layout{layout}"
    config = []
    if mode == "plugin":
        env.update(PLUGIN_ENV)
        config = ["-c", "python:gunicorn_insight.conf" if args.shipped_tick else "python:per_request_conf"]
    valgrind = ["valgrind", "--tool=callgrind", "--separate-threads=yes"]
    valgrind += [f"--callgrind-out-file={directory}/{label}.%p", *(["--cache-sim=yes"] if args.cache_sim else [])]
    gunicorn = [sys.executable, "-m", "gunicorn", *config, "--timeout", "600", "--graceful-timeout", "60"]
    gunicorn += ["-w", "1", "-k", worker_class, app]
    log = directory / f"{label}.log"
    for _ in range(START_ATTEMPTS):
        # A free port can be taken by another process while valgrind starts gunicorn (seconds): then the log
        # says so, and another pair of ports is tried. Only gunicorn's own "Listening at" line says the port is
        # its, where a connection accepted could be anyone's.
        port = free_port()
        if mode == "plugin":
            env["GUNICORN_INSIGHT_METRICS_BIND"] = f"127.0.0.1:{free_port()}"
        with log.open("wb") as output:
            server = subprocess.Popen(
                [*valgrind, *gunicorn, "-b", f"127.0.0.1:{port}"], env=env, stdout=output, stderr=subprocess.STDOUT
            )
        try:
            bound = wait_until(
                functools.partial(_listening, log, port, server),
                timeout=START_TIMEOUT,
                what=f"gunicorn to listen on port {port}",
                dump=lambda: log.read_text(errors="replace"),
                interval=0.2,
            )
            if bound == "listening":
                serve(port, WARMUP - 1 + args.requests, args.worker == "uvicorn", time.monotonic() + 60 * args.requests)
                serve(port, 1, args.worker == "uvicorn", time.monotonic() + 60)  # the last counted one dumps
        finally:
            _stop(server)
        if bound == "listening":
            return main_thread_counts(directory, label)
    sys.exit(f"worker_instructions: {label}: each of {START_ATTEMPTS} ports was taken while gunicorn started")


def _listening(log: Path, port: int, server: subprocess.Popen[bytes]) -> str | None:
    """Whether gunicorn listens on port: "listening", "taken" (another process has it) or None (not yet)."""
    text = log.read_text(errors="replace")
    if f"Listening at: http://127.0.0.1:{port} " in text:
        return "listening"
    if f"Connection in use: ('127.0.0.1', {port})" in text:
        return "taken"
    if server.poll() is not None:
        raise AssertionError(f"gunicorn exited with status {server.returncode} before listening:\n{text}")
    return None


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=sorted(WORKERS), default="uvicorn", help="worker class (default uvicorn)")
    parser.add_argument("--requests", type=int, default=2000, help="requests counted per mode (default 2000)")
    parser.add_argument("--cache-sim", action="store_true", help="also count first-level cache misses")
    parser.add_argument(
        "--shipped-tick",
        action="store_true",
        help="keep the watchdog's tick at its shipped once a second (its work then counts as per-request work)",
    )
    parser.add_argument(
        "--layouts", type=int, default=1, help="memory layouts to count both sides in, medians reported (default 1)"
    )
    parser.add_argument("--keep", metavar="DIR", help="write the callgrind dumps and logs here and keep them")
    args = parser.parse_args()
    if args.requests < 1:
        parser.error(f"--requests must be at least 1, got {args.requests}")
    if args.layouts < 1:
        parser.error(f"--layouts must be at least 1, got {args.layouts}")
    if shutil.which("valgrind") is None or not Path("/usr/include/valgrind/callgrind.h").exists():
        sys.exit("worker_instructions: valgrind and its callgrind.h are needed (Debian: apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="worker-instructions-") as scratch:
        directory = Path(args.keep) if args.keep else Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        helper = build_helper(directory)
        layouts = [
            {mode: run(mode, args, directory, helper, layout) for mode in ("bare", "plugin")}
            for layout in range(args.layouts)
        ]
    report(args, layouts)


def report(args: argparse.Namespace, layouts: list[dict[str, dict[str, int]]]) -> None:
    """Per request: each layout's added cost when there are several, then the medians over the layouts."""
    events = ["Ir", "I1mr", "D1mr", "D1mw"] if args.cache_sim else ["Ir"]
    names = {"Ir": "instructions", "I1mr": "L1i misses", "D1mr": "L1d read misses", "D1mw": "L1d write misses"}

    def per_request(counts: dict[str, dict[str, int]], event: str) -> tuple[float, float]:
        return counts["bare"][event] / args.requests, counts["plugin"][event] / args.requests

    def added(counts: dict[str, dict[str, int]], event: str) -> float:
        bare, plugin = per_request(counts, event)
        return plugin - bare

    print(f"{args.worker} worker, {args.requests} requests after {WARMUP}; per request, the worker's main thread:")
    if len(layouts) > 1:
        for layout, counts in enumerate(layouts):
            print(f"layout {layout}: added " + ", ".join(f"{names[e]} {added(counts, e):+,.0f}" for e in events))
        print(f"medians of {len(layouts)} layouts:")
    print(f"{'':18}{'bare':>12}{'plugin':>12}{'added':>12}{'added %':>10}")
    for event in events:
        pairs = [per_request(counts, event) for counts in layouts]
        bare = statistics.median(pair[0] for pair in pairs)
        plugin = statistics.median(pair[1] for pair in pairs)
        more = statistics.median(added(counts, event) for counts in layouts)
        print(f"{names[event]:<18}{bare:>12,.0f}{plugin:>12,.0f}{more:>12,.0f}{100 * more / bare:>10.1f}")


if __name__ == "__main__":
    main()
