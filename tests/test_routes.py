"""Routes: per-slot tables that outlive workers, the cap, and the framework adapters."""

from __future__ import annotations

import logging
from unittest.mock import patch

import pytest
from fakes import FakeRequest, FakeResponse, finish, start

from gunicorn_insight import _scoreboard as sb
from gunicorn_insight._master.drain import ROUTE_CAP_WARNING, Drainer
from gunicorn_insight._report import ERRORS
from gunicorn_insight._worker.recorder import RecorderOptions, RequestRecorder
from gunicorn_insight._worker.routes import ROUTE_KEY
from gunicorn_insight.django import RouteMiddleware

pytestmark = pytest.mark.usefixtures("each_hook_implementation")


@pytest.fixture
def routed(tmp_path: object) -> sb.Scoreboard:
    return sb.Scoreboard.create(f"{tmp_path}/board", slots=2, entries=1, ring=64, master_pid=1, routes=3)


def serve(recorder: RequestRecorder, route: str | None, path: str = "/x") -> None:
    req = FakeRequest(path=path)
    start(recorder, req)
    finish(recorder, req, {ROUTE_KEY: route} if route else {"PATH_INFO": path}, FakeResponse("200 OK"))


def recorder(board: sb.Scoreboard, slot: int = 0) -> RequestRecorder:
    board.assign(slot, 0.0)
    return RequestRecorder(board, slot, object(), RecorderOptions(routes=True, threaded=False))


def test_routes_become_labels_and_none_when_unknown(routed: sb.Scoreboard) -> None:
    """The template is the label; a request without one is counted under an empty route."""
    drainer = Drainer(routed, max_routes=10)
    rec = recorder(routed)
    serve(rec, "/items/<id>")
    serve(rec, "/items/<id>")
    serve(rec, None)
    assert drainer.collect().requests == {
        ("GET", 200, "/items/<id>"): 2,
        ("GET", 200, ""): 1,
    }


def test_route_value_that_is_not_a_string_still_counts(routed: sb.Scoreboard) -> None:
    """A framework putting a non-string (even unhashable) route in the environ gets its str(), no lost record."""
    drainer = Drainer(routed, max_routes=10)
    rec = recorder(routed)
    for route in (["/list"], ["/list"], 7):
        req = FakeRequest()
        start(rec, req)
        finish(rec, req, {ROUTE_KEY: route}, FakeResponse("200 OK"))
    assert drainer.collect().requests == {("GET", 200, "['/list']"): 2, ("GET", 200, "7"): 1}


def test_route_numbers_survive_worker_replacement(routed: sb.Scoreboard) -> None:
    """A new worker in the slot reuses the table, so records written before the handover still decode."""
    drainer = Drainer(routed, max_routes=10)
    serve(recorder(routed), "/a")
    routed.release(0)
    rec = recorder(routed)
    serve(rec, "/b")
    serve(rec, "/a")
    assert drainer.collect().requests == {("GET", 200, "/a"): 2, ("GET", 200, "/b"): 1}


def test_cap_counts_the_rest_as_other_and_warns_once(routed: sb.Scoreboard, caplog: pytest.LogCaptureFixture) -> None:
    """Past max_routes (per slot table, and across slots) values become 'other' with one warning."""
    ROUTE_CAP_WARNING._last.clear()
    drainer = Drainer(routed, max_routes=2)
    rec = recorder(routed)
    for n in range(6):
        serve(rec, f"/r{n}")
    with caplog.at_level(logging.WARNING, logger="gunicorn.error"):
        facts = drainer.collect()
    assert facts.requests[("GET", 200, "other")] == 4
    assert len({route for _, _, route in facts.requests}) == 3
    assert caplog.text.count("distinct routes") == 1


class DjangoMatch:
    route = "items/<int:pk>/"


class DjangoRequest:
    path_info = "/missing/"

    def __init__(self, match: DjangoMatch | None) -> None:
        self.resolver_match = match
        self.environ: dict[str, str] = {}


def test_django_middleware_records_the_pattern_on_the_way_out() -> None:
    """The pattern is read after the response exists, with a leading slash, even if get_response raised."""
    request = DjangoRequest(DjangoMatch())
    assert RouteMiddleware(lambda request: "response")(request) == "response"
    assert request.environ[ROUTE_KEY] == "/items/<int:pk>/"

    def failing(request: DjangoRequest) -> str:
        raise RuntimeError("the app's own error")

    request = DjangoRequest(DjangoMatch())
    with pytest.raises(RuntimeError, match="the app's own error"):
        RouteMiddleware(failing)(request)
    assert request.environ[ROUTE_KEY] == "/items/<int:pk>/"


def test_django_404_is_not_resolved_again() -> None:
    """A 404 with no resolver_match already failed Django's resolver: no second resolution, no route."""

    class NotFound:
        status_code = 404

    request = DjangoRequest(None)
    with patch("django.urls.resolve") as resolve:
        RouteMiddleware(lambda request: NotFound())(request)
    assert resolve.call_count == 0
    assert ROUTE_KEY not in request.environ


def test_django_middleware_errors_never_reach_the_app(caplog: pytest.LogCaptureFixture) -> None:
    """A request object the middleware cannot read is logged as the plugin's error; the response still goes out."""
    ERRORS._last.clear()
    with caplog.at_level(logging.ERROR, logger="gunicorn.error"):
        assert RouteMiddleware(lambda request: "response")(object()) == "response"
    assert "internal error in the Django route middleware" in caplog.text


def test_gthread_recorder_is_locked_while_a_new_route_is_numbered(routed: sb.Scoreboard) -> None:
    """gthread: post_request holds the recorder's lock while route_number runs Python code (a resolver here)."""
    held: list[bool] = []

    def resolver(environ: dict[str, str]) -> str:
        held.append(rec.lock is not None and rec.lock.locked())
        return environ["PATH_INFO"]

    routed.assign(0, 0.0)
    rec = RequestRecorder(routed, 0, object(), RecorderOptions(routes=True, threaded=True, route_resolver=resolver))
    serve(rec, None, path="/a")
    serve(rec, None, path="/b")
    assert held == [True, True]
    assert routed.route_names(0) == ["/a", "/b"]
    assert rec.lock is not None
    assert not rec.lock.locked()
