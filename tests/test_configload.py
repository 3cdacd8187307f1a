"""Loading a gunicorn configuration as gunicorn does: the file, GUNICORN_CMD_ARGS, install() quarantined."""

from __future__ import annotations

from pathlib import Path

import pytest

from gunicorn_insight.cli.configload import ConfigLoadError, load


def test_config_file_and_gunicorn_cmd_args_are_applied_as_gunicorn_does(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings come from the file, then GUNICORN_CMD_ARGS on top of it, like gunicorn's own loading."""
    path = clean_env / "gunicorn.conf.py"
    path.write_text("workers = 3\ntimeout = 90\n")
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--workers 5 --threads 2")
    loaded = load(str(path))
    assert (loaded.cfg.workers, loaded.cfg.timeout, loaded.cfg.threads) == (5, 90, 2)
    assert loaded.cmd_args == "--workers 5 --threads 2"


def test_default_config_file_is_found_like_gunicorn(clean_env: Path) -> None:
    """Without -c, ./gunicorn.conf.py is used, as gunicorn does; without it, gunicorn's defaults."""
    assert load(None).source is None
    (clean_env / "gunicorn.conf.py").write_text("workers = 7\n")
    loaded = load(None)
    assert (loaded.source, loaded.cfg.workers) == (str(clean_env / "gunicorn.conf.py"), 7)


def test_python_module_config_is_loaded(clean_env: Path) -> None:
    """-c python:gunicorn_insight.conf works as with gunicorn, and counts as the plugin installed."""
    loaded = load("python:gunicorn_insight.conf")
    assert getattr(loaded.cfg.on_starting, "__gunicorn_insight__", False)


@pytest.mark.parametrize(
    ("content", "env", "message"),
    [
        (None, None, "does not exist; give the path"),
        ("raise ValueError('boom')\n", None, "raised while loading"),
        ("workers = 'many'\n", None, "sets a value gunicorn refuses"),
        ("workers = 2\n", "--no-such-option", "unrecognized arguments: --no-such-option"),
        ("workers = 2\n", "--workers lots", "GUNICORN_CMD_ARGS"),
    ],
)
def test_config_that_cannot_load_says_why(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, env: str | None, message: str
) -> None:
    """A missing, raising or invalid config, or bad GUNICORN_CMD_ARGS, is one ConfigLoadError naming the cause."""
    path = clean_env / "conf.py"
    if content is not None:
        path.write_text(content)
    if env is not None:
        monkeypatch.setenv("GUNICORN_CMD_ARGS", env)
    with pytest.raises(ConfigLoadError, match=message):
        load(str(path))


# -- the command ---------------------------------------------------------------------------------------------
