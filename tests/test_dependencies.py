"""Dependency contracts: each range in pyproject.toml is installed and tested at both ends. The oldest venv of
scripts/test-all pins every lower bound; the main venv gets the newest release under each upper bound."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_REQUIREMENT = re.compile(r'^\s*"(?P<name>[A-Za-z0-9_.-]+)>=(?P<low>[0-9.]+)(?:,<(?P<high>[0-9.]+))?",?\s*$')
_PIN = re.compile(r"(?P<name>[A-Za-z0-9_.-]+)==(?P<version>[0-9.]+)")


def _version(text: str) -> tuple[int, ...]:
    parts = tuple(int(part) for part in re.findall(r"\d+", text)[:3])
    return parts + (0,) * (3 - len(parts))


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def ranges() -> dict[str, tuple[str, str | None]]:
    """name -> (lower bound, upper bound or None) for every ``name>=x[,<y]`` line of pyproject.toml."""
    found = {}
    for line in (ROOT / "pyproject.toml").read_text().splitlines():
        match = _REQUIREMENT.match(line)
        if match:
            found[_canonical(match["name"])] = (match["low"], match["high"])
    return found


def oldest_pins() -> dict[str, str]:
    script = (ROOT / "scripts" / "test-all").read_text()
    block = script[script.index("OLDEST_PINS=(") : script.index(")", script.index("OLDEST_PINS=("))]
    return {_canonical(match["name"]): match["version"] for match in _PIN.finditer(block)}


def test_the_libraries_used_at_their_boundary_have_both_ends() -> None:
    """prometheus_client (file format) and the OpenTelemetry SDK have an upper bound; StatsD needs no library."""
    bounded = {name for name, (_, high) in ranges().items() if high}
    assert {
        "prometheus-client",
        "opentelemetry-sdk",
        "opentelemetry-exporter-otlp-proto-http",
        "opentelemetry-exporter-otlp-proto-grpc",
    } <= bounded
    assert "statsd" not in ranges()


def test_the_oldest_venv_pins_every_lower_bound() -> None:
    """scripts/test-all installs exactly the lower end of each range, so the oldest allowed versions are tested."""
    pins = oldest_pins()
    for name, (low, _high) in ranges().items():
        if name in {"gunicorn", "prometheus-client"} or name.startswith("opentelemetry"):
            assert name in pins, f"{name} has no pin in scripts/test-all's OLDEST_PINS"
            assert _version(pins[name]) == _version(low), f"{name}: pinned {pins[name]}, lower bound {low}"


def test_installed_versions_are_inside_the_ranges() -> None:
    """Whichever venv runs this (newest or oldest), what is installed is what the ranges promise."""
    for name, (low, high) in ranges().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an extra's package this venv does not have
        assert _version(installed) >= _version(low), f"{name} {installed} is below {low}"
        if high:
            assert _version(installed) < _version(high), f"{name} {installed} is not below {high}"
