"""The Grafana dashboard and the alert rules against real data: every panel query answers from a real Prometheus.

One gunicorn (gthread, 2 workers, 4 threads) with the plugin runs behind a real nginx that sets
X-Request-Start, under continuous load (200s, 404s, 500s, 503s, slow requests, max_requests recycling).
A real Prometheus scrapes its /metrics every 0.5 s. Each panel target of dashboards/gunicorn-insight.json,
with Grafana's variables substituted, must return at least one series with a number in it. A metric that
gunicorn-insight does not export makes exactly the panels that use it fail, naming the missing metric.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakes
import pytest
import yaml
from harness import ROOT, Gunicorn, start_gunicorn
from servers import Nginx, Process, PrometheusServer, process_starter, wait_until

DASHBOARD = ROOT / "dashboards" / "gunicorn-insight.json"
RULES = ROOT / "alerts" / "gunicorn-insight.rules.yml"
JOB = "gunicorn"
RATE_INTERVAL = "30s"
# How long after the stack is up a panel may take to show data (rates need two scrapes, the slow request
# needs its second). Shared by all panel tests: once it has passed, each further query gets one short poll,
# so a missing metric costs the module this long once, not once per panel.
DATA_DEADLINE = 60.0
LATE_POLL = 2.0

# Families no panel draws, and why; every other family /metrics serves is on some panel.
NOT_DRAWN = {
    "gunicorn_cgroup_cpu_quota_cores": "absent without a quota; the throttling it causes is drawn",
    "gunicorn_cgroup_memory_limit_bytes": "absent without a limit; the working set it is compared with is drawn",
    "gunicorn_cgroup_pids": "most servers run without a pids count; GunicornPidsNearLimit watches it",
    "gunicorn_cgroup_pids_limit": "as gunicorn_cgroup_pids",
}
METRIC_FAMILIES = tuple(
    name + ("_total" if kind == "counter" else "")
    for name, kind in sorted(fakes.served_families().items())
    if name not in NOT_DRAWN
)


def _load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included, rows themselves excluded."""
    found = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def _targets() -> list[tuple[str, str]]:
    """(test id, expr) for every query of every panel."""
    return [
        (f"#{panel['id']} {panel['title']} [{target['refId']}]", target["expr"])
        for panel in _panels(_load_dashboard())
        for target in panel.get("targets", [])
    ]


def _alerts() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"] if "alert" in rule]


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """What Grafana sends: $var, ${var} and ${var:format} replaced (a single value needs no format)."""

    def replace(match: re.Match[str]) -> str:
        name = match["braced"] or match["bare"]
        if name not in variables:
            raise AssertionError(f"unknown variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$(?:\{(?P<braced>\w+)(?::\w+)?\}|(?P<bare>\w+))", replace, expr)


def _grafana_variables(instance: str) -> dict[str, str]:
    return {
        "job": JOB,
        "instance": instance,
        "datasource": "prometheus",
        "__rate_interval": RATE_INTERVAL,
        "__interval": RATE_INTERVAL,
        "__range": RATE_INTERVAL,
    }


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bgunicorn_\w+", expr))


# --------------------------------------------------------------------------------------------------------
# Static checks: the JSON itself


def test_dashboard_has_datasource_input_and_variables() -> None:
    """A DS_PROMETHEUS input, a datasource variable, and job/instance variables from label_values(gunicorn_workers)."""
    dashboard = _load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] == "gunicorn-insight"
    assert [(i["name"], i["type"], i["pluginId"]) for i in dashboard["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")
    ]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["job"]["definition"] == "label_values(gunicorn_workers, job)"
    assert variables["instance"]["definition"] == 'label_values(gunicorn_workers{job=~"$job"}, instance)'
    for name in ("job", "instance"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["multi"], name
        assert variables[name]["includeAll"], name
        assert variables[name]["allValue"] == ".*", name


def test_every_panel_is_well_formed() -> None:
    """Unique ids, a grid position, the templated datasource on each panel and query, unique refIds."""
    dashboard = _load_dashboard()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        title = panel["title"]
        position = panel["gridPos"]
        assert min(position["w"], position["h"]) > 0, title
        assert position["x"] + position["w"] <= 24, title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], f"{title}: no query"
        assert panel.get("description"), f"{title}: no description"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), title
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title


