"""Retention: finished jobs (COMPLETED, FAILED, CANCELLED), with their transcripts and history, are deleted
once they are older than [retention] max_age_s or beyond the newest max_finished_jobs. Live jobs never are.

The policy is a pure function (`to_prune`) over the oldest finished jobs. The deleting runs in a thread on a
connection of its own, in small transactions, every prune_interval_s, so the loop is never blocked by it and
its own writes wait at most one small transaction. What was deleted is told to the registry on the loop, so
that its counts follow the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import msgspec

from whisperd.config import RetentionConfig
from whisperd.errors import StorageError
from whisperd.jobs import TERMINAL_STATES, JobState
from whisperd.sqlite_store import keep_reserve, storage_error

log = logging.getLogger("whisperd.retention")

# Jobs deleted per transaction: small enough that the daemon's own writes, which wait for the database's
# lock only storage.busy_timeout_s (100 ms), are never held up past it. Measured with 20 KB transcripts:
# 100 jobs hold the lock about 13 ms, 1,000 about 150 ms. Between transactions the pruner pauses, so that a
# write of the daemon's waiting for the lock gets it.
BATCH_JOBS = 100
PAUSE_S = 0.02


class FinishedJob(msgspec.Struct, frozen=True, array_like=True):
    id: int
    finished_at: float


def to_prune(
    oldest: Sequence[FinishedJob], finished_count: int, now: float, max_age_s: float, max_finished_jobs: int
) -> list[int]:
    """Which of the oldest finished jobs to delete. `oldest`: the first of all `finished_count` finished
    jobs, by finished_at. A job goes when it finished more than max_age_s ago, or when more than
    max_finished_jobs would be kept with it (0 turns either bound off)."""
    over = max(0, finished_count - max_finished_jobs) if max_finished_jobs else 0
    expired = 0
    if max_age_s:
        cutoff = now - max_age_s
        while expired < len(oldest) and oldest[expired].finished_at < cutoff:
            expired += 1
    return [job.id for job in oldest[: max(over, expired)]]


class PruneRound(msgspec.Struct, frozen=True):
    removed: dict[JobState, int]  # jobs deleted, by state
    error: str | None = None  # why the round stopped early (what it had deleted stays deleted)


class Pruner(Protocol):
    def prune(self, now: float, max_age_s: float, max_finished_jobs: int) -> PruneRound:
        """Blocking: run in a thread."""
        ...

    def stop(self) -> None:
        """Ask a round under way to end after its current transaction."""
        ...


_TERMINAL = tuple(s.value for s in TERMINAL_STATES)
_IN_TERMINAL = f"state IN ({','.join('?' * len(_TERMINAL))})"


class SqlitePruner:
    """Deletes from the SQLite store's file (whisperd.sqlite_store) on a connection of its own."""

    def __init__(self, path: Path, batch_jobs: int = BATCH_JOBS, busy_timeout_s: float = 5.0) -> None:
        self._path = path
        self._batch_jobs = batch_jobs
        self._busy_timeout_s = busy_timeout_s  # in its thread, it may wait for the daemon's writes
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def prune(self, now: float, max_age_s: float, max_finished_jobs: int) -> PruneRound:
        removed: Counter[JobState] = Counter()
        error = None
        db = sqlite3.connect(self._path, timeout=self._busy_timeout_s, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous=NORMAL")  # a deletion lost to a power cut is redone next round
            while not self._stopping.is_set():
                deleted = self._batch(db, now, max_age_s, max_finished_jobs)
                if not deleted:
                    break
                removed.update(deleted)
                self._stopping.wait(PAUSE_S)
        except sqlite3.OperationalError as exc:
            error = storage_error(exc).message
        finally:
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            db.close()
        keep_reserve(self._path.with_name(self._path.name + ".reserve"))  # set aside again after a full disk
        return PruneRound(removed=dict(removed), error=error)

    def _batch(
        self, db: sqlite3.Connection, now: float, max_age_s: float, max_finished_jobs: int
    ) -> Counter[JobState]:
        # Chosen outside the write lock: a finished job stays finished, so the choice cannot go stale.
        [(count,)] = db.execute(
            f"SELECT COUNT(*) FROM jobs WHERE finished_at IS NOT NULL AND {_IN_TERMINAL}", _TERMINAL
        ).fetchall()
        rows = db.execute(
            f"SELECT id, finished_at FROM jobs WHERE finished_at IS NOT NULL AND {_IN_TERMINAL}"
            " ORDER BY finished_at, id LIMIT ?",
            (*_TERMINAL, self._batch_jobs),
        ).fetchall()
        oldest = [FinishedJob(job_id, finished_at) for job_id, finished_at in rows]
        ids = to_prune(oldest, count, now, max_age_s, max_finished_jobs)
        if not ids:
            return Counter()
        marks = ",".join("?" * len(ids))
        db.execute("BEGIN IMMEDIATE")
        db.execute(f"DELETE FROM job_events WHERE job_id IN ({marks})", ids)
        states = db.execute(
            f"DELETE FROM jobs WHERE id IN ({marks}) AND {_IN_TERMINAL} RETURNING state", (*ids, *_TERMINAL)
        ).fetchall()  # never a live job, whatever was chosen
        db.execute("COMMIT")
        return Counter(JobState(state) for (state,) in states)


class Retention:
    """The background task: a round at start, then one every prune_interval_s (read afresh each time)."""

    def __init__(
        self,
        pruner: Pruner,
        settings: Callable[[], RetentionConfig],
        forget: Callable[[Mapping[JobState, int]], None],
        clock: Callable[[], float],
    ) -> None:
        """forget: told on the loop what each round deleted (the registry's counts follow)."""
        self._pruner = pruner
        self._settings = settings
        self._forget = forget
        self._clock = clock

    async def run_once(self) -> PruneRound:
        s = self._settings()
        result = await asyncio.to_thread(self._pruner.prune, self._clock(), s.max_age_s, s.max_finished_jobs)
        if result.removed:
            self._forget(result.removed)
            log.info("retention: deleted %d finished jobs (%s)", sum(result.removed.values()),
                     ", ".join(f"{n} {state}" for state, n in sorted(result.removed.items())))  # fmt: skip
        if result.error is not None:
            log.warning("retention: the round stopped early, to be tried again: %s", result.error)
        return result

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.run_once()
                except (OSError, StorageError) as exc:
                    log.warning("retention: the round failed, to be tried again: %s", exc)
                await asyncio.sleep(self._settings().prune_interval_s)
        finally:
            self._pruner.stop()
