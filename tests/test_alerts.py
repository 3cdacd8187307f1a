"""The shipped Prometheus alerting rules: promtool accepts them, and every alert has unit tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import fakes
import pytest
import yaml

from gunicorn_insight._facts import CAUSES

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "alerts" / "gunicorn-insight.rules.yml"
RULE_TESTS = ROOT / "alerts" / "gunicorn-insight.rules.test.yml"

# The sample names /metrics serves, plus Prometheus' own `up`.
METRICS = fakes.served_samples() | {"up"}
SEVERITIES = {"critical", "warning", "info"}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed: run scripts/test-all, which installs it (Debian package prometheus)",
            pytrace=False,
        )
    return path


def _run(*args: str) -> str:
    result = subprocess.run([_promtool(), *args], capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} exited with {result.returncode}:\n{output}"
    return output


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _rule_tests() -> list[dict[str, Any]]:
    """Every alert_rule_test entry of the promtool test file."""
    document = yaml.safe_load(RULE_TESTS.read_text())
    return [entry for group in document["tests"] for entry in group.get("alert_rule_test", [])]


def test_promtool_check_rules() -> None:
    """promtool parses every rule and its PromQL."""
    output = _run("check", "rules", str(RULES))
    assert f"SUCCESS: {len(_alerts())} rules found" in output, output


def test_promtool_unit_tests_pass() -> None:
    """promtool runs the unit tests: each alert fires for the bad series and not for the healthy ones."""
    output = _run("test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in output, output


def test_the_unit_tests_load_the_rules_file() -> None:
    """The test file reads the shipped rules, not a copy."""
    document = yaml.safe_load(RULE_TESTS.read_text())
    assert [(RULE_TESTS.parent / name).resolve() for name in document["rule_files"]] == [RULES.resolve()]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert has a case where it fires and one where it must not; no test names an unknown alert."""
    names = {rule["alert"] for rule in _alerts()}
    firing = {entry["alertname"] for entry in _rule_tests() if entry.get("exp_alerts")}
    quiet = {entry["alertname"] for entry in _rule_tests() if not entry.get("exp_alerts")}
    assert not names - firing, f"alerts without a test case where they fire: {sorted(names - firing)}"
    assert not names - quiet, f"alerts without a test case where they stay quiet: {sorted(names - quiet)}"
    unknown = (firing | quiet) - names
    assert not unknown, f"tests for alerts the rules file does not have: {sorted(unknown)}"


def test_every_alert_tells_the_operator_what_to_do() -> None:
    """A severity label, a summary and a description naming the instance on every alert; unique names."""
    alerts = _alerts()
    assert len({rule["alert"] for rule in alerts}) == len(alerts)
    for rule in alerts:
        name = rule["alert"]
        assert name.startswith("Gunicorn"), name
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert "{{ $labels.instance }}" in annotations.get("summary", ""), name
        assert len(annotations.get("description", "")) > 100, f"{name}: the description says too little"


def test_rules_use_only_exported_metrics_and_causes() -> None:
    """A misspelt metric or exit cause would make an alert that can never fire."""
    for rule in _alerts():
        expr = rule["expr"]
        used = set(re.findall(r"\b(?:gunicorn_\w+|up)\b", expr))
        assert used, f"{rule['alert']}: no metric found in {expr!r}"
        assert used <= METRICS, f"{rule['alert']}: unknown metrics {sorted(used - METRICS)}"
        for matcher in re.findall(r'cause=~?"([^"]+)"', expr):
            assert set(matcher.split("|")) <= set(CAUSES), f"{rule['alert']}: unknown cause in {matcher!r}"


def test_alerts_are_per_server() -> None:
    """Every aggregation keeps job and instance, so one alert names one gunicorn server."""
    for rule in _alerts():
        for grouping in re.findall(r"\b(?:sum|max|min|avg)\s+by\s*\(([^)]*)\)", rule["expr"]):
            labels = {label.strip() for label in grouping.split(",")}
            assert {"job", "instance"} <= labels, f"{rule['alert']}: aggregates away job or instance: {grouping}"
