"""A ready gunicorn configuration: ``gunicorn -c python:gunicorn_insight.conf app:app``.

Every setting comes from ``GUNICORN_INSIGHT_*`` environment variables; gunicorn's own settings still
come from its command line and ``GUNICORN_CMD_ARGS``.
"""

from gunicorn_insight import install

install(globals())
