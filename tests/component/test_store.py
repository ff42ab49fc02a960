"""The stores on real files and a real PostgreSQL: atomic submits, transitions with their history, listings
that never decode transcripts, spool hygiene. The tests that say nothing of the backend run against both
SqliteStore and PgStore (the `backend` fixture); the SQLite file's own (old databases) against SQLite."""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psycopg
import pytest

from whisperd.errors import InvalidAudio, StorageError
from whisperd.jobs import JobEvent, JobState
from whisperd.pg_store import PgStore
from whisperd.protocol import Segment, Transcript
from whisperd.spool import Spool
from whisperd.sqlite_store import SqliteStore
from whisperd.store import EventRow, JobRow, NewJob, Store

HOST = "host-1"  # the shared store's host id
_names = itertools.count()


class Backend:
    """Opens stores of one kind on one database, and writes behind their back; closes them at the end."""

    def __init__(self, tmp_path: Path, url: str | None) -> None:
        self.path, self.url = tmp_path / "jobs.sqlite3", url
        self.opened: list[Store] = []

    def open(self) -> Store:
        store: Store
        if self.url is None:
            store = SqliteStore(self.path)
        else:
            shared = PgStore(self.url, HOST, lease_s=30.0, release="test")
            shared.open()
            store = shared
        self.opened.append(store)
        return store

    def corrupt_transcript(self, store: Store, job_id: int) -> None:
        """A stored transcript that no longer decodes."""
        if isinstance(store, SqliteStore):
            store._db.execute("UPDATE jobs SET transcript = x'00ff' WHERE id = ?", (job_id,))
            return
        assert self.url is not None
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("UPDATE jobs SET transcript = '\\x00ff'::bytea WHERE id = %s", (job_id,))

    def close(self) -> None:
        for store in self.opened:
            with contextlib.suppress(Exception):  # some tests closed theirs already
                store.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    url = None
    if request.param == "postgres":
        url = request.getfixturevalue("postgres").create_database(f"store_{next(_names)}")
    opened = Backend(tmp_path, url)
    yield opened
    opened.close()


def dispatch(store: Store, job: JobRow, worker: str = "cpu0") -> None:
    """The DISPATCH as the registry takes it: the attempt raised (the fencing token) and the host set."""
    old = job.state
    job.state, job.worker, job.attempt, job.host = JobState.PROCESSING, worker, job.attempt + 1, HOST
    store.save_transition(job, old, JobEvent.DISPATCH)


def new_job(spool: str, priority: int = 0) -> NewJob:
    return NewJob(
        spool_path=spool, spool_bytes=100, filename="a.wav", owner_uid=1000, model="tiny.en", language=None,
        task="transcribe", priority=priority, word_timestamps=True,
    )  # fmt: skip


def spooled(spool: Spool, tmp_path: Path, data: bytes = b"RIFF....") -> str:
    source = tmp_path / f"src{len(list(tmp_path.iterdir()))}"
    source.write_bytes(data)
    fd = os.open(source, os.O_RDONLY)
    try:
        return spool.copy_from_fd(fd, 1 << 20)[0]
    finally:
        os.close(fd)


def test_a_failed_submit_leaves_no_open_transaction(backend: Backend, tmp_path: Path) -> None:
    store, spool = backend.open(), Spool(tmp_path / "spool")
    path = spooled(spool, tmp_path)
    with pytest.raises((OverflowError, StorageError)):  # SQLite's driver refuses it, PostgreSQL the server
        store.insert_jobs([new_job(path), new_job(path, priority=2**64)], now=1.0)
    assert store.live_jobs() == [], "all or nothing"
    [job] = store.insert_jobs([new_job(path)], now=2.0)  # the store still works
    assert job.word_timestamps is True and job.state is JobState.PENDING
    job.updated_at = 3.0
    dispatch(store, job)
    assert store.history(job.id) == [
        EventRow(at=2.0, from_state=None, to_state=JobState.PENDING, event="submit", worker=None, error=None),
        EventRow(at=3.0, from_state=JobState.PENDING, to_state=JobState.PROCESSING, event="dispatch",
                 worker="cpu0", error=None),
    ]  # fmt: skip
    store.close()
    reopened = backend.open()
    assert [(j.state, j.worker) for j in reopened.live_jobs()] == [(JobState.PROCESSING, "cpu0")]
    assert reopened.count_by_state() == {JobState.PROCESSING: 1}
    reopened.close()


