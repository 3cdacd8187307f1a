"""Django support: the URL pattern of the request (``resolver_match.route``) as its route label.

Add ``"gunicorn_insight.django.RouteMiddleware"`` to ``MIDDLEWARE``, first for preference, and set
``route_label=True``. The route is taken on the way out, whoever produced the response: the view, a
``process_view`` that refused the request (CSRF, ``LoginRequiredMiddleware``), or a middleware further in that
answered before Django resolved the URL.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._report import report
from ._worker.routes import ROUTE_KEY

__all__ = ["RouteMiddleware"]


class RouteMiddleware:
    """Django middleware that labels each request with its URL pattern (the route template)."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        response = None
        try:
            response = self.get_response(request)
            return response
        finally:
            try:
                route = route_of(request, getattr(response, "status_code", None))
                if route:
                    request.environ[ROUTE_KEY] = route
            except Exception as error:
                report("the Django route middleware", error)


def route_of(request: Any, status: int | None) -> str | None:
    """The matched pattern with a leading slash (``items/<int:pk>/`` -> ``/items/<int:pk>/``), or None.

    Django sets ``resolver_match`` before any ``process_view`` runs, so a response a ``process_view``
    returned still has it. It is None only when nothing resolved the URL: no pattern matched (a 404, not
    resolved a second time) or a middleware answered first; then the path is resolved here, and only the
    pattern it matches is kept, never the path.
    """
    match = getattr(request, "resolver_match", None)
    if match is None:
        if status == 404:
            return None
        from django.urls import Resolver404, resolve

        try:
            match = resolve(request.path_info, getattr(request, "urlconf", None))
        except Resolver404:
            return None
    route = getattr(match, "route", None)
    return "/" + route.lstrip("/") if route else None
