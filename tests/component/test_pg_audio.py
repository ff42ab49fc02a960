"""A job's audio through PostgreSQL (whisperd/pg_audio.py) on a real cluster: stored in chunks by one host,
fetched byte for byte by another into its cache, which keeps to its size."""

from __future__ import annotations

import io
import itertools
import os
from pathlib import Path

import psycopg
import pytest

from tests.support.postgres import Cluster
from whisperd import pg_audio, pg_queue, pg_schema

_names = itertools.count()


@pytest.fixture
def conn(postgres: Cluster) -> psycopg.Connection[tuple[object, ...]]:
    url = postgres.create_database(f"audio_{next(_names)}")
    connection = psycopg.connect(url, autocommit=True)
    pg_schema.migrate(connection, "test")
    pg_queue.register_host(connection, "a", "test")
    return connection


def job(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    row = conn.execute(
        "INSERT INTO jobs (state, model, task, filename, owner_uid, submit_host, created_at, updated_at, "
        "queued_at) VALUES ('PENDING', 'tiny.en', 'transcribe', 'a.wav', 1000, 'a', 1, 1, 1) RETURNING id"
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("size", [0, 1, 1000, 3 * 1000 + 7])
def test_audio_comes_back_byte_for_byte(conn: psycopg.Connection[tuple[object, ...]], size: int) -> None:
    job_id = job(conn)
    data = os.urandom(size)
    assert pg_audio.store(conn, job_id, io.BytesIO(data), chunk_bytes=1000) == size
    assert conn.execute("SELECT count(*) FROM job_audio WHERE job_id = %s", (job_id,)).fetchone() == (
        -(-size // 1000),
    ), "in chunks of at most chunk_bytes"
    if size == 0:
        with pytest.raises(pg_audio.AudioMissing):
            pg_audio.fetch(conn, job_id, io.BytesIO())
        return
    out = io.BytesIO()
    assert pg_audio.fetch(conn, job_id, out) == size and out.getvalue() == data
    assert conn.execute("SELECT audio_bytes FROM jobs WHERE id = %s", (job_id,)).fetchone() == (size,)


def test_a_deleted_job_takes_its_audio_with_it(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    job_id = job(conn)
    pg_audio.store(conn, job_id, io.BytesIO(b"x" * 10))
    conn.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
    assert conn.execute("SELECT count(*) FROM job_audio").fetchone() == (0,)


def test_the_cache_fetches_once_and_keeps_to_its_size(
    conn: psycopg.Connection[tuple[object, ...]], tmp_path: Path
) -> None:
    cache = pg_audio.AudioCache(tmp_path / "cache", max_bytes=2500)
    ids = [job(conn) for _ in range(4)]
    for i, job_id in enumerate(ids):
        pg_audio.store(conn, job_id, io.BytesIO(bytes([i]) * 1000))
    first = cache.path(conn, ids[0])
    assert first.read_bytes() == b"\0" * 1000
    conn.execute("DELETE FROM job_audio WHERE job_id = %s", (ids[0],))
    assert cache.path(conn, ids[0]) == first, "cached: not fetched again"
    for job_id in ids[1:]:
        cache.path(conn, job_id)
    kept = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert kept == sorted(str(i) for i in ids[2:]), "the least recently used went first"
    cache.discard(ids[3])
    assert not (tmp_path / "cache" / str(ids[3])).exists()


def test_a_fetch_that_fails_leaves_no_file_behind(
    conn: psycopg.Connection[tuple[object, ...]], tmp_path: Path
) -> None:
    cache = pg_audio.AudioCache(tmp_path / "cache", max_bytes=1 << 20)
    with pytest.raises(pg_audio.AudioMissing):
        cache.path(conn, job(conn))
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_file_removed_while_the_cache_is_trimmed_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop discards a finished job's file while a fetch thread trims: the file it listed is gone by the
    time it is looked at (seen under load in bench/fleet.py: the batch's send died, its jobs stuck)."""
    cache = pg_audio.AudioCache(tmp_path / "cache", max_bytes=2500)
    for job_id in (1, 2):
        cache.fill(job_id, lambda out: out.write(b"x" * 1000))
    listed = Path.iterdir

    def listing_then_discard(folder: Path) -> list[Path]:
        paths = list(listed(folder))
        cache.discard(1)  # between the listing and the look at each file
        return paths

    monkeypatch.setattr(Path, "iterdir", listing_then_discard)
    cache.fill(3, lambda out: out.write(b"y" * 1000))
    monkeypatch.undo()
    assert sorted(p.name for p in cache.folder.iterdir()) == ["2", "3"]
