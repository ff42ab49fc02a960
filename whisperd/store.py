"""The only SQL: durable jobs and their results in SQLite (WAL), and the spooled audio files."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
import uuid
from collections.abc import Iterable
from pathlib import Path

import msgspec

from whisperd.errors import InvalidAudio, StorageFull
from whisperd.jobs import JobState
from whisperd.protocol import JobView, Task, Transcript

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

_COLUMNS = [
    "id",
    "state",
    "progress",
    "retries",
    "device",
    "worker",
    "model",
    "language",
    "task",
    "priority",
    "word_timestamps",
    "error",
    "filename",
    "owner_uid",
    "audio_duration_s",
    "spool_path",
    "created_at",
    "updated_at",
    "queued_at",
    "started_at",
    "finished_at",
    "not_before",
]
_MUTABLE = [c for c in _COLUMNS if c not in ("id", "model", "language", "task", "filename", "owner_uid")]
_COPY_CHUNK_BYTES = 1024 * 1024


class JobRecord(JobView, kw_only=True, gc=False):
    """A job as the daemon holds it: the protocol's JobView plus what only the daemon needs. Scalars only,
    hence gc=False: a queue of 100,000 jobs adds nothing to the garbage collector's rounds."""

    spool_path: str | None
    queued_at: float  # FIFO key: set at submit and whenever a job goes back to the tail
    not_before: float | None  # a RETRYING job waits until then

    def view(self) -> JobView:
        return JobView(**{name: getattr(self, name) for name in JobView.__struct_fields__})


class NewJob(msgspec.Struct, kw_only=True):
    spool_path: str
    filename: str
    owner_uid: int
    model: str
    language: str | None
    task: Task
    priority: int
    word_timestamps: bool


def _record(row: sqlite3.Row) -> JobRecord:
    values = dict(row)
    values["word_timestamps"] = bool(values["word_timestamps"])
    return msgspec.convert(values, JobRecord)


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.spool_dir = state_dir / "spool"
        self.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._db = sqlite3.connect(state_dir / "jobs.sqlite3", isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the submit is acknowledged.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # ---- spool ---------------------------------------------------------------------------------------

    def spool_from_fd(self, fd: int, max_bytes: int) -> tuple[str, int]:
        """Copy an open file into the spool and fsync it and its directory entry; blocking, so the daemon
        runs it in a thread. Only regular files: a pipe or a device could block or fill the spool forever."""
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise InvalidAudio(f"cannot read the audio: {exc.strerror}") from exc
        if stat.S_ISDIR(mode):
            raise InvalidAudio("that is a directory, not an audio file")
        if not stat.S_ISREG(mode):
            raise InvalidAudio("the audio must be a regular file, not a pipe, socket or device")
        target = self.spool_dir / f"{uuid.uuid4().hex}.audio"
        size = 0
        try:
            with open(target, "wb") as out:
                while chunk := os.read(fd, _COPY_CHUNK_BYTES):
                    size += len(chunk)
                    if size > max_bytes:
                        raise InvalidAudio(f"audio is larger than the limit of {max_bytes} bytes")
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if size == 0:
                raise InvalidAudio("the audio file is empty")
            directory = os.open(self.spool_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)  # the file's name survives a power cut too, before the submit is acked
            finally:
                os.close(directory)
        except OSError as exc:
            target.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"no space left in {self.spool_dir} to spool the audio") from exc
            if exc.errno == errno.EISDIR:
                raise InvalidAudio("that is a directory, not an audio file") from exc
            raise InvalidAudio(f"cannot read the audio: {exc.strerror}") from exc
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return str(target), size

    def discard_spool(self, spool_path: str | None) -> None:
        if spool_path:
            Path(spool_path).unlink(missing_ok=True)

    def remove_orphan_spool_files(self) -> int:
        """Spool files of submits that crashed before their commit, or of jobs already finished."""
        rows = self._db.execute("SELECT spool_path FROM jobs WHERE spool_path IS NOT NULL")
        live = {Path(r[0]).name for r in rows}  # by name: the state dir may be reached by another path now
        removed = 0
        for path in self.spool_dir.iterdir():
            if path.name not in live:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # ---- jobs ----------------------------------------------------------------------------------------

    def insert_jobs(self, new_jobs: Iterable[NewJob], now: float) -> list[JobRecord]:
        """All of a submit's jobs in one transaction: either every file is queued or none."""
        records = []
        try:
            self._db.execute("BEGIN IMMEDIATE")
            for job in new_jobs:
                cursor = self._db.execute(
                    "INSERT INTO jobs (state, model, language, task, priority, word_timestamps, filename,"
                    " owner_uid, spool_path, created_at, updated_at, queued_at)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?) RETURNING *",
                    (
                        JobState.PENDING.value,
                        job.model,
                        job.language,
                        job.task,
                        job.priority,
                        int(job.word_timestamps),
                        job.filename,
                        job.owner_uid,
                        job.spool_path,
                        now,
                        now,
                        now,
                    ),
                )
                record = _record(cursor.fetchone())
                self._add_event(record, None, "submit")
                records.append(record)
            self._db.execute("COMMIT")
        except BaseException as exc:
            self._db.execute("ROLLBACK")  # never leave a transaction open behind an error
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                raise StorageFull(f"the job store is full: {exc}") from exc
            raise
        return records

    def save_transition(
        self, job: JobRecord, from_state: JobState, event: str, transcript: Transcript | None = None
    ) -> None:
        """The job's new state, its history row and any result land in one commit."""
        assignments = ", ".join(f"{c} = ?" for c in _MUTABLE)
        values = [getattr(job, c) for c in _MUTABLE]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values, job.id])
            if transcript is not None:
                encoded = msgspec.json.encode(transcript)
                self._db.execute("UPDATE jobs SET transcript = ? WHERE id = ?", (encoded, job.id))
            self._add_event(job, from_state.value, event)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _add_event(self, job: JobRecord, from_state: str | None, event: str) -> None:
        self._db.execute(
            "INSERT INTO job_events (job_id, at, from_state, to_state, event, worker, error)"
            " VALUES (?,?,?,?,?,?,?)",
            (job.id, job.updated_at, from_state, job.state.value, event, job.worker, job.error),
        )

    def history(self, job_id: int) -> list[tuple[float, str | None, str, str, str | None, str | None]]:
        rows = self._db.execute(
            "SELECT at, from_state, to_state, event, worker, error FROM job_events"
            " WHERE job_id = ? ORDER BY rowid",
            (job_id,),
        ).fetchall()
        return [tuple(r) for r in rows]

    def get(self, job_id: int) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def transcript(self, job_id: int) -> Transcript | None:
        row = self._db.execute("SELECT transcript FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        return msgspec.json.decode(row[0], type=Transcript)

    def select(self, ids: list[int], state: JobState | None, limit: int) -> list[JobRecord]:
        where: list[str] = []
        args: list[object] = []
        if ids:
            where.append(f"id IN ({','.join('?' * len(ids))})")
            args.extend(ids)
        if state is not None:
            where.append("state = ?")
            args.append(state.value)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id DESC LIMIT ?"
        rows = self._db.execute(sql, [*args, limit]).fetchall()
        return [_record(r) for r in reversed(rows)]

    def live_jobs(self) -> list[JobRecord]:
        terminal = [s.value for s in JobState if s.terminal]
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE state NOT IN (?,?,?) ORDER BY id", terminal
        ).fetchall()
        return [_record(r) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: count for state, count in rows}
