"""Runs in gunicorn's master (the arbiter): the exporter round, the scoreboard drain, exit forensics,
host readings (/proc, cgroup, listen backlog)."""
