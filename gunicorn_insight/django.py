"""Django support: the URL pattern of the view (``resolver_match.route``) as the request's route label.

Add ``"gunicorn_insight.django.RouteMiddleware"`` to ``MIDDLEWARE`` and set ``route_label=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._routes import ROUTE_KEY

__all__ = ["RouteMiddleware"]


class RouteMiddleware:
    """Django middleware that labels each request with its URL pattern (the route template)."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)

    def process_view(self, request: Any, view_func: Any, view_args: Any, view_kwargs: Any) -> None:
        # Django resolves the URL before process_view: resolver_match.route is the pattern, e.g. "items/<int:pk>/".
        match = getattr(request, "resolver_match", None)
        route = getattr(match, "route", None)
        if route:
            request.environ[ROUTE_KEY] = "/" + route.lstrip("/")
