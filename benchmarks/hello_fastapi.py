"""The reference row's application: a FastAPI hello, served bare or with prometheus-fastapi-instrumentator, the
metrics middleware FastAPI users add today (BENCH_INSTRUMENTATOR=1, with PROMETHEUS_MULTIPROC_DIR set, as its
documentation asks for under gunicorn)."""

from __future__ import annotations

import os

from bench_ready import mark_booted
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

app = FastAPI()


@app.get("/", response_class=PlainTextResponse)
async def hello() -> str:
    return "hello"


if os.environ.get("BENCH_INSTRUMENTATOR"):
    from prometheus_fastapi_instrumentator import Instrumentator

    Instrumentator().instrument(app).expose(app)

mark_booted()
