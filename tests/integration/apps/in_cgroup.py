"""``python in_cgroup.py CGROUP_DIR PROGRAM ARGS...``: join the cgroup, then become PROGRAM (same pid).

Everything PROGRAM forks later (gunicorn's workers) starts in the cgroup too.
"""

from __future__ import annotations

import os
import sys

directory, *command = sys.argv[1:]
with open(os.path.join(directory, "cgroup.procs"), "w") as procs:
    procs.write(f"{os.getpid()}\n")
os.execv(command[0], command)
