"""Host facts doctor reads: which filesystem a path is on, /proc/mounts parsing."""

from __future__ import annotations

from pathlib import Path

from gunicorn_insight.cli.hostfacts import Mount, System, _read_mounts


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
