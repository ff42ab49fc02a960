"""The shared store's job rows in PostgreSQL (schema in pg_schema.py): rows in and out, the compare-and-set
writes of transitions, claims, the plan's lanes, and the notifications each commit sends. pg_store.py holds
the connections, runs these on them and maps the driver's failures; pg_queue.py has the fleet's own
operations (heartbeats, requeue of expired leases).

Every write is a compare-and-set on (id, state, attempt): the attempt is the fencing token, raised at each
dispatch, so a host whose lease expired while it was away cannot write over the host that took the job
since. Row times are the registry's (the host's clock), as in the embedded store; leases use the
database's clock alone."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgspec
import psycopg

from whisperd import pg_audio
from whisperd.jobs import JobEvent, JobState
from whisperd.protocol import JobView
from whisperd.store import (
    JOB_COLUMNS,
    MUTABLE_COLUMNS,
    EventRow,
    JobRow,
    NewJob,
    SavedTransition,
    UserTotal,
)

Conn = psycopg.Connection[tuple[Any, ...]]

DB_NOW = "extract(epoch from clock_timestamp())"  # the database's clock: hosts' clocks may disagree
EVENTS_CHANNEL = "whisperd_events"  # every committed change of a job: a JobNotice
JOBS_CHANNEL = "whisperd_jobs"  # "look at the queue now": a job was queued or requeued (empty payload)
NOTICE_LIMIT_BYTES = 7900  # PostgreSQL refuses a payload of 8000 bytes or more
# A lane's length is counted up to this: the plan sizes batches from it (at most max_batch_size a worker),
# so more tells it nothing, and counting costs a tenth of a millisecond per thousand jobs of each lane.
LANE_COUNT_CAP = 1_000
HELD = ("PROCESSING", "RETRYING")  # the states in which a host holds a job, under a lease
LIVE = ("PENDING", "PROCESSING", "RETRYING")

ROW_COLUMNS: tuple[str, ...] = (*JOB_COLUMNS, "attempt", "host", "submit_host")
SELECT_ROW = f"SELECT {', '.join(ROW_COLUMNS)} FROM jobs"  # never the transcript
_VIEW_COLUMNS = (
    "id", "state", "progress", "retries", "device", "worker", "model", "language", "task", "priority",
    "word_timestamps", "error", "filename", "owner_uid", "audio_duration_s", "created_at", "updated_at",
    "started_at", "finished_at", "host", "temperature",
)  # fmt: skip
SELECT_VIEW = f"SELECT {', '.join(_VIEW_COLUMNS)} FROM jobs"
_STATES = {s.value: s for s in JobState}
_EVENT_COLUMNS = ("at", "from_state", "to_state", "event", "worker", "error")
_INSERT_EVENT = (
    "INSERT INTO job_events (job_id, at, from_state, to_state, event, host, worker, attempt, error) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
_SET = ", ".join(f"{c} = %s" for c in MUTABLE_COLUMNS)
_WRITE = (
    f"UPDATE jobs SET {_SET}, attempt = %s, host = %s, transcript = coalesce(%s, transcript), "
    f"lease_expires_at = CASE WHEN %s THEN {DB_NOW} + %s END "
    "WHERE id = %s AND state = %s AND attempt = %s RETURNING id"
)


class JobNotice(msgspec.Struct, frozen=True, kw_only=True):
    """The payload on EVENTS_CHANNEL: the job as the host that changed it committed it."""

    host: str
    job: JobView


def job_row(row: Sequence[Any]) -> JobRow:
    values = dict(zip(ROW_COLUMNS, row, strict=True))
    values["state"] = _STATES[values["state"]]
    return JobRow(**values)


def job_views(rows: Iterable[Sequence[Any]]) -> list[JobView]:
    """Straight from a listing's columns (SELECT_VIEW), with no JobRow between."""
    return [
        JobView(
            id=id_, state=_STATES[state], progress=progress, retries=retries, device=device, worker=worker,
            model=model, language=language, task=task, priority=priority, word_timestamps=word_timestamps,
            error=error, filename=filename, owner_uid=owner_uid, audio_duration_s=audio_duration_s,
            created_at=created_at, updated_at=updated_at, started_at=started_at, finished_at=finished_at,
            host=host, temperature=temperature,
        )
        for (
            id_, state, progress, retries, device, worker, model, language, task, priority, word_timestamps,
            error, filename, owner_uid, audio_duration_s, created_at, updated_at, started_at, finished_at,
            host, temperature,
        ) in rows
    ]  # fmt: skip


