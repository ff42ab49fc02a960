"""The embedded store: jobs, results and history in one SQLite file (WAL, synchronous=NORMAL).

A commit writes its frames into the WAL and returns, with no fsync on the daemon's loop: it is durable once
`sync()` (an fsync of the WAL, in the durability barrier's thread) or a checkpoint has run after it, and a
submit is acknowledged only then (durability.py). Checkpoints run in a thread on a connection of their own
(`checkpoint()`), never on their own at a commit (wal_autocheckpoint=0); see sqlite_wal.py for how the WAL
is kept short while commits never pause.

Every failure of SQLite to read or write (a full disk, another process holding the write lock past the short
busy timeout, an I/O error) is raised as a StorageError with nothing changed, so the caller can answer it
or retry it later; none of them blocks the daemon's loop for longer than the busy timeout."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from whisperd.errors import StorageBusy, StorageError, StorageFull, os_storage_error
from whisperd.jobs import TERMINAL_STATES, JobEvent, JobState
from whisperd.protocol import JobView, Transcript
from whisperd.sqlite_wal import WAL_LIMIT_BYTES, Checkpointer, limit_wal, restart, sync_wal
from whisperd.statedir import PRIVATE_FILE_MODE, narrow_mode
from whisperd.store import (
    JOB_COLUMNS,
    MUTABLE_COLUMNS,
    EventRow,
    JobRow,
    Names,
    NewJob,
    QueueEntry,
    SavedTransition,
    UserTotal,
)

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
    spool_bytes INTEGER,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    queued_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    not_before REAL,
    transcript BLOB,
    prompt TEXT,
    temperature REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
-- The queue, oldest first, read whole at start only: it covers what the scheduler's lanes keep of a job.
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(queued_at, id, priority, owner_uid, model)
    WHERE state = 'PENDING';
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
    "started_at", "finished_at", "temperature",
)  # fmt: skip
_SELECT_VIEW = f"SELECT {', '.join(_VIEW_COLUMNS)} FROM jobs"
_STATES = {s.value: s for s in JobState}
_EVENT_COLUMNS = ("at", "from_state", "to_state", "event", "worker", "error")
_LIVE_STATES = tuple(s for s in JobState if s not in TERMINAL_STATES)
_LIVE = tuple(s.value for s in _LIVE_STATES)
_QUEUE_CHUNK = 10_000
_SPOOL_SIZES_STORED = 1  # PRAGMA user_version from which every job's spool size is stored
_BACKGROUND_BUSY_S = 5.0  # a thread's connection may wait for the loop's short transactions


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
            started_at=started_at, finished_at=finished_at, temperature=temperature,
        )
        for (
            id_, state, progress, retries, device, worker, model, language, task, priority, word_timestamps,
            error, filename, owner_uid, audio_duration_s, created_at, updated_at, started_at, finished_at,
            temperature,
        ) in rows
    ]  # fmt: skip


# Columns added since the first release, and their types: NULL in the rows of an older database.
_ADDED_COLUMNS = {"spool_bytes": "INTEGER", "prompt": "TEXT", "temperature": "REAL"}


def _add_columns(db: sqlite3.Connection) -> None:
    """Columns added since the first release, to a database made by an older one (their values NULL)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    if not columns:  # a new database, made whole by the schema: every job stores its spool size
        db.execute(f"PRAGMA user_version = {_SPOOL_SIZES_STORED}")
        return
    for name, kind in _ADDED_COLUMNS.items():
        if name not in columns:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        # A commit only writes the WAL: no fsync, no checkpoint on the loop. The durability barrier syncs the
        # WAL in its thread before a submit is acknowledged; checkpoints run in a thread (sqlite_wal.py).
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA wal_autocheckpoint=0")
        limit_wal(db, WAL_LIMIT_BYTES)
        # Before the schema, whose indexes may name them; not in the try below: every read names them, so a
        # store without them cannot run (on a full disk the caller gives back its reserve and tries again).
        _add_columns(db)
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
    shared = False  # only this daemon writes it: its queue changes only through the registry

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
        self._checkpointer = Checkpointer(path)

    def close(self) -> None:
        self._checkpointer.close()  # first: the last connection to close copies the WAL in, synced
        self._db.close()

    # ---- durability (sqlite_wal.py) ------------------------------------------------------------------

    def sync(self) -> None:
        """Every commit so far made durable: an fsync of the WAL. Blocking: run it in a thread."""
        try:
            sync_wal(self.path)
        except OSError as exc:
            raise os_storage_error(exc, "make the job store's latest changes durable") from exc

    def checkpoint(self) -> bool:
        """A PASSIVE checkpoint on a connection of its own; blocking: run it in a thread. True when the WAL
        is still past its limit after it, and only restart_log() can let it start over."""
        try:
            return self._checkpointer.run()
        except sqlite3.Error as exc:
            raise storage_error(exc) from exc

    def restart_log(self) -> None:
        """On the loop, right after a checkpoint() that returned True: copy the few frames it left, so that
        the next commit starts the WAL over (a copy and two fsyncs: about a millisecond)."""
        try:
            restart(self._db, self._checkpointer.limit_bytes)
        except sqlite3.Error as exc:
            raise storage_error(exc) from exc

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

    def insert_jobs(
        self,
        new_jobs: Sequence[NewJob],
        now: float,
        before_commit: Callable[[list[JobRow]], None] | None = None,
    ) -> list[JobRow]:
        rows = []
        with self._transaction():
            for job in new_jobs:
                cursor = self._db.execute(
                    "INSERT INTO jobs (state, model, language, task, priority, word_timestamps, filename,"
                    " owner_uid, spool_path, spool_bytes, created_at, updated_at, queued_at, prompt,"
                    f" temperature) VALUES ({','.join('?' * 15)}) RETURNING {', '.join(JOB_COLUMNS)}",
                    (
                        JobState.PENDING.value, job.model, job.language, job.task, job.priority,
                        int(job.word_timestamps), job.filename, job.owner_uid, job.spool_path,
                        job.spool_bytes, now, now, now, job.prompt, job.temperature,
                    ),
                )  # fmt: skip
                row = _job(cursor.fetchone())
                self._add_event(row, None, "submit")
                rows.append(row)
            if before_commit is not None:
                before_commit(rows)
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

    def claim(self, transitions: Sequence[SavedTransition]) -> list[int]:
        """Nobody else takes jobs from this store: the dispatch is an ordinary commit of them all."""
        self.save_transitions(transitions)
        return [job.id for job, _, _, _ in transitions]

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
        return self.jobs_in(_LIVE_STATES)

    def jobs_in(self, states: Sequence[JobState]) -> list[JobRow]:
        placeholders = ",".join("?" * len(states))
        values = [s.value for s in states]
        rows = self._query(f"{_SELECT_JOB} WHERE state IN ({placeholders}) ORDER BY id", values)
        return [_job(r) for r in rows]

    def queue(self) -> Iterator[list[QueueEntry]]:
        """The PENDING jobs, oldest first, in chunks: an index-only scan (jobs_queue), and no row kept
        longer than its chunk, so a queue of a million costs its own size in memory and no more."""
        try:
            cursor = self._db.execute(
                "SELECT id, priority, owner_uid, model, queued_at FROM jobs INDEXED BY jobs_queue"
                " WHERE state = 'PENDING' ORDER BY queued_at, id"
            )
            while chunk := cursor.fetchmany(_QUEUE_CHUNK):
                yield chunk
        except sqlite3.OperationalError as exc:
            raise storage_error(exc) from exc

    def user_totals(self) -> list[UserTotal]:
        rows = self._query(
            "SELECT owner_uid, state, COUNT(*), COALESCE(SUM(spool_bytes), 0) FROM jobs"
            f" WHERE state IN ({','.join('?' * len(_LIVE))}) GROUP BY owner_uid, state",
            _LIVE,
        )
        return [UserTotal(owner_uid=uid, state=_STATES[state], jobs=jobs, spool_bytes=size)
                for uid, state, jobs, size in rows]  # fmt: skip

    def measure_spools(self, size_of: Callable[[str], int]) -> int:
        """Live jobs queued by a release that did not store spool sizes: measure each file once (size_of)
        and store it. Blocking, on a connection of its own: run it in a thread, before recovery."""
        db = sqlite3.connect(self.path, timeout=_BACKGROUND_BUSY_S, isolation_level=None)
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] >= _SPOOL_SIZES_STORED:
                return 0  # measured already, or made by a release that stores them: no scan at each start
            rows = db.execute(
                f"SELECT id, spool_path FROM jobs WHERE spool_bytes IS NULL AND spool_path IS NOT NULL"
                f" AND state IN ({','.join('?' * len(_LIVE))})",
                _LIVE,
            ).fetchall()
            for start in range(0, len(rows), _QUEUE_CHUNK):
                sized = [(size_of(path), job_id) for job_id, path in rows[start : start + _QUEUE_CHUNK]]
                db.execute("BEGIN IMMEDIATE")
                db.executemany("UPDATE jobs SET spool_bytes = ? WHERE id = ?", sized)
                db.execute("COMMIT")
            db.execute(f"PRAGMA user_version = {_SPOOL_SIZES_STORED}")
            return len(rows)
        except sqlite3.OperationalError as exc:
            raise storage_error(exc) from exc
        finally:
            db.close()

    def count_by_state(self) -> dict[JobState, int]:
        rows = self._query("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        return {JobState(state): count for state, count in rows}

    def spool_names_in_use(self) -> Names:
        """On a read-only connection of its own, so a thread may call it while the loop writes."""
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=_BACKGROUND_BUSY_S)
        try:
            rows = db.execute("SELECT spool_path FROM jobs WHERE spool_path IS NOT NULL")
            # By name: the state dir may be reached by another path now (basename: a Path per row is slow).
            return Names(os.path.basename(r[0]) for r in rows)
        except sqlite3.OperationalError as exc:
            raise storage_error(exc) from exc
        finally:
            db.close()
