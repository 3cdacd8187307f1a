"""A minimal ASGI application answering 201; /block blocks the event loop for 3 s the way a sync call in a
coroutine does, /stuck for 30 s (past any test's --timeout); /slow awaits 3 s without blocking the loop; /burn
computes for 1 s (wall time)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope.get("path") == "/block":
        time.sleep(3)  # a blocking call inside a coroutine: the whole event loop stops for 3 s
    if scope.get("path") == "/stuck":
        time.sleep(30)
    if scope.get("path") == "/burn":
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            sum(range(10000))
    if scope.get("path") == "/slow":
        await asyncio.sleep(3)  # a slow awaited call: the loop keeps serving others
    await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"created\n"})