def newest(conn: Conn, select: str, ids: Sequence[int], state: JobState | None, limit: int) -> list[Any]:
    """The rows of the newest `limit` jobs (of those named, of one state), newest first: from the primary
    key, or from jobs_state, whose entries are ordered by id within a state."""
    where: list[str] = []
    args: list[object] = []
    if ids:
        where.append("id = ANY(%s)")
        args.append(list(ids))
    if state is not None:
        where.append("state = %s")
        args.append(state.value)
    sql = select + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT %s"
    return conn.execute(sql, [*args, limit]).fetchall()


def history(conn: Conn, job_id: int) -> list[EventRow]:
    rows = conn.execute(
        f"SELECT {', '.join(_EVENT_COLUMNS)} FROM job_events WHERE job_id = %s ORDER BY id", (job_id,)
    ).fetchall()
    return [msgspec.convert(dict(zip(_EVENT_COLUMNS, r, strict=True)), EventRow) for r in rows]


def user_totals(conn: Conn) -> list[UserTotal]:
    """Live jobs and their spooled bytes by owner and state, fleet-wide."""
    rows = conn.execute(
        "SELECT owner_uid, state, count(*), coalesce(sum(spool_bytes), 0) FROM jobs WHERE state = ANY(%s) "
        "GROUP BY owner_uid, state",
        (list(LIVE),),
    ).fetchall()
    return [UserTotal(owner_uid=uid, state=_STATES[s], jobs=n, spool_bytes=int(b)) for uid, s, n, b in rows]


def notice_payload(host: str, view: JobView) -> str:
    """The JobNotice as JSON under PostgreSQL's limit: a long file name (then error) is cut to fit."""
    data = msgspec.json.encode(JobNotice(host=host, job=view))
    for name in ("filename", "error"):
        over = len(data) - NOTICE_LIMIT_BYTES
        if over <= 0:
            break
        value: str = getattr(view, name) or ""
        # each character left out shortens the JSON by a byte at least
        view = msgspec.structs.replace(view, **{name: value[: max(0, len(value) - over)]})
        data = msgspec.json.encode(JobNotice(host=host, job=view))
    return data.decode()


def notify(conn: Conn, host: str, views: Sequence[JobView], wake: bool) -> None:
    """In the caller's transaction (sent at its commit): a notice for each job; wake: and "look now"."""
    if views:
        conn.execute(
            "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p",
            (EVENTS_CHANNEL, [notice_payload(host, v) for v in views]),
        )
    if wake:
        conn.execute(f"NOTIFY {JOBS_CHANNEL}")


def insert_jobs(
    conn: Conn,
    host: str,
    new_jobs: Sequence[NewJob],
    now: float,
    before_commit: Callable[[list[JobRow]], None] | None = None,
) -> list[JobRow]:
    """A submit's jobs and their audio (copied from the local spool files) in one transaction: a job is
    never seen by another host without its audio. OSError if a spool file cannot be read."""
    rows: list[JobRow] = []
    with conn.transaction():
        # a large file's COPY may take longer than a statement should; a cut connection still fails
        # (tcp_user_timeout, keepalives: see pg_store.session_conninfo)
        conn.execute("SET LOCAL statement_timeout = 0")
        for job in new_jobs:
            stored = conn.execute(
                "INSERT INTO jobs (state, model, language, task, priority, word_timestamps, filename,"
                " owner_uid, submit_host, spool_path, spool_bytes, created_at, updated_at, queued_at, prompt,"
                f" temperature) VALUES ({', '.join(['%s'] * 16)}) RETURNING {', '.join(ROW_COLUMNS)}",
                (
                    JobState.PENDING.value, job.model, job.language, job.task, job.priority,
                    job.word_timestamps, job.filename, job.owner_uid, host, job.spool_path, job.spool_bytes,
                    now, now, now, job.prompt, job.temperature,
                ),
            ).fetchone()  # fmt: skip
            assert stored is not None
            row = job_row(stored)
            with open(job.spool_path, "rb") as source:
                pg_audio.store(conn, row.id, source)
            rows.append(row)
        conn.cursor().executemany(
            _INSERT_EVENT, [(r.id, now, None, r.state.value, "submit", host, None, 0, None) for r in rows]
        )
        notify(conn, host, [r.view() for r in rows], wake=True)
        if before_commit is not None:
            before_commit(rows)
    return rows


