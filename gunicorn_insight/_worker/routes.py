"""Route templates from web frameworks, put where post_request can find them: the WSGI environ.

Flask pops its request context (and clears ``werkzeug.request`` from the environ) before gunicorn calls
post_request, so the rule is copied into ``environ["gunicorn_insight.route"]`` when Flask announces the
request (its ``request_started`` signal fires after URL matching). Django does the same through
:class:`gunicorn_insight.django.RouteMiddleware`. Any other framework, or an app of your own, can set
the key itself, or a ``route_resolver`` can compute it.
"""

from __future__ import annotations

import sys
from typing import Any

ROUTE_KEY = "gunicorn_insight.route"


def hook_frameworks() -> None:
    """Called in each worker after the application is loaded; only frameworks the app imported count."""
    flask = sys.modules.get("flask")
    if flask is not None and hasattr(flask, "request_started"):
        flask.request_started.connect(_flask_request_started, weak=False)


def _flask_request_started(sender: Any, **_extra: Any) -> None:
    from flask import request

    rule = request.url_rule
    if rule is not None:
        request.environ[ROUTE_KEY] = rule.rule
