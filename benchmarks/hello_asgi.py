"""The benchmark's ASGI application for uvicorn's worker: the cheapest there is, as hello.py is for WSGI."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from types import SimpleNamespace
from typing import Any

from bench_ready import mark_booted

Message = MutableMapping[str, Any]
BODY = b"hello"
START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())],
}
FINISH = {"type": "http.response.body", "body": BODY}
# What a router (Starlette's) leaves in the scope, read only when the route label is on: bare runs pay this one
# dict store too, so both sides of a pair run the same app.
ROUTE = SimpleNamespace(path_format="/")


async def app(
    scope: MutableMapping[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    scope["route"] = ROUTE
    await send(START)
    await send(FINISH)


mark_booted()
