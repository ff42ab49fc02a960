"""The embedded store: jobs, results and history in one SQLite file (WAL, synchronous=FULL).

Every failure of SQLite to read or write (a full disk, another process holding the write lock past the short
busy timeout, an I/O error) is raised as a StorageError with nothing changed, so the caller can answer it
or retry it later; none of them blocks the daemon's loop for longer than the busy timeout."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from whisperd.errors import StorageBusy, StorageError, StorageFull
from whisperd.jobs import TERMINAL_STATES, JobEvent, JobState
from whisperd.protocol import JobView, Transcript
from whisperd.statedir import PRIVATE_FILE_MODE, narrow_mode
from whisperd.store import JOB_COLUMNS, MUTABLE_COLUMNS, EventRow, JobRow, NewJob, SavedTransition

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
-- Finished jobs, oldest first, for retention (only terminal jobs have finished_at).
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
"""

_SELECT_JOB = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs"  # never the transcript
# A listing's columns, in the order _views unpacks them: no transcript, no spool path.
_VIEW_COLUMNS = (
    "id", "state", "progress", "retries", "device", "worker", "model", "language", "task", "priority",
    "word_timestamps", "error", "filename", "owner_uid", "audio_duration_s", "created_at", "updated_at",
    "started_at", "finished_at",
)  # fmt: skip
_SELECT_VIEW = f"SELECT {', '.join(_VIEW_COLUMNS)} FROM jobs"
_STATES = {s.value: s for s in JobState}
_EVENT_COLUMNS = ("at", "from_state", "to_state", "event", "worker", "error")
_LIVE = tuple(s.value for s in JobState if s not in TERMINAL_STATES)


# A full disk leaves SQLite unable even to open a WAL database (its -shm file cannot be sized): this much
# is kept aside in the state dir and given back when opening the store fails, so the daemon can start.
RESERVE_BYTES = 1024 * 1024
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_FULL = 5, 6, 13


def storage_error(exc: sqlite3.Error) -> StorageError:
    """What a failed SQLite call means to the caller: every kind is worth a retry later."""
    primary = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the extended code's low byte is the primary one
    text = str(exc)
    if primary == _SQLITE_FULL or "full" in text:
        return StorageFull(f"the job store is full: {text}")
    if primary in (_SQLITE_BUSY, _SQLITE_LOCKED) or "locked" in text:
        return StorageBusy(f"the job store is locked by another process: {text}; try again")
    return StorageError(f"the job store failed: {text}")


def _job(row: tuple[object, ...]) -> JobRow:
    return msgspec.convert(dict(zip(JOB_COLUMNS, row, strict=True)), JobRow, strict=False)


def _views(rows: Sequence[tuple[Any, ...]]) -> list[JobView]:
    """Straight from the rows, with no JobRow between and no validation: a third of msgspec.convert's cost
    from dicts, which counts when a listing returns thousands of jobs."""
    return [
        JobView(
            id=id_, state=_STATES[state], progress=progress, retries=retries, device=device, worker=worker,
            model=model, language=language, task=task, priority=priority,
            word_timestamps=bool(word_timestamps), error=error, filename=filename, owner_uid=owner_uid,
            audio_duration_s=audio_duration_s, created_at=created_at, updated_at=updated_at,
            started_at=started_at, finished_at=finished_at,
        )
        for (
            id_, state, progress, retries, device, worker, model, language, task, priority, word_timestamps,
            error, filename, owner_uid, audio_duration_s, created_at, updated_at, started_at, finished_at,
        ) in rows
    ]  # fmt: skip


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the submit is acknowledged
        try:
            db.executescript(_SCHEMA)
        except sqlite3.OperationalError:
            # An older database on a full disk cannot take a new index: it runs without until a later start.
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'job_events'").fetchone():
                raise
            log.warning("the job store's schema could not be brought up to date (the disk is full?)")
    except BaseException:
        db.close()
        raise
    return db


def keep_reserve(reserve: Path, size_bytes: int = RESERVE_BYTES) -> bool:
    """Set the reserve aside again (fsynced, allocated) when the disk has room for it twice over."""
    if reserve.exists():
        return True
    try:
        if shutil.disk_usage(reserve.parent).free < 2 * size_bytes:
            return False
        fd = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        reserve.unlink(missing_ok=True)
        log.warning("cannot set aside the store's reserve %s: %s", reserve, exc.strerror)
        return False
    return True


