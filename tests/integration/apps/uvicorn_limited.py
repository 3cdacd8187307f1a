"""uvicorn's worker class with a concurrency limit of its own, the way uvicorn's docs suggest configuring it."""

from __future__ import annotations

from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker


class LimitedWorker(UvicornWorker):  # type: ignore[misc]  # gunicorn's base class ships no type information
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {**UvicornWorker.CONFIG_KWARGS, "limit_concurrency": 7}
