"""Where this process's cgroups live, for cgroup v1, v2 and hybrid hosts (v2 mounted at ``unified/``)."""

from __future__ import annotations

import os


def memory_cgroup_dirs(
    proc_self_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup", *, include_root: bool = True
) -> list[tuple[int, str]]:
    """(cgroup version, directory) of the memory controller: the process's own group, then (unless told
    not to) the hierarchy's root, where a container's limits often live."""
    found: list[tuple[int, str]] = []
    for version, own, mount in cgroup_dirs("memory", proc_self_cgroup, root):
        found.append((version, own))
        if include_root:
            found.append((version, mount))
    return found


def cgroup_dirs(
    controller: str, proc_self_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
) -> list[tuple[int, str, str]]:
    """(cgroup version, this process's directory, the hierarchy's mount point) for ``controller``: its v1
    hierarchy if it has one, then the v2 group (also in hybrid mode, where v2 is mounted at ``unified/``).
    An empty ``controller`` asks for the v2 group alone."""
    try:
        with open(proc_self_cgroup) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    found: list[tuple[int, str, str]] = []
    unified: list[tuple[int, str, str]] = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            for mount in (root, os.path.join(root, "unified")):
                if os.path.exists(os.path.join(mount, "cgroup.controllers")):
                    unified.append((2, os.path.normpath(os.path.join(mount, relative)), mount))
                    break
        elif controller and controller in controllers.split(","):
            # The hierarchy is mounted under the joined names (cpu,cpuacct), usually with a symlink per name.
            for name in (controllers, controller):
                mount = os.path.join(root, name)
                if os.path.isdir(mount):
                    found.append((1, os.path.normpath(os.path.join(mount, relative)), mount))
                    break
    return found + unified
