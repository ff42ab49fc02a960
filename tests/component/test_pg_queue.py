"""The shared queue's claims, leases and fencing (whisperd/pg_queue.py) on a real PostgreSQL, with several
hosts as threads on connections of their own: a job is claimed by one host only, a lease that is not renewed
hands the job back to the queue, and a host that lost its lease cannot commit over the new owner."""

from __future__ import annotations

import itertools
import threading
import time

import psycopg
import pytest

from tests.support.postgres import Cluster
from whisperd import pg_queue, pg_schema

_names = itertools.count()
HOSTS = ("a", "b", "c")


@pytest.fixture
def dsn(postgres: Cluster) -> str:
    url = postgres.create_database(f"queue_{next(_names)}")
    with psycopg.connect(url, autocommit=True) as conn:
        pg_schema.migrate(conn, "test")
        for host in HOSTS:
            pg_queue.register_host(conn, host, "test")
    return url


def queue(dsn: str, count: int, priority: int = 0, at: float = 1.0) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "INSERT INTO jobs (state, model, task, filename, owner_uid, submit_host, priority, created_at, "
            "updated_at, queued_at) SELECT 'PENDING', 'tiny.en', 'transcribe', 'f' || n, 1000, 'a', %s, %s, "
            "%s, %s + n FROM generate_series(1, %s) AS n RETURNING id",
            (priority, at, at, at, count),
        ).fetchall()
    return [r[0] for r in rows]


def events(dsn: str, job_id: int) -> list[tuple[str, str | None, int | None]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT event, host, attempt FROM job_events WHERE job_id = %s ORDER BY id", (job_id,)
        ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def test_hosts_claiming_at_once_never_take_the_same_job(dsn: str) -> None:
    ids = queue(dsn, 300)
    claimed: dict[str, list[int]] = {h: [] for h in HOSTS}
    start = threading.Barrier(len(HOSTS))

    def host(name: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            start.wait()
            while waiting := pg_queue.waiting(conn, 10):
                got = pg_queue.claim(conn, name, [w.id for w in waiting], 30.0, "w0", "cpu")
                claimed[name] += [c.id for c in got]

    threads = [threading.Thread(target=host, args=(h,)) for h in HOSTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = [i for got in claimed.values() for i in got]
    assert sorted(everything) == ids, "every job claimed, none twice"
    takers = sum(1 for got in claimed.values() if got)
    assert takers >= 2, f"the hosts shared the work: { {h: len(c) for h, c in claimed.items()} }"
    assert events(dsn, ids[0])[-1][0] == "dispatch"


def test_the_queue_is_read_in_priority_then_fifo_order(dsn: str) -> None:
    low = queue(dsn, 3, priority=0, at=1.0)
    high = queue(dsn, 2, priority=5, at=100.0)
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert [w.id for w in pg_queue.waiting(conn, 10)] == high + low


def test_a_lease_not_renewed_hands_the_job_back_and_counts_nothing(dsn: str) -> None:
    [job, kept] = queue(dsn, 2)
    with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
        pg_queue.claim(a, "a", [job], 0.3, "w0", "cpu")
        pg_queue.claim(b, "b", [kept], 0.3, "w0", "cpu")
        assert pg_queue.requeue_expired(b, "b") == [], "not expired yet"
        for _ in range(4):  # host b heartbeats; host a has stopped
            time.sleep(0.15)
            assert pg_queue.heartbeat(b, "b", 0.3) == 1
        assert pg_queue.requeue_expired(b, "b") == [job]
        row = b.execute("SELECT state, retries, host, attempt FROM jobs WHERE id = %s", (job,)).fetchone()
        assert row == ("PENDING", 0, None, 1)
        assert b.execute("SELECT state FROM jobs WHERE id = %s", (kept,)).fetchone() == ("PROCESSING",)
    assert [e[0] for e in events(dsn, job)] == ["dispatch", "lease_expired"]


def test_a_host_that_lost_its_lease_cannot_commit_over_the_new_owner(dsn: str) -> None:
    [job] = queue(dsn, 1)
    with psycopg.connect(dsn, autocommit=True) as a, psycopg.connect(dsn, autocommit=True) as b:
        [stale] = pg_queue.claim(a, "a", [job], 0.1, "w0", "cpu")
        time.sleep(0.2)  # host a is cut off (SIGSTOP, a network cut) past its lease
        assert pg_queue.requeue_expired(b, "b") == [job]
        [fresh] = pg_queue.claim(b, "b", [job], 30.0, "w0", "cpu")
        assert (stale.attempt, fresh.attempt) == (1, 2)
        assert not pg_queue.complete(a, stale, "a", b"a's transcript", 10.0), "the late result is refused"
        assert pg_queue.complete(b, fresh, "b", b"b's transcript", 10.0)
        assert not pg_queue.complete(b, fresh, "b", b"again", 10.0), "a job completes once"
        row = b.execute("SELECT state, transcript FROM jobs WHERE id = %s", (job,)).fetchone()
        assert row == ("COMPLETED", b"b's transcript")
    assert events(dsn, job) == [
        ("dispatch", "a", 1), ("lease_expired", "b", 1), ("dispatch", "b", 2), ("complete", "b", 2),
    ]  # fmt: skip
