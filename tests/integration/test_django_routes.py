"""Django under real gunicorn: every response is counted with the pattern of its URL, whoever answered it."""

from __future__ import annotations

import http.client

import pytest
from harness import APPS, Gunicorn, start_gunicorn
from servers import ProcessFactory


def request(server: Gunicorn, method: str, path: str, headers: dict[str, str] | None = None) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def start_django(process_factory: ProcessFactory, middleware_at: str) -> Gunicorn:
    return start_gunicorn(
        process_factory,
        app="django_site.wsgi:application",
        cwd=APPS,
        workers=1,
        env={
            "GUNICORN_INSIGHT_ROUTE_LABEL": "true",
            "ROUTE_MIDDLEWARE_AT": middleware_at,
            "DJANGO_SETTINGS_MODULE": "django_site.settings",
        },
    )


def requests_by_label(server: Gunicorn) -> dict[tuple[str, str, str], float]:
    return {
        (labels["method"], labels["status"], labels["route"]): value
        for (name, label_pairs), value in server.samples().items()
        if name == "gunicorn_requests_total" and (labels := dict(label_pairs))
    }


@pytest.mark.parametrize("middleware_at", ["last", "first"])
def test_django_responses_refused_before_the_view_keep_their_route(
    middleware_at: str, process_factory: ProcessFactory
) -> None:
    """CSRF 403s, LoginRequiredMiddleware 302s and admin pages carry their pattern; an unknown path is 'none'."""
    server = start_django(process_factory, middleware_at)
    assert request(server, "GET", "/items/7/") == 200
    assert request(server, "POST", "/items/7/") == 403  # no CSRF token: refused in CsrfViewMiddleware.process_view
    assert request(server, "GET", "/private/") == 302  # LoginRequiredMiddleware.process_view, to LOGIN_URL
    assert request(server, "GET", "/admin/login/") == 200
    assert request(server, "GET", "/admin/") == 302  # to the login page: admin pages need a user
    assert request(server, "GET", "/no/such/page/") == 404
    expected = {
        ("GET", "200", "/items/<int:pk>/"): 1,
        ("POST", "403", "/items/<int:pk>/"): 1,
        ("GET", "302", "/private/"): 1,
        ("GET", "200", "/admin/login/"): 1,
        ("GET", "302", "/admin/"): 1,
        ("GET", "404", "none"): 1,
    }
    server.wait_for_value("gunicorn_requests_total", sum(expected.values()))
    assert {key: value for key, value in requests_by_label(server).items() if value} == expected


def test_django_middleware_first_routes_responses_made_before_url_resolution(process_factory: ProcessFactory) -> None:
    """Placed first, it resolves the path itself for a middleware's early answer (429 before any resolver_match)."""
    server = start_django(process_factory, "first")
    for _ in range(3):
        assert request(server, "GET", "/items/3/", headers={"X-Throttle": "1"}) == 429
    assert request(server, "GET", "/nowhere/", headers={"X-Throttle": "1"}) == 429
    server.wait_for_value("gunicorn_requests_total", 4)
    assert {key: value for key, value in requests_by_label(server).items() if value} == {
        ("GET", "429", "/items/<int:pk>/"): 3,
        ("GET", "429", "none"): 1,
    }
    assert "/items/3/" not in server.metrics_text()
