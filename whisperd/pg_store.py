"""The shared backend of `Store`: one queue in PostgreSQL for many whisperd hosts (psycopg 3).

The registry's calls run on the event loop on a connection of the loop's own (each a few milliseconds at
most, bounded by the statement timeout, as the embedded store's are by its busy timeout); the calls that do
more I/O (a submit's audio, heartbeats, requeues, the fleet's figures, audio fetches) run in threads, on a
pool of connections. The SQL is in pg_jobs.py (job rows) and pg_queue.py (leases).

When the database cannot be reached (down, cut off, too slow), a call raises StorageUnavailable and nothing
is tried again until a backoff has passed (reconnect_backoff_s, doubled at each failure in a row up to
reconnect_backoff_max_s): meanwhile every call raises StorageUnavailable at once, with no I/O, so the loop
never waits for a dead server again and again. The loop's connection is made again after the backoff."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import msgspec
import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool

from whisperd import pg_audio, pg_jobs, pg_queue, pg_schema
from whisperd.errors import (
    ConfigError,
    StorageBusy,
    StorageError,
    StorageFull,
    StorageUnavailable,
    Superseded,
    os_storage_error,
)
from whisperd.jobs import JobEvent, JobState
from whisperd.pg_jobs import SELECT_ROW, SELECT_VIEW, JobNotice, job_row, job_views
from whisperd.pg_queue import FleetFigures, HostRow
from whisperd.protocol import JobView, Transcript
from whisperd.store import EventRow, JobRow, Names, NewJob, QueueEntry, SavedTransition, UserTotal

__all__ = ["FleetFigures", "HostRow", "JobNotice", "PgStore"]

log = logging.getLogger("whisperd.store")

Conn = pg_jobs.Conn
_POOL_MAX = 8  # threads at once: the heartbeat, requeues, figures, audio fetches, submits' inserts
_QUEUE_CHUNK = 10_000
_LIVE = pg_jobs.LIVE
_monotonic = time.monotonic  # the backoff's clock


def session_conninfo(
    conninfo: str, password: str | None, connect_timeout_s: float, statement_timeout_s: float, host_id: str
) -> str:
    """The connection string every connection uses: the password, the timeouts, and TCP settings that
    notice a cut connection within about the statement timeout (a server that is gone answers nothing, and
    the statement timeout is the server's to enforce). What the configured string sets itself is kept,
    but for the connect timeout and the password."""
    try:
        given = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"store.url is not a PostgreSQL url or conninfo: {exc}") from exc
    timeout_ms = max(1, math.ceil(statement_timeout_s * 1000))
    options = [
        str(given.get("options") or ""),
        f"-c statement_timeout={timeout_ms}",
        # a row another host holds for long (stopped in a transaction) is busy, not the database down
        f"-c lock_timeout={max(1, timeout_ms // 2)}",
        # a host stopped (SIGSTOP) inside a transaction must not hold its rows' locks for long
        f"-c idle_in_transaction_session_timeout={2 * timeout_ms}",
        "-c jit=off",  # every statement here is small: compiling one would cost more than running it
    ]
    defaults: dict[str, Any] = {
        "application_name": f"whisperd {host_id}"[:63],
        "keepalives": 1,
        "keepalives_idle": max(1, math.ceil(statement_timeout_s)),
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": timeout_ms,
    }
    extra: dict[str, Any] = {k: v for k, v in defaults.items() if k not in given}
    extra["options"] = " ".join(o for o in options if o)
    extra["connect_timeout"] = max(2, math.ceil(connect_timeout_s))  # libpq: whole seconds, 2 at least
    if password is not None:
        extra["password"] = password
    return make_conninfo(conninfo, **extra)


class _Backoff:
    """After a failure to reach the database, no call tries again until the delay has passed; the delay
    doubles with each failure in a row. Shared by the loop and the threads: one database."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self._lock = threading.Lock()
        self._base_s, self._max_s = base_s, max_s
        self._delay_s = base_s
        self._until = 0.0
        self._reason = ""

    def check(self) -> None:
        left_s = self._until - _monotonic()
        if left_s > 0:
            raise StorageUnavailable(
                f"the job database is unreachable ({self._reason}); trying again in {left_s:.1f} s"
            )

    def failed(self, reason: str) -> float:
        """A failure: the delay before the next try (failures at once, of one outage, count once)."""
        with self._lock:
            now = _monotonic()
            if now < self._until:
                return self._until - now
            delay_s, self._delay_s = self._delay_s, min(2 * self._delay_s, self._max_s)
            self._until, self._reason = now + delay_s, reason
            return delay_s

    def succeeded(self) -> None:
        if self._delay_s != self._base_s:
            with self._lock:
                self._delay_s = self._base_s


def _kind(exc: psycopg.Error) -> type[StorageError]:
    if isinstance(exc, pg_errors.DiskFull):
        return StorageFull
    if isinstance(exc, pg_errors.TransactionRollback | pg_errors.LockNotAvailable):
        return StorageBusy  # a deadlock or a serialization failure: nothing written, a retry works
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | pg_errors.ReadOnlySqlTransaction):
        return StorageUnavailable  # the connection failed, timed out, or reached a standby
    return StorageError


