"""The ``gunicorn-insight`` command: ``status``, ``top``, ``stacks`` and ``doctor``.

``stacks`` writes one field per worker slot, the question its watchdog answers (see cli/stacks.py).
``status`` and ``top`` only read: the scoreboard is mapped read-only and the JSON files are opened for
reading, so pointing them at a production server cannot disturb it. Exit status: 0 success, 1 nothing to
show (no server, permission denied, the server went away, doctor found an error), 2 a usage problem
(including several servers and no selector).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .. import _discovery
from .. import _scoreboard as sb
from .._discovery import DiscoveryError, Selector, Server
from . import configload, livedoctor, views
from . import doctor as _doctor
from . import stacks as _stacks

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _selectors(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("choosing the server (default: the only one running)")
    choice = group.add_mutually_exclusive_group()
    choice.add_argument("--pid", type=int, help="pid of the master or of one of its workers")
    choice.add_argument("--pidfile", metavar="PATH", help="gunicorn's pidfile (--pid option of gunicorn)")
    choice.add_argument("--name", metavar="PROC_NAME", help="gunicorn's proc_name (-n)")
    choice.add_argument("--prometheus-dir", metavar="DIR", help="the server's Prometheus multiprocess directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gunicorn-insight", description="Look inside running gunicorn servers that use gunicorn-insight."
    )
    parser.add_argument(
        "--version", action=_Version, nargs=0, help="print this package's version and those it runs with, then exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", help="workers, requests in flight and recent exits, once")
    _selectors(status)
    status.add_argument("--json", action="store_true", help="print one JSON object (keys: see docs/cli.md)")
    status.set_defaults(handler=run_status)

    top = commands.add_parser("top", help="the status view, refreshed until Ctrl-C")
    _selectors(top)
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="seconds between refreshes")
    top.add_argument("--iterations", type=int, default=None, metavar="N", help="stop after N frames (scripts, tests)")
    top.set_defaults(handler=run_top)

    stacks = commands.add_parser(
        "stacks", help="the Python stack of every request in flight, from the workers themselves (no ptrace)"
    )
    _selectors(stacks)
    stacks.add_argument(
        "--wait",
        type=float,
        default=_stacks.DEFAULT_WAIT,
        metavar="SECONDS",
        help="how long to wait for the workers' answers (default %(default)s)",
    )
    stacks.add_argument("--json", action="store_true", help="print one JSON object (keys: see docs/cli.md)")
    stacks.set_defaults(handler=run_stacks)

    doctor = commands.add_parser("doctor", help="check a gunicorn configuration, or a running server, for trouble")
    _selectors(doctor)
    doctor.add_argument(
        "--window",
        type=float,
        default=livedoctor.DEFAULT_WINDOW,
        metavar="SECONDS",
        help="with a server selector: seconds to watch the server (default %(default)s)",
    )
    doctor.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="gunicorn config file, or python:module (default: as gunicorn picks it)",
    )
    doctor.add_argument(
        "--worker-memory-mb",
        type=int,
        default=_doctor.DEFAULT_WORKER_MEMORY_MB,
        metavar="MB",
        help="memory one worker needs, for the memory check (default %(default)s)",
    )
    doctor.add_argument("--json", action="store_true", help="print findings as one JSON object")
    doctor.add_argument(
        "--import-app",
        action="store_true",
        help="also import the application in a subprocess and time it (runs its import-time code)",
    )
    doctor.add_argument(
        "--app", metavar="MODULE:VARIABLE", help="the application for --import-app (default: wsgi_app from the config)"
    )
    doctor.set_defaults(handler=run_doctor)
    return parser


def version_line() -> str:
    """``gunicorn-insight X`` and the versions that matter in a bug report (what is installed, not imported)."""
    from importlib import metadata

    from .._version import __version__

    found = []
    for distribution in ("gunicorn", "prometheus_client", "opentelemetry-sdk"):
        try:
            found.append(f"{distribution} {metadata.version(distribution)}")
        except metadata.PackageNotFoundError:
            found.append(f"{distribution} not installed")
    python = ".".join(map(str, sys.version_info[:3]))
    return f"gunicorn-insight {__version__} ({', '.join(found)}; Python {python})"


class _Version(argparse.Action):
    """argparse's own version action wraps the line at the terminal width; a bug report wants it whole."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(version_line())
        parser.exit()


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        # rich assumes 80 columns for pipes and files; logs and scripts are better served by full rows.
        console.width = 120
    return console


def _error(message: str) -> None:
    print(f"gunicorn-insight: {message}", file=sys.stderr)


def _selector(args: argparse.Namespace) -> Selector:
    return Selector(pid=args.pid, pidfile=args.pidfile, name=args.name, prometheus_dir=args.prometheus_dir)


