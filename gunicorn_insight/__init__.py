"""gunicorn-insight: make a running Gunicorn server explain itself.

In ``gunicorn.conf.py``::

    import gunicorn_insight
    gunicorn_insight.install(globals())

or, with no config file of your own: ``gunicorn -c python:gunicorn_insight.conf app:app``.
"""

from __future__ import annotations

from ._hooks import install
from ._version import __version__
from .settings import ConfigurationError, Settings

__all__ = ["ConfigurationError", "Settings", "__version__", "install"]