def test_listings_select_rows_without_decoding_transcripts(backend: Backend, tmp_path: Path) -> None:
    store, spool = backend.open(), Spool(tmp_path / "spool")
    jobs = store.insert_jobs([new_job(spooled(spool, tmp_path)) for _ in range(3)], now=1.0)
    done = jobs[1]
    dispatch(store, done)
    done.state, done.updated_at, done.spool_path = JobState.COMPLETED, 2.0, None
    transcript = Transcript("en", 1.0, 1.0, "hello", [Segment(id=1, start=0.0, end=1.0, text="hello")])
    store.save_transition(done, JobState.PROCESSING, JobEvent.COMPLETE, transcript)
    # A transcript that no longer decodes would break any listing that read it.
    backend.corrupt_transcript(store, jobs[0].id)
    assert [j.id for j in store.select([], None, 2)] == [jobs[1].id, jobs[2].id], "newest two, oldest first"
    assert [j.id for j in store.select([], JobState.COMPLETED, 10)] == [done.id]
    assert [j.id for j in store.live_jobs()] == [jobs[0].id, jobs[2].id]
    assert store.get(jobs[0].id) is not None
    assert store.transcript(done.id) == transcript
    with pytest.raises(msgspec.DecodeError):
        store.transcript(jobs[0].id)
    assert store.spool_names_in_use() == {Path(j.spool_path or "").name for j in (jobs[0], jobs[2])}
    views = store.views([], None, 3)
    assert [v.id for v in views] == [j.id for j in jobs], "views read no transcript either"
    assert [v.id for v in store.views([jobs[2].id, jobs[0].id], None, 2)] == [jobs[0].id, jobs[2].id]
    assert [v.id for v in store.views([], JobState.COMPLETED, 10)] == [done.id]


def test_views_are_the_rows_views(backend: Backend, tmp_path: Path) -> None:
    """What a listing reads straight from the store is exactly what the row would show, on the wire too
    (a stored 0/1 is a JSON false/true, a state is a JobState, the shared store's host)."""
    store, spool = backend.open(), Spool(tmp_path / "spool")
    jobs = store.insert_jobs([new_job(spooled(spool, tmp_path), priority=i) for i in range(3)], now=1.0)
    done = jobs[0]
    dispatch(store, done)
    done.state, done.progress, done.updated_at, done.finished_at = JobState.COMPLETED, 100.0, 2.0, 2.0
    done.spool_path, done.worker, done.device, done.audio_duration_s = None, "cpu0", "cpu", 12.5
    store.save_transition(done, JobState.PROCESSING, JobEvent.COMPLETE, Transcript("en", 1.0, 1.0, "x", []))
    failed = jobs[1]
    dispatch(store, failed)
    failed.state, failed.error, failed.retries, failed.word_timestamps = JobState.FAILED, "no audio", 2, False
    store.save_transition(failed, JobState.PROCESSING, JobEvent.FAIL_FATAL)
    views = store.views([], None, 10)
    rows = [store.get(j.id) for j in jobs]
    assert msgspec.json.encode(views) == msgspec.json.encode([r.view() for r in rows if r is not None])
    assert [v.state for v in views] == [JobState.COMPLETED, JobState.FAILED, JobState.PENDING]
    assert all(type(v.state) is JobState and type(v.word_timestamps) is bool for v in views)
    assert [v.host for v in views] == ([HOST, HOST, None] if store.shared else [None] * 3)
    store.close()


