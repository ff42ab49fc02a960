"""The shipped Grafana dashboard (etc/grafana/whisperd.json): every query in it (panel targets and template
variables) parses, checked by the real `promtool check rules`, and names only series whisperd exports,
collected from the app started in-process with a fake GPU, plus the shipped recording rules. Also the
placement threshold the dashboard draws: a gauge that follows the running configuration."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.inprocess import GIB, FakeProbe, build, reading, run_started
from whisperd.config import Config, GpuConfig, SchedulerConfig, WorkersConfig
from whisperd.metrics import FleetCollector

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "etc" / "grafana" / "whisperd.json"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian's prometheus package) is needed: `make test`"
)
# What Grafana puts in place of its own variables: durations where PromQL wants one.
GRAFANA_DURATIONS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "inf", "nan", "atan2",
}  # fmt: skip


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))  # a collapsed row holds its panels


def queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values' series selector)."""
    found = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in all_panels(board["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"\s*(?:label_values|query_result)\((.*?)(?:,\s*\w+)?\)\s*", text, re.S)
        assert match, f"variable {variable['name']}: a query Grafana's Prometheus source runs: {text}"
        found.append((f"variable {variable['name']}", match.group(1)))
    return found


def as_promql(expr: str) -> str:
    """Grafana's variables replaced: its durations by a duration, the dashboard's own (inside label
    matchers) by a regex."""
    for name, value in GRAFANA_DURATIONS.items():
        expr = expr.replace(name, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads: identifiers that are not functions, keywords, label
    names (inside braces or grouping lists), strings or parts of durations and numbers."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*+)(?!\s*\()", expr):
        if match.group(1).lower() not in KEYWORDS:
            names.add(match.group(1))
    return names


def test_metric_names_reads_series_not_functions_labels_or_keywords() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, instance) (rate(a_bucket{x=~"b|c", y="$v"}[5m] offset 1h))) '
        '/ on (instance) group_left (gpu) fleet:b:max > bool 1e9 and c unless d{e="f"} or vector(0)'
    )
    assert metric_names(expr) == {"a_bucket", "fleet:b:max", "c", "d"}


# ---- what whisperd exports ----------------------------------------------------------------------------


class OneHost:
    """A fleet link as FleetCollector reads it, so that the fleet's series are exported as with a shared
    store (their values do not matter here, their names do)."""

    class Host:
        id = "here"
        heartbeat_age_s = 1.0

    hosts = [Host()]
    reachable = True


def family_names(body: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(body):
        suffixes = {
            "counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "info": ["_info"],
            "summary": ["", "_sum", "_count"],
        }.get(family.type, [""])  # fmt: skip
        names |= {family.name + suffix for suffix in suffixes}
        names |= {sample.name for sample in family.samples}
    return names


def gpu_app_config(**scheduler: Any) -> Config:
    return Config(
        workers=WorkersConfig(cpu_workers=0, start_timeout_s=20), gpu=GpuConfig(worker_device="cpu"),
        scheduler=SchedulerConfig(**scheduler),
    )  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every series name whisperd exports: /metrics and /metrics/gpu of the app started in-process with one
    fake GPU, the fleet's collector, and the recording rules shipped in etc/prometheus."""
    tmp_path = tmp_path_factory.mktemp("exported")
    app = build(tmp_path, gpu_app_config(), FakeProbe([reading(0)]))
    bodies: list[str] = []

    async def scrape() -> None:
        bodies.extend(
            generate_latest(registry).decode() for registry in (app.system_metrics, app.gpu_metrics)
        )

    run_started(app, scrape)
    fleet = CollectorRegistry(auto_describe=False)
    fleet.register(FleetCollector(OneHost(), 30.0))
    bodies.append(generate_latest(fleet).decode())
    names = set().union(*map(family_names, bodies))
    for rules in (ROOT / "etc" / "prometheus").glob("*.yml"):
        names |= set(re.findall(r"^\s*- record:\s*(\S+)", rules.read_text(), re.M))
    return names


def test_the_exported_names_include_every_kind(exported: set[str]) -> None:
    assert {
        "whisperd_jobs", "whisperd_gpu_memory_placement_threshold_bytes", "whisperd_jobs_finished_total",
        "whisperd_job_queue_wait_seconds_bucket", "whisperd_fleet_host_heartbeat_age_seconds",
        "whisperd_build_info", "fleet:whisperd_jobs:max",
    } <= exported  # fmt: skip


# ---- the dashboard ------------------------------------------------------------------------------------


def test_every_query_names_only_series_whisperd_exports(exported: set[str]) -> None:
    found = queries(dashboard())
    assert len(found) > 30
    unknown = {where: sorted(metric_names(as_promql(expr)) - exported) for where, expr in found}
    assert {where: names for where, names in unknown.items() if names} == {}
    assert all(metric_names(as_promql(expr)) for _where, expr in found), "every query reads a series"


@needs_promtool
def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    found = queries(dashboard())
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": as_promql(expr)} for i, (_where, expr) in enumerate(found)
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules, indent=1))  # JSON is YAML
    done = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    index = "\n".join(f"query_{i}: {where}" for i, (where, _expr) in enumerate(found))
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{index}"
    assert f"{len(found)} rules found" in done.stdout


def test_the_dashboard_is_a_grafana_model_on_a_chosen_prometheus() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] == "whisperd"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert {"instance", "host", "gpu"} <= set(variables)
    panels = list(all_panels(board["panels"]))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    for panel in panels:
        assert panel["gridPos"]["x"] >= 0 and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            sources = [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]
            assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources), panel["title"]
    for where, expr in queries(board):
        if "instance" not in where and "host" not in where and "fleet_host" not in expr:
            assert 'instance=~"$instance"' in expr, f"{where} follows the instance variable"


def test_the_readme_says_what_each_row_answers() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Grafana dashboard\n", 1)[1].split("\n## ", 1)[0]
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert len(rows) == 6
    for title in rows:
        assert f"**{title}**" in section, f"README's Grafana dashboard section describes the row {title!r}"


# ---- the threshold it draws ---------------------------------------------------------------------------


def threshold(app_config: Config, tmp_path: Path, then: Config) -> list[float]:
    """whisperd_gpu_memory_placement_threshold_bytes for an 80 GiB GPU under app_config, then after a
    reload to then."""
    app = build(tmp_path, app_config, FakeProbe([reading(0, total=80 * GIB)]))
    seen: list[float] = []

    def read() -> float:
        body = generate_latest(app.gpu_metrics).decode()
        [value] = re.findall(r'^whisperd_gpu_memory_placement_threshold_bytes\{gpu="0",uuid="GPU-0"\} (\S+)$',
                             body, re.M)  # fmt: skip
        return float(value)

    async def scrape() -> None:
        seen.append(read())
        app.daemon.config = then  # what a reload does
        seen.append(read())

    run_started(app, scrape)
    return seen


def test_the_placement_threshold_follows_the_running_configuration(tmp_path: Path) -> None:
    # 10 % of 80 GiB beats the 1 GiB minimum; then a 20 GiB minimum beats 5 % of it
    seen = threshold(gpu_app_config(), tmp_path, gpu_app_config(min_free_memory_bytes=20 * GIB,
                                                                  memory_safety_margin=0.05))  # fmt: skip
    assert seen == [8 * GIB, 20 * GIB]
