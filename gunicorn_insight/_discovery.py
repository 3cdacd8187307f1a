"""Find the running gunicorn masters that have gunicorn-insight, from the files each one leaves behind.

Every master creates a private run directory ``gunicorn-insight-XXXX`` (``tempfile.mkdtemp``) in
``/dev/shm`` when it can write there, else in the temporary directory, and writes ``server.json`` into it
once (see :mod:`gunicorn_insight._runfiles`). Discovery lists those directories and keeps the ones whose
``master_pid`` is alive. The directory is removed when the master exits normally, but a SIGKILLed master
leaves it behind: that is why liveness is checked, and why a recycled pid is caught by comparing the
process's start time with the time ``server.json`` was written.

``mkdtemp`` makes the directory readable by its owner only, so another user sees the directory but cannot
read ``server.json``; those are reported as unreadable rather than silently skipped, so the tool can say
"run as that user" instead of "nothing is running".
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _scoreboard as sb
from ._proc import TICKS, stat_fields
from ._runfiles import SERVER_FILE, STATUS_FILE, ContractError, ServerInfo, read_record

RUN_DIR_PREFIX = "gunicorn-insight-"
# A master writes server.json during on_starting, a moment after exec; a process that started well after
# that time cannot be the master that wrote it: its pid was recycled.
_START_SLACK = 2.0

EXIT_NOT_FOUND = 1
EXIT_AMBIGUOUS = 2


class DiscoveryError(Exception):
    """Discovery could not pick one server. The message says why and what to do; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_NOT_FOUND) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Server:
    """One live master, as described by its ``server.json``."""

    run_dir: str
    info: ServerInfo

    @property
    def master_pid(self) -> int:
        return self.info.master_pid

    @property
    def proc_name(self) -> str:
        return self.info.proc_name

    @property
    def binds(self) -> list[str]:
        return list(self.info.binds)

    @property
    def scoreboard_path(self) -> str:
        return self.info.scoreboard

    @property
    def status_path(self) -> str:
        return os.path.join(self.run_dir, STATUS_FILE)

    @property
    def prometheus_dir(self) -> str | None:
        return self.info.prometheus_dir

    def label(self) -> str:
        return f"pid {self.master_pid} name {self.proc_name!r} binds {', '.join(self.binds) or '-'}"


@dataclass
class Scan:
    """What a scan of the run directories found."""

    servers: list[Server] = field(default_factory=list)
    unreadable: list[tuple[str, int]] = field(default_factory=list)
    """(run dir, owner uid) of directories this user may not read: another user's servers, maybe live."""
    stale: list[str] = field(default_factory=list)
    """Run directories whose master is gone (SIGKILLed masters leave them behind)."""
    incompatible: list[tuple[str, str]] = field(default_factory=list)
    """(run dir, why) of live servers whose server.json this version cannot read (another format)."""


@dataclass(frozen=True)
class Selector:
    """How the operator named the server; all None means "the only one running"."""

    pid: int | None = None
    pidfile: str | None = None
    name: str | None = None
    prometheus_dir: str | None = None

    @property
    def empty(self) -> bool:
        return self.pid is None and self.pidfile is None and self.name is None and self.prometheus_dir is None


def search_roots() -> list[str]:
    """Where masters create their run directories (see ``_hooks._prepare_directories``)."""
    roots = ["/dev/shm", tempfile.gettempdir()]
    return list(dict.fromkeys(os.path.realpath(root) for root in roots))


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; it belongs to another user
    return True


def process_start_time(pid: int) -> float | None:
    """Wall-clock time the process started, from /proc; None when unknown (not Linux, gone)."""
    fields = stat_fields(pid)
    try:
        with open("/proc/stat") as handle:
            boot = next(float(line.split()[1]) for line in handle if line.startswith("btime "))
        ticks = int(fields[19]) if fields is not None else None  # starttime, in clock ticks since boot
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    return None if ticks is None else boot + ticks / TICKS


def is_live(info: ServerInfo) -> bool:
    return _alive(info.master_pid, info.started)


def _alive(pid: Any, started: Any) -> bool:
    """The master `pid` that wrote its server.json at `started` is running (values as read: maybe not numbers)."""
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    begun = process_start_time(pid)
    # A process that began well after server.json was written is not its master: the pid was recycled.
    return not (isinstance(started, (int, float)) and begun is not None and begun > started + _START_SLACK)


def scan(roots: Iterable[str] | None = None) -> Scan:
    found = Scan()
    for root in search_roots() if roots is None else roots:
        for run_dir in sorted(glob.glob(os.path.join(root, RUN_DIR_PREFIX + "*"))):
            if not os.path.isdir(run_dir):
                continue
            path = os.path.join(run_dir, SERVER_FILE)
            try:
                info = read_record(ServerInfo, path)
            except PermissionError:
                found.unreadable.append((run_dir, _owner(run_dir)))
                continue
            except FileNotFoundError:
                continue  # a master between mkdtemp and on_starting, or one whose on_starting failed
            except OSError:
                continue
            except ContractError as error:
                _sort_unreadable(found, run_dir, path, error)
                continue
            if is_live(info):
                found.servers.append(Server(run_dir, info))
            else:
                found.stale.append(run_dir)
    return found