class SqliteStore:
    def __init__(self, path: Path, busy_timeout_s: float = 0.1) -> None:
        """busy_timeout_s: how long a write waits for another process's write lock before it fails with
        StorageBusy; short, since the daemon's loop waits with it."""
        # Transcripts are the users' own: 0600 whatever the umask. SQLite gives -wal and -shm the database
        # file's mode, so creating it 0600 (and narrowing older, wider ones) covers all three.
        for suffix in ("", "-wal", "-shm"):
            narrow_mode(Path(f"{path}{suffix}"), PRIVATE_FILE_MODE)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE))
        self.path = path
        self._reserve = path.with_name(path.name + ".reserve")
        try:
            self._db = _connect(path, busy_timeout_s)
        except sqlite3.OperationalError as exc:
            if not self._reserve.exists():
                raise storage_error(exc) from exc
            log.warning("cannot open the job store (%s): giving back its reserve of %d bytes", exc,
                        RESERVE_BYTES)  # fmt: skip
            self._reserve.unlink()
            try:
                self._db = _connect(path, busy_timeout_s)
            except sqlite3.OperationalError as again:
                raise storage_error(again) from again
        keep_reserve(self._reserve)

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE .. COMMIT. After a full disk SQLite has rolled back already, and a second ROLLBACK
        would raise "no transaction is active" over the real error: roll back only what is still open."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            yield
            self._db.execute("COMMIT")
        except BaseException as exc:
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise storage_error(exc) from exc
            raise

    def _query(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            raise storage_error(exc) from exc

    def insert_jobs(self, new_jobs: Sequence[NewJob], now: float) -> list[JobRow]:
        rows = []
        with self._transaction():
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
        return rows

    def save_transition(
        self, job: JobRow, from_state: JobState, event: JobEvent, transcript: Transcript | None = None
    ) -> None:
        self.save_transitions([(job, from_state, event, transcript)])

    def save_transitions(self, transitions: Sequence[SavedTransition]) -> None:
        assignments = ", ".join(f"{c} = ?" for c in MUTABLE_COLUMNS)
        with self._transaction():
            for job, from_state, event, transcript in transitions:
                values = [getattr(job, c) for c in MUTABLE_COLUMNS]
                self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values, job.id])
                if transcript is not None:
                    encoded = msgspec.json.encode(transcript)
                    self._db.execute("UPDATE jobs SET transcript = ? WHERE id = ?", (encoded, job.id))
                self._add_event(job, from_state.value, event.value)

    def _add_event(self, job: JobRow, from_state: str | None, event: str) -> None:
        self._db.execute(
            f"INSERT INTO job_events (job_id, {', '.join(_EVENT_COLUMNS)}) VALUES (?,?,?,?,?,?,?)",
            (job.id, job.updated_at, from_state, job.state.value, event, job.worker, job.error),
        )

    def history(self, job_id: int) -> list[EventRow]:
        rows = self._query(
            f"SELECT {', '.join(_EVENT_COLUMNS)} FROM job_events WHERE job_id = ? ORDER BY rowid", (job_id,)
        )
        return [msgspec.convert(dict(zip(_EVENT_COLUMNS, r, strict=True)), EventRow) for r in rows]

    def get(self, job_id: int) -> JobRow | None:
        rows = self._query(f"{_SELECT_JOB} WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def transcript(self, job_id: int) -> Transcript | None:
        rows = self._query("SELECT transcript FROM jobs WHERE id = ?", (job_id,))
        if not rows or rows[0][0] is None:
            return None
        return msgspec.json.decode(rows[0][0], type=Transcript)

    def select(self, ids: Sequence[int], state: JobState | None, limit: int) -> list[JobRow]:
        rows = self._newest(_SELECT_JOB, ids, state, limit)
        return [_job(r) for r in reversed(rows)]

    def views(self, ids: Sequence[int], state: JobState | None, limit: int) -> list[JobView]:
        return _views(self._newest(_SELECT_VIEW, ids, state, limit)[::-1])

    def newest_ids(self, state: JobState | None, limit: int) -> list[int]:
        # by the primary key, or by the jobs_state index, whose entries are ordered by id within a state
        return [r[0] for r in reversed(self._newest("SELECT id FROM jobs", (), state, limit))]

    def _newest(
        self, select: str, ids: Sequence[int], state: JobState | None, limit: int
    ) -> list[tuple[Any, ...]]:
        where: list[str] = []
        args: list[object] = []
        if ids:
            where.append(f"id IN ({','.join('?' * len(ids))})")
            args.extend(ids)
        if state is not None:
            where.append("state = ?")
            args.append(state.value)
        sql = select + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        return self._query(sql, [*args, limit])

    def live_jobs(self) -> list[JobRow]:
        placeholders = ",".join("?" * len(_LIVE))
        rows = self._query(f"{_SELECT_JOB} WHERE state IN ({placeholders}) ORDER BY id", _LIVE)
        return [_job(r) for r in rows]

    def count_by_state(self) -> dict[JobState, int]:
        rows = self._query("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {JobState(state): count for state, count in rows}

    def spool_names_in_use(self) -> set[str]:
        rows = self._query("SELECT spool_path FROM jobs WHERE spool_path IS NOT NULL")
        # By name: the state dir may be reached by another path now (basename: a Path per row is slow).
        return {os.path.basename(r[0]) for r in rows}
