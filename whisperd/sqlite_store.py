"""The embedded store: jobs, results and history in one SQLite file (WAL, synchronous=FULL)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import msgspec

from whisperd.errors import StorageFull
from whisperd.jobs import TERMINAL_STATES, JobEvent, JobState
from whisperd.protocol import Transcript
from whisperd.store import JOB_COLUMNS, MUTABLE_COLUMNS, EventRow, JobRow, NewJob

log = logging.getLogger("whisperd.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL,
    progress REAL NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    device TEXT,
    worker TEXT,
    model TEXT NOT NULL,
    language TEXT,
    task TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    word_timestamps INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    filename TEXT NOT NULL,
    owner_uid INTEGER NOT NULL,
    audio_duration_s REAL,
    spool_path TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    queued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    not_before REAL,
    transcript BLOB
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
-- Every transition of every job, for operators and for proving that nothing ran twice.
CREATE TABLE IF NOT EXISTS job_events (
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    event TEXT NOT NULL,
    worker TEXT,
    error TEXT
);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events(job_id);
"""

_SELECT_JOB = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs"  # never the transcript
_EVENT_COLUMNS = ("at", "from_state", "to_state", "event", "worker", "error")
_LIVE = tuple(s.value for s in JobState if s not in TERMINAL_STATES)


def _job(row: tuple[object, ...]) -> JobRow:
    return msgspec.convert(dict(zip(JOB_COLUMNS, row, strict=True)), JobRow, strict=False)


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the submit is acknowledged
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def insert_jobs(self, new_jobs: Sequence[NewJob], now: float) -> list[JobRow]:
        rows = []
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for job in new_jobs:
                cursor = self._db.execute(
                    "INSERT INTO jobs (state, model, language, task, priority, word_timestamps, filename,"
                    " owner_uid, spool_path, created_at, updated_at, queued_at)"
                    f" VALUES ({','.join('?' * 12)}) RETURNING {', '.join(JOB_COLUMNS)}",
                    (
                        JobState.PENDING.value, job.model, job.language, job.task, job.priority,
                        int(job.word_timestamps), job.filename, job.owner_uid, job.spool_path, now, now, now,
                    ),
                )  # fmt: skip
                row = _job(cursor.fetchone())
                self._add_event(row, None, "submit")
                rows.append(row)
            self._db.execute("COMMIT")
        except BaseException as exc:
            self._db.execute("ROLLBACK")  # never leave a transaction open behind an error
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                raise StorageFull(f"the job store is full: {exc}") from exc
            raise
        return rows

    def save_transition(
        self, job: JobRow, from_state: JobState, event: JobEvent, transcript: Transcript | None = None
    ) -> None:
        assignments = ", ".join(f"{c} = ?" for c in MUTABLE_COLUMNS)
        values = [getattr(job, c) for c in MUTABLE_COLUMNS]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values, job.id])
            if transcript is not None:
                encoded = msgspec.json.encode(transcript)
                self._db.execute("UPDATE jobs SET transcript = ? WHERE id = ?", (encoded, job.id))
            self._add_event(job, from_state.value, event.value)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _add_event(self, job: JobRow, from_state: str | None, event: str) -> None:
        self._db.execute(
            f"INSERT INTO job_events (job_id, {', '.join(_EVENT_COLUMNS)}) VALUES (?,?,?,?,?,?,?)",
            (job.id, job.updated_at, from_state, job.state.value, event, job.worker, job.error),
        )

    def history(self, job_id: int) -> list[EventRow]:
        rows = self._db.execute(
            f"SELECT {', '.join(_EVENT_COLUMNS)} FROM job_events WHERE job_id = ? ORDER BY rowid", (job_id,)
        ).fetchall()
        return [msgspec.convert(dict(zip(_EVENT_COLUMNS, r, strict=True)), EventRow) for r in rows]

    def get(self, job_id: int) -> JobRow | None:
        row = self._db.execute(f"{_SELECT_JOB} WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def transcript(self, job_id: int) -> Transcript | None:
        row = self._db.execute("SELECT transcript FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        return msgspec.json.decode(row[0], type=Transcript)

    def select(self, ids: Sequence[int], state: JobState | None, limit: int) -> list[JobRow]:
        where: list[str] = []
        args: list[object] = []
        if ids:
            where.append(f"id IN ({','.join('?' * len(ids))})")
            args.extend(ids)
        if state is not None:
            where.append("state = ?")
            args.append(state.value)
        sql = _SELECT_JOB + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        rows = self._db.execute(sql, [*args, limit]).fetchall()
        return [_job(r) for r in reversed(rows)]

    def live_jobs(self) -> list[JobRow]:
        placeholders = ",".join("?" * len(_LIVE))
        rows = self._db.execute(f"{_SELECT_JOB} WHERE state IN ({placeholders}) ORDER BY id", _LIVE)
        return [_job(r) for r in rows.fetchall()]

    def count_by_state(self) -> dict[JobState, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {JobState(state): count for state, count in rows}

    def spool_names_in_use(self) -> set[str]:
        rows = self._db.execute("SELECT spool_path FROM jobs WHERE spool_path IS NOT NULL")
        return {Path(r[0]).name for r in rows}  # by name: the state dir may be reached by another path now
