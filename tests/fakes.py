"""Stand-ins for the few attributes of gunicorn's objects the unit tests need."""

from __future__ import annotations


class FakeRequest:
    """The attributes of gunicorn's Request that the recorder reads."""

    def __init__(self, method: str = "GET", path: str = "/", query: str = "", peer: object = ("10.1.2.3", 4567)):
        self.method = method
        self.path = path
        self.query = query
        self.peer_addr = peer


class FakeResponse:
    def __init__(self, status: object) -> None:
        self.status = status
