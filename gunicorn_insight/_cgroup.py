"""Where this process's memory cgroup lives, for cgroup v2 and v1."""

from __future__ import annotations

import os


def memory_cgroup_dirs(
    proc_self_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> list[tuple[int, str]]:
    """(cgroup version, directory) of the memory controller, the process's own group first, then the root."""
    try:
        with open(proc_self_cgroup) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    found: list[tuple[int, str]] = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            found += [(2, os.path.join(root, path.lstrip("/"))), (2, root)]
        elif "memory" in controllers.split(","):
            found += [(1, os.path.join(root, "memory", path.lstrip("/"))), (1, os.path.join(root, "memory"))]
    return found
