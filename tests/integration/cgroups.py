"""Child cgroups for tests that put gunicorn under a real limit: made here, emptied and removed afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import wait_until


@contextlib.contextmanager
def child_cgroup(parent: str, version: int, kind: str) -> Iterator[Path]:
    """A new cgroup under ``parent`` (skips the test, saying why, when it cannot be made); at the end whatever is
    left in it is killed and the group removed."""
    group = Path(parent) / f"gunicorn-insight-{kind}-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as error:
        pytest.skip(f"cannot create a {kind} cgroup (v{version}) under {parent}: {error}")
    try:
        yield group
    finally:
        _remove(group)


def _remove(group: Path) -> None:
    """Kill whatever is left in the group (the harness already stopped gunicorn), then rmdir it."""
    procs = group / "cgroup.procs"

    def removed() -> bool:
        with contextlib.suppress(OSError, ValueError):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            group.rmdir()
        except FileNotFoundError:
            return True
        except OSError:  # EBUSY until the last member has been reaped
            return False
        return True

    wait_until(removed, timeout=30, what=f"the test cgroup {group} to be empty and removed")