def _sort_unreadable(found: Scan, run_dir: str, path: str, error: ContractError) -> None:
    """A server.json this version cannot decode: said about when its master runs, stale when it does not."""
    try:
        raw = read_json(path)
    except (OSError, ValueError):
        return  # not JSON (server.json is replaced atomically, so not ours): nothing to trust in it
    if not isinstance(raw, dict) or not isinstance(raw.get("format"), int):
        return  # not written by gunicorn-insight
    if _alive(raw.get("master_pid"), raw.get("started")):
        found.incompatible.append((run_dir, str(error)))
    else:
        found.stale.append(run_dir)


def read_json(path: str) -> Any:
    with open(path) as handle:
        return json.load(handle)


def _owner(path: str) -> int:
    try:
        return os.stat(path).st_uid
    except OSError:
        return -1


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return f"uid {uid}"


def read_pidfile(path: str) -> int:
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except FileNotFoundError:
        raise DiscoveryError(
            f"pidfile {path} does not exist; check gunicorn's --pid setting, or select the server with --pid"
        ) from None
    except OSError as error:
        raise DiscoveryError(
            f"cannot read pidfile {path}: {error.strerror}; run as the server's user or root"
        ) from None
    try:
        return int(text)
    except ValueError:
        raise DiscoveryError(f"pidfile {path} holds {text[:40]!r}, not a process id") from None


def worker_pids(server: Server) -> set[int]:
    """Pids of the server's workers as its scoreboard has them; empty when it cannot be read."""
    try:
        board = sb.Scoreboard.attach(server.scoreboard_path)
    except (OSError, ValueError):
        return set()
    try:
        return {view.pid for view in board if view.state != sb.FREE and view.pid}
    finally:
        board.close()


def _same_path(first: str, second: str) -> bool:
    return os.path.realpath(first) == os.path.realpath(second)


def matching(servers: Sequence[Server], selector: Selector) -> list[Server]:
    """The servers the selector names (every one when it names nothing)."""
    if selector.empty:
        return list(servers)
    pid = selector.pid
    if selector.pidfile is not None:
        pid = read_pidfile(selector.pidfile)
    chosen = list(servers)
    if pid is not None:
        masters = [server for server in chosen if server.master_pid == pid]
        chosen = masters or [server for server in chosen if pid in worker_pids(server)]
    if selector.name is not None:
        chosen = [server for server in chosen if server.proc_name == selector.name]
    if selector.prometheus_dir is not None:
        wanted = selector.prometheus_dir
        chosen = [server for server in chosen if server.prometheus_dir and _same_path(server.prometheus_dir, wanted)]
    return chosen


def describe_selector(selector: Selector) -> str:
    parts = []
    if selector.pid is not None:
        parts.append(f"pid {selector.pid}")
    if selector.pidfile is not None:
        parts.append(f"pidfile {selector.pidfile}")
    if selector.name is not None:
        parts.append(f"name {selector.name!r}")
    if selector.prometheus_dir is not None:
        parts.append(f"prometheus dir {selector.prometheus_dir}")
    return " and ".join(parts)


def select(selector: Selector, roots: Iterable[str] | None = None) -> Server:
    """Exactly one live server, or a DiscoveryError that says what to do."""
    found = scan(roots)
    chosen = matching(found.servers, selector)
    if len(chosen) == 1:
        return chosen[0]
    if len(chosen) > 1:
        listing = "\n".join(f"  {server.label()}" for server in chosen)
        what = "several servers match " + describe_selector(selector) if not selector.empty else "several servers run"
        raise DiscoveryError(
            f"{what}; pick one with --pid (or --pidfile, --name, --prometheus-dir):\n{listing}", EXIT_AMBIGUOUS
        )
    raise DiscoveryError(_nothing_found(found, selector))


def _nothing_found(found: Scan, selector: Selector) -> str:
    roots = " and ".join(os.path.join(root, RUN_DIR_PREFIX + "*") for root in search_roots())
    if selector.pid is not None and not pid_alive(selector.pid):
        message = f"no process {selector.pid} is running; give the pid of a live gunicorn master or worker"
    elif found.servers:
        listing = "\n".join(f"  {server.label()}" for server in found.servers)
        message = (
            f"no running gunicorn with gunicorn-insight matches {describe_selector(selector)}; running:\n{listing}"
        )
    else:
        message = (
            "no running gunicorn with gunicorn-insight found; is it started with the plugin? "
            "(gunicorn -c python:gunicorn_insight.conf, or gunicorn_insight.install(globals()) in its config). "
            f"Looked for {roots}"
        )
    for _, why in found.incompatible:
        message += f"\nfound a running server this gunicorn-insight cannot read: {why}"
    if found.unreadable:
        owners = sorted({user_name(uid) for _, uid in found.unreadable})
        message += (
            f"\npermission denied reading {len(found.unreadable)} run "
            f"director{'y' if len(found.unreadable) == 1 else 'ies'} owned by {', '.join(owners)}: "
            f"run as the server's user (sudo -u {owners[0]} gunicorn-insight ...) or as root"
        )
    return message