def write_transitions(
    conn: Conn, host: str, lease_s: float, transitions: Sequence[SavedTransition], expected: Sequence[int]
) -> tuple[list[SavedTransition], list[int]]:
    """In the caller's transaction: each job's new row, its history row and any transcript, where the
    stored row is still (id, from_state, expected attempt). Returns the transitions written and the ids
    missed. Rows are locked in id order first, so that two hosts writing the same jobs never deadlock."""
    if len(transitions) > 1:
        conn.execute(
            "SELECT 1 FROM jobs WHERE id = ANY(%s) ORDER BY id FOR UPDATE", ([t[0].id for t in transitions],)
        )
    params = [
        (
            *[getattr(job, c) for c in MUTABLE_COLUMNS], job.attempt, job.host,
            None if transcript is None else msgspec.json.encode(transcript),
            job.state.value in HELD, lease_s, job.id, from_state.value, attempt,
        )
        for (job, from_state, _event, transcript), attempt in zip(transitions, expected, strict=True)
    ]  # fmt: skip
    cursor = conn.cursor()
    cursor.executemany(_WRITE, params, returning=True)
    won: set[int] = set()
    while True:
        won.update(r[0] for r in cursor.fetchall())
        if not cursor.nextset():
            break
    written = [t for t in transitions if t[0].id in won]
    cursor.executemany(
        _INSERT_EVENT,
        [
            (job.id, job.updated_at, old.value, job.state.value, event.value, host, job.worker, job.attempt,
             job.error)
            for job, old, event, _ in written
        ],
    )  # fmt: skip
    if ended := [t[0].id for t in written if t[0].state.terminal]:  # no host needs their audio any more
        conn.execute("DELETE FROM job_audio WHERE job_id = ANY(%s)", (ended,))
    notify(
        conn, host, [t[0].view() for t in written], wake=any(t[0].state is JobState.PENDING for t in written)
    )
    return written, [t[0].id for t in transitions if t[0].id not in won]


def save_transitions(
    conn: Conn, host: str, lease_s: float, transitions: Sequence[SavedTransition]
) -> frozenset[int]:
    """In the caller's transaction: write_transitions at the attempts the registry read (the one before
    its own at DISPATCH: it raised it already); returns the ids another host changed since (the caller
    rolls back), those already written as asked not counted."""
    expected = [j.attempt - 1 if e is JobEvent.DISPATCH else j.attempt for j, _, e, _ in transitions]
    _written, missed = write_transitions(conn, host, lease_s, transitions, expected)
    return frozenset(missed) - already_written(conn, transitions, missed)


def already_written(conn: Conn, transitions: Sequence[SavedTransition], missed: Sequence[int]) -> set[int]:
    """Of the missed ids, those whose row is already what the transition writes (its state, attempt and
    host): a commit that went through while its acknowledgement was lost (the connection cut), now taken
    again. A dispatch never counts: another host may have raised the attempt to the same number."""
    if not missed:
        return set()
    rows = conn.execute("SELECT id, state, attempt, host FROM jobs WHERE id = ANY(%s)", (list(missed),))
    found = {r[0]: (r[1], r[2], r[3]) for r in rows.fetchall()}
    return {
        job.id
        for job, _old, event, _ in transitions
        if event is not JobEvent.DISPATCH and found.get(job.id) == (job.state.value, job.attempt, job.host)
    }


def claim(conn: Conn, host: str, lease_s: float, transitions: Sequence[SavedTransition]) -> list[int]:
    """The DISPATCH of those jobs still PENDING at the attempt the registry read (SKIP LOCKED: a job another
    host is taking right now is left to it, never waited for), in one transaction, with each claimed
    owner's fair-share turn raised; the ids taken, in the order given."""
    with conn.transaction():
        locked = conn.execute(
            "SELECT id, attempt FROM jobs WHERE id = ANY(%s) AND state = 'PENDING' ORDER BY id "
            "FOR UPDATE SKIP LOCKED",
            ([t[0].id for t in transitions],),
        ).fetchall()
        free: dict[int, int] = dict(locked)  # id -> attempt
        mine = [
            t for t in transitions
            if t[1] is JobState.PENDING and t[2] is JobEvent.DISPATCH
            and free.get(t[0].id) == t[0].attempt - 1
        ]  # fmt: skip
        if not mine:
            return []
        written, _ = write_transitions(conn, host, lease_s, mine, [t[0].attempt - 1 for t in mine])
        raise_turns(conn, [t[0].owner_uid for t in written])
    return [t[0].id for t in written]


