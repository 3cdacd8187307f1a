"""An ASGI 2 (double-callable) application, and uvicorn's worker class told so, as uvicorn's docs allow."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker

Message = MutableMapping[str, Any]


class Asgi2Worker(UvicornWorker):  # type: ignore[misc]  # gunicorn's base class ships no type information
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {**UvicornWorker.CONFIG_KWARGS, "interface": "asgi2"}


class App:
    """Instantiated with the scope, then called with receive and send."""

    def __init__(self, scope: MutableMapping[str, Any]) -> None:
        self.scope = scope

    async def __call__(
        self, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        if self.scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 203, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


app = App
