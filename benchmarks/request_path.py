#!/usr/bin/env python3
"""What the plugin's two request hooks cost, counted by cachegrind instead of timed.

    python benchmarks/request_path.py [--worker sync|uvicorn] [--proxy] [--hooks compiled|python] [--requests 1000]

bench.py measures the overhead end to end, but on a small VM its pair-to-pair noise (a few percent) is
wider than a request-path change is worth. This counts instead: one process does what gunicorn's sync
worker does per request (parse the request from a socket, build the environ, call the application,
write the response) with gunicorn-insight's hooks configured like bench.py's ``sync:everything`` row,
and once with gunicorn's default hooks. Each runs under ``valgrind --tool=cachegrind`` twice, for a
short and a long loop, so interpreter start-up cancels out; the difference divided by the extra requests
is the cost per request: instructions, first-level cache misses (instructions and data) and last-level
misses. The counts are deterministic (hash seed fixed); the "cycles" column is only the usual estimate,
instructions + 10 x L1 misses + 100 x LL misses.

``--worker uvicorn`` does what uvicorn's worker class does per request instead: its HTTP protocol (the one
uvicorn picks, h11 unless httptools is installed) parses the request from a transport, runs the
application in a task of its own on an asyncio loop and writes the response; the application is
``benchmarks/hello_asgi.py``'s, bare, or inside the recording ASGI layer with the hooks configured like
bench.py's ``uvicorn:everything`` row. One keep-alive connection serves every request, as wrk's do.

``--proxy`` sends what a request behind nginx carries: a query string, an ``X-Request-Start`` stamp and
the usual forwarding headers. Needs valgrind (Debian package ``valgrind``). To compare two checkouts (from
the commit that added this script on), run it with ``PYTHONPATH`` pointing at the other one.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

WARMUP = 200
EVENTS = {"I refs": "instructions", "I1 misses": "L1i misses", "D1 misses": "L1d misses", "LL misses": "LL misses"}

PLAIN_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"  # what wrk sends


def proxied_request() -> bytes:
    return (
        b"GET /?page=2 HTTP/1.1\r\nHost: example.com\r\nX-Real-IP: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"X-Forwarded-Proto: https\r\nX-Request-Start: t=%.3f\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n"
        b"Connection: close\r\n\r\n" % time.time()
    )


def record_into_a_scoreboard(worker: Any, *, thread_cpu: bool, current: Any = None) -> Any:
    """A fresh scoreboard and the process's recorder on slot 0, configured like bench.py's everything row (the
    thread's CPU clock where requests own their thread); returns the scoreboard."""
    from gunicorn_insight import _scoreboard as sb
    from gunicorn_insight._worker import recorder

    board = sb.Scoreboard.create(
        os.path.join(tempfile.mkdtemp(), "scoreboard"),
        slots=2,
        entries=1,
        ring=8192,
        master_pid=os.getpid(),
        routes=100,
    )
    board.assign(0, time.monotonic())
    options = recorder.RecorderOptions(
        routes=True,
        exclude_paths=frozenset({"/healthz"}),
        access_log_atoms=True,
        threaded=False,
        thread_cpu=thread_cpu,
    )
    extra = () if current is None else (current,)
    recorder.RECORDER = recorder.RequestRecorder(board, 0, worker, options, *extra)
    return board


def request_loop(mode: str, requests: int, raw_request: bytes) -> None:
    """The child: a sync worker's per-request work, ``requests`` times after a warm-up."""
    from gunicorn.config import Config
    from gunicorn.glogging import Logger
    from gunicorn.http import RequestParser, wsgi

    cfg = Config()

    class Worker:  # the attributes gunicorn's default hooks and gunicorn-insight's read
        log = Logger(cfg)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        environ["gunicorn_insight.route"] = "/"  # as benchmarks/hello.py does, bare or not
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
        return [b"hello"]

    worker = Worker()
    pre_request, post_request = cfg.pre_request, cfg.post_request
    if mode != "bare":
        from gunicorn_insight._worker import recorder

        board = record_into_a_scoreboard(worker, thread_cpu=True)
        if mode == "compiled":
            if recorder.COMPILED is None:
                sys.exit(
                    "request_path: gunicorn_insight._worker._speedups is not built; reinstall with a C compiler present"
                )
            pre_request, post_request = recorder.COMPILED
        else:
            pre_request, post_request = recorder.pre_request, recorder.post_request

    listener, peer = ("127.0.0.1", 8000), ("127.0.0.1", 45678)

    def serve_one() -> None:
        client, server = socket.socketpair()
        with client, server:
            client.sendall(raw_request)
            req = next(RequestParser(cfg, server, peer))
            environ = resp = None
            try:
                pre_request(worker, req)
                resp, environ = wsgi.create(req, server, peer, listener, cfg)
                for chunk in app(environ, resp.start_response):
                    resp.write(chunk)
                resp.close()
            finally:
                post_request(worker, req, environ, resp)
            client.recv(65536)

    for _ in range(WARMUP + requests):
        serve_one()
    if mode != "bare":
        recorded = board.read(0).head
        if recorded != WARMUP + requests:  # the count would be meaningless if the hooks had bailed out
            sys.exit(f"request_path: the hooks recorded {recorded} of {WARMUP + requests} requests")


def asgi_request_loop(mode: str, requests: int, raw_request: bytes) -> None:
    """The child for ``--worker uvicorn``: uvicorn's per-request work on one keep-alive connection."""
    import asyncio

    from uvicorn.config import Config
    from uvicorn.server import ServerState

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hello_asgi import app  # the benchmark's ASGI application, bare or wrapped alike

    class Worker:  # what the layer and the hooks read from uvicorn's worker
        nr = 0
        nr_conns = 1

    worker = Worker()
    served: Any = app
    if mode != "bare":
        from gunicorn_insight._worker import asgi, recorder

        board = record_into_a_scoreboard(worker, thread_cpu=False, current=asgi.current_task)
        if mode == "compiled":
            if recorder.COMPILED is None:
                sys.exit(
                    "request_path: gunicorn_insight._worker._speedups is not built; reinstall with a C compiler present"
                )
            hooks = recorder.COMPILED
        else:
            hooks = (recorder.pre_request, recorder.post_request)
        served = asgi.RecordingApp(app, worker, hooks, routes=True).entry()

    class Transport(asyncio.Transport):
        """A connected socket's transport, as the protocol sees it; what it writes is counted, not sent."""

        def __init__(self) -> None:
            super().__init__()
            self.responses = 0

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return {"peername": ("127.0.0.1", 45678), "sockname": ("127.0.0.1", 8000)}.get(name, default)

        def write(self, data: Any) -> None:
            self.responses += bytes(data).startswith(b"HTTP/1.1 200 OK\r\n")

        def close(self) -> None:
            pass

        def is_closing(self) -> bool:
            return False

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    async def serve() -> None:
        # As uvicorn's worker configures it under gunicorn (uvicorn_worker.UvicornWorker), app aside.
        config = Config(served, log_config=None, timeout_keep_alive=2, forwarded_allow_ips="127.0.0.1")
        config.load()
        state = ServerState()
        protocol: Any = config.http_protocol_class(config=config, server_state=state, app_state={})
        transport = Transport()
        protocol.connection_made(transport)
        for _ in range(WARMUP + requests):
            protocol.data_received(raw_request)
            (task,) = state.tasks
            await task
            if protocol.__class__.__name__ == "H11Protocol":
                await asyncio.sleep(0)  # h11 reads the next request from a callback of the finished cycle
        protocol.connection_lost(None)
        if transport.responses != WARMUP + requests:
            sys.exit(f"request_path: {transport.responses} of {WARMUP + requests} requests were answered 200 OK")

    asyncio.run(serve())
    if mode != "bare":
        recorded = board.read(0).head
        if recorded != WARMUP + requests:
            sys.exit(f"request_path: the layer recorded {recorded} of {WARMUP + requests} requests")


def parse_summary(text: str) -> dict[str, int]:
    """The totals of cachegrind's summary (``==123== I   refs:      508,493,093``) for each of EVENTS."""
    counts = {}
    for event in EVENTS:
        pattern = r"\s+".join(map(re.escape, event.split()))
        match = re.search(rf"==\d+== {pattern}:\s+([\d,]+)", text)
        if match:
            counts[event] = int(match.group(1).replace(",", ""))
    return counts


def cachegrind(mode: str, requests: int, proxy: bool, worker: str) -> dict[str, int]:
    command = [
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=yes",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--child",
        mode,
        "--requests",
        str(requests),
        "--worker",
        worker,
    ] + (["--proxy"] if proxy else [])
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, check=False
    )
    counts = parse_summary(done.stderr)
    if done.returncode != 0 or len(counts) != len(EVENTS):
        sys.exit(f"request_path: cachegrind run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return counts


def per_request(mode: str, requests: int, proxy: bool, worker: str) -> dict[str, float]:
    short, long = cachegrind(mode, 100, proxy, worker), cachegrind(mode, 100 + requests, proxy, worker)
    return {event: (long[event] - short[event]) / requests for event in EVENTS}


def estimated_cycles(counts: dict[str, float]) -> float:
    return counts["I refs"] + 10 * (counts["I1 misses"] + counts["D1 misses"]) + 100 * counts["LL misses"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests counted per mode (default 1000)")
    parser.add_argument("--proxy", action="store_true", help="a request as nginx forwards it (query, X-Request-Start)")
    parser.add_argument(
        "--hooks",
        choices=("compiled", "python"),
        default="compiled",
        help="the compiled request hooks (the default where they are built) or the pure-Python ones",
    )
    parser.add_argument(
        "--worker",
        choices=("sync", "uvicorn"),
        default="sync",
        help="gunicorn's sync worker and the request hooks (default), or uvicorn's and the recording ASGI layer",
    )
    parser.add_argument("--child", choices=("bare", "compiled", "python"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.requests < 1:
        parser.error(f"--requests must be at least 1, got {args.requests}")
    raw_request = proxied_request() if args.proxy else PLAIN_REQUEST
    if args.worker == "uvicorn":
        raw_request = raw_request.replace(b"Connection: close\r\n", b"")  # one keep-alive connection serves all
    if args.child:
        loop = asgi_request_loop if args.worker == "uvicorn" else request_loop
        loop(args.child, args.requests, raw_request)
        return
    if shutil.which("valgrind") is None:
        sys.exit("request_path: valgrind is not installed (Debian: apt-get install valgrind)")
    import gunicorn_insight

    print(
        f"gunicorn-insight from {os.path.dirname(gunicorn_insight.__file__)}; "
        f"{args.worker} worker; {'proxied' if args.proxy else 'plain (wrk-like)'} request; {args.hooks} hooks; "
        f"{args.requests} requests per mode"
    )
    bare = per_request("bare", args.requests, args.proxy, args.worker)
    plugin = per_request(args.hooks, args.requests, args.proxy, args.worker)
    print(f"{'per request':<16}{'bare':>12}{'plugin':>12}{'added':>12}{'added %':>10}")
    rows = [(EVENTS[event], bare[event], plugin[event]) for event in EVENTS]
    rows.append(("est. cycles", estimated_cycles(bare), estimated_cycles(plugin)))
    for name, without, with_plugin in rows:
        added = with_plugin - without
        share = f"{100 * added / without:.1f}" if without >= 1 else "-"
        print(f"{name:<16}{without:>12,.0f}{with_plugin:>12,.0f}{added:>12,.0f}{share:>10}")


if __name__ == "__main__":
    main()
