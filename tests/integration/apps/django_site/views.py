from __future__ import annotations

from django.contrib.auth.decorators import login_not_required
from django.http import HttpRequest, HttpResponse
from django.utils.deprecation import MiddlewareMixin


@login_not_required  # type: ignore[untyped-decorator]  # django ships no types here
def item(request: HttpRequest, pk: int) -> HttpResponse:
    return HttpResponse(f"item {pk} {request.method}\n")


def private(request: HttpRequest) -> HttpResponse:
    return HttpResponse("only for users\n")


class ThrottleMiddleware(MiddlewareMixin):  # type: ignore[misc]  # django ships no types here
    """Refuses a request carrying X-Throttle with 429 before URL resolution (no resolver_match)."""

    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        if "HTTP_X_THROTTLE" in request.META:
            return HttpResponse("slow down\n", status=429)
        return None
