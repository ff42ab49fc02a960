"""The shipped Prometheus and Alertmanager configuration, checked with their own tools, and a real
Prometheus server (Debian's package) scraping a test daemon that sees two fake GPUs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import free_port, scrape
from tests.support.gpus import GIB, TOTAL, Gpus, gpu

ETC = Path(__file__).resolve().parents[2] / "etc"
needs_prometheus = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="Debian's prometheus package is needed: `make test` installs it",
)


def run(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, input=stdin, timeout=60)


@needs_prometheus
def test_promtool_checks_the_scrape_config_and_rules() -> None:
    config = run("promtool", "check", "config", str(ETC / "prometheus" / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = run("promtool", "check", "rules", str(ETC / "prometheus" / "whisperd-rules.yml"))
    assert rules.returncode == 0 and "16 rules found" in rules.stdout, rules.stdout + rules.stderr


@needs_prometheus
def test_every_alert_has_a_unit_test_and_they_pass() -> None:
    rules = (ETC / "prometheus" / "whisperd-rules.yml").read_text()
    tests = (ETC / "prometheus" / "whisperd-rules.test.yml").read_text()
    alerts = [
        line.split(":", 1)[1].strip() for line in rules.splitlines() if line.strip().startswith("- alert:")
    ]
    assert len(alerts) == 11
    for alert in alerts:
        assert tests.count(f"alertname: {alert}") >= 2, f"{alert} needs a firing and a quiet case"
    records = [
        line.split(":", 1)[1].strip() for line in rules.splitlines() if line.strip().startswith("- record:")
    ]
    assert len(records) == 5
    for record in records:
        assert f"- expr: {record}\n" in tests, f"{record} needs a promql_expr_test"
    result = run("promtool", "test", "rules", str(ETC / "prometheus" / "whisperd-rules.test.yml"))
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("amtool") is None, reason="Debian's prometheus-alertmanager provides amtool")
def test_amtool_checks_the_alertmanager_example() -> None:
    result = run("amtool", "check-config", str(ETC / "alertmanager" / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_prometheus
@pytest.mark.parametrize("path", ["/metrics", "/metrics/gpu"])
def test_a_live_scrape_passes_promtool_check_metrics(gpus: Gpus, path: str) -> None:
    body = scrape(gpus.daemon.metrics_port, path)
    result = run("promtool", "check", "metrics", stdin=body)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "job_id" not in body and not re.search(r'[{,]id="', body), "no job id in any label"


def test_gpu_series_carry_the_nvml_figures(gpus: Gpus) -> None:
    gpus.set(gpu(0), gpu(1, used=30 * GIB))
    got = samples(scrape(gpus.daemon.metrics_port, "/metrics/gpu"))
    one, zero = (("gpu", "1"), ("uuid", "GPU-fake-1")), (("gpu", "0"), ("uuid", "GPU-fake-0"))
    assert got["whisperd_gpu_memory_total_bytes", one] == TOTAL
    assert got["whisperd_gpu_memory_used_bytes", one] == 30 * GIB
    assert got["whisperd_gpu_memory_free_bytes", one] == TOTAL - 30 * GIB
    assert got["whisperd_gpu_memory_available_bytes", one] == TOTAL - 30 * GIB
    assert got["whisperd_gpu_memory_reserved_bytes", one] == 0
    assert got["whisperd_gpu_utilization_ratio", zero] == pytest.approx(0.10)
    assert got["whisperd_gpu_temperature_celsius", one] == 41
    assert got["whisperd_gpu_power_watts", one] == 101
    assert got["whisperd_gpu_up", zero] == 1
    info = (("driver_version", "999.99.fake"), ("gpu", "0"), ("name", "Fake-H000"), ("uuid", "GPU-fake-0"))
    assert got["whisperd_gpu_info", info] == 1
    system = scrape(gpus.daemon.metrics_port, "/metrics")
    assert "whisperd_gpu_" not in system, "GPU series live on the 5 s path only"
    assert "whisperd_build_info{" in system and "whisperd_scheduler_tick_seconds_count" in system


def samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


class PrometheusServer:
    def __init__(self, folder: Path, metrics_port: int) -> None:
        self.port = free_port()
        config = (ETC / "prometheus" / "prometheus.yml").read_text()
        config = config.replace("127.0.0.1:9464", f"127.0.0.1:{metrics_port}")
        config = config.replace("whisperd-rules.yml", str(ETC / "prometheus" / "whisperd-rules.yml"))
        (folder / "prometheus.yml").write_text(config)
        self.log = folder / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                "prometheus", f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())["data"]

    def value(self, query: str) -> float | None:
        result = self.get("/api/v1/query", query=query)["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, query: str, expected: float, timeout_s: float = 75) -> None:
        deadline = time.monotonic() + timeout_s
        got = None
        while time.monotonic() < deadline:
            got = self.value(query)
            if got == expected:
                return
            time.sleep(0.5)
        raise AssertionError(f"{query} = {got}, expected {expected}\n{self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def prometheus(gpus: Gpus, tmp_path: Path) -> Iterator[PrometheusServer]:
    server = PrometheusServer(tmp_path, gpus.daemon.metrics_port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/-/ready", timeout=2)
            break
        except OSError:
            time.sleep(0.2)
    yield server
    server.stop()


@needs_prometheus
def test_a_real_prometheus_scrapes_both_jobs_at_their_intervals(
    gpus: Gpus, prometheus: PrometheusServer, speech: dict[str, Path]
) -> None:
    gpus.set(gpu(0, used=12 * GIB), gpu(1))
    before = gpus.daemon.client.stats().states
    [done] = gpus.daemon.client.submit([str(speech["fox"])])
    gpus.daemon.wait_terminal([done.id])
    # GPU series from the fake library, through the 5 s job
    prometheus.wait_value('whisperd_gpu_memory_used_bytes{job="whisperd-gpu",gpu="0"}', 12 * GIB)
    prometheus.wait_value('whisperd_gpu_temperature_celsius{gpu="1"}', 41)
    prometheus.wait_value('whisperd_gpu_power_watts{gpu="1"}', 101)
    # queue series through the 30 s job
    prometheus.wait_value('whisperd_jobs{job="whisperd",state="COMPLETED"}', before["COMPLETED"] + 1)
    gpus.daemon.client.cancel([gpus.daemon.client.submit([str(speech["long"])])[0].id])
    prometheus.wait_value('whisperd_jobs{state="CANCELLED"}', before["CANCELLED"] + 1)
    prometheus.wait_value('sum(whisperd_jobs_finished_total{outcome="cancelled"})', 1)
    targets = prometheus.get("/api/v1/targets")["activeTargets"]
    assert {t["labels"]["job"]: t["scrapeInterval"] for t in targets} == {
        "whisperd-gpu": "5s",
        "whisperd": "30s",
    }
    assert {t["health"] for t in targets} == {"up"}
    # over the same window the GPU job scraped about six times as often as the system job
    gpu_scrapes = prometheus.value('count_over_time(up{job="whisperd-gpu"}[2m])') or 0
    system_scrapes = prometheus.value('count_over_time(up{job="whisperd"}[2m])') or 0
    assert system_scrapes >= 2 and gpu_scrapes >= 4 * system_scrapes - 6, (gpu_scrapes, system_scrapes)
