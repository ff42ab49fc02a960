"""The shared job store's schema in PostgreSQL (several whisperd hosts, one queue): versioned migrations that
whisperd applies itself when it starts.

Each migration runs once, in order, in one transaction with its version row, under a transaction-level
advisory lock: hosts that start at once queue behind the first, and each finds the schema already at the
version it knows. A database whose schema is newer than this release knows is refused (a host left behind
at an upgrade must not write rows it does not understand); an older one is brought up to date.

Times are seconds since the epoch (double precision), as in the embedded store, so a job row reads the same
from either; leases compare against the database's own clock, never a host's. The driver is psycopg 3:
synchronous for this start-up step, asynchronous (with LISTEN/NOTIFY) for the store itself."""

from __future__ import annotations

from typing import Any

from whisperd.errors import StorageError

# pg_advisory_xact_lock key: "whsp", whisperd's own, apart from any other application's locks
LOCK_KEY = 0x77687370

# (version, what it creates); append only: a released migration is never edited
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
CREATE TABLE hosts (
    id text PRIMARY KEY,
    started_at double precision NOT NULL,
    heartbeat_at double precision NOT NULL,
    release text NOT NULL
);
CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    state text NOT NULL,
    progress real NOT NULL DEFAULT 0,
    retries integer NOT NULL DEFAULT 0,
    attempt integer NOT NULL DEFAULT 0,
    host text REFERENCES hosts(id),
    lease_expires_at double precision,
    device text,
    worker text,
    model text NOT NULL,
    language text,
    task text NOT NULL,
    priority integer NOT NULL DEFAULT 0,
    word_timestamps boolean NOT NULL DEFAULT false,
    error text,
    filename text NOT NULL,
    owner_uid integer NOT NULL,
    submit_host text NOT NULL,
    audio_duration_s double precision,
    audio_bytes bigint,
    created_at double precision NOT NULL,
    updated_at double precision NOT NULL,
    queued_at double precision NOT NULL,
    started_at double precision,
    finished_at double precision,
    not_before double precision,
    transcript bytea
);
COMMENT ON COLUMN jobs.attempt IS 'fencing token: raised at each claim; a result commits only with its own';
CREATE INDEX jobs_queue ON jobs (priority DESC, queued_at, id) WHERE state = 'PENDING';
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'PROCESSING';
CREATE INDEX jobs_state ON jobs (state);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE job_audio (
    job_id bigint NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE job_events (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    at double precision NOT NULL,
    from_state text,
    to_state text NOT NULL,
    event text NOT NULL,
    host text,
    worker text,
    attempt integer,
    error text
);
CREATE INDEX job_events_job ON job_events (job_id);
""",
    ),
    (
        2,
        """
-- What the store (pg_store.py) keeps beside v1: a job row as the embedded store has it (a double progress,
-- uids past 2^31, the submitting host's spool file and its size), each host's latest figures, the users'
-- fair-share turns, and indexes that make each read cost what it returns.
ALTER TABLE hosts ADD COLUMN snapshot bytea;
ALTER TABLE jobs ALTER COLUMN progress TYPE double precision;
ALTER TABLE jobs ALTER COLUMN owner_uid TYPE bigint;
ALTER TABLE jobs ADD COLUMN spool_path text, ADD COLUMN spool_bytes bigint;
-- RETRYING jobs hold a lease too: only leased rows have an expiry.
DROP INDEX jobs_leases;
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
-- ids by state in order: the newest jobs of one state, and the counts, from the index alone
DROP INDEX jobs_state;
CREATE INDEX jobs_state ON jobs (state, id);
CREATE INDEX jobs_held ON jobs (host, state) WHERE host IS NOT NULL;
-- the plan's lanes: distinct (priority, owner, model) by a loose index scan, each lane oldest first
CREATE INDEX jobs_lanes ON jobs (priority, owner_uid, model, queued_at, id) WHERE state = 'PENDING';
CREATE SEQUENCE user_turn_seq;
CREATE TABLE user_turns (
    owner_uid bigint PRIMARY KEY,
    last_served bigint NOT NULL
);
""",
    ),
    (
        3,
        """
-- A job's decoding options, as submitted (NULL: faster-whisper's defaults): Whisper's initial prompt and
-- one sampling temperature (no fallback schedule).
ALTER TABLE jobs ADD COLUMN prompt text, ADD COLUMN temperature double precision;
""",
    ),
)
LATEST = MIGRATIONS[-1][0]


class SchemaTooNew(StorageError):
    """The database was migrated by a newer whisperd than this one."""


def migrate(conn: Any, release: str) -> list[int]:
    """Bring the schema to LATEST on a psycopg connection in autocommit mode (the migration is a transaction
    of its own); returns the versions this call applied (none when another host, or an earlier start, did
    it)."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS whisperd_schema (version integer PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now(), release text NOT NULL)"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM whisperd_schema").fetchone()
        current = int(row[0])
        if current > LATEST:
            raise SchemaTooNew(
                f"the job database's schema is at version {current}, newer than this whisperd ({release}) "
                f"knows (version {LATEST}): upgrade whisperd on this host"
            )
        for version, sql in MIGRATIONS:
            if version <= current:
                continue
            conn.execute(sql)
            conn.execute("INSERT INTO whisperd_schema (version, release) VALUES (%s, %s)", (version, release))
            applied.append(version)
    return applied


def version(conn: Any) -> int:
    """The schema's version (0: whisperd never migrated this database)."""
    exists = conn.execute("SELECT to_regclass('whisperd_schema') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    return int(conn.execute("SELECT coalesce(max(version), 0) FROM whisperd_schema").fetchone()[0])
