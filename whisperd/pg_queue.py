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

_NOW = "extract(epoch from clock_timestamp())"  # the database's clock: hosts' clocks may disagree
NOTIFY_CHANNEL = "whisperd_jobs"


class Waiting(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    priority: int
    owner_uid: int
    model: str
    queued_at: float


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
    with conn.transaction():
        conn.execute(f"UPDATE hosts SET heartbeat_at = {_NOW} WHERE id = %s", (host,))
        held = conn.execute(
            f"UPDATE jobs SET lease_expires_at = {_NOW} + %s WHERE host = %s AND state = 'PROCESSING'",
            (lease_s, host),
        )
        return int(held.rowcount)


def requeue_expired(conn: Any, host: str) -> list[int]:
    """Jobs whose lease expired (their host stopped or was cut off) go back to the queue, nothing counted
    against them; `host` is the one doing it, for the history. Returns their ids."""
    with conn.transaction():
        rows = conn.execute(
            "UPDATE jobs SET state = 'PENDING', host = NULL, worker = NULL, device = NULL, "
            f"lease_expires_at = NULL, progress = 0, queued_at = {_NOW}, updated_at = {_NOW} "
            "WHERE id IN (SELECT id FROM jobs WHERE state = 'PROCESSING' "
            f"AND lease_expires_at < {_NOW} FOR UPDATE SKIP LOCKED) RETURNING id, attempt"
        ).fetchall()
        _events(conn, [(r[0], r[1]) for r in rows], "PROCESSING", "PENDING", "lease_expired", host, None)
        if rows:
            conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
    return sorted(r[0] for r in rows)


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
