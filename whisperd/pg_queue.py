"""The shared queue's operations in PostgreSQL (several whisperd hosts, one queue; schema in pg_schema.py).

A host claims the jobs its plan picked with `FOR UPDATE SKIP LOCKED` (two hosts never claim one job, and
neither waits for the other). A claim is a lease: the host's id, an expiry on the database's clock, and the
job's attempt raised by one, the fencing token. The host heartbeats to extend its leases; once a lease has
expired, any host requeues the job (nothing counted against it). A result commits only with the attempt its
claim returned, so a host that was cut off past its lease cannot overwrite the new owner's result.

Each function is one transaction on a psycopg connection in autocommit mode (so that `transaction()` is a
transaction of its own, committed when it returns), synchronous: the store runs them off the event loop.
Times are seconds since the epoch, as in the embedded store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from whisperd import pg_jobs
from whisperd.jobs import JobState
from whisperd.store import UserTotal

_NOW = pg_jobs.DB_NOW  # the database's clock: hosts' clocks may disagree
NOTIFY_CHANNEL = pg_jobs.JOBS_CHANNEL


class Waiting(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    priority: int
    owner_uid: int
    model: str
    queued_at: float


class HostRow(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    heartbeat_age_s: float  # on the database's clock
    started_at: float
    release: str
    snapshot: bytes | None  # what the host's last heartbeat stored (msgspec JSON), None before its first


class FleetFigures(msgspec.Struct, frozen=True, kw_only=True):
    counts: dict[JobState, int]  # every job in the database by state (like count_by_state)
    user_totals: list[UserTotal]  # like user_totals(), fleet-wide
    hosts: list[HostRow]


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    attempt: int  # the fencing token this host's result must carry


def register_host(conn: Any, host: str, release: str) -> None:
    """The host's row, its heartbeat now."""
    with conn.transaction():
        conn.execute(
            f"INSERT INTO hosts (id, started_at, heartbeat_at, release) VALUES (%s, {_NOW}, {_NOW}, %s) "
            f"ON CONFLICT (id) DO UPDATE SET started_at = {_NOW}, heartbeat_at = {_NOW}, release = %s",
            (host, release, release),
        )


def waiting(conn: Any, take: int) -> list[Waiting]:
    """The first `take` queued jobs in the fleet-wide order the plan starts from (priority, then FIFO)."""
    rows = conn.execute(
        "SELECT id, priority, owner_uid, model, queued_at FROM jobs WHERE state = 'PENDING' "
        "ORDER BY priority DESC, queued_at, id LIMIT %s",
        (take,),
    ).fetchall()
    return [Waiting(id=r[0], priority=r[1], owner_uid=r[2], model=r[3], queued_at=r[4]) for r in rows]


def claim(
    conn: Any, host: str, job_ids: Sequence[int], lease_s: float, worker: str, device: str
) -> list[Claim]:
    """Take those of the jobs still queued and not being taken by another host right now; returns them
    with their new attempt. A job another host holds or took first is skipped, never waited for."""
    with conn.transaction():
        rows = conn.execute(
            "UPDATE jobs SET state = 'PROCESSING', host = %s, attempt = attempt + 1, worker = %s, "
            f"device = %s, lease_expires_at = {_NOW} + %s, started_at = {_NOW}, updated_at = {_NOW}, "
            "progress = 0 "
            "WHERE id IN (SELECT id FROM jobs WHERE id = ANY(%s) AND state = 'PENDING' "
            "ORDER BY id FOR UPDATE SKIP LOCKED) RETURNING id, attempt",
            (host, worker, device, lease_s, list(job_ids)),
        ).fetchall()
        _events(conn, [(r[0], r[1]) for r in rows], "PENDING", "PROCESSING", "dispatch", host, worker)
    return sorted((Claim(id=r[0], attempt=r[1]) for r in rows), key=lambda c: c.id)


def heartbeat(conn: Any, host: str, lease_s: float) -> int:
    """The host is alive: its heartbeat now, its jobs' leases extended; returns how many it holds."""
    return len(extend_leases(conn, host, lease_s, None))


def extend_leases(conn: Any, host: str, lease_s: float, snapshot: bytes | None) -> set[int]:
    """The host's heartbeat now (with its latest figures, if given) and the leases of the jobs it holds
    (PROCESSING, RETRYING) extended; returns their ids: a job the host runs that is not among them was
    taken from it (requeued by another host after its lease expired, or cancelled). A row being written by
    another host right now is skipped, never waited for: the next heartbeat extends it."""
    with conn.transaction():
        conn.execute(
            f"UPDATE hosts SET heartbeat_at = {_NOW}, snapshot = coalesce(%s, snapshot) WHERE id = %s",
            (snapshot, host),
        )
        held = conn.execute(
            "SELECT id FROM jobs WHERE host = %s AND state IN ('PROCESSING', 'RETRYING')", (host,)
        ).fetchall()
        conn.execute(
            f"UPDATE jobs SET lease_expires_at = {_NOW} + %s WHERE id IN (SELECT id FROM jobs WHERE host = %s"
            " AND state IN ('PROCESSING', 'RETRYING') ORDER BY id FOR UPDATE SKIP LOCKED)",
            (lease_s, host),
        )
    return {r[0] for r in held}


