"""Host facts doctor reads: which filesystem a path is on, /proc/mounts parsing."""

from __future__ import annotations

import os
from pathlib import Path

from gunicorn_insight.cli.hostfacts import GunicornOnHost, Mount, System, _read_mounts, gunicorn_on_host, meminfo


def test_filesystem_is_the_longest_mount_point_and_the_last_mounted() -> None:
    """/dev/shm/x is on the /dev/shm mount, not on /; a mount listed later over the same point wins."""
    mounts = (Mount("/", "ext4"), Mount("/dev", "devtmpfs"), Mount("/dev/shm", "ext4"), Mount("/dev/shm", "tmpfs"))
    system = System(cpus=1, mem_available=None, somaxconn=None, mounts=mounts, tempdir="/tmp")
    assert system.filesystem("/dev/shm/heartbeat") == "tmpfs"
    assert system.filesystem("/dev/shmx") == "devtmpfs"
    assert system.filesystem("/var/tmp") == "ext4"


def test_mounts_are_read_with_escaped_spaces(tmp_path: Path) -> None:
    """/proc/mounts writes a space in a mount point as \\040; it is read back as a space."""
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\ntmpfs /run/my\\040dir tmpfs rw 0 0\n")
    assert _read_mounts(str(mounts)) == (Mount("/", "ext4"), Mount("/run/my dir", "tmpfs"))


def _process(proc: Path, pid: int, parent: int, command: str, rss_pages: int) -> None:
    directory = proc / str(pid)
    directory.mkdir(parents=True)
    (directory / "cmdline").write_bytes(command.replace(" ", "\0").encode() + b"\0")
    fields = ["S", str(parent)] + ["0"] * 19 + [str(rss_pages)] + ["0"] * 20
    (directory / "stat").write_text(f"{pid} (python) {' '.join(fields)}\n")


def test_every_gunicorn_on_the_host_with_its_children(tmp_path: Path) -> None:
    """Masters are gunicorn processes whose parent is not one (any spelling of the command line); each counts
    with its children (workers, the /metrics process); gunicorn-insight itself and other programs do not."""
    _process(tmp_path, 1, 0, "/sbin/init", 100)
    _process(tmp_path, 10, 1, "/srv/a/venv/bin/python /srv/a/venv/bin/gunicorn app:app", 10)
    _process(tmp_path, 11, 10, "/srv/a/venv/bin/python /srv/a/venv/bin/gunicorn app:app", 20)
    _process(tmp_path, 12, 10, "/usr/bin/python3 -c import-the-metrics-process", 5)
    _process(tmp_path, 20, 1, "python -m gunicorn shop:app", 10)
    _process(tmp_path, 21, 20, "gunicorn: worker [shop]", 30)
    _process(tmp_path, 30, 1, "/usr/local/bin/gunicorn-insight doctor --pid 10", 7)
    _process(tmp_path, 40, 1, "nginx: master process", 3)
    page = os.sysconf("SC_PAGE_SIZE")
    assert gunicorn_on_host(str(tmp_path)) == GunicornOnHost(servers=2, processes=5, rss=75 * page)


def test_meminfo_needs_both_figures(tmp_path: Path) -> None:
    """MemTotal and MemAvailable in bytes; a file without MemAvailable (kernels before 3.14) gives None."""
    (tmp_path / "meminfo").write_text("MemTotal:        1024 kB\nMemFree:          100 kB\nMemAvailable:     300 kB\n")
    assert meminfo(str(tmp_path / "meminfo")) == (1024 * 1024, 300 * 1024)
    (tmp_path / "old").write_text("MemTotal:        1024 kB\nMemFree:          100 kB\n")
    assert meminfo(str(tmp_path / "old")) is None
