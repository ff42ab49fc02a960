"""The shared store's schema migrations (whisperd/pg_schema.py) on a real PostgreSQL: applied once, in order,
by whichever of several hosts starting at once gets there first; a newer schema is refused."""

from __future__ import annotations

import itertools
import threading

import psycopg
import pytest

from tests.support.postgres import Cluster
from whisperd import pg_schema

_names = itertools.count()


@pytest.fixture
def dsn(postgres: Cluster) -> str:
    return postgres.create_database(f"schema_{next(_names)}")


def tables(conn: psycopg.Connection[tuple[object, ...]]) -> set[str]:
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {str(r[0]) for r in rows}


def test_a_fresh_database_gets_every_migration_once(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert pg_schema.version(conn) == 0
        assert pg_schema.migrate(conn, "test") == [v for v, _ in pg_schema.MIGRATIONS]
        assert pg_schema.version(conn) == pg_schema.LATEST
        assert {"hosts", "jobs", "job_audio", "job_events", "whisperd_schema"} <= tables(conn)
        assert pg_schema.migrate(conn, "test") == [], "a second start finds it done"
        rows = conn.execute("SELECT version, release FROM whisperd_schema ORDER BY version").fetchall()
        assert rows == [(v, "test") for v, _ in pg_schema.MIGRATIONS]


def test_hosts_starting_at_once_apply_each_migration_once(dsn: str) -> None:
    applied: list[list[int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def host() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                start.wait()
                applied.append(pg_schema.migrate(conn, "test"))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=host) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(applied, key=len) == [[]] * 7 + [[v for v, _ in pg_schema.MIGRATIONS]]
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM whisperd_schema").fetchone() == (len(pg_schema.MIGRATIONS),)


def test_a_schema_newer_than_this_release_is_refused_and_left_alone(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        pg_schema.migrate(conn, "test")
        conn.execute(
            "INSERT INTO whisperd_schema (version, release) VALUES (%s, 'future')", (pg_schema.LATEST + 1,)
        )
        conn.commit()
        with pytest.raises(pg_schema.SchemaTooNew) as refused:
            pg_schema.migrate(conn, "test")
        assert refused.value.code == "storage_error" and "upgrade whisperd" in refused.value.message
        assert pg_schema.version(conn) == pg_schema.LATEST + 1


def test_a_job_row_keeps_its_fencing_token_and_lease(dsn: str) -> None:
    """The columns the shared queue's claims rely on exist with their defaults."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pg_schema.migrate(conn, "test")
        conn.execute("INSERT INTO hosts VALUES ('a', 0, 0, 'test')")
        row = conn.execute(
            "INSERT INTO jobs (state, model, task, filename, owner_uid, submit_host, created_at, updated_at,"
            " queued_at) VALUES ('PENDING', 'tiny.en', 'transcribe', 'a.wav', 1000, 'a', 1, 1, 1)"
            " RETURNING attempt, host, lease_expires_at"
        ).fetchone()
        assert row == (0, None, None)
