"""Boot markers: how the benchmark knows every worker has booted, with no server hook.

Each benchmark app calls :func:`mark_booted` as the last line of its module, once its own setup is done
(for ``prom_app``, after its Counter has created its file). With ``BENCH_READY_DIR`` set, that leaves an
empty file named after the worker's pid. A bare gunicorn must give the same signal as an instrumented
one, and a hook would be extra code in the bare runs.
"""

from __future__ import annotations

import os
from pathlib import Path


def mark_booted() -> None:
    """Runs once per worker, at import (gunicorn imports the app in each worker unless --preload)."""
    directory = os.environ.get("BENCH_READY_DIR")
    if directory:
        Path(directory, str(os.getpid())).touch()
