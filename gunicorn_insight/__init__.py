"""gunicorn-insight: make a running Gunicorn server explain itself.

In ``gunicorn.conf.py``::

    import gunicorn_insight
    gunicorn_insight.install(globals())

or, with no config file of your own: ``gunicorn -c python:gunicorn_insight.conf app:app``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .settings import ConfigurationError, Settings

if TYPE_CHECKING:
    from ._hooks import install

__all__ = ["ConfigurationError", "Settings", "__version__", "install"]


def __getattr__(name: str) -> Any:
    # install() pulls in every role (worker, master, export); importing one role's module, as the /metrics
    # process and the command line do, must not load the others through this package's __init__.
    if name == "install":
        from ._hooks import install

        return install
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