def _attach(server: Server, *, writable: bool = False) -> sb.Scoreboard:
    """The server's scoreboard, or a DiscoveryError saying why not and what to do."""
    path = server.scoreboard_path
    try:
        return sb.Scoreboard.attach(path, writable=writable)
    except PermissionError:
        owner = _discovery.user_name(_owner(path))
        raise DiscoveryError(
            f"permission denied {'opening' if writable else 'reading'} the scoreboard {path} (owned by {owner}); "
            f"run as the server's user (sudo -u {owner} gunicorn-insight ...) or as root"
        ) from None
    except FileNotFoundError:
        raise DiscoveryError(
            f"the scoreboard {path} is gone: the server (pid {server.master_pid}) has just exited"
        ) from None
    except ValueError as error:
        raise DiscoveryError(
            f"{error}; this gunicorn-insight is a different version from the server's: run the "
            "gunicorn-insight command from the server's own environment"
        ) from None


def _owner(path: str) -> int:
    for candidate in (path, os.path.dirname(path)):
        try:
            return os.stat(candidate).st_uid
        except OSError:
            continue
    return -1


def _open(args: argparse.Namespace) -> tuple[Server, sb.Scoreboard]:
    server = _discovery.select(_selector(args))
    return server, _attach(server)


def run_status(args: argparse.Namespace) -> int:
    try:
        server, board = _open(args)
    except DiscoveryError as error:
        _error(str(error))
        return error.code
    try:
        snap = views.snapshot(views.take_reading(server, board))
    finally:
        board.close()
    if args.json:
        print(json.dumps(snap, indent=2))
    else:
        _console().print(views.render(snap))
    return EXIT_OK


def _frame(snap: views.StatusDocument, interval: float) -> Group:
    title = Text(
        f"gunicorn-insight top  {time.strftime('%H:%M:%S')}  every {interval:g}s  Ctrl-C to quit", style="reverse"
    )
    return Group(title, views.render(snap, max_exits=5))