def test_a_job_s_decoding_options_are_kept_through_its_life(backend: Backend, tmp_path: Path) -> None:
    """prompt and temperature as submitted: in the row through its transitions and a reopening; a listing's
    views show the temperature, never the prompt (every caller may list the queue)."""
    store, spool = backend.open(), Spool(tmp_path / "spool")
    prompt = "Ana, Bob; the «Q3» budget.\nNew line, 'quotes' and \\ too. " + "é" * 4000
    asked = [
        msgspec.structs.replace(new_job(spooled(spool, tmp_path)), prompt=prompt, temperature=0.0),
        new_job(spooled(spool, tmp_path)),
        msgspec.structs.replace(new_job(spooled(spool, tmp_path)), temperature=0.7),
    ]
    jobs = store.insert_jobs(asked, now=1.0)
    options = [(prompt, 0.0), (None, None), (None, 0.7)]
    assert [(j.prompt, j.temperature) for j in jobs] == options
    done = jobs[0]
    dispatch(store, done)
    done.state, done.updated_at, done.finished_at, done.spool_path = JobState.COMPLETED, 2.0, 2.0, None
    store.save_transition(done, JobState.PROCESSING, JobEvent.COMPLETE, Transcript("en", 1.0, 1.0, "x", []))
    dispatch(store, jobs[2])
    store.close()
    reopened = backend.open()
    rows = reopened.select([], None, 10)
    assert [(r.prompt, r.temperature) for r in rows] == options
    assert [r.state for r in rows] == [JobState.COMPLETED, JobState.PENDING, JobState.PROCESSING]
    views = reopened.views([], None, 10)
    assert [v.temperature for v in views] == [0.0, None, 0.7]
    assert msgspec.json.encode(views) == msgspec.json.encode([r.view() for r in rows])
    assert "é".encode() not in msgspec.json.encode(views), "no prompt in a listing"
    reopened.close()


def test_newest_ids_come_by_state_oldest_first_within_the_limit(backend: Backend, tmp_path: Path) -> None:
    store, spool = backend.open(), Spool(tmp_path / "spool")
    jobs = store.insert_jobs([new_job(spooled(spool, tmp_path)) for _ in range(6)], now=1.0)
    for job in jobs[1::2]:
        job.updated_at = 2.0
        dispatch(store, job)
    ids = [j.id for j in jobs]
    assert store.newest_ids(None, 4) == ids[2:]
    assert store.newest_ids(JobState.PENDING, 2) == [ids[2], ids[4]]
    assert store.newest_ids(JobState.PROCESSING, 10) == [ids[1], ids[3], ids[5]]
    assert store.newest_ids(JobState.COMPLETED, 10) == []
    store.close()


def test_spool_refuses_empty_and_oversized_audio_and_cleans_up(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidAudio, match="empty"):
        spooled(spool, tmp_path, b"")
    source = tmp_path / "big"
    source.write_bytes(b"x" * 2048)
    fd = os.open(source, os.O_RDONLY)
    with pytest.raises(InvalidAudio, match="larger than the limit"):
        spool.copy_from_fd(fd, 1024)
    os.close(fd)
    assert list(spool.directory.iterdir()) == []


def test_orphan_spool_files_go_and_live_ones_stay(backend: Backend, tmp_path: Path) -> None:
    store, spool = backend.open(), Spool(tmp_path / "spool")
    kept = spooled(spool, tmp_path)
    orphan = spooled(spool, tmp_path)
    store.insert_jobs([new_job(kept)], now=1.0)
    assert spool.remove_orphans(store.spool_names_in_use()) == 1
    assert [p.name for p in spool.directory.iterdir()] == [Path(kept).name]
    assert not Path(orphan).exists()


def test_an_orphan_written_after_the_start_is_left_to_its_submit(backend: Backend, tmp_path: Path) -> None:
    store, spool = backend.open(), Spool(tmp_path / "spool")
    old, new = spooled(spool, tmp_path), spooled(spool, tmp_path)
    os.utime(old, (1_000.0, 1_000.0))
    assert spool.remove_orphans(store.spool_names_in_use(), before=2_000.0) == 1
    assert not Path(old).exists() and Path(new).exists(), (
        "a file spooled since may be a submit's, uncommitted"
    )


