"""A FastAPI application with path parameters (routes must be recorded as templates), a mounted sub-application,
sync and async endpoints, an endpoint that raises, and a websocket (not a request)."""

from __future__ import annotations

from fastapi import FastAPI, HTTPException, WebSocket

app = FastAPI()
api = FastAPI()


@app.get("/items/{item_id}")
async def item(item_id: int) -> dict[str, int]:
    return {"item_id": item_id}


@app.get("/users/{name}/orders/{order_id}")
def order(name: str, order_id: str) -> dict[str, str]:  # a sync endpoint: FastAPI runs it in a thread pool
    return {"name": name, "order": order_id}


@app.get("/teapot")
async def teapot() -> None:
    raise HTTPException(status_code=418)


@app.get("/boom")
async def boom() -> None:
    raise RuntimeError("the application failed")


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())
    await websocket.close()


@api.get("/things/{thing_id}")
async def thing(thing_id: str) -> dict[str, str]:
    return {"thing": thing_id}


app.mount("/api", api)
