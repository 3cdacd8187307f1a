"""StatsD and Prometheus at once, gthread workers, with a hook of your own kept running.

gunicorn -c gunicorn.both.conf.py app:app
"""

import gunicorn_insight

bind = "127.0.0.1:8000"
workers = 2
worker_class = "gthread"
threads = 4
worker_connections = 100


def post_fork(server, worker):
    server.log.info("worker %s forked (your own hook, still called)", worker.pid)


gunicorn_insight.install(
    globals(),
    statsd="127.0.0.1:8125",
    metrics_bind="127.0.0.1:9180",
)
