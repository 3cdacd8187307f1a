"""install(): hooks land in the config namespace, chain the user's own, and pass gunicorn's arity checks."""

from __future__ import annotations

from typing import Any

import pytest
from gunicorn.config import Config

from gunicorn_insight import _hooks, _worker, install
from gunicorn_insight.settings import ConfigurationError, Settings

STATSD_ONLY: dict[str, Any] = {"statsd": "127.0.0.1:9"}  # keeps these tests from exporting PROMETHEUS_MULTIPROC_DIR


def validated(namespace: dict[str, Any]) -> Config:
    """Feed the namespace through gunicorn's own setting validators, as a config file would be."""
    cfg = Config()
    for name, value in namespace.items():
        if name in cfg.settings:
            cfg.set(name, value)
    return cfg


def test_installs_every_hook_and_gunicorn_accepts_them() -> None:
    """All hooks are installed with the arity gunicorn validates."""
    namespace: dict[str, Any] = {}
    install(namespace, **STATSD_ONLY)
    assert set(_hooks.HOOKS) <= set(namespace)
    validated(namespace)


def test_user_hooks_still_run_after_ours() -> None:
    """A hook defined before install() keeps running, after ours, with the same arguments."""
    calls: list[tuple[str, tuple[Any, ...]]] = []

    def pre_request(worker: Any, req: Any) -> None:
        calls.append(("pre_request", (worker, req)))

    def post_request(worker: Any, req: Any) -> None:  # gunicorn allows 2, 3 or 4 parameters
        calls.append(("post_request", (worker, req)))

    def worker_abort(worker: Any) -> None:
        calls.append(("worker_abort", (worker,)))

    namespace: dict[str, Any] = {"pre_request": pre_request, "post_request": post_request, "worker_abort": worker_abort}
    install(namespace, **STATSD_ONLY)
    cfg = validated(namespace)
    cfg.pre_request("w", "r")
    cfg.post_request("w", "r", {}, None)
    cfg.worker_abort("w")
    assert calls == [("pre_request", ("w", "r")), ("post_request", ("w", "r")), ("worker_abort", ("w",))]
    assert namespace["pre_request"].__wrapped__ is pre_request


def test_user_hook_errors_are_theirs_to_see() -> None:
    """An exception in the user's hook is not swallowed by the chain (gunicorn logs it as before)."""

    def pre_request(worker: Any, req: Any) -> None:
        raise ValueError("user bug")

    namespace: dict[str, Any] = {"pre_request": pre_request}
    install(namespace, **STATSD_ONLY)
    with pytest.raises(ValueError, match="user bug"):
        namespace["pre_request"]("w", "r")


def test_installing_twice_does_not_chain_ours_to_ours() -> None:
    """A config re-read on HUP installs again without stacking a second copy of our hooks."""
    namespace: dict[str, Any] = {}
    install(namespace, **STATSD_ONLY)
    first = dict(namespace)
    install(namespace, **STATSD_ONLY)
    assert namespace == first


def test_post_request_with_wrong_arity_is_a_clear_error() -> None:
    """A post_request gunicorn could never call fails at install time, naming the expected parameters."""

    def post_request(worker: Any) -> None: ...

    with pytest.raises(ConfigurationError, match=r"takes 1 positional parameters; gunicorn calls it with"):
        install({"post_request": post_request}, **STATSD_ONLY)


def test_unknown_setting_fails_at_install() -> None:
    """A typo in install()'s keywords stops the config from loading, naming valid settings."""
    with pytest.raises(ConfigurationError, match="unknown setting 'metric_bind'"):
        install({}, metric_bind="x")


def test_worker_hooks_never_raise_even_without_state() -> None:
    """Hooks called in a process where the plugin is not set up (or broken) do nothing and raise nothing."""
    _hooks.HOOKS["pre_request"](object(), object())
    _hooks.HOOKS["post_request"](object(), object(), {}, None)
    _hooks.worker_abort(object())
    _hooks.worker_int(object())
    _hooks.child_exit(object(), object())


def test_without_the_extension_the_python_hooks_are_installed_and_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiled build (no compiler at install time): the Python pair, and the startup line's reason."""
    monkeypatch.setattr(_hooks.STATE, "inspecting", True)
    monkeypatch.setattr(_worker, "COMPILED", None)
    namespace: dict[str, Any] = {}
    _hooks.install(namespace)
    assert (namespace["pre_request"], namespace["post_request"]) == (_worker.pre_request, _worker.post_request)
    assert _hooks.STATE.request_hooks == "python (the C extension is not built)"


def test_a_settings_object_is_used_as_given(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """install(globals(), Settings(...)) installs with exactly that object; environment variables it skips are named."""
    monkeypatch.setenv("GUNICORN_INSIGHT_INTERVAL", "5")
    given = Settings(statsd="127.0.0.1:9", interval=2.0)
    namespace: dict[str, Any] = {}
    assert install(namespace, settings=given) is given
    assert set(_hooks.HOOKS) <= set(namespace)
    assert "so GUNICORN_INSIGHT_INTERVAL is not read; Settings.build({...})" in caplog.text


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"settings": {"statsd": "127.0.0.1:9"}}, "install\\(\\)'s settings argument is a dict, not gunicorn_insight"),
        ({"settings": Settings(statsd="127.0.0.1:9"), "interval": 2},
         "got a Settings object and the keywords interval"),
    ],
)
def test_settings_object_misuse_is_a_configuration_error(arguments: dict[str, Any], message: str) -> None:
    """A Settings that is not one, or one mixed with keywords, stops the config naming what to pass instead."""
    with pytest.raises(ConfigurationError, match=message):
        install({}, **arguments)