def test_every_query_follows_the_job_and_instance_variables() -> None:
    """Each metric selector filters on $job and $instance, so the variables narrow every panel."""
    for test_id, expr in _targets():
        selectors = re.findall(r"\b(gunicorn_\w+)(\{[^}]*\})?", expr)
        assert selectors, f"{test_id}: no gunicorn metric in {expr!r}"
        for name, matchers in selectors:
            assert 'job=~"$job"' in matchers, f"{test_id}: {name}{matchers}"
            assert 'instance=~"$instance"' in matchers, f"{test_id}: {name}{matchers}"


def test_panels_need_no_route_label() -> None:
    """routes are optional in gunicorn-insight: no panel may depend on the route label."""
    for test_id, expr in _targets():
        assert "route" not in expr, test_id


def test_the_dashboard_shows_every_exported_metric() -> None:
    """Each metric family appears in at least one panel."""
    used = {name for _, expr in _targets() for name in _metric_names(expr)}
    missing = [family for family in METRIC_FAMILIES if not any(name.startswith(family) for name in used)]
    assert not missing, f"metrics on no panel: {missing}"


def test_every_panel_query_parses(tmp_path: Path) -> None:
    """promtool parses every substituted panel query (as recording rules), without a server."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run scripts/test-all, which installs it", pytrace=False)
    variables = _grafana_variables("127.0.0.1:9180")
    rules = [
        {"record": f"panel:query_{index}", "expr": substitute(expr, variables)}
        for index, (_, expr) in enumerate(_targets())
    ]
    path = tmp_path / "panels.rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------------
# Against real servers


class Load:
    """Continuous traffic, half straight to gunicorn and half through nginx (which sets X-Request-Start)."""

    PATHS = ("/", "/", "/status/404", "/", "/error", "/", "/status/503", "/status/201")

    def __init__(self, direct_port: int, proxy_port: int) -> None:
        self.ports = (direct_port, proxy_port)
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _get(self, port: int, path: str) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", path)
            connection.getresponse().read()
            self.sent += 1
        except OSError as error:
            self.errors.append(f"{path} on port {port}: {error!r}")
        finally:
            connection.close()

    def _run(self) -> None:
        count = 0
        while not self._stop.is_set():
            port = self.ports[count % 2]
            if count % 200 == 0:  # slower than slow_request_timeout=1: a slow request, logged with its stack
                slow = threading.Thread(target=self._get, args=(port, "/slow?s=1.5"), daemon=True)
                slow.start()
                self._threads.append(slow)
            self._get(port, self.PATHS[count % len(self.PATHS)])
            count += 1
            self._stop.wait(0.01)

    def start(self) -> None:
        thread = threading.Thread(target=self._run, name="dashboard-load", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


@dataclass
class Stack:
    server: Gunicorn
    prometheus: PrometheusServer
    load: Load
    target: str
    ready_at: float

    @property
    def variables(self) -> dict[str, str]:
        return _grafana_variables(self.target)

    def poll(self, expr: str) -> list[dict[str, Any]]:
        """The result once it has a number in it, or the last result when the shared deadline has passed."""
        deadline = max(self.ready_at + DATA_DEADLINE, time.monotonic() + LATE_POLL)
        while True:
            result = self.prometheus.query(expr)  # an error answer (bad PromQL) fails at once
            if any(not math.isnan(float(sample["value"][1])) for sample in result):
                return result
            if time.monotonic() >= deadline:
                return result
            time.sleep(0.25)

    def absent_metrics(self, expr: str) -> list[str]:
        """The metrics of `expr` that Prometheus has never scraped from our target."""
        return sorted(
            name
            for name in _metric_names(expr)
            if not self.prometheus.query(f'count({{__name__="{name}", instance="{self.target}"}})')
        )

    def diagnosis(self, expr: str, result: list[dict[str, Any]]) -> str:
        absent = self.absent_metrics(expr)
        why = (
            f"not exported by gunicorn-insight: {', '.join(absent)}"
            if absent
            else f"every metric is exported\n{self.server.process.output()[-3000:]}"
        )
        return (
            f"{expr}\n  result: {result}\n  {why}\n  load: {self.load.sent} requests sent, "
            f"errors: {self.load.errors[-3:]}"
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """gunicorn gthread x2 + nginx + load + Prometheus, shared by the module's tests, stopped at the end."""
    workdir = tmp_path_factory.mktemp("dashboard")
    processes: list[Process] = []

    process_factory = process_starter(workdir, processes)

    def stop_processes() -> None:
        for process in processes:
            process.stop()

    with contextlib.ExitStack() as cleanup:  # stops everything in reverse order, also when a start fails
        cleanup.callback(stop_processes)
        server = start_gunicorn(
            process_factory,
            worker_class="gthread",
            workers=2,
            args=["--threads", "4", "--max-requests", "1000", "--max-requests-jitter", "100"],
            env={"GUNICORN_INSIGHT_SLOW_REQUEST_TIMEOUT": "1"},
            interval=None,  # the plugin's default, as the dashboard's users run it
        )
        nginx = Nginx(
            f"127.0.0.1:{server.port}",
            workdir=workdir / "nginx",
            extra_location_directives='proxy_set_header X-Request-Start "t=${msec}";',
        )
        nginx.start()
        cleanup.callback(nginx.stop)
        load = Load(server.port, nginx.port)
        load.start()
        cleanup.callback(load.stop)
        target = f"127.0.0.1:{server.metrics_port}"
        prometheus = PrometheusServer([target], job_name=JOB, scrape_interval=0.5, workdir=workdir / "prometheus")
        prometheus.start()
        cleanup.callback(prometheus.stop)
        wait_until(
            prometheus.targets_up,
            timeout=30,
            what="Prometheus to scrape gunicorn-insight",
            dump=lambda: f"{prometheus.targets_status()}\n{server.process.describe()}",
        )
        wait_until(
            lambda: (prometheus.query_value(f"sum(rate(gunicorn_requests_total[{RATE_INTERVAL}]))") or 0) > 0,
            timeout=30,
            what="a non-zero request rate in Prometheus",
            dump=lambda: f"{prometheus.dump()}\n{server.process.describe()}",
        )
        yield Stack(server, prometheus, load, target, time.monotonic())


