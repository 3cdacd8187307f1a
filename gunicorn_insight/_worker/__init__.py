"""Runs in each worker process: the request hooks (Python and compiled), the watchdog thread, routes."""
