"""Part 1 of bench/fleet.py: claims per second of N hosts on one PostgreSQL queue, workers simulated.

Each host is a process of its own (this file, run with --host) running the daemon's real wiring
(whisperd.app.App on a PgStore: the plan, claims with SKIP LOCKED, leases, heartbeats, LISTEN/NOTIFY, the
audio cache) whose workers are the real worker loop with the scripted transcriber of
tests/support/fake_worker.py, answering at once. The daemon has no switch for such workers, and gets none
for a bench: this is the in-process wiring the component tests use, on a real database. Also measured: the
database transactions and statements per job (pg_stat_statements) and where the CPU went.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402

from bench.common import TICK_S, machine_busy_s  # noqa: E402
from tests.support.postgres import Cluster  # noqa: E402

LEASE_S = 30.0  # the product's default: nothing here should expire
FAKE_WORKERS_PER_HOST = 2
INSERT_BATCH = 500


def rows(url: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


async def _host(name: str, url: str, state_dir: Path, workers: int) -> None:
    """One host: the daemon's wiring on a PgStore, the scripted workers; ready, then "go" on stdin."""
    from tests.support.inprocess import FakeProbe, fake_worker_spawner
    from whisperd import __version__
    from whisperd.app import App
    from whisperd.config import Config, GpuConfig, MetricsConfig, StoreConfig, WorkersConfig
    from whisperd.pg_audio import AudioCache
    from whisperd.pg_store import PgStore
    from whisperd.spool import Spool

    store_config = StoreConfig(url=url, host_id=name, lease_s=LEASE_S, heartbeat_interval_s=LEASE_S / 6)
    config = Config(
        store=store_config, workers=WorkersConfig(cpu_workers=workers), gpu=GpuConfig(enabled=False),
        metrics=MetricsConfig(enabled=False),
    )  # fmt: skip
    store = PgStore(url, name, lease_s=LEASE_S, release=__version__)
    await asyncio.to_thread(store.open)
    app = App(
        config, store, Spool(state_dir / "spool"), FakeProbe(), spawner=fake_worker_spawner(state_dir / "fw"),
        shared=store, audio_cache=AudioCache(state_dir / "audio-cache", 1 << 30),
    )  # fmt: skip
    try:
        app.daemon.install_signal_handlers()
        await app.daemon.start()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await app.run()
        await app.drain(10)
    finally:
        store.close()


