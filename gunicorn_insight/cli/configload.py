"""Load a gunicorn configuration the way ``gunicorn`` does, without starting anything.

gunicorn's own :class:`gunicorn.config.Config` and its own ``load_config_from_file`` (so ``python:module`` and
``file:path`` forms, and every setting's validator, behave exactly as in gunicorn), then ``GUNICORN_CMD_ARGS``
on top, as ``gunicorn`` applies it. No socket is bound and the application is not imported (unless the
config file itself imports it).

A config that calls ``gunicorn_insight.install(globals())`` would normally create a run directory and
prepare, and clear, the Prometheus directory: next to a live server that would delete the live server's
metric files. While the config loads, directory preparation is therefore switched off and ``install``
errors are caught and kept for the doctor to report; the process environment is restored afterwards.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


class ConfigLoadError(Exception):
    """The configuration could not be loaded; the message says which part and how to fix it."""


@dataclass
class Loaded:
    cfg: Any
    """gunicorn.config.Config with the file and GUNICORN_CMD_ARGS applied."""
    source: str | None
    cmd_args: str | None
    environ: dict[str, str]
    """The environment as the config file left it (a config may export PROMETHEUS_MULTIPROC_DIR itself)."""
    plugin_errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _quarantine() -> Iterator[list[str]]:
    """Let a config call gunicorn_insight.install() without side effects; collect its ConfigurationErrors."""
    import gunicorn_insight

    from .. import _hooks
    from ..settings import ConfigurationError

    errors: list[str] = []
    original_install = gunicorn_insight.install
    saved_environ = dict(os.environ)
    saved_path = list(sys.path)

    def install(namespace: Any, settings: Any = None, **fields: Any) -> Any:
        try:
            return original_install(namespace, settings, **fields)
        except ConfigurationError as error:
            errors.append(str(error))
            return None

    gunicorn_insight.install = install
    try:
        with _hooks.inspecting():  # no run dir, no Prometheus directory created or cleared
            yield errors
    finally:
        gunicorn_insight.install = original_install
        os.environ.clear()
        os.environ.update(saved_environ)
        sys.path[:] = saved_path


def _loader() -> Any:
    from gunicorn.app.base import Application

    class ConfigOnly(Application):  # type: ignore[misc]
        """gunicorn's Application minus argv parsing, chdir and running: only the config loading."""

        def __init__(self) -> None:  # the base __init__ would parse sys.argv and exit on any error
            self.usage, self.prog, self.cfg, self.callable, self.logger = None, "gunicorn", None, None, None

        def init(self, parser: Any, opts: Any, args: Any) -> None:
            return None

        def load(self) -> None:
            raise NotImplementedError("doctor never loads the application")

    return ConfigOnly()


def load(location: str | None) -> Loaded:
    """The configuration gunicorn would run with, from ``location`` (else GUNICORN_CMD_ARGS' -c, else
    ./gunicorn.conf.py, as gunicorn picks it), plus GUNICORN_CMD_ARGS."""
    from gunicorn.config import get_default_config_file

    app = _loader()
    app.load_default_config()
    cfg = app.cfg
    parser = cfg.parser()
    cmd_args = os.environ.get("GUNICORN_CMD_ARGS")
    complaint = io.StringIO()
    try:
        # argparse prints gunicorn's whole usage before its one-line complaint: keep only the complaint.
        with contextlib.redirect_stderr(complaint):
            env_args = parser.parse_args(cfg.get_cmd_args_from_env())
    except SystemExit:
        reason = (complaint.getvalue().strip().splitlines() or ["not valid"])[-1].partition("error: ")[2]
        raise ConfigLoadError(
            f"GUNICORN_CMD_ARGS={cmd_args!r} is not valid gunicorn options ({reason}); fix or unset it"
        ) from None
    source = location or env_args.config or get_default_config_file()
    with _quarantine() as plugin_errors:
        if source is not None:
            _load_file(app, source)
        for name, value in vars(env_args).items():
            if value is None or name == "args":
                continue
            try:
                cfg.set(name.lower(), value)
            except Exception as error:
                raise ConfigLoadError(
                    f"GUNICORN_CMD_ARGS sets {name}={value!r}, which gunicorn refuses: {error}"
                ) from None
        environ = dict(os.environ)
    return Loaded(cfg, source, cmd_args, environ, plugin_errors)


def _load_file(app: Any, source: str) -> None:
    if source.startswith("python:"):
        # Re-run the module (e.g. python:gunicorn_insight.conf) so install() sees today's environment.
        sys.modules.pop(source[len("python:") :], None)
    else:
        path = source[len("file:") :] if source.startswith("file:") else source
        if not os.path.exists(path):
            raise ConfigLoadError(f"config file {path} does not exist; give the path of your gunicorn.conf.py with -c")
    try:
        app.load_config_from_file(source)
    except SystemExit:
        # gunicorn printed "Failed to read config file" and the traceback just before exiting.
        raise ConfigLoadError(
            f"the config file {source} raised while loading (traceback above); fix it, then rerun"
        ) from None
    except ModuleNotFoundError as error:
        raise ConfigLoadError(f"{source}: {error}; check the module name and sys.path") from None
    except Exception as error:
        # gunicorn printed "Invalid value for <name>: <value>"; the validator's message is the reason.
        raise ConfigLoadError(f"{source} sets a value gunicorn refuses: {error}") from None
