"""Settings: built from keywords and GUNICORN_INSIGHT_* variables, validated with messages that say the fix."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from gunicorn_insight.settings import DEFAULT_BUCKETS, ConfigurationError, Settings


def build(environ: dict[str, str] | None = None, **overrides: object) -> Settings:
    return Settings.build(overrides, environ or {})


def test_defaults_are_the_embedded_prometheus_setup() -> None:
    """No settings at all: Prometheus on, /metrics served on the documented loopback port, no StatsD."""
    settings = build()
    assert settings.prometheus_enabled
    assert settings.serves_metrics
    assert settings.metrics_address == ("127.0.0.1", 9180)
    assert settings.statsd_target is None
    assert settings.buckets == DEFAULT_BUCKETS


def test_environment_variables_are_read_and_keywords_win() -> None:
    """GUNICORN_INSIGHT_<NAME> sets a field; a keyword argument overrides it."""
    env = {"GUNICORN_INSIGHT_STATSD": "10.0.0.1:8125", "GUNICORN_INSIGHT_BUCKETS": "0.1, 1,5"}
    assert build(env).statsd_target == ("10.0.0.1", 8125)
    assert build(env).buckets == (0.1, 1.0, 5.0)
    assert build(env, statsd="localhost:9125").statsd_target == ("localhost", 9125)


def test_empty_environment_variable_means_unset() -> None:
    """An exported but empty variable does not turn into an invalid value."""
    assert build({"GUNICORN_INSIGHT_STATSD": "  "}).statsd is None


@pytest.mark.parametrize(
    ("value", "target"),
    [("unix:/run/statsd.sock", "/run/statsd.sock"), ("/run/s.sock", "/run/s.sock"), ("[::1]:8125", ("::1", 8125))],
)
def test_statsd_accepts_unix_paths_and_ipv6(value: str, target: object) -> None:
    """statsd takes host:port, [v6]:port or a unix datagram socket path."""
    assert build(statsd=value).statsd_target == target


def test_statsd_only_turns_prometheus_off() -> None:
    """Asking for StatsD alone does not also open a /metrics port."""
    assert not build(statsd="localhost:8125").prometheus_enabled
    assert build(statsd="localhost:8125", prometheus_dir="/tmp/x").prometheus_enabled
    assert build(statsd="localhost:8125", metrics_bind="127.0.0.1:9999").prometheus_enabled


def test_metrics_bind_off_keeps_files_but_serves_nothing() -> None:
    """metrics_bind=off with a directory writes files for the user's own exporter and binds no port."""
    settings = build(metrics_bind="off", prometheus_dir="/tmp/x")
    assert settings.prometheus_enabled
    assert not settings.serves_metrics
    assert not build(metrics_bind="off").prometheus_enabled


def test_unknown_keyword_lists_valid_names() -> None:
    """A typo in a keyword names the typo and every valid setting."""
    with pytest.raises(ConfigurationError, match=r"unknown setting 'statd'; valid settings are: statsd, prometheus_"):
        build(statd="x")


def test_unknown_environment_variable_lists_valid_names() -> None:
    """A typo in a GUNICORN_INSIGHT_ variable is an error, not silently ignored."""
    with pytest.raises(ConfigurationError, match=r"GUNICORN_INSIGHT_STATS;.*GUNICORN_INSIGHT_STATSD"):
        build({"GUNICORN_INSIGHT_STATS": "x:1"})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("statsd", "localhost", r"statsd='localhost' is not host:port; write it like '127.0.0.1:8125'"),
        ("statsd", "host:0", "port 0 is outside 1..65535"),
        ("metrics_bind", "127.0.0.1:70000", "port 70000 is outside"),
        ("metrics_bind", "9180", "is not host:port"),
        ("buckets", (1.0, 0.5), "strictly increasing"),
        ("buckets", (), "buckets is empty"),
        ("buckets", "0.1", "must be a list of numbers"),
        ("buckets", ("a",), "is not a number"),
        ("redact_query", "maybe", "is not a boolean; use true or false"),
        ("max_workers", 0, "between 1 and 4096"),
        ("interval", 0.001, "between 0.05 and 60"),
        ("interval", float("nan"), "finite"),
        ("statsd_timers_per_second", -1, r"statsd_timers_per_second=-1 must be between 0 and 1000000 \(0 sends"),
        (
            "statsd_timers_per_second",
            "many",
            "statsd_timers_per_second='many' is not an integer; give one between 0 and 1000000",
        ),
        ("interval", "soon", r"interval='soon' is not a number; give seconds between 0\.05 and 60"),
        ("max_workers", "lots", "max_workers='lots' is not an integer; give one between 1 and 4096"),
    ],
)
def test_bad_values_name_field_value_and_fix(field: str, value: object, message: str) -> None:
    """Each validation error names the field and the bad value and says what would be accepted."""
    with pytest.raises(ConfigurationError, match=message):
        Settings.build({field: value}, {})


