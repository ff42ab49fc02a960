"""The shared store (whisperd/pg_store.py) on a real PostgreSQL, with hosts as PgStore instances on one
database: claims never give one job to two hosts, a write with a stale attempt is refused and changes
nothing, heartbeats extend leases, expired leases are requeued (but not right after a server restart), the
plan's lanes and turns, audio stored and fetched back, notifications, and an unreachable server."""

from __future__ import annotations

import io
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest

from tests.support.postgres import Cluster
from whisperd import pg_queue, pg_schema, pg_store
from whisperd.errors import StorageBusy, StorageError, StorageUnavailable, Superseded
from whisperd.jobs import JobEvent, JobState
from whisperd.pg_jobs import EVENTS_CHANNEL, JOBS_CHANNEL, LANE_COUNT_CAP, NOTICE_LIMIT_BYTES, JobNotice
from whisperd.pg_store import PgStore
from whisperd.protocol import Transcript
from whisperd.store import JobRow, NewJob, SavedTransition

_names = itertools.count()
MakeStore = Callable[..., PgStore]


@pytest.fixture
def url(postgres: Cluster) -> str:
    return postgres.create_database(f"pgstore_{next(_names)}")


@pytest.fixture
def stores(url: str) -> Iterator[MakeStore]:
    opened: list[PgStore] = []

    def make(host: str = "a", lease_s: float = 30.0, **settings: Any) -> PgStore:
        store = PgStore(url, host, lease_s=lease_s, release="test", **settings)
        store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def jobs(tmp_path: Path) -> Callable[..., NewJob]:
    files = itertools.count()

    def new_job(data: bytes = b"RIFF....", owner_uid: int = 1000, model: str = "tiny.en", priority: int = 0,
                filename: str = "a.wav") -> NewJob:  # fmt: skip
        path = tmp_path / f"spooled-{next(files)}"
        path.write_bytes(data)
        return NewJob(
            spool_path=str(path), spool_bytes=len(data), filename=filename, owner_uid=owner_uid, model=model,
            language=None, task="transcribe", priority=priority, word_timestamps=False,
        )  # fmt: skip

    return new_job


