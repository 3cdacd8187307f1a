"""gunicorn-insight configured as ``-c python:gunicorn_insight.conf`` does it, with the watchdog's tick stretched
to an hour: worker_instructions.py's plugin side.

Under valgrind a worker serves some tens of requests a second instead of thousands, so work paced by the clock
counts a hundred times its real share per request. The watchdog ticks at most once a second, and each tick has the
event loop run a heartbeat callback, woken through its self-pipe: counted in the worker's main thread as if it
were per-request work (docs/performance.md has the figure). ``worker_instructions.py --shipped-tick`` keeps it.
"""

from gunicorn_insight import install
from gunicorn_insight._worker import watchdog

watchdog._MAX_TICK = 3600.0  # private on purpose: only this measurement wants a slower tick
install(globals())
