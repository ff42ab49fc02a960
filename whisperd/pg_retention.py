"""Retention for the shared store: the same policy as the embedded one (retention.to_prune), deleting from
PostgreSQL in small transactions on a connection of its own, in the retention's thread. Every host runs it;
a session-level advisory lock lets one host prune at a time (the others skip the round), so two hosts never
count the same deletions or contend for the same rows. A job's audio rows and history go with it (ON DELETE
CASCADE)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from whisperd.jobs import TERMINAL_STATES, JobState
from whisperd.pg_schema import LOCK_KEY
from whisperd.retention import BATCH_JOBS, PAUSE_S, FinishedJob, PruneRound, to_prune

_TERMINAL = [s.value for s in TERMINAL_STATES]
PRUNE_LOCK = 2  # second key beside LOCK_KEY: the migrations' lock is another


class PgPruner:
    def __init__(self, connect: Callable[[], Any], batch_jobs: int = BATCH_JOBS) -> None:
        """connect: a new psycopg connection in autocommit mode (the store's settings), closed after use."""
        self._connect = connect
        self._batch_jobs = batch_jobs
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def prune(self, now: float, max_age_s: float, max_finished_jobs: int) -> PruneRound:
        import psycopg

        removed: Counter[JobState] = Counter()
        try:
            with self._connect() as conn:
                got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_KEY, PRUNE_LOCK)).fetchone()
                if not got[0]:  # another host prunes now: its round covers this one's
                    return PruneRound(removed={})
                while not self._stopping.is_set():
                    deleted = self._batch(conn, now, max_age_s, max_finished_jobs)
                    if not deleted:
                        break
                    removed.update(deleted)
                    self._stopping.wait(PAUSE_S)
        except psycopg.Error as exc:
            return PruneRound(removed=dict(removed), error=str(exc).strip() or type(exc).__name__)
        return PruneRound(removed=dict(removed))

    def _batch(self, conn: Any, now: float, max_age_s: float, max_finished_jobs: int) -> Counter[JobState]:
        [count] = conn.execute(
            "SELECT count(*) FROM jobs WHERE finished_at IS NOT NULL AND state = ANY(%s)", (_TERMINAL,)
        ).fetchone()
        rows = conn.execute(
            "SELECT id, finished_at FROM jobs WHERE finished_at IS NOT NULL AND state = ANY(%s) "
            "ORDER BY finished_at, id LIMIT %s",
            (_TERMINAL, self._batch_jobs),
        ).fetchall()
        ids = to_prune([FinishedJob(i, f) for i, f in rows], count, now, max_age_s, max_finished_jobs)
        if not ids:
            return Counter()
        with conn.transaction():
            states = conn.execute(
                "DELETE FROM jobs WHERE id = ANY(%s) AND state = ANY(%s) RETURNING state", (ids, _TERMINAL)
            ).fetchall()  # never a live job, whatever was chosen
        return Counter(JobState(state) for (state,) in states)
