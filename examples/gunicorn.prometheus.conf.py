"""Prometheus only: metrics in a multiprocess directory, served on /metrics by the master.

gunicorn -c gunicorn.prometheus.conf.py app:app
curl http://127.0.0.1:9180/metrics
"""

import gunicorn_insight

bind = "127.0.0.1:8000"
workers = 2
timeout = 30

gunicorn_insight.install(
    globals(),
    prometheus_dir="/tmp/gunicorn-insight-prometheus",
    metrics_bind="127.0.0.1:9180",
)
