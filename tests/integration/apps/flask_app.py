"""A Flask application: its url_rule is the route template gunicorn-insight labels requests with."""

from __future__ import annotations

import time

from flask import Flask

app = Flask(__name__)


@app.route("/items/<int:item_id>")
def item(item_id: int) -> str:
    return f"item {item_id}\n"


@app.route("/health")
def health() -> str:
    return "ok\n"


@app.route("/slow")
def slow() -> str:
    time.sleep(1)
    return "slow\n"


def raw_path(environ: dict[str, str]) -> str:
    """A deliberately bad resolver (raw paths): the cap on distinct routes must hold it."""
    return environ["PATH_INFO"]
