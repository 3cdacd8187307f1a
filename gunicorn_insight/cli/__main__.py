"""``python -m gunicorn_insight.cli``: the ``gunicorn-insight`` command, for environments without its script."""

import sys

from .commands import main

sys.exit(main())
