"""StatsD only: gunicorn's own statsd_host and statsd_prefix are reused, no /metrics port is opened.

    gunicorn -c gunicorn.statsd.conf.py app:app

gunicorn's statsd logger keeps sending gunicorn.requests, gunicorn.request.duration and
gunicorn.request.status.*; gunicorn-insight adds workers, in-flight and per-worker connection gauges
without counting anything twice. To have gunicorn-insight send everything instead (batched, cheaper),
drop statsd_host and pass statsd="127.0.0.1:8125" to install().
"""

import gunicorn_insight

bind = "127.0.0.1:8000"
workers = 2
statsd_host = "127.0.0.1:8125"
statsd_prefix = "myapp"

gunicorn_insight.install(globals(), metrics_bind="off")