@pytest.mark.parametrize("expr", [expr for _, expr in _targets()], ids=[test_id for test_id, _ in _targets()])
def test_panel_query_returns_data(stack: Stack, expr: str) -> None:
    """The panel query, variables substituted, returns a series with a number from the real Prometheus."""
    query = substitute(expr, stack.variables)
    assert "$" not in query, query
    result = stack.poll(query)
    assert any(not math.isnan(float(sample["value"][1])) for sample in result), stack.diagnosis(query, result)
    assert {sample["metric"].get("instance", stack.target) for sample in result} == {stack.target}


def test_template_variables_list_the_server(stack: Stack) -> None:
    """The job and instance variables' label_values queries offer our job and our target."""
    expected = {"job": JOB, "instance": stack.target}
    for variable in _load_dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((?P<selector>.+),\s*(?P<label>\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector = substitute(match["selector"], stack.variables)
        values = stack.prometheus.api(f"label/{match['label']}/values", {"match[]": selector})
        assert expected[variable["name"]] in values, (variable["name"], values)


@pytest.mark.parametrize(("alert", "expr"), _alerts(), ids=[alert for alert, _ in _alerts()])
def test_alert_expression_evaluates_on_real_series(stack: Stack, alert: str, expr: str) -> None:
    """Prometheus evaluates the alert's expression on the real label sets without error (no matching errors)."""
    stack.prometheus.query(expr)


def test_error_ratio_and_slow_request_alerts_see_this_load(stack: Stack) -> None:
    """With a quarter of the responses 5xx and slow requests, those two alert conditions hold for our server."""
    expressions = dict(_alerts())
    for alert in ("GunicornErrorRatio", "GunicornSlowRequests"):
        result = stack.poll(expressions[alert])
        assert [sample["metric"]["instance"] for sample in result] == [stack.target], stack.diagnosis(
            expressions[alert], result
        )
