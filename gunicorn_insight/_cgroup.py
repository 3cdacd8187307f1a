"""Where this process's memory cgroup lives, for cgroup v2 and v1."""

from __future__ import annotations

import os


def memory_cgroup_dirs(
    proc_self_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup", *, include_root: bool = True
) -> list[tuple[int, str]]:
    """(cgroup version, directory) of the memory controller: the process's own group, then (unless told
    not to) the hierarchy's root, where a container's limits often live."""
    try:
        with open(proc_self_cgroup) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    found: list[tuple[int, str]] = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            own, top = os.path.join(root, path.lstrip("/")), root
            version = 2
        elif "memory" in controllers.split(","):
            own, top = os.path.join(root, "memory", path.lstrip("/")), os.path.join(root, "memory")
            version = 1
        else:
            continue
        found.append((version, own))
        if include_root:
            found.append((version, top))
    return found