def host_process(name: str, url: str, state_dir: Path, workers: int) -> subprocess.Popen[str]:
    state_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(state_dir / "host.log", "w") as log:  # the workers' stderr
        return subprocess.Popen(
            [sys.executable, __file__, "--host", name, url, str(state_dir), str(workers)],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip


def queue_jobs(url: str, count: int, folder: Path) -> None:
    """count PENDING jobs of 8 users, each with its audio (a script the fake worker answers at once) in the
    database, inserted as a submit inserts them, by a "bench" host that never runs anything."""
    from whisperd.pg_store import PgStore
    from whisperd.store import NewJob

    audio = folder / "script"
    audio.write_text("segments=1")
    store = PgStore(url, "bench", lease_s=LEASE_S, release="bench")
    store.open()
    try:
        for start in range(0, count, INSERT_BATCH):
            new = [
                NewJob(spool_path=str(audio), spool_bytes=audio.stat().st_size, filename=f"job{i}.wav",
                       owner_uid=1000 + i % 8, model="tiny.en", language=None, task="transcribe",
                       priority=0, word_timestamps=False)
                for i in range(start, min(count, start + INSERT_BATCH))
            ]  # fmt: skip
            store.insert_jobs(new, time.time())
    finally:
        store.close()


def _proc_table() -> dict[int, tuple[int, float, float]]:
    """pid -> (parent pid, its own CPU seconds, CPU seconds of its children that exited and were reaped)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        own, reaped = (
            (int(fields[11]) + int(fields[12])) * TICK_S,
            (int(fields[13]) + int(fields[14])) * TICK_S,
        )
        table[int(stat.parent.name)] = (int(fields[1]), own, reaped)
    return table


def cpu_split(host_pids: list[int], postmaster: int) -> dict[str, float]:
    """CPU seconds so far of the hosts' daemons, their workers, the PostgreSQL server (every backend, those
    gone included), and of the whole machine."""
    table = _proc_table()

    def tree(pid: int) -> float:  # the process, its children reaped, and those alive
        _parent, own, reaped = table.get(pid, (0, 0.0, 0.0))
        return own + reaped + sum(tree(child) for child, (parent, _o, _r) in table.items() if parent == pid)

    daemons = sum(table.get(pid, (0, 0.0, 0.0))[1] for pid in host_pids)
    return {"daemons": daemons, "workers": sum(tree(pid) for pid in host_pids) - daemons,
            "postgres": tree(postmaster), "machine": machine_busy_s()}  # fmt: skip


def enable_statement_statistics(cluster: Cluster) -> bool:
    """pg_stat_statements (contrib, in Debian's server package), for statements per job; False if absent."""
    try:
        with psycopg.connect(cluster.conninfo, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        cluster.restart()
        with psycopg.connect(cluster.conninfo, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
    except (psycopg.Error, subprocess.SubprocessError) as exc:
        print(f"(no statements per job: pg_stat_statements is not available: {exc})", file=sys.stderr)
        return False
    return True


TOP_STATEMENTS = (
    "SELECT s.calls, s.total_exec_time, left(regexp_replace(s.query, '\\s+', ' ', 'g'), 100) "
    "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
    "WHERE d.datname = %s AND s.query NOT IN ('BEGIN', 'COMMIT') AND s.query !~ '^(SAVEPOINT|RELEASE)' "
    "ORDER BY s.total_exec_time DESC LIMIT 10"
)


def claims(cluster: Cluster, hosts: int, jobs: int, root: Path, statements: bool) -> dict[str, Any]:
    name = f"claims_{hosts}"
    url = cluster.create_database(name)
    queue_jobs(url, jobs, root)
    names = [f"h{i}" for i in range(hosts)]
    procs = [host_process(n, url, root / f"claims{hosts}" / n, FAKE_WORKERS_PER_HOST) for n in names]
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    commits = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s"
    with psycopg.connect(cluster.dsn("postgres"), autocommit=True) as watcher:
        try:
            for host, proc in zip(names, procs, strict=True):
                assert proc.stdout is not None
                ready, _, _ = select.select([proc.stdout], [], [], 300)
                if not ready or proc.stdout.readline().strip() != "ready":
                    raise RuntimeError(f"host {host} did not start: see {root}/claims{hosts}/{host}/host.log")
            load = os.getloadavg()[0]
            if statements:
                watcher.execute("SELECT pg_stat_statements_reset()")  # the queueing's statements out
            [(xacts_before,)] = watcher.execute(commits, (name,)).fetchall()
            cpu_before = cpu_split([proc.pid for proc in procs], postmaster)
            go_at = time.time()
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            finished = "SELECT count(*) FROM jobs WHERE state IN ('COMPLETED', 'FAILED', 'CANCELLED')"
            with psycopg.connect(url, autocommit=True) as poll:
                deadline = time.monotonic() + 1200
                while poll.execute(finished).fetchall()[0][0] < jobs:
                    if time.monotonic() > deadline or any(proc.poll() is not None for proc in procs):
                        raise RuntimeError(f"the queue did not drain; host logs under {root}/claims{hosts}")
                    time.sleep(0.1)
            cpu_after = cpu_split([proc.pid for proc in procs], postmaster)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(60)
        time.sleep(1.0)  # the backends' statistics reach the server as they exit
        [(xacts_after,)] = watcher.execute(commits, (name,)).fetchall()
        top = watcher.execute(TOP_STATEMENTS, (name,)).fetchall() if statements else []
    events = rows(
        url, "SELECT event, host, at FROM job_events WHERE event IN ('dispatch', 'complete') ORDER BY at"
    )
    dispatched = [(host, at) for event, host, at in events if event == "dispatch"]
    times = [at for _host, at in dispatched]
    low, high = round(0.1 * (len(times) - 1)), round(0.9 * (len(times) - 1))
    drain_s = events[-1][2] - go_at
    cpu = {kind: cpu_after[kind] - cpu_before[kind] for kind in cpu_after}
    cpu["others"] = max(0.0, cpu.pop("machine") - cpu["daemons"] - cpu["workers"] - cpu["postgres"])
    return {
        "hosts": hosts,
        "workers_per_host": FAKE_WORKERS_PER_HOST,
        "jobs": jobs,
        "final_states": dict(rows(url, "SELECT state, count(*) FROM jobs GROUP BY state")),
        "dispatches": len(dispatched),
        "claims_per_s": (high - low) / (times[high] - times[low]),  # the middle 80%
        "claims_per_s_overall": len(times) / (times[-1] - go_at),
        "drain_s": drain_s,
        "dispatches_per_host": dict(sorted(Counter(host for host, _at in dispatched).items())),
        "transactions_per_job": (xacts_after - xacts_before) / jobs,
        # where the database's time went: [calls per job, database time per job in ms, the statement]
        "statements_per_job": [[calls / jobs, ms / jobs, text] for calls, ms, text in top],
        "cpu_ms_per_job": {kind: 1000 * seconds / jobs for kind, seconds in cpu.items()},
        "cpu_share_of_machine": {k: v / ((os.cpu_count() or 1) * drain_s) for k, v in cpu.items()},
        "load_average_before": load,
    }


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--host":
        import uvloop

        from whisperd.cli import GIL_SWITCH_INTERVAL_S

        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as the daemon runs
        state = Path(sys.argv[4])
        logging.basicConfig(filename=state / "whisperd.log", level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
        uvloop.run(_host(sys.argv[2], sys.argv[3], state, int(sys.argv[5])))