def test_the_queue_is_read_oldest_first_with_the_owners_books(backend: Backend, tmp_path: Path) -> None:
    store, spool = backend.open(), Spool(tmp_path / "spool")
    a, b, c = store.insert_jobs([new_job(spooled(spool, tmp_path), priority=i) for i in range(3)], now=5.0)
    b.updated_at = 6.0
    dispatch(store, b)
    b.state, b.queued_at, b.host, b.worker = JobState.PENDING, 7.0, None, None  # requeued: to the tail
    store.save_transition(b, JobState.PROCESSING, JobEvent.REQUEUE)
    dispatch(store, a)
    queue = [entry for chunk in store.queue() for entry in chunk]
    assert queue == [(c.id, 2, 1000, "tiny.en", 5.0), (b.id, 1, 1000, "tiny.en", 7.0)]
    assert {(t.state, t.jobs, t.spool_bytes) for t in store.user_totals()} == {
        (JobState.PENDING, 2, 200), (JobState.PROCESSING, 1, 100),
    }  # fmt: skip
    assert [j.id for j in store.jobs_in([JobState.PROCESSING, JobState.RETRYING])] == [a.id]
    store.close()


def test_a_store_from_before_spool_sizes_gets_them_measured_once(tmp_path: Path) -> None:
    """A database made by a release whose jobs table had no spool_bytes column."""
    spool = Spool(tmp_path / "spool")
    path = spooled(spool, tmp_path, b"x" * 1234)
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.execute(
            "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, state TEXT NOT NULL,"
            " progress REAL NOT NULL DEFAULT 0, retries INTEGER NOT NULL DEFAULT 0, device TEXT, worker TEXT,"
            " model TEXT NOT NULL,"
            " language TEXT, task TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0, word_timestamps INTEGER"
            " NOT NULL DEFAULT 0, error TEXT, filename TEXT NOT NULL, owner_uid INTEGER NOT NULL,"
            " audio_duration_s REAL, spool_path TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,"
            " queued_at REAL NOT NULL, started_at REAL, finished_at REAL, not_before REAL, transcript BLOB)"
        )
        db.execute(
            "INSERT INTO jobs (state, model, task, filename, owner_uid, spool_path, created_at, updated_at,"
            " queued_at) VALUES ('PENDING', 'tiny.en', 'transcribe', 'a.wav', 1000, ?, 1, 1, 1)",
            (path,),
        )
    store = SqliteStore(tmp_path / "jobs.sqlite3")
    [job] = store.live_jobs()
    assert job.spool_bytes is None
    measured: list[str] = []

    def size_of(spooled: str) -> int:
        measured.append(spooled)
        return os.stat(spooled).st_size

    assert store.measure_spools(size_of) == 1
    assert measured == [path] and store.live_jobs()[0].spool_bytes == 1234
    assert store.measure_spools(lambda p: 0) == 0, "once"
    assert [t.spool_bytes for t in store.user_totals()] == [1234]
    assert [e[0] for chunk in store.queue() for e in chunk] == [job.id], "the queue's index was added too"
    store.close()


