"""The fleet's series on /metrics, wired by the app: with a shared store (a real PostgreSQL) every host's
heartbeat age, the hosts alive and whether this host reaches the database; with SQLite none of them."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
from pathlib import Path

import psycopg
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.inprocess import FakeClock, FakeProbe, build, fake_worker_spawner
from tests.support.postgres import Cluster
from whisperd.app import App
from whisperd.config import Config, StoreConfig
from whisperd.pg_audio import AudioCache
from whisperd.pg_store import PgStore
from whisperd.spool import Spool

_names = itertools.count()
FLEET_SERIES = (
    "whisperd_fleet_host_heartbeat_age_seconds",
    "whisperd_fleet_hosts",
    "whisperd_store_reachable",
)


def samples(app: App) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = generate_latest(app.system_metrics).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_a_store_of_its_own_exports_no_fleet_series(tmp_path: Path) -> None:
    got = samples(build(tmp_path, Config()))
    assert not [name for name, _labels in got if name in FLEET_SERIES]
    assert ("whisperd_jobs", (("state", "PENDING"),)) in got  # the queue's series as ever


def test_a_shared_store_exports_every_hosts_heartbeat(postgres: Cluster, tmp_path: Path) -> None:
    name = f"fleet_metrics_{next(_names)}"
    url = postgres.create_database(name)
    config = Config(store=StoreConfig(url=url, host_id="here", lease_s=30.0, heartbeat_interval_s=5.0))
    store = PgStore(url, "here", lease_s=30.0, release="test", reconnect_backoff_s=0.1)
    store.open()
    # another host, silent for 100 s (its heartbeat on the database's clock)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO hosts (id, started_at, heartbeat_at, release) VALUES ('gone', 0, "
            "extract(epoch from clock_timestamp()) - 100, 'test')"
        )
    app = App(
        config, store, Spool(tmp_path / "spool"), FakeProbe(), spawner=fake_worker_spawner(tmp_path / "fw"),
        clock=FakeClock(), cpu_count=2, shared=store, audio_cache=AudioCache(tmp_path / "cache", 1 << 30),
    )  # fmt: skip
    assert app.link is not None
    link = app.link
    try:
        asyncio.run(link.beat())
        got = samples(app)
        age = "whisperd_fleet_host_heartbeat_age_seconds"
        assert 0 <= got[age, (("host", "here"),)] < 30
        assert got[age, (("host", "gone"),)] >= 100
        assert got["whisperd_fleet_hosts", ()] == 1
        assert got["whisperd_store_reachable", ()] == 1
        if shutil.which("promtool"):  # names and help text as Prometheus wants them
            body = generate_latest(app.system_metrics).decode()
            lint = subprocess.run(
                ["promtool", "check", "metrics"], input=body, capture_output=True, text=True, timeout=60
            )
            assert lint.returncode == 0, lint.stdout + lint.stderr

        # the database gone: the next heartbeat fails, the ages stay as last read
        with psycopg.connect(postgres.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        asyncio.run(link.beat())
        after = samples(app)
        assert after["whisperd_store_reachable", ()] == 0
        assert after[age, (("host", "gone"),)] == got[age, (("host", "gone"),)]
    finally:
        store.close()