def run_top(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        _error(f"--interval {args.interval} must be a positive number of seconds, e.g. --interval 1")
        return EXIT_USAGE
    if args.iterations is not None and args.iterations < 1:
        _error(f"--iterations {args.iterations} must be at least 1 (leave it out to run until Ctrl-C)")
        return EXIT_USAGE
    try:
        server, board = _open(args)
    except DiscoveryError as error:
        _error(str(error))
        return error.code
    console = _console()
    try:
        if console.is_terminal:
            return _top_live(console, server, board, args)
        return _top_batch(console, server, board, args)
    except KeyboardInterrupt:
        return EXIT_OK  # Ctrl-C is how top is meant to end
    finally:
        board.close()


def _gone(server: Server) -> str:
    return f"gunicorn (master pid {server.master_pid}, {server.proc_name}) has exited; nothing left to watch"


def _frames(server: Server, board: sb.Scoreboard, args: argparse.Namespace) -> Iterator[views.StatusDocument | None]:
    """Snapshots every interval; stops after --iterations, or when the master is gone (yields None)."""
    count = 0
    while args.iterations is None or count < args.iterations:
        if count:
            time.sleep(args.interval)
        # The mapping outlives the file, so only the master's pid says whether anyone still writes it.
        if not _discovery.pid_alive(server.master_pid):
            yield None
            return
        yield views.snapshot(views.take_reading(server, board))
        count += 1


def _top_live(console: Console, server: Server, board: sb.Scoreboard, args: argparse.Namespace) -> int:
    with Live(console=console, auto_refresh=False, screen=False, transient=False) as live:
        for snap in _frames(server, board, args):
            if snap is None:
                live.stop()
                _error(_gone(server))
                return EXIT_FAILED
            live.update(_frame(snap, args.interval), refresh=True)
    return EXIT_OK


def _top_batch(console: Console, server: Server, board: sb.Scoreboard, args: argparse.Namespace) -> int:
    """No terminal (a pipe, a test): print frame after frame, like top -b, instead of redrawing."""
    for snap in _frames(server, board, args):
        if snap is None:
            _error(_gone(server))
            return EXIT_FAILED
        console.print(_frame(snap, args.interval))
        console.print()
        console.file.flush()
    return EXIT_OK


def run_stacks(args: argparse.Namespace) -> int:
    if not 0 < args.wait <= 60:
        _error(f"--wait {args.wait} must be between 0 and 60 seconds, e.g. --wait 3")
        return EXIT_USAGE
    try:
        server = _discovery.select(_selector(args))
        board = _attach(server, writable=True)
    except DiscoveryError as error:
        _error(str(error))
        return error.code
    # --pid of a worker (rather than the master) asks that worker alone.
    only_pid = args.pid if args.pid is not None and args.pid != server.master_pid else None
    try:
        collected = _stacks.collect(server, board, args.wait, only_pid)
    finally:
        board.close()
    document = _stacks.document(server, collected)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _stacks.render(_console(), document)
    return EXIT_FAILED if _stacks.unanswered(document) else EXIT_OK


_SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def run_doctor(args: argparse.Namespace) -> int:
    if args.worker_memory_mb <= 0:
        _error(f"--worker-memory-mb {args.worker_memory_mb} must be a positive number of megabytes")
        return EXIT_USAGE
    if not _selector(args).empty:
        return _run_live_doctor(args)
    try:
        loaded, ctx, findings = _doctor.diagnose(
            args.config, args.worker_memory_mb, import_app=args.import_app, app=args.app
        )
    except configload.ConfigLoadError as error:
        _error(str(error))
        return EXIT_FAILED
    except _doctor.UsageError as error:
        _error(str(error))
        return EXIT_USAGE
    errors = sum(1 for finding in findings if finding.severity == "error")
    if args.json:
        document = {
            "facts": _doctor.facts(loaded, ctx),
            "findings": [finding.as_dict() for finding in findings],
            "errors": errors,
            "warnings": sum(1 for finding in findings if finding.severity == "warning"),
        }
        print(json.dumps(document, indent=2))
    else:
        _print_doctor(_console(), _doctor.facts(loaded, ctx), findings)
    return EXIT_FAILED if errors else EXIT_OK


def _run_live_doctor(args: argparse.Namespace) -> int:
    """Judge a running server from what it does over --window seconds; with -c, its config file too."""
    if not 0 < args.window <= 600:
        _error(f"--window {args.window} must be between 0 and 600 seconds, e.g. --window 3")
        return EXIT_USAGE
    try:
        server, board = _open(args)
    except DiscoveryError as error:
        _error(str(error))
        return error.code
    try:
        facts = livedoctor.measure(server, board, args.window)
    finally:
        board.close()
    findings = livedoctor.run_live_checks(facts)
    findings += _doctor.version_findings(server.info.gunicorn_version or "")
    if args.config is not None:
        try:
            findings += _doctor.diagnose(args.config, args.worker_memory_mb)[2]
        except configload.ConfigLoadError as error:
            _error(str(error))
            return EXIT_FAILED
    findings = _doctor.by_severity(findings)
    errors = sum(1 for finding in findings if finding.severity == "error")
    if args.json:
        document = {
            "server": {"master_pid": server.master_pid, "proc_name": server.proc_name, "binds": server.binds},
            "measured": facts.as_dict(),
            "findings": [finding.as_dict() for finding in findings],
            "errors": errors,
            "warnings": sum(1 for finding in findings if finding.severity == "warning"),
        }
        print(json.dumps(document, indent=2))
        return EXIT_FAILED if errors else EXIT_OK
    console = _console()
    console.print(Text(f"server: {server.label()}", style="bold"))
    console.print(facts.summary())
    _print_findings(console, findings)
    return EXIT_FAILED if errors else EXIT_OK


def _print_doctor(console: Console, facts: dict[str, Any], findings: Sequence[_doctor.Finding]) -> None:
    source = facts["config"] or "no config file (gunicorn defaults)"
    if facts["gunicorn_cmd_args"]:
        source += f" + GUNICORN_CMD_ARGS={facts['gunicorn_cmd_args']!r}"
    console.print(Text(f"config: {source}", style="bold"))
    memory = facts["mem_available_mb"]
    console.print(
        f"{facts['worker_class']} x {facts['workers']} workers, threads {facts['threads']}, "
        f"timeout {facts['timeout']}s, keepalive {facts['keepalive']}s, backlog {facts['backlog']}; "
        f"host: {facts['cpus']} CPUs, {'?' if memory is None else memory} MB available, "
        f"somaxconn {facts['somaxconn'] if facts['somaxconn'] is not None else '?'}"
    )
    _print_findings(console, findings)


def _print_findings(console: Console, findings: Sequence[_doctor.Finding]) -> None:
    if not findings:
        console.print(Text("no problems found", style="green"))
        return
    # What, why and fix stacked in one cell: three prose columns side by side read badly in 80 columns.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_lines=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("finding", overflow="fold")
    for finding in findings:
        detail = Text(finding.what, style="bold")
        detail.append(f"\nwhy: {finding.why}\nfix: {finding.fix}")
        table.add_row(Text(finding.severity, style=_SEVERITY_STYLE[finding.severity]), finding.check, detail)
    console.print(table)
    counts = {severity: sum(1 for f in findings if f.severity == severity) for severity in _doctor.SEVERITIES}
    console.print(f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = args.handler
    try:
        return int(handler(args))
    except BrokenPipeError:
        # `gunicorn-insight status | head`: the reader left; that is not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
