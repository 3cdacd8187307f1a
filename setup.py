"""The one thing pyproject.toml cannot declare: the optional C extension with the compiled request hooks.

optional=True: where it cannot be built (no compiler, no Python headers, a big-endian machine) the install
still succeeds and gunicorn_insight uses the pure-Python hooks, which behave the same.

On Linux the extension calls CPython through its global offset table instead of PLT stubs (``-fno-plt``): a
request runs on an interpreter bound by its instruction cache, and the stubs' lines were a seventh of the
misses the extension's own code adds (worker_instructions.py --cache-sim: 167 per request, 144 without them).
GCC and clang both take the flag there.
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gunicorn_insight._worker._speedups",
            ["gunicorn_insight/_worker/_speedups.c"],
            extra_compile_args=["-fno-plt"] if sys.platform.startswith("linux") else [],
            optional=True,
        )
    ]
)