def raise_turns(conn: Conn, owners: Sequence[int]) -> None:
    """Each owner's last_served stamp, from one sequence shared by the fleet, raised in the order they were
    served (the last job of each counts); rows written in uid order (no deadlock between hosts)."""
    order = list(dict.fromkeys(reversed(owners)))[::-1]
    stamps = sorted(r[0] for r in conn.execute(
        "SELECT nextval('user_turn_seq') FROM generate_series(1, %s)", (len(order),)
    ).fetchall())  # fmt: skip
    turns = sorted(zip(order, stamps, strict=True))
    conn.execute(
        "INSERT INTO user_turns (owner_uid, last_served) "
        "SELECT * FROM unnest(%s::bigint[], %s::bigint[]) ORDER BY 1 "
        "ON CONFLICT (owner_uid) DO UPDATE "
        "SET last_served = greatest(user_turns.last_served, excluded.last_served)",
        ([t[0] for t in turns], [t[1] for t in turns]),
    )


# The distinct lanes by a loose index scan of jobs_lanes (one probe a lane), then each lane's length up to
# the cap and its first jobs, each from the same index: the cost is the lanes and what is returned.
_LANES = f"""
WITH RECURSIVE lanes AS (
    (SELECT priority, owner_uid, model FROM jobs WHERE state = 'PENDING'
     ORDER BY priority, owner_uid, model LIMIT 1)
    UNION ALL
    SELECT n.priority, n.owner_uid, n.model FROM lanes AS l, LATERAL (
        SELECT priority, owner_uid, model FROM jobs
        WHERE state = 'PENDING' AND (priority, owner_uid, model) > (l.priority, l.owner_uid, l.model)
        ORDER BY priority, owner_uid, model LIMIT 1) AS n
)
SELECT l.priority, l.owner_uid, l.model, c.n, f.id, f.queued_at
FROM lanes AS l
CROSS JOIN LATERAL (
    SELECT count(*) AS n FROM (SELECT 1 FROM jobs AS j WHERE j.state = 'PENDING' AND j.priority = l.priority
        AND j.owner_uid = l.owner_uid AND j.model = l.model LIMIT {LANE_COUNT_CAP}) AS capped) AS c
LEFT JOIN LATERAL (
    SELECT id, queued_at FROM jobs AS j WHERE j.state = 'PENDING' AND j.priority = l.priority
        AND j.owner_uid = l.owner_uid AND j.model = l.model
    ORDER BY queued_at, id LIMIT %s) AS f ON true
ORDER BY l.priority, l.owner_uid, l.model, f.queued_at, f.id
"""

Lane = tuple[tuple[int, int, str], int, list[tuple[int, float]]]


def lanes(conn: Conn, take: int) -> tuple[list[Lane], dict[int, int]]:
    """The PENDING queue by (priority, owner, model): each lane's key, length (capped) and first `take`
    jobs as (id, queued_at) oldest first; and the turns (owner -> last_served) of the lanes' owners."""
    found: list[Lane] = []
    for priority, owner_uid, model, count, job_id, queued_at in conn.execute(_LANES, (take,)).fetchall():
        key = (priority, owner_uid, model)
        if not found or found[-1][0] != key:
            found.append((key, count, []))
        if job_id is not None:
            found[-1][2].append((job_id, queued_at))
    owners = sorted({lane[0][1] for lane in found})
    turns: dict[int, int] = {}
    if owners:
        rows = conn.execute(
            "SELECT owner_uid, last_served FROM user_turns WHERE owner_uid = ANY(%s)", (owners,)
        ).fetchall()
        turns = {uid: stamp for uid, stamp in rows}
    return found, turns


def note_stale_result(
    conn: Conn, host: str, job_id: int, attempt: int, worker: str | None, now: float
) -> None:
    """A history row for a late result of an attempt no longer the job's, refused (none: the job is gone)."""
    conn.execute(
        "INSERT INTO job_events (job_id, at, from_state, to_state, event, host, worker, attempt) "
        "SELECT %s, %s, 'PROCESSING', 'PROCESSING', 'stale_result', %s, %s, %s "
        "WHERE EXISTS (SELECT 1 FROM jobs WHERE id = %s)",
        (job_id, now, host, worker, attempt, job_id),
    )