def requeue_expired(conn: Any, host: str, lease_s: float = 0.0, now: float | None = None) -> list[int]:
    """Jobs whose lease expired (their host stopped or was cut off) go back to the queue, PROCESSING or
    RETRYING alike, nothing counted against them; `host` is the one doing it, for the history; `now` the
    time its rows carry (its clock; None: the database's). Returns their ids.

    Not within lease_s of the database server's own start: leases that expired while it was down (or
    failing over) are every host's, and each gets one lease to reconnect and heartbeat before any is
    taken from it."""
    which = (
        f"lease_expires_at < {_NOW} AND extract(epoch from pg_postmaster_start_time()) + %(grace)s <= {_NOW}"
    )
    return _requeue(conn, host, which, {"grace": lease_s, "now": now}, "lease_expired", now)


def requeue_strays(conn: Any, host: str, job_ids: Sequence[int], now: float | None = None) -> list[int]:
    """Jobs the database says this host holds but the host does not (a claim that committed while its
    acknowledgement was lost): back to the queue at once, nothing counted against them."""
    which = "id = ANY(%(ids)s) AND host = %(host)s"
    return _requeue(conn, host, which, {"ids": list(job_ids), "host": host, "now": now}, "requeue", now)


def _requeue(
    conn: Any, host: str, which: str, args: dict[str, Any], event: str, now: float | None
) -> list[int]:
    at = _NOW if now is None else "%(now)s"
    with conn.transaction():
        rows = conn.execute(
            f"WITH expired AS (SELECT id, state, worker FROM jobs WHERE {which} "
            "AND state IN ('PROCESSING', 'RETRYING') "
            "ORDER BY id FOR UPDATE SKIP LOCKED) "
            "UPDATE jobs AS j SET state = 'PENDING', host = NULL, worker = NULL, device = NULL, "
            f"lease_expires_at = NULL, progress = 0, not_before = NULL, queued_at = {at}, updated_at = {at} "
            f"FROM expired AS e WHERE j.id = e.id RETURNING e.state, e.worker, "
            f"{', '.join('j.' + c for c in pg_jobs.ROW_COLUMNS)}",
            args,
        ).fetchall()
        jobs = [pg_jobs.job_row(r[2:]) for r in rows]
        conn.cursor().executemany(
            "INSERT INTO job_events (job_id, at, from_state, to_state, event, host, worker, attempt) "
            "VALUES (%s, %s, %s, 'PENDING', %s, %s, %s, %s)",
            [
                (j.id, j.updated_at, r[0], event, host, r[1], j.attempt)
                for r, j in zip(rows, jobs, strict=True)
            ],
        )
        pg_jobs.notify(conn, host, [j.view() for j in jobs], wake=bool(jobs))
    return sorted(j.id for j in jobs)


def complete(conn: Any, job: Claim, host: str, transcript: bytes, audio_duration_s: float) -> bool:
    """Commit the job's result, if this host still holds this attempt of it (the fencing check); False when
    its lease was lost and the job requeued or taken by another host meanwhile: the result is dropped."""
    with conn.transaction():
        row = conn.execute(
            f"UPDATE jobs SET state = 'COMPLETED', transcript = %s, audio_duration_s = %s, progress = 100, "
            f"finished_at = {_NOW}, updated_at = {_NOW}, lease_expires_at = NULL "
            "WHERE id = %s AND attempt = %s AND host = %s AND state = 'PROCESSING' RETURNING worker",
            (transcript, audio_duration_s, job.id, job.attempt, host),
        ).fetchone()
        if row is None:
            return False
        _events(conn, [(job.id, job.attempt)], "PROCESSING", "COMPLETED", "complete", host, row[0])
    return True


def _events(
    conn: Any, jobs: Sequence[tuple[int, int]], old: str, new: str, event: str, host: str, worker: str | None
) -> None:
    if jobs:
        conn.cursor().executemany(
            "INSERT INTO job_events (job_id, at, from_state, to_state, event, host, worker, attempt) "
            f"VALUES (%s, {_NOW}, %s, %s, %s, %s, %s, %s)",
            [(job_id, old, new, event, host, worker, attempt) for job_id, attempt in jobs],
        )


def figures(conn: Any) -> FleetFigures:
    """The whole fleet's jobs by state, its users' live jobs and every host's latest heartbeat."""
    with conn.transaction():
        counts = {JobState(s): n for s, n in conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")}
        totals = pg_jobs.user_totals(conn)
        hosts = [
            HostRow(id=i, heartbeat_age_s=age, started_at=started, release=release, snapshot=snapshot)
            for i, age, started, release, snapshot in conn.execute(
                f"SELECT id, {_NOW} - heartbeat_at, started_at, release, snapshot FROM hosts ORDER BY id"
            )
        ]
    return FleetFigures(counts=counts, user_totals=totals, hosts=hosts)
