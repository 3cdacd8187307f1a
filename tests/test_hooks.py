"""install(): hooks land in the config namespace, chain the user's own, and pass gunicorn's arity checks."""

from __future__ import annotations

import os
from typing import Any

import pytest
from gunicorn.config import Config

from gunicorn_insight import _hooks, install
from gunicorn_insight._worker import recorder
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
    monkeypatch.setattr(recorder, "COMPILED", None)
    namespace: dict[str, Any] = {}
    _hooks.install(namespace)
    assert (namespace["pre_request"], namespace["post_request"]) == (recorder.pre_request, recorder.post_request)
    assert _hooks.STATE.request_hooks == "python (the C extension is not built)"


def test_hooks_defined_after_install_are_chained_into_gunicorns_config() -> None:
    """A later post_request in gunicorn's final config is chained behind ours; gunicorn's defaults are not."""
    namespace: dict[str, Any] = {}
    install(namespace, **STATSD_ONLY)
    calls: list[str] = []

    def post_request(worker: Any, req: Any, environ: Any) -> None:
        calls.append("theirs")

    namespace["post_request"] = post_request
    cfg = validated(namespace)
    assert _hooks.adopt_late_hooks(cfg) == ["post_request"]
    chained = cfg.settings["post_request"].get()
    assert _hooks.is_ours(chained)
    chained(None, object(), {}, None)
    assert calls == ["theirs"]
    assert _hooks.adopt_late_hooks(cfg) == []  # checked again (a HUP, every fork): nothing chained twice
    assert cfg.settings["when_ready"].get() is cfg.settings["when_ready"].default  # not ours to touch


def test_a_later_hook_that_wraps_ours_is_left_alone() -> None:
    """A hook that saved install()'s and calls it would run ours twice if chained: it is kept as it is."""
    namespace: dict[str, Any] = {}
    install(namespace, **STATSD_ONLY)
    saved = namespace["pre_request"]

    def pre_request(worker: Any, req: Any) -> None:
        saved(worker, req)

    namespace["pre_request"] = pre_request
    cfg = validated(namespace)
    assert _hooks.adopt_late_hooks(cfg) == []
    assert cfg.settings["pre_request"].get() is pre_request


class _Gone:
    """Stands in for the master: records how child_exit and worker_exit hand a worker over."""

    def __init__(self) -> None:
        self.pid = 0
        self.calls: list[bool] = []

    def worker_gone(self, worker: Any, *, shutting_down: bool = False) -> None:
        self.calls.append(shutting_down)


class _Arbiter:
    def __init__(self, listeners: list[str]) -> None:
        self.LISTENERS = listeners


@pytest.mark.parametrize(("listeners", "expected"), [(["127.0.0.1:8000"], False), ([], True)])
def test_a_worker_reaped_once_gunicorn_is_stopping_is_handed_over_as_such(
    monkeypatch: pytest.MonkeyPatch, listeners: list[str], expected: bool
) -> None:
    """gunicorn's stop() empties LISTENERS first: a worker it reaps after that (even after its own SIGKILL,
    when graceful_timeout ran out) is a shutdown exit, whether child_exit or worker_exit reports it."""
    from gunicorn_insight._master import arbiter

    gone = _Gone()
    gone.pid = os.getpid()
    monkeypatch.setattr(arbiter, "CURRENT", gone)
    _hooks.child_exit(_Arbiter(listeners), object())
    _hooks.worker_exit(_Arbiter(listeners), object())
    assert gone.calls == [expected, expected]


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
        (
            {"settings": Settings(statsd="127.0.0.1:9"), "interval": 2},
            "got a Settings object and the keywords interval",
        ),
    ],
)
def test_settings_object_misuse_is_a_configuration_error(arguments: dict[str, Any], message: str) -> None:
    """A Settings that is not one, or one mixed with keywords, stops the config naming what to pass instead."""
    with pytest.raises(ConfigurationError, match=message):
        install({}, **arguments)