def until(condition: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, "not within the bound"
        time.sleep(0.05)
    return result


def taking(job: JobRow, host: str, worker: str = "w0") -> SavedTransition:
    """The DISPATCH as the registry makes it: attempt raised, host set."""
    job.state, job.worker, job.attempt, job.host = JobState.PROCESSING, worker, job.attempt + 1, host
    return (job, JobState.PENDING, JobEvent.DISPATCH, None)


def moved(job: JobRow, event: JobEvent, state: JobState, **changes: Any) -> SavedTransition:
    old = job.state
    job.state, job.updated_at = state, time.time()
    for name, value in changes.items():
        setattr(job, name, value)
    return (job, old, event, None)


def rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Behind the stores' back, on a connection of the test's own."""
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, args)
        return cursor.fetchall() if cursor.description else []


def events(url: str, job_id: int) -> list[tuple[str, str | None, int | None]]:
    return [(e, h, a) for e, h, a in rows(
        url, "SELECT event, host, attempt FROM job_events WHERE job_id = %s ORDER BY id", job_id
    )]  # fmt: skip


def test_two_hosts_claiming_at_once_never_take_the_same_job(
    stores: MakeStore, jobs: Callable[..., NewJob], url: str
) -> None:
    a, b = stores("a"), stores("b")
    ids = [j.id for j in a.insert_jobs([jobs(owner_uid=1000 + i % 3) for i in range(150)], now=1.0)]
    claimed: dict[str, list[int]] = {"a": [], "b": []}
    start = threading.Barrier(2)
    failures: list[BaseException] = []

    def host(store: PgStore) -> None:
        try:
            start.wait()
            while True:
                lanes, _turns = store.lanes(4)
                offered = [job_id for _key, _count, first in lanes for job_id, _at in first]
                if not offered:
                    return
                fresh = [job for job in map(store.get, offered) if job and job.state is JobState.PENDING]
                claimed[store.host_id] += store.claim([taking(job, store.host_id) for job in fresh])
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=host, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []
    assert sorted(claimed["a"] + claimed["b"]) == ids, "every job claimed, none twice"
    # (how they split it is the scheduler's luck: a claim that loses a race to another host is in
    # test_a_row_another_host_is_writing_is_skipped_by_a_claim_and_busy_for_a_write)
    holders = dict(rows(url, "SELECT id, host FROM jobs WHERE state = 'PROCESSING'"))
    assert all(holders[i] == h for h, got in claimed.items() for i in got)
    dispatches = rows(url, "SELECT job_id, count(*) FROM job_events WHERE event = 'dispatch' GROUP BY job_id")
    assert {n for _, n in dispatches} == {1} and len(dispatches) == len(ids)


def test_a_write_with_a_stale_attempt_is_refused_and_changes_nothing(
    stores: MakeStore, jobs: Callable[..., NewJob], url: str
) -> None:
    a, b = stores("a"), stores("b", lease_s=0.5)
    [job, other] = a.insert_jobs([jobs(), jobs()], now=1.0)
    assert a.claim([taking(job, "a"), taking(other, "a")]) == [job.id, other.id]
    a.heartbeat(b"{}")
    # host a is cut off past its lease: b requeues the job and takes it (attempt 2)
    rows(url, "UPDATE jobs SET lease_expires_at = 0 WHERE id = %s", job.id)
    assert until(b.requeue_expired) == [job.id]
    fresh = b.get(job.id)
    assert fresh is not None and (fresh.state, fresh.attempt, fresh.host) == (JobState.PENDING, 1, None)
    assert b.claim([taking(fresh, "b")]) == [job.id]
    before = (rows(url, "SELECT * FROM jobs ORDER BY id"), a.history(job.id), a.history(other.id))

    result = Transcript("en", 1.0, 1.0, "a's late result", [])
    late = moved(job, JobEvent.COMPLETE, JobState.COMPLETED, progress=100.0)
    with pytest.raises(Superseded) as refused:
        a.save_transition(*late[:3], result)
    assert refused.value.job_ids == frozenset({job.id})
    with pytest.raises(Superseded) as refused:  # all or none: the one still a's is not written either
        a.save_transitions([moved(other, JobEvent.COMPLETE, JobState.COMPLETED), late])
    assert refused.value.job_ids == frozenset({job.id})
    assert (rows(url, "SELECT * FROM jobs ORDER BY id"), a.history(job.id), a.history(other.id)) == before
    assert b.transcript(job.id) is None
    a.note_stale_result(job.id, 1, "w0")
    assert events(url, job.id) == [
        ("submit", "a", 0), ("dispatch", "a", 1), ("lease_expired", "b", 1), ("dispatch", "b", 2),
        ("stale_result", "a", 1),
    ]  # fmt: skip


def test_a_commit_taken_again_after_a_lost_acknowledgement_is_not_refused(
    stores: MakeStore, jobs: Callable[..., NewJob], url: str
) -> None:
    a = stores("a")
    [job] = a.insert_jobs([jobs()], now=1.0)
    a.claim([taking(job, "a")])
    done = moved(job, JobEvent.COMPLETE, JobState.COMPLETED, progress=100.0)
    a.save_transitions([done])
    a.save_transitions([done])  # the first one committed, but its caller was told the connection failed
    assert [e for e, _, _ in events(url, job.id)] == ["submit", "dispatch", "complete"]


def test_a_heartbeat_extends_the_leases_held_and_returns_them(
    stores: MakeStore, jobs: Callable[..., NewJob], url: str
) -> None:
    a, b = stores("a"), stores("b")
    j1, j2, j3 = a.insert_jobs([jobs(), jobs(), jobs()], now=1.0)
    a.claim([taking(j1, "a"), taking(j2, "a"), taking(j3, "a")])
    a.save_transition(
        *moved(j2, JobEvent.FAIL, JobState.RETRYING, retries=1, not_before=time.time() + 60)[:3]
    )
    taken = b.get(j3.id)  # cancelled on another host
    assert taken is not None and taken.host == "a"
    b.save_transition(*moved(taken, JobEvent.CANCEL, JobState.CANCELLED)[:3])
    rows(url, "UPDATE jobs SET lease_expires_at = 1 WHERE id = ANY(%s)", [j1.id, j2.id])
    assert a.heartbeat(b'{"devices": []}') == {j1.id, j2.id}
    leases = rows(url, f"SELECT lease_expires_at - {pg_store.pg_jobs.DB_NOW} FROM jobs WHERE id = ANY(%s)",
                  [j1.id, j2.id])  # fmt: skip
    assert all(20 < left <= 30 for (left,) in leases), "a lease (30 s) from now, the RETRYING one's too"
    assert b.heartbeat(b"{}") == set()
    figures = b.figures()
    assert figures.counts == {JobState.PROCESSING: 1, JobState.RETRYING: 1, JobState.CANCELLED: 1}
    assert {(h.id, h.snapshot, h.release) for h in figures.hosts} == {
        ("a", b'{"devices": []}', "test"), ("b", b"{}", "test"),
    }  # fmt: skip
    assert all(0 <= h.heartbeat_age_s < 30 for h in figures.hosts)
    assert {(t.state, t.jobs) for t in figures.user_totals} == {
        (JobState.PROCESSING, 1),
        (JobState.RETRYING, 1),
    }


def test_expired_leases_go_back_to_the_queue_counting_nothing(
    stores: MakeStore, jobs: Callable[..., NewJob], url: str
) -> None:
    a, b = stores("a", lease_s=0.5), stores("b", lease_s=0.5)
    running, retrying, kept = a.insert_jobs([jobs(), jobs(), jobs()], now=1.0)
    a.claim([taking(running, "a"), taking(retrying, "a")])
    a.save_transition(*moved(retrying, JobEvent.FAIL, JobState.RETRYING, retries=1, not_before=1e12)[:3])
    b.claim([taking(kept, "b")])
    stop = threading.Event()

    def heartbeats() -> None:
        while not stop.wait(0.1):
            b.heartbeat(b"{}")

    beats = threading.Thread(target=heartbeats)
    beats.start()  # host b is alive, host a has stopped
    try:
        requeued = until(b.requeue_expired)
    finally:
        stop.set()
        beats.join()
    assert sorted(requeued) == [running.id, retrying.id]
    found = rows(url, "SELECT id, state, retries, host, attempt, lease_expires_at FROM jobs ORDER BY id")
    assert [r[1:5] for r in found] == [
        ("PENDING", 0, None, 1),
        ("PENDING", 1, None, 1),
        ("PROCESSING", 0, "b", 1),
    ]
    assert found[0][5] is None and found[2][5] is not None
    assert events(url, running.id)[-1] == ("lease_expired", "b", 1)
    history = b.history(retrying.id)
    assert (history[-1].from_state, history[-1].to_state, history[-1].event) == (
        JobState.RETRYING, JobState.PENDING, "lease_expired",
    )  # fmt: skip
    assert a.heartbeat(b"{}") == set(), "host a, back, learns it lost them"


def test_no_lease_is_taken_within_a_lease_of_the_server_restarting(
    postgres: Cluster, stores: MakeStore, jobs: Callable[..., NewJob], url: str
) -> None:
    a = stores("a", lease_s=0.1)
    [job] = a.insert_jobs([jobs()], now=1.0)
    a.claim([taking(job, "a")])
    time.sleep(0.2)  # expired
    postgres.restart()
    b = stores("b", lease_s=3.0)
    assert b.requeue_expired() == [], "every host gets a lease to reconnect and heartbeat"
    assert until(b.requeue_expired) == [job.id]
    [(waited,)] = rows(
        url, "SELECT e.at - extract(epoch from pg_postmaster_start_time()) FROM job_events AS e "
        "WHERE job_id = %s AND event = 'lease_expired'", job.id,
    )  # fmt: skip
    assert waited >= 3.0 - 0.1, "a lease past the server's start (the row has the host's clock, read first)"


def test_lanes_come_in_order_with_the_turns_of_their_users(
    stores: MakeStore, jobs: Callable[..., NewJob], url: str
) -> None:
    a = stores("a")
    u1 = [a.insert_jobs([jobs(owner_uid=1)], now=t)[0] for t in (3.0, 1.0, 2.0)]
    [u1_high] = a.insert_jobs([jobs(owner_uid=1, priority=5, model="base")], now=9.0)
    u2 = a.insert_jobs([jobs(owner_uid=2), jobs(owner_uid=2)], now=4.0)
    lanes, turns = a.lanes(2)
    assert lanes == [
        ((0, 1, "tiny.en"), 3, [(u1[1].id, 1.0), (u1[2].id, 2.0)]),
        ((0, 2, "tiny.en"), 2, [(u2[0].id, 4.0), (u2[1].id, 4.0)]),  # FIFO, then by id
        ((5, 1, "base"), 1, [(u1_high.id, 9.0)]),
    ]
    assert turns == {}, "nobody served yet"
    a.claim([taking(u1[1], "a")])
    a.claim([taking(u2[0], "a")])
    lanes, turns = a.lanes(0)
    assert [(key, count, first) for key, count, first in lanes] == [
        ((0, 1, "tiny.en"), 2, []), ((0, 2, "tiny.en"), 1, []), ((5, 1, "base"), 1, []),
    ]  # fmt: skip
    assert set(turns) == {1, 2} and turns[2] > turns[1], "user 2 was served last"
    a.claim([taking(u1[2], "a")])
    assert a.lanes(1)[1][1] > a.lanes(1)[1][2]
    # a long lane is counted up to a cap: what the plan needs, at a bounded cost
    rows(url, "INSERT INTO jobs (state, model, task, filename, owner_uid, submit_host, created_at,"
              " updated_at, queued_at) SELECT 'PENDING', 'tiny.en', 'transcribe', 'f', 3, 'a', 1, 1, n"
              " FROM generate_series(1, %s) AS n", LANE_COUNT_CAP + 1)  # fmt: skip
    [long] = [lane for lane in a.lanes(1)[0] if lane[0][1] == 3]
    assert long[1] == LANE_COUNT_CAP and long[2][0][1] == 1.0


def test_a_submits_audio_comes_back_byte_for_byte_on_any_host(
    stores: MakeStore, jobs: Callable[..., NewJob], tmp_path: Path
) -> None:
    a, b = stores("a"), stores("b")
    data = os.urandom(2 * 1024 * 1024 + 123)  # three chunks
    [job] = a.insert_jobs([jobs(data)], now=1.0)
    stored = b.get(job.id)
    assert stored is not None
    assert (stored.submit_host, stored.spool_path, stored.spool_bytes) == ("a", job.spool_path, len(data))
    out = io.BytesIO()
    assert b.fetch_audio(job.id, out) == len(data) and out.getvalue() == data
    missing = NewJob(**{**msgspec.structs.asdict(jobs()), "spool_path": str(tmp_path / "gone")})
    with pytest.raises(StorageError):
        a.insert_jobs([jobs(), missing], now=2.0)
    assert [j.id for j in a.live_jobs()] == [job.id], "all or nothing"


def test_reads_are_fleet_wide_but_a_hosts_own_jobs_are_its_own(
    stores: MakeStore, jobs: Callable[..., NewJob]
) -> None:
    a, b = stores("a"), stores("b")
    mine, theirs, waiting = b.insert_jobs([jobs(), jobs(), jobs()], now=1.0)
    a.claim([taking(mine, "a")])
    b.claim([taking(theirs, "b")])
    assert [j.id for j in a.jobs_in([JobState.PROCESSING, JobState.PENDING])] == [mine.id, waiting.id]
    assert [(j.id, j.host, j.attempt, j.submit_host) for j in a.live_jobs()] == [
        (mine.id, "a", 1, "b"), (theirs.id, "b", 1, "b"), (waiting.id, None, 0, "b"),
    ]  # fmt: skip
    assert [v.host for v in a.views([], None, 10)] == ["a", "b", None]
    assert a.count_by_state() == {JobState.PROCESSING: 2, JobState.PENDING: 1}
    assert a.spool_names_in_use() == set(), "host a accepted none of them"
    assert b.spool_names_in_use() == {Path(j.spool_path or "").name for j in (mine, theirs, waiting)}
    with pytest.raises(StorageError) as refused:  # no raw driver error, whatever the database says
        a.views([], None, -1)
    assert not isinstance(refused.value, StorageUnavailable)
    assert a.get(waiting.id) is not None, "and the connection still works"


def test_a_row_another_host_is_writing_is_skipped_by_a_claim_and_busy_for_a_write(
    stores: MakeStore, jobs: Callable[..., NewJob], url: str
) -> None:
    a = stores("a", statement_timeout_s=1.0)
    [job, free] = a.insert_jobs([jobs(), jobs()], now=1.0)
    with psycopg.connect(url) as other:  # another host, stopped inside its transaction
        other.execute("SELECT 1 FROM jobs WHERE id = %s FOR UPDATE", (job.id,))
        assert a.claim([taking(job, "a"), taking(free, "a")]) == [free.id], "skipped, not waited for"
        queued = a.get(job.id)  # reads never wait
        assert queued is not None and queued.state is JobState.PENDING
        cancel = moved(queued, JobEvent.CANCEL, JobState.CANCELLED)
        with pytest.raises(StorageBusy):  # the lock timeout: nothing written, a retry later works
            a.save_transitions([cancel])
        assert a.get(job.id) is not None, "no backoff: the database is there"
    a.save_transitions([cancel])
    assert [e for e, _, _ in events(url, job.id)] == ["submit", "cancel"]


def test_every_commit_is_notified_with_the_job_as_committed(
    stores: MakeStore, jobs: Callable[..., NewJob], url: str
) -> None:
    a, b = stores("a"), stores("b", lease_s=0.5)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {EVENTS_CHANNEL}")
        listener.execute(f"LISTEN {JOBS_CHANNEL}")
        [job, long] = a.insert_jobs([jobs(), jobs(filename="x" * 20_000)], now=1.0)
        a.claim([taking(job, "a")])
        rows(url, "UPDATE jobs SET lease_expires_at = 0 WHERE id = %s", job.id)
        until(b.requeue_expired)
        heard = [(n.channel, n.payload) for n in listener.notifies(timeout=10, stop_after=6)]
    events_, jobs_ = EVENTS_CHANNEL, JOBS_CHANNEL
    assert [channel for channel, _ in heard] == [events_, events_, jobs_, events_, events_, jobs_], (
        "a wake-up for the submit and for the requeue"
    )
    notices = [msgspec.json.decode(p, type=JobNotice) for c, p in heard if c == EVENTS_CHANNEL]
    assert [(n.host, n.job.id, n.job.state, n.job.host) for n in notices] == [
        ("a", job.id, JobState.PENDING, None), ("a", long.id, JobState.PENDING, None),
        ("a", job.id, JobState.PROCESSING, "a"), ("b", job.id, JobState.PENDING, None),
    ]  # fmt: skip
    longest = max(len(p.encode()) for c, p in heard if c == EVENTS_CHANNEL)
    assert longest <= NOTICE_LIMIT_BYTES and notices[1].job.filename.startswith("xxxx")


def test_a_database_of_the_first_schema_is_brought_up_to_date_with_its_jobs(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    with monkeypatch.context() as first_release, psycopg.connect(url, autocommit=True) as conn:
        first_release.setattr(pg_schema, "MIGRATIONS", pg_schema.MIGRATIONS[:1])
        first_release.setattr(pg_schema, "LATEST", 1)
        pg_schema.migrate(conn, "old")
        pg_queue.register_host(conn, "a", "old")
        conn.execute(
            "INSERT INTO jobs (state, progress, model, task, filename, owner_uid, submit_host, created_at,"
            " updated_at, queued_at) VALUES ('PENDING', 12.5, 'tiny.en', 'transcribe', 'a.wav', 1000, 'a', 1,"
            " 1, 1)"
        )
    store = PgStore(url, "b", lease_s=30.0, release="test")
    store.open()
    try:
        [job] = store.live_jobs()
        assert (job.progress, job.spool_path, job.spool_bytes, job.submit_host) == (12.5, None, None, "a")
        assert store.lanes(1)[0] == [((0, 1000, "tiny.en"), 1, [(job.id, 1.0)])]
    finally:
        store.close()
    assert rows(url, "SELECT max(version) FROM whisperd_schema") == [(pg_schema.LATEST,)]


def test_an_unreachable_database_fails_fast_then_works_again(jobs: Callable[..., NewJob]) -> None:
    cluster = Cluster().start()  # of its own: it is stopped
    try:
        url = cluster.create_database("outage")
        store = PgStore(url, "a", lease_s=30.0, release="test", reconnect_backoff_s=5.0)
        store.open()
        [job] = store.insert_jobs([jobs()], now=1.0)
        cluster.down()
        with pytest.raises(StorageUnavailable) as failed:
            store.get(job.id)
        assert isinstance(failed.value.__cause__, psycopg.Error), "it tried, and the server was gone"
        cluster.up()
        for call in (
            lambda: store.get(job.id),
            lambda: store.heartbeat(b"{}"),
            lambda: store.views([], None, 1),
        ):
            with pytest.raises(StorageUnavailable) as refused:
                call()
            assert refused.value.__cause__ is None, "refused at once, within the backoff: no I/O"

        def works() -> bool:
            try:
                return store.get(job.id) is not None and store.heartbeat(b"{}") == set()
            except StorageUnavailable:
                return False

        until(works)
        store.close()
    finally:
        cluster.stop()


def test_the_backoff_doubles_up_to_its_limit_and_starts_over_after_a_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(pg_store, "_monotonic", lambda: now[0])
    backoff = pg_store._Backoff(0.5, 2.0)
    delays = []
    for _ in range(4):
        delays.append(backoff.failed("down"))
        assert backoff.failed("down too") == delays[-1], "failures at once count once"
        with pytest.raises(StorageUnavailable):
            backoff.check()
        now[0] += delays[-1]
        backoff.check()
    assert delays == [0.5, 1.0, 2.0, 2.0]
    backoff.succeeded()
    assert backoff.failed("down") == 0.5


def test_the_connection_string_carries_the_password_and_timeouts() -> None:
    store = PgStore("postgresql://whisperd@db.example/jobs?options=-c%20work_mem%3D8MB", "gpu-7",
                    lease_s=30.0, release="test", password="s3cret", statement_timeout_s=2.5)  # fmt: skip
    params = psycopg.conninfo.conninfo_to_dict(store.conninfo)
    assert params["password"] == "s3cret" and params["host"] == "db.example" and params["dbname"] == "jobs"
    assert params["options"] == (
        "-c work_mem=8MB -c statement_timeout=2500 -c lock_timeout=1250"
        " -c idle_in_transaction_session_timeout=5000 -c jit=off"
    )
    assert (params["connect_timeout"], params["tcp_user_timeout"]) == ("5", "2500")


def test_a_claim_whose_answer_was_lost_goes_back_to_the_queue(
    stores: MakeStore, jobs: Callable[..., NewJob], url: str
) -> None:
    a, b = stores("a"), stores("b")
    j1, j2 = a.insert_jobs([jobs(), jobs()], now=1.0)
    a.claim([taking(j1, "a"), taking(j2, "a")])
    # The daemon never learnt it took j2 (its answer was lost): the heartbeat lists it, the host requeues it.
    assert a.heartbeat(b"{}") == {j1.id, j2.id}
    assert b.requeue_strays([j2.id]) == [], "only the host holding a job requeues it as a stray"
    assert a.requeue_strays([j2.id]) == [j2.id]
    assert events(url, j2.id)[-1] == ("requeue", "a", 1)
    stored = b.get(j2.id)
    assert stored is not None and (stored.state, stored.host, stored.retries) == (JobState.PENDING, None, 0)


def test_a_finished_jobs_audio_leaves_the_database(
    stores: MakeStore, jobs: Callable[..., NewJob], url: str
) -> None:
    a = stores("a")
    [job] = a.insert_jobs([jobs(os.urandom(3000))], now=1.0)
    a.claim([taking(job, "a")])
    assert rows(url, "SELECT count(*) FROM job_audio WHERE job_id = %s", job.id) == [(1,)]
    a.save_transition(*moved(job, JobEvent.COMPLETE, JobState.COMPLETED, finished_at=time.time())[:3])
    assert rows(url, "SELECT count(*) FROM job_audio WHERE job_id = %s", job.id) == [(0,)]
