"""The one thing pyproject.toml cannot declare: the optional C extension with the compiled request hooks.

optional=True: where it cannot be built (no compiler, no Python headers, a big-endian machine) the install
still succeeds and gunicorn_insight uses the pure-Python hooks, which behave the same.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("gunicorn_insight._worker._speedups", ["gunicorn_insight/_worker/_speedups.c"], optional=True)
    ]
)