def test_a_store_from_before_decoding_options_is_brought_up_to_date_with_its_jobs(tmp_path: Path) -> None:
    """A database made by the release before per-job prompts and temperatures: its jobs read back with
    none, run on, and new jobs keep theirs."""
    spool = Spool(tmp_path / "spool")
    path = spooled(spool, tmp_path)
    transcript = Transcript("en", 1.0, 1.0, "old", [Segment(id=1, start=0.0, end=1.0, text="old")])
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        db.executescript(
            "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, state TEXT NOT NULL,"
            " progress REAL NOT NULL DEFAULT 0, retries INTEGER NOT NULL DEFAULT 0, device TEXT, worker TEXT,"
            " model TEXT NOT NULL, language TEXT, task TEXT NOT NULL, priority INTEGER NOT NULL DEFAULT 0,"
            " word_timestamps INTEGER NOT NULL DEFAULT 0, error TEXT, filename TEXT NOT NULL,"
            " owner_uid INTEGER NOT NULL, audio_duration_s REAL, spool_path TEXT, spool_bytes INTEGER,"
            " created_at REAL NOT NULL, updated_at REAL NOT NULL, queued_at REAL NOT NULL, started_at REAL,"
            " finished_at REAL, not_before REAL, transcript BLOB);"
            "CREATE INDEX jobs_state ON jobs(state);"
            "CREATE INDEX jobs_queue ON jobs(queued_at, id, priority, owner_uid, model)"
            " WHERE state = 'PENDING';"
            "CREATE TABLE job_events (job_id INTEGER NOT NULL REFERENCES jobs(id), at REAL NOT NULL,"
            " from_state TEXT, to_state TEXT NOT NULL, event TEXT NOT NULL, worker TEXT, error TEXT);"
            "CREATE INDEX job_events_job ON job_events(job_id);"
            "CREATE INDEX jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;"
            "PRAGMA user_version = 1;"
        )
        db.execute(
            "INSERT INTO jobs (state, model, task, filename, owner_uid, spool_path, spool_bytes, created_at,"
            " updated_at, queued_at) VALUES ('PENDING', 'tiny.en', 'transcribe', 'a.wav', 1000, ?, 8, 1, 1,"
            " 1)",
            (path,),
        )
        db.execute(
            "INSERT INTO jobs (state, model, task, filename, owner_uid, created_at, updated_at, queued_at,"
            " finished_at, transcript) VALUES ('COMPLETED', 'tiny.en', 'transcribe', 'b.wav', 1000, 1, 2, 1,"
            " 2, ?)",
            (msgspec.json.encode(transcript),),
        )
    store = SqliteStore(tmp_path / "jobs.sqlite3")
    waiting, done = store.select([], None, 10)
    assert [(j.prompt, j.temperature) for j in (waiting, done)] == [(None, None)] * 2
    assert store.transcript(done.id) == transcript and store.views([], None, 10)[1].temperature is None
    dispatch(store, waiting)
    asked = msgspec.structs.replace(new_job(spooled(spool, tmp_path)), prompt="Ana.", temperature=0.2)
    [new] = store.insert_jobs([asked], now=5.0)
    store.close()
    reopened = SqliteStore(tmp_path / "jobs.sqlite3")  # once brought up to date, opened as any other
    assert [(j.id, j.state, j.prompt, j.temperature) for j in reopened.live_jobs()] == [
        (waiting.id, JobState.PROCESSING, None, None), (new.id, JobState.PENDING, "Ana.", 0.2),
    ]  # fmt: skip
    assert [e[0] for chunk in reopened.queue() for e in chunk] == [new.id]
    reopened.close()


def test_a_claim_dispatches_the_jobs_it_wins(backend: Backend, tmp_path: Path) -> None:
    store, spool = backend.open(), Spool(tmp_path / "spool")
    jobs = store.insert_jobs([new_job(spooled(spool, tmp_path)) for _ in range(3)], now=1.0)
    for job in jobs:
        job.state, job.worker, job.attempt, job.host = JobState.PROCESSING, "cpu0", job.attempt + 1, HOST
    won = store.claim([(job, JobState.PENDING, JobEvent.DISPATCH, None) for job in jobs[:2]])
    assert won == [jobs[0].id, jobs[1].id], "nobody else took them"
    assert [(j.id, j.state) for j in store.live_jobs()] == [
        (jobs[0].id, JobState.PROCESSING), (jobs[1].id, JobState.PROCESSING), (jobs[2].id, JobState.PENDING),
    ]  # fmt: skip
    assert [e.event for e in store.history(jobs[0].id)] == ["submit", "dispatch"]