def test_timer_cap_comes_from_the_environment_and_defaults_to_500() -> None:
    """statsd_timers_per_second is an integer setting like the others: default 500, 0 allowed (no cap)."""
    assert build().statsd_timers_per_second == 500
    assert build({"GUNICORN_INSIGHT_STATSD_TIMERS_PER_SECOND": "0"}).statsd_timers_per_second == 0


def test_booleans_parse_from_environment() -> None:
    """true/false/1/0/yes/no from the environment become booleans."""
    assert build({"GUNICORN_INSIGHT_REDACT_QUERY": "false"}).redact_query is False
    assert build({"GUNICORN_INSIGHT_DOGSTATSD": "YES"}).dogstatsd is True


def test_settings_are_immutable() -> None:
    """The settings object cannot be changed after validation."""
    settings = build()
    with pytest.raises(AttributeError):
        settings.statsd = "x:1"  # type: ignore[misc]


def test_reloaded_resolver_function_counts_as_unchanged() -> None:
    """A HUP re-creates a config's resolver function; the same qualified name is not a settings change."""

    def make() -> object:
        def resolver(environ: object) -> str:
            return "/"

        return resolver

    first, second = build(route_resolver=make()), build(route_resolver=make())
    assert first != second
    assert first.same_as(second)
    assert not first.same_as(build(route_resolver=make(), max_routes=5))


def test_resolver_from_environment_is_imported() -> None:
    """GUNICORN_INSIGHT_ROUTE_RESOLVER=module:function is imported at startup; a bad one says why."""
    resolver = build({"GUNICORN_INSIGHT_ROUTE_RESOLVER": "os.path:basename"}).route_resolver
    assert resolver is os.path.basename
    with pytest.raises(ConfigurationError, match="cannot be imported"):
        build({"GUNICORN_INSIGHT_ROUTE_RESOLVER": "no_such_module:f"})
    with pytest.raises(ConfigurationError, match="must be a callable"):
        build(route_resolver="nocolon")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "GUNICORN_INSIGHT_INTERVAL",
            "0.001",
            r"interval='0\.001' must be between 0\.05 and 60 seconds \(from the environment variable "
            r"GUNICORN_INSIGHT_INTERVAL\)",
        ),
        (
            "GUNICORN_INSIGHT_MAX_WORKERS",
            "x",
            r"max_workers='x' is not an integer; give one between 1 and 4096 \(from the environment variable "
            r"GUNICORN_INSIGHT_MAX_WORKERS\)",
        ),
        (
            "GUNICORN_INSIGHT_METRICS_BIND",
            "127.0.0.1:99999",
            r"port 99999 is outside 1\.\.65535 \(from the environment variable GUNICORN_INSIGHT_METRICS_BIND\)",
        ),
    ],
)
def test_bad_environment_value_names_the_variable_and_the_range(variable: str, value: str, message: str) -> None:
    """A bad value read from GUNICORN_INSIGHT_* names that variable (the user never wrote the field name)."""
    with pytest.raises(ConfigurationError, match=message):
        build({variable: value})


def test_keyword_over_a_bad_environment_value_wins() -> None:
    """A keyword replaces a bad environment value: it is not validated, and the keyword's own error has no variable."""
    assert build({"GUNICORN_INSIGHT_INTERVAL": "nope"}, interval=1).interval == 1.0
    with pytest.raises(ConfigurationError, match=r"^interval=0 must be between 0\.05 and 60 seconds$"):
        build({"GUNICORN_INSIGHT_INTERVAL": "1"}, interval=0)


def test_configuration_page_lists_every_setting_and_counts_them() -> None:
    """docs/configuration.md's table has one row per Settings field, and its count of them is right."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| .* \| `GUNICORN_INSIGHT_(\w+)` \|", page, re.MULTILINE)
    assert [name for name, _ in rows] == list(Settings.field_names())
    assert all(variable == name.upper() for name, variable in rows)
    (count,) = re.findall(r"that is not one of the (\w+) below", page)
    assert count == str(len(Settings.field_names()))