class PgStore:
    shared = True  # many hosts write it: its queue changes under the daemon's feet

    def __init__(
        self,
        conninfo: str,
        host_id: str,
        *,
        lease_s: float,
        release: str,
        password: str | None = None,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float = 5.0,
        reconnect_backoff_s: float = 0.5,
        reconnect_backoff_max_s: float = 30.0,
    ) -> None:
        """No I/O: open() connects."""
        self.host_id = host_id
        self.lease_s = lease_s
        self.release = release
        # what every connection uses, the LISTEN one (pg_notify.Listener) included
        self.conninfo = session_conninfo(conninfo, password, connect_timeout_s, statement_timeout_s, host_id)
        self._connect_timeout_s = connect_timeout_s
        self._backoff = _Backoff(reconnect_backoff_s, reconnect_backoff_max_s)
        self._backoff_max_s = reconnect_backoff_max_s
        self._conn: Conn | None = None  # the loop's
        self._loop_suspect = False  # a thread's connection failed: make the loop's again before using it
        self._pool: ConnectionPool[Conn] | None = None

    # ---- connections ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, bring the schema up to date (pg_schema.migrate, under its advisory lock) and register
        this host. StorageUnavailable if the database cannot be reached; SchemaTooNew passes through."""
        conn = self._connect()
        try:
            # a migration, or waiting behind another host's, may take longer than a statement should
            conn.execute("SET statement_timeout = 0; SET lock_timeout = 0")
            pg_schema.migrate(conn, self.release)
            conn.execute("RESET statement_timeout; RESET lock_timeout")
            pg_queue.register_host(conn, self.host_id, self.release)
        except psycopg.Error as exc:
            conn.close()
            raise self._storage_error(exc, on_loop=False) from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._pool = ConnectionPool(
            self.conninfo, min_size=1, max_size=_POOL_MAX, open=False, kwargs={"autocommit": True},
            timeout=self._connect_timeout_s, check=ConnectionPool.check_connection,
            # the pool's own retries back off without a bound: give up as ours would, so that a call after
            # the database is back asks for a fresh connection at once
            reconnect_timeout=self._backoff_max_s, name=f"whisperd-store-{self.host_id}",
        )  # fmt: skip
        self._pool.open(wait=False)

    def connect(self) -> Conn:
        """A new connection of its own in autocommit mode, with the store's settings, for a thread that
        keeps one for a while (retention: pg_retention.PgPruner); raises psycopg.Error as it is."""
        return psycopg.connect(self.conninfo, autocommit=True)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connect(self) -> Conn:
        self._backoff.check()
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise self._storage_error(exc, on_loop=False) from exc
        self._backoff.succeeded()
        return conn

    def _storage_error(self, exc: psycopg.Error, on_loop: bool) -> StorageError:
        """What a failure of the driver means to the caller; a connection's failure starts the backoff."""
        kind = _kind(exc)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if kind is not StorageUnavailable:
            return kind(f"the job database refused: {reason}")
        delay_s = self._backoff.failed(reason)
        if on_loop:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(psycopg.Error):
                    conn.close()
        else:
            self._loop_suspect = True
        log.warning("the job database is unreachable (%s); trying again in %.1f s", reason, delay_s)
        return StorageUnavailable(
            f"the job database is unreachable ({reason}); trying again in {delay_s:.1f} s"
        )

    @contextlib.contextmanager
    def _loop(self) -> Iterator[Conn]:
        """The loop's connection (made again once the backoff allows), failures mapped."""
        self._backoff.check()
        if self._loop_suspect or self._conn is None or self._conn.closed:
            self._loop_suspect = False
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()
            self._conn = self._connect()
        try:
            yield self._conn
        except psycopg.Error as exc:
            raise self._storage_error(exc, on_loop=True) from exc
        self._backoff.succeeded()

    @contextlib.contextmanager
    def _pooled(self) -> Iterator[Conn]:
        """A connection of the pool, for a thread; failures mapped."""
        self._backoff.check()
        pool = self._pool
        if pool is None:
            raise StorageUnavailable("the job database is not open")
        try:
            with pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise self._storage_error(exc, on_loop=False) from exc
        self._backoff.succeeded()

    # ---- writes --------------------------------------------------------------------------------------

    def insert_jobs(
        self,
        new_jobs: Sequence[NewJob],
        now: float,
        before_commit: Callable[[list[JobRow]], None] | None = None,
    ) -> list[JobRow]:
        """A thread: the rows and the audio of the spool files, in one transaction."""
        try:
            with self._pooled() as conn:
                return pg_jobs.insert_jobs(conn, self.host_id, new_jobs, now, before_commit)
        except OSError as exc:
            raise os_storage_error(exc, "read a spooled file into the job database") from exc

    def save_transition(
        self, job: JobRow, from_state: JobState, event: JobEvent, transcript: Transcript | None = None
    ) -> None:
        self.save_transitions([(job, from_state, event, transcript)])

    def save_transitions(self, transitions: Sequence[SavedTransition]) -> None:
        """All or none, each a compare-and-set on (id, from_state, attempt): Superseded, with nothing
        written, if another host changed any of them since."""
        if not transitions:
            return
        with self._loop() as conn, conn.transaction():
            lost = pg_jobs.save_transitions(conn, self.host_id, self.lease_s, transitions)
            if lost:  # raised inside the transaction: rolled back
                ids = ", ".join(map(str, sorted(lost)))
                raise Superseded(f"job(s) {ids} changed on another host since: the change is refused", lost)

    def claim(self, transitions: Sequence[SavedTransition]) -> list[int]:
        if not transitions:
            return []
        with self._loop() as conn:
            return pg_jobs.claim(conn, self.host_id, self.lease_s, transitions)

    def note_stale_result(self, job_id: int, attempt: int, worker: str | None) -> None:
        """A result for an attempt that is no longer the job's came late and was refused: in the history."""
        with self._pooled() as conn:
            pg_jobs.note_stale_result(conn, self.host_id, job_id, attempt, worker, time.time())

    # ---- the fleet (threads) -------------------------------------------------------------------------

    def heartbeat(self, snapshot: bytes) -> set[int]:
        """This host is alive (with its figures): its leases extended; the ids it holds in the database."""
        with self._pooled() as conn:
            return pg_queue.extend_leases(conn, self.host_id, self.lease_s, snapshot)

    def requeue_expired(self) -> list[int]:
        """Any host's jobs whose lease expired, back to the queue (see pg_queue.requeue_expired)."""
        with self._pooled() as conn:
            return pg_queue.requeue_expired(conn, self.host_id, self.lease_s, time.time())

    def requeue_strays(self, job_ids: Sequence[int]) -> list[int]:
        """This host's jobs in the database that the daemon does not hold, back to the queue."""
        with self._pooled() as conn:
            return pg_queue.requeue_strays(conn, self.host_id, job_ids, time.time())

    def figures(self) -> FleetFigures:
        with self._pooled() as conn:
            return pg_queue.figures(conn)

    def fetch_audio(self, job_id: int, dest: BinaryIO) -> int:
        with self._pooled() as conn:
            return pg_audio.fetch(conn, job_id, dest)

    # ---- reads (the loop) ----------------------------------------------------------------------------

    def get(self, job_id: int) -> JobRow | None:
        with self._loop() as conn:
            row = conn.execute(f"{SELECT_ROW} WHERE id = %s", (job_id,)).fetchone()
        return job_row(row) if row is not None else None

    def select(self, ids: Sequence[int], state: JobState | None, limit: int) -> list[JobRow]:
        return [job_row(r) for r in reversed(self._newest(SELECT_ROW, ids, state, limit))]

    def views(self, ids: Sequence[int], state: JobState | None, limit: int) -> list[JobView]:
        return job_views(self._newest(SELECT_VIEW, ids, state, limit)[::-1])

    def newest_ids(self, state: JobState | None, limit: int) -> list[int]:
        return [r[0] for r in reversed(self._newest("SELECT id FROM jobs", (), state, limit))]

    def _newest(self, select: str, ids: Sequence[int], state: JobState | None, limit: int) -> list[Any]:
        with self._loop() as conn:
            return pg_jobs.newest(conn, select, ids, state, limit)

    def live_jobs(self) -> list[JobRow]:
        with self._loop() as conn:
            rows = conn.execute(f"{SELECT_ROW} WHERE state = ANY(%s) ORDER BY id", (list(_LIVE),)).fetchall()
        return [job_row(r) for r in rows]

    def jobs_in(self, states: Sequence[JobState]) -> list[JobRow]:
        """Only this host's jobs among them, and those no host holds."""
        with self._loop() as conn:
            rows = conn.execute(
                f"{SELECT_ROW} WHERE state = ANY(%s) AND (host = %s OR host IS NULL) ORDER BY id",
                ([s.value for s in states], self.host_id),
            ).fetchall()
        return [job_row(r) for r in rows]

    def queue(self) -> Iterator[Sequence[QueueEntry]]:
        """The PENDING jobs oldest first, in chunks, through a cursor on the server: consume it at once
        (it holds a transaction on the loop's connection meanwhile)."""
        with self._loop() as conn, conn.transaction(), conn.cursor(name="whisperd_queue") as cursor:
            cursor.execute(
                "SELECT id, priority, owner_uid, model, queued_at FROM jobs WHERE state = 'PENDING' "
                "ORDER BY queued_at, id"
            )
            while chunk := cursor.fetchmany(_QUEUE_CHUNK):
                yield chunk

    def lanes(self, take: int) -> tuple[list[pg_jobs.Lane], dict[int, int]]:
        """The PENDING queue as the plan reads it: ((priority, owner_uid, model), count of the lane (capped
        at pg_jobs.LANE_COUNT_CAP), its first `take` jobs as (id, queued_at) oldest first); and the
        fair-share turns (owner_uid -> last_served) of the users with a lane. Costs the lanes and what it
        returns (each lane's count at most the cap), not the queue's length."""
        with self._loop() as conn:
            return pg_jobs.lanes(conn, take)

    def user_totals(self) -> list[UserTotal]:
        """Fleet-wide, like every read but jobs_in."""
        with self._loop() as conn:
            return pg_jobs.user_totals(conn)

    def count_by_state(self) -> dict[JobState, int]:
        with self._loop() as conn:
            rows = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        return {JobState(state): count for state, count in rows}

    def transcript(self, job_id: int) -> Transcript | None:
        with self._loop() as conn:
            row = conn.execute("SELECT transcript FROM jobs WHERE id = %s", (job_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        return msgspec.json.decode(row[0], type=Transcript)

    def history(self, job_id: int) -> list[EventRow]:
        with self._loop() as conn:
            return pg_jobs.history(conn, job_id)

    # ---- the embedded store's housekeeping: nothing to do here ---------------------------------------

    def measure_spools(self, size_of: Callable[[str], int]) -> int:
        return 0  # every job's spool size is stored at submit

    def spool_names_in_use(self) -> Names:
        """A thread: names of the spool files of the live jobs this host accepted (the others' are theirs)."""
        with self._pooled() as conn, conn.transaction(), conn.cursor(name="whisperd_spools") as cursor:
            cursor.itersize = _QUEUE_CHUNK
            cursor.execute(
                "SELECT spool_path FROM jobs WHERE submit_host = %s AND spool_path IS NOT NULL "
                "AND state = ANY(%s)",
                (self.host_id, list(_LIVE)),
            )
            # by name, as the embedded store gives them (basename: a Path per row is slow)
            return Names(os.path.basename(r[0]) for r in cursor)

    def sync(self) -> None:
        """Nothing: a PostgreSQL commit is durable when it returns."""

    def checkpoint(self) -> bool:
        return False

    def restart_log(self) -> None:
        """Nothing: the server keeps its own log short."""
