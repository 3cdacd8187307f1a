"""Runs in an operator's terminal: ``gunicorn-insight status|top|doctor``."""

from .commands import main

__all__ = ["main"]
