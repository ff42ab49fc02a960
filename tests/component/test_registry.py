"""The job registry on a real SQLite store and a real spool, with a fake clock: what it publishes and counts,
retries and their backoff, terminal transitions, a store that refuses a commit, recovery after a restart,
devices to avoid, selection by id, and counts that never drift from the store."""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.support.inprocess import FakeClock
from whisperd.errors import IllegalTransition, NotFound, StorageFull
from whisperd.jobs import JobEvent, JobState
from whisperd.protocol import JobView, Segment, Transcript
from whisperd.registry import JobRegistry, RetryPolicy
from whisperd.spool import Spool
from whisperd.sqlite_store import SqliteStore
from whisperd.store import JobRow, NewJob

S = JobState
E = JobEvent
T0 = 1_000_000.0
POLICY = RetryPolicy(max_retries=2, backoff_s=10.0, backoff_max_s=15.0)
TRANSCRIPT = Transcript("en", 0.99, 30.0, "hello", [Segment(id=1, start=0.0, end=30.0, text="hello")])


class RefusingStore(SqliteStore):
    """The real store, refusing every transition while `refuse` is set (as a full disk would)."""

    refuse = False

    def save_transition(
        self, job: JobRow, from_state: JobState, event: JobEvent, transcript: Transcript | None = None
    ) -> None:
        if self.refuse:
            raise StorageFull("the job store is full")
        super().save_transition(job, from_state, event, transcript)


@dataclass
class Parts:
    tmp_path: Path
    store: RefusingStore
    spool: Spool
    clock: FakeClock
    registry: JobRegistry
    published: list[JobView] = field(default_factory=list)
    # (job id, from, to, event) of each committed transition, as the hook saw it
    transitions: list[tuple[int, JobState, JobState, JobEvent]] = field(default_factory=list)

    def add(self, count: int = 1, owner_uid: int = 1000) -> list[JobRow]:
        return self.registry.add([new_job(self.spool, self.tmp_path, owner_uid) for _ in range(count)])

    def events(self, job_id: int) -> list[str]:
        return [e.event for e in self.store.history(job_id)]

    def store_counts(self) -> dict[str, int]:
        stored = self.store.count_by_state()
        return {s.value: stored.get(s, 0) for s in JobState}


def make(tmp_path: Path, clock: FakeClock | None = None, policy: RetryPolicy = POLICY) -> Parts:
    store = RefusingStore(tmp_path / "jobs.sqlite3")
    spool = Spool(tmp_path / "spool")
    clock = clock or FakeClock(T0)
    published: list[JobView] = []
    transitions: list[tuple[int, JobState, JobState, JobEvent]] = []

    def on_transition(job: JobRow, old: JobState, event: JobEvent) -> None:
        transitions.append((job.id, old, job.state, event))

    registry = JobRegistry(store, spool, clock, policy, published.append, on_transition)
    return Parts(tmp_path, store, spool, clock, registry, published, transitions)


def new_job(spool: Spool, tmp_path: Path, owner_uid: int = 1000) -> NewJob:
    source = tmp_path / f"source-{len(list(tmp_path.iterdir()))}.wav"
    source.write_bytes(b"RIFF" + os.urandom(16))
    fd = os.open(source, os.O_RDONLY)
    try:
        path, size = spool.copy_from_fd(fd, 1 << 20)
    finally:
        os.close(fd)
    return NewJob(
        spool_path=path, spool_bytes=size, filename=source.name, owner_uid=owner_uid, model="tiny.en",
        language=None, task="transcribe", priority=0, word_timestamps=False,
    )  # fmt: skip


def spool_files(parts: Parts) -> set[str]:
    return {p.name for p in parts.spool.directory.iterdir()}


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    made = make(tmp_path)
    yield made
    made.store.close()


def dispatch(parts: Parts, job: JobRow, worker: str = "cpu0", device: str = "cpu") -> None:
    parts.registry.apply(job, E.DISPATCH, device=device, worker=worker)


def changes_for(event: JobEvent) -> dict[str, Any]:
    """What the daemon passes along with an event: a dispatch names its worker and device."""
    return {"worker": "cpu0", "device": "cpu"} if event is E.DISPATCH else {}


def queued(registry: JobRegistry) -> list[int]:
    """Ids of the PENDING jobs as the scheduler sees them, lane by lane, oldest first."""
    return [j.id for lane in registry.waiting(1_000_000, {"tiny.en"}).lanes for j in lane.jobs]


# ---- add -----------------------------------------------------------------------------------------------


def test_add_publishes_pending_views_and_counts_them(parts: Parts) -> None:
    jobs = parts.add(2)
    assert [j.state for j in jobs] == [S.PENDING, S.PENDING]
    assert parts.published == [j.view() for j in jobs]
    assert [v.state for v in parts.published] == [S.PENDING, S.PENDING]
    assert parts.registry.counts() == {**{s.value: 0 for s in JobState}, "PENDING": 2}
    assert parts.registry.counts() == parts.store_counts()
    assert parts.registry.waiting_count() == 2
    assert [j.id for j in parts.store.live_jobs()] == [j.id for j in jobs]
    assert queued(parts.registry) == [j.id for j in jobs] and parts.registry.held() == []
    assert [parts.registry.get(j.id) for j in jobs] == jobs, "PENDING rows come from the store"
    assert parts.registry.oldest_waiting_since() == T0
    assert parts.transitions == [], "a submit is not a transition"
    assert parts.events(jobs[0].id) == ["submit"]
    assert all(j.queued_at == j.created_at == T0 for j in jobs)


def test_nothing_waits_in_an_empty_registry(parts: Parts) -> None:
    assert parts.registry.oldest_waiting_since() is None
    assert parts.registry.waiting_count() == 0
    assert parts.registry.release_due_retries(parts.clock()) is None
    assert parts.registry.counts() == {s.value: 0 for s in JobState}
    with pytest.raises(NotFound):
        parts.registry.get(1)


# ---- retries -------------------------------------------------------------------------------------------


def test_a_failed_job_backs_off_then_goes_to_the_tail_of_the_queue(parts: Parts) -> None:
    registry, clock = parts.registry, parts.clock
    a, b = parts.add(2)
    clock.advance(5)
    dispatch(parts, a)
    assert (a.state, a.worker, a.device, a.started_at) == (S.PROCESSING, "cpu0", "cpu", T0 + 5)
    assert registry.oldest_waiting_since() == T0, "b still waits since its submit"
    assert registry.waiting_count() == 1

    clock.advance(3)
    registry.apply(a, E.FAIL, error="worker cpu0 died")
    assert (a.state, a.retries) == (S.RETRYING, 1)
    assert a.not_before == T0 + 8 + POLICY.backoff_s
    assert a.error is not None
    assert registry.waiting_count() == 2
    assert registry.oldest_waiting_since() == T0, "b is still the oldest"
    assert parts.published[-1].state is S.RETRYING

    # Not due yet: stays RETRYING, and the registry says when it will be.
    due = T0 + 8 + POLICY.backoff_s
    assert a.not_before == due
    assert registry.release_due_retries(clock()) == due
    clock.now = due - 0.001
    assert registry.release_due_retries(clock()) == due
    assert a.state is S.RETRYING

    clock.now = due  # exactly at not_before
    assert registry.release_due_retries(clock()) is None
    assert [a.state, a.retries, a.not_before, a.worker, a.device] == [S.PENDING, 1, None, None, None]
    assert a.queued_at == clock(), "back at the tail of the queue"
    assert queued(registry) == [b.id, a.id], "a is back at the tail, b never left"
    assert registry.oldest_waiting_since() == T0

    clock.advance(1)
    dispatch(parts, b)
    assert registry.oldest_waiting_since() == a.queued_at, "with b gone, a is the oldest"
    assert parts.events(a.id) == ["submit", "dispatch", "fail", "backoff_elapsed"]
    assert [(f, t, e) for i, f, t, e in parts.transitions if i == a.id] == [
        (S.PENDING, S.PROCESSING, E.DISPATCH),
        (S.PROCESSING, S.RETRYING, E.FAIL),
        (S.RETRYING, S.PENDING, E.BACKOFF_ELAPSED),
    ]
    stored = parts.store.get(a.id)
    assert stored is not None and (stored.state, stored.retries, stored.queued_at) == (
        S.PENDING,
        1,
        a.queued_at,
    )


def test_backoff_doubles_up_to_its_cap_and_only_due_retries_are_released(parts: Parts) -> None:
    registry, clock = parts.registry, parts.clock
    a, b = parts.add(2)
    dispatch(parts, a)
    registry.apply(a, E.FAIL, error="boom")
    assert a.not_before == clock() + 10.0
    clock.advance(10)
    registry.release_due_retries(clock())
    dispatch(parts, a)
    dispatch(parts, b)
    registry.apply(a, E.FAIL, error="boom")
    assert a.retries == 2 and a.not_before == clock() + 15.0, "2 x 10 s, capped at 15 s"
    clock.advance(1)
    registry.apply(b, E.FAIL, error="boom")
    assert b.not_before == clock() + 10.0
    assert a.not_before is not None and b.not_before is not None and b.not_before < a.not_before
    assert registry.release_due_retries(clock()) == b.not_before, "the earlier of the two"
    clock.advance(10)  # b is due, a is not
    assert registry.release_due_retries(clock()) == a.not_before
    assert (a.state, b.state) == (S.RETRYING, S.PENDING)


def test_a_failure_with_no_retries_left_fails_the_job(parts: Parts) -> None:
    registry, clock = parts.registry, parts.clock
    [job] = parts.add()
    spooled = job.spool_path
    for _ in range(POLICY.max_retries):
        dispatch(parts, job)
        registry.apply(job, E.FAIL, error="boom")
        assert job.state is S.RETRYING
        clock.advance(60)
        registry.release_due_retries(clock())
    dispatch(parts, job)
    registry.apply(job, E.FAIL, error="boom again")
    assert (job.state, job.retries) == (S.FAILED, POLICY.max_retries)
    assert job.finished_at == clock() and job.error is not None
    assert job.spool_path is None and spooled is not None and not Path(spooled).exists()
    assert registry.find_live(job.id) is None and registry.held() == [] and queued(registry) == []
    assert registry.get(job.id).state is S.FAILED
    assert registry.counts()["FAILED"] == 1 and registry.waiting_count() == 0
    assert registry.oldest_waiting_since() is None
    assert parts.events(job.id)[-1] == "fail"
    assert parts.store_counts() == registry.counts()


# ---- terminal transitions ------------------------------------------------------------------------------

# (events taking a fresh job to the state before the last one, the last one, where it ends)
TERMINAL_PATHS: list[tuple[list[JobEvent], JobEvent, JobState]] = [
    ([E.DISPATCH], E.COMPLETE, S.COMPLETED),
    ([E.DISPATCH], E.FAIL_FATAL, S.FAILED),
    ([], E.CANCEL, S.CANCELLED),
    ([E.DISPATCH], E.CANCEL, S.CANCELLED),
    ([E.DISPATCH, E.FAIL], E.CANCEL, S.CANCELLED),
]


@pytest.mark.parametrize(
    ("path", "last", "end"), TERMINAL_PATHS, ids=["complete", "fail_fatal", "cancel-pending",
                                                    "cancel-processing", "cancel-retrying"]
)  # fmt: skip
def test_a_terminal_transition_discards_the_spool_file_and_ends_the_live_job(
    parts: Parts, path: list[JobEvent], last: JobEvent, end: JobState
) -> None:
    registry = parts.registry
    job, other = parts.add(2)
    for event in path:
        registry.apply(job, event, **changes_for(event))
    spooled = job.spool_path
    assert spooled is not None and Path(spooled).exists()
    parts.clock.advance(7)
    transcript = TRANSCRIPT if last is E.COMPLETE else None
    registry.apply(job, last, transcript=transcript)
    assert job.state is end and job.finished_at == parts.clock()
    assert job.spool_path is None and not Path(spooled).exists()
    assert other.spool_path is not None and Path(other.spool_path).exists(), "only that job's audio"
    assert registry.held() == [] and queued(registry) == [other.id]
    assert registry.find_live(job.id) is None
    assert registry.get(job.id) == job, "the store has the same row"
    assert registry.counts()[end.value] == 1
    assert registry.counts() == parts.store_counts()
    assert parts.published[-1] == job.view()
    assert parts.transitions[-1] == (job.id, path_state(path), end, last)
    assert parts.events(job.id)[-1] == last.value
    if end is S.COMPLETED:
        assert job.progress == 100.0 and registry.transcript(job.id) == TRANSCRIPT
    else:
        assert registry.transcript(job.id) is None
    with pytest.raises(IllegalTransition):
        registry.apply(job, E.CANCEL)
    assert registry.counts() == parts.store_counts()


def path_state(path: list[JobEvent]) -> JobState:
    return {0: S.PENDING, 1: S.PROCESSING, 2: S.RETRYING}[len(path)]


# ---- refused commits -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "event", "changes"),
    [
        ([], E.DISPATCH, {"worker": "cpu0", "device": "cpu"}),
        ([E.DISPATCH], E.COMPLETE, {"audio_duration_s": 30.0}),
        ([E.DISPATCH], E.FAIL, {"error": "boom"}),
        ([E.DISPATCH], E.FAIL_FATAL, {"error": "undecodable"}),
        ([E.DISPATCH], E.REQUEUE, {}),
        ([E.DISPATCH], E.CANCEL, {}),
        ([E.DISPATCH, E.FAIL], E.CANCEL, {}),
    ],
    ids=["dispatch", "complete", "fail", "fail_fatal", "requeue", "cancel", "cancel-retrying"],
)
def test_a_refused_commit_leaves_the_job_and_the_counts_as_they_were(
    parts: Parts, path: list[JobEvent], event: JobEvent, changes: dict[str, Any]
) -> None:
    registry = parts.registry
    job, other = parts.add(2)
    for step in path:
        registry.apply(job, step, **changes_for(step))
    registry.avoid_device(job.id, "cuda:0")
    parts.clock.advance(3)
    before = msgspec.structs.replace(job)
    counts, waiting, oldest = registry.counts(), registry.waiting_count(), registry.oldest_waiting_since()
    avoided = registry.avoided_devices(job.id)  # recorded for a running job only
    published, transitions, history = len(parts.published), len(parts.transitions), parts.events(job.id)
    files = spool_files(parts)

    parts.store.refuse = True
    transcript = TRANSCRIPT if event is E.COMPLETE else None
    with pytest.raises(StorageFull):
        registry.apply(job, event, transcript=transcript, **changes)
    assert job == before, "the in-memory job is exactly as it was"
    assert (registry.find_live(job.id) is job) == (job.state is not S.PENDING), "held unless queued"
    assert registry.get(job.id) == job, "the store has it as it was"
    assert registry.counts() == counts == parts.store_counts()
    assert registry.waiting_count() == waiting and registry.oldest_waiting_since() == oldest
    assert registry.avoided_devices(job.id) == avoided
    assert spool_files(parts) == files, "the audio is still needed"
    assert len(parts.published) == published and len(parts.transitions) == transitions
    assert parts.events(job.id) == history
    assert parts.store.get(job.id) == job
    assert registry.transcript(job.id) is None

    parts.store.refuse = False  # the disk has room again: the same transition goes through
    registry.apply(job, event, transcript=transcript, **changes)
    assert parts.events(job.id) == [*history, event.value]
    assert registry.counts() == parts.store_counts()
    assert other.state is S.PENDING


def test_an_illegal_event_changes_nothing(parts: Parts) -> None:
    [job] = parts.add()
    before = msgspec.structs.replace(job)
    for event in (E.COMPLETE, E.FAIL, E.FAIL_FATAL, E.REQUEUE, E.BACKOFF_ELAPSED):
        with pytest.raises(IllegalTransition):
            parts.registry.apply(job, event, error="x")
    assert job == before
    assert parts.events(job.id) == ["submit"] and parts.transitions == []
    assert len(parts.published) == 1


# ---- recovery ------------------------------------------------------------------------------------------


def test_recover_requeues_processing_jobs_and_removes_orphan_spool_files(tmp_path: Path) -> None:
    first = make(tmp_path)
    running, waiting, retrying, done = first.add(4)
    dispatch(first, running, worker="gpu0", device="cuda:0")
    dispatch(first, retrying)
    first.registry.apply(retrying, E.FAIL, error="boom")
    dispatch(first, done)
    first.registry.apply(done, E.COMPLETE, transcript=TRANSCRIPT)
    first.store.close()
    orphan = first.spool.directory / "crashed-before-commit.audio"
    orphan.write_bytes(b"RIFF")
    kept = {Path(j.spool_path or "").name for j in (running, waiting, retrying)}

    clock = FakeClock(T0 + 100)
    second = make(tmp_path, clock)
    try:
        assert second.registry.recover() == 1
        job = second.registry.get(running.id)
        assert (job.state, job.worker, job.device, job.retries) == (S.PENDING, None, None, 0)
        assert job.queued_at == clock()
        assert second.events(running.id) == ["submit", "dispatch", "requeue"]
        [requeue] = second.store.history(running.id)[-1:]
        assert (requeue.from_state, requeue.to_state, requeue.at) == (S.PROCESSING, S.PENDING, clock())
        assert second.transitions == [(running.id, S.PROCESSING, S.PENDING, E.REQUEUE)]
        assert second.published == [job.view()]
        assert second.registry.remove_orphan_spools(before=time.time()) == 1
        assert spool_files(second) == kept, "the orphan is gone, the live jobs' audio stays"
        assert [j.id for j in second.registry.held()] == [retrying.id]
        assert queued(second.registry) == [waiting.id, running.id], "the requeued job behind the waiting one"
        assert second.registry.counts() == second.store_counts()
        assert second.registry.counts() == {**{s.value: 0 for s in JobState},
                                            "PENDING": 2, "RETRYING": 1, "COMPLETED": 1}  # fmt: skip
        assert second.registry.waiting_count() == 3
        # The retry's backoff survives the restart.
        not_before = second.registry.get(retrying.id).not_before
        assert not_before == retrying.not_before
        assert second.registry.release_due_retries(clock()) is None
        assert second.registry.get(retrying.id).state is S.PENDING
    finally:
        second.store.close()


def test_recover_keeps_the_longest_waiting_job_first(tmp_path: Path) -> None:
    first = make(tmp_path)
    [running] = first.add()
    first.clock.advance(1)
    [waiting] = first.add()  # submitted after `running`, still waiting when the daemon stops
    dispatch(first, running)
    first.store.close()
    second = make(tmp_path, FakeClock(T0 + 3600))
    try:
        second.registry.recover()
        assert second.registry.oldest_waiting_since() == waiting.queued_at == T0 + 1
    finally:
        second.store.close()


# ---- devices to avoid ----------------------------------------------------------------------------------


@pytest.mark.parametrize("end", [E.COMPLETE, E.FAIL_FATAL, E.CANCEL])
def test_avoided_devices_are_kept_across_retries_and_dropped_when_the_job_ends(
    parts: Parts, end: JobEvent
) -> None:
    registry = parts.registry
    job, other = parts.add(2)
    dispatch(parts, job, "gpu0", "cuda:0")
    registry.avoid_device(job.id, "cuda:0")
    registry.avoid_device(job.id, "cuda:0")
    assert registry.avoided_devices(job.id) == frozenset({"cuda:0"})
    registry.apply(job, E.FAIL, error="CUDA out of memory")
    parts.clock.advance(60)
    registry.release_due_retries(parts.clock())
    dispatch(parts, job, "gpu1", "cuda:1")
    registry.avoid_device(job.id, "cuda:1")
    assert registry.avoided_devices(job.id) == frozenset({"cuda:0", "cuda:1"})
    assert registry.avoided_devices(other.id) == frozenset()
    registry.apply(job, end)
    assert registry.avoided_devices(job.id) == frozenset()
    registry.avoid_device(job.id, "cuda:2")  # a late report about a finished job
    assert registry.avoided_devices(job.id) == frozenset()


def test_devices_of_an_unknown_job_are_not_recorded(parts: Parts) -> None:
    parts.registry.avoid_device(42, "cuda:0")
    assert parts.registry.avoided_devices(42) == frozenset()


# ---- select --------------------------------------------------------------------------------------------


def test_select_by_ids_raises_not_found_naming_every_missing_id(parts: Parts) -> None:
    a, b = parts.add(2)
    with pytest.raises(NotFound) as info:
        parts.registry.select([a.id, 998, b.id, 999], None, 1000)
    assert re.findall(r"\d+", info.value.message) == ["998", "999"], "the missing ids, and only those"
    assert info.value.code == "not_found"


def test_select_by_ids_keeps_their_order_and_shows_live_progress(parts: Parts) -> None:
    a, b, c = parts.add(3)
    dispatch(parts, b)
    parts.registry.set_progress(b, 40.0, 12.5)
    selected = parts.registry.select([c.id, b.id, a.id, b.id], None, 1)
    assert [j.id for j in selected] == [c.id, b.id, a.id], "in the order asked, once each, limit ignored"
    assert selected[1].progress == 40.0, "the live copy, not the stored row"
    assert [j.id for j in parts.registry.select([a.id, b.id], S.PROCESSING, 10)] == [b.id]
    assert parts.registry.select([a.id], S.COMPLETED, 10) == []


def test_select_without_ids_gives_the_newest_of_a_state(parts: Parts) -> None:
    jobs = parts.add(4)
    dispatch(parts, jobs[0])
    parts.registry.apply(jobs[0], E.COMPLETE, transcript=TRANSCRIPT)
    dispatch(parts, jobs[1])
    parts.registry.set_progress(jobs[1], 10.0, 5.0)
    registry = parts.registry
    assert [j.id for j in registry.select([], None, 2)] == [jobs[2].id, jobs[3].id]
    assert [j.id for j in registry.select([], S.PENDING, 1)] == [jobs[3].id]
    assert [j.id for j in registry.select([], S.PENDING, 10)] == [jobs[2].id, jobs[3].id]
    assert [j.progress for j in registry.select([], S.PROCESSING, 10)] == [10.0]
    assert [j.id for j in registry.select([], S.COMPLETED, 10)] == [jobs[0].id]
    assert [j.id for j in registry.select([], None, 10)] == [j.id for j in jobs]
    assert registry.select([], None, 10)[1].progress == 10.0


def test_select_gives_what_clients_see_of_each_job(parts: Parts) -> None:
    """Views straight from the store for finished jobs, from memory for live ones: the same as each job's own
    view, byte for byte on the wire."""
    jobs = parts.add(3)
    dispatch(parts, jobs[0])
    parts.registry.apply(jobs[0], E.COMPLETE, transcript=TRANSCRIPT)
    dispatch(parts, jobs[1])
    parts.registry.set_progress(jobs[1], 55.0, 20.0)
    ids = [j.id for j in jobs]
    for selected in (parts.registry.select([], None, 10), parts.registry.select(ids, None, 1)):
        assert all(isinstance(v, JobView) for v in selected)
        assert msgspec.json.encode(selected) == msgspec.json.encode([j.view() for j in jobs])
    assert parts.registry.select([], S.COMPLETED, 10)[0].state is S.COMPLETED


class NoWalk(dict[int, JobRow]):
    """The live jobs, refusing to be walked: a listing must find what it returns without visiting them all."""

    def _walked(self, *args: Any) -> Any:
        raise AssertionError("the listing walked every live job")

    __iter__ = values = items = keys = _walked


def reads(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(method, rows returned) for every read of the store from now on."""
    seen: list[tuple[str, int]] = []
    for name in ("select", "views", "newest_ids", "live_jobs", "get"):
        method = getattr(store, name)

        def spy(*args: Any, _name: str = name, _method: Any = method) -> Any:
            result = _method(*args)
            seen.append((_name, len(result) if isinstance(result, list) else 1))
            return result

        monkeypatch.setattr(store, name, spy)
    return seen


def test_a_listing_costs_what_it_returns_not_the_length_of_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make(tmp_path)
    jobs = first.add(40)
    dispatch(first, jobs[-1])
    first.registry.apply(jobs[-1], E.COMPLETE, transcript=TRANSCRIPT)
    first.store.close()
    parts = make(tmp_path)  # a restart: nothing read yet
    try:
        registry = parts.registry
        registry.recover()
        for job in jobs[:4]:
            dispatch(parts, registry.get(job.id))
        parts.registry.set_progress(registry.get(jobs[2].id), 30.0, 9.0)
        monkeypatch.setattr(registry, "_live", NoWalk(registry._live))
        seen = reads(parts.store, monkeypatch)
        assert [j.id for j in registry.select([], S.PENDING, 3)] == [j.id for j in jobs[36:39]]
        running = [(jobs[2].id, 30.0), (jobs[3].id, 0.0)]
        assert [(j.id, j.progress) for j in registry.select([], S.PROCESSING, 2)] == running, "live progress"
        assert [j.id for j in registry.select([], None, 2)] == [jobs[38].id, jobs[39].id]
        assert [j.id for j in registry.select([], S.COMPLETED, 5)] == [jobs[39].id]
        # Each listing reads the ids it returns, then the views of those never seen since the start: the
        # running jobs' come from memory (with their progress), a view read once is kept.
        assert seen == [
            ("newest_ids", 3), ("views", 3), ("newest_ids", 2), ("newest_ids", 2), ("views", 1),
            ("newest_ids", 1),
        ]  # fmt: skip
    finally:
        parts.store.close()


def test_finished_jobs_listed_again_are_not_read_again_and_deleted_ones_are_gone(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = parts.add(3)
    for job in jobs:
        dispatch(parts, job)
        parts.registry.apply(job, E.COMPLETE, transcript=TRANSCRIPT)
    first = parts.registry.select([], S.COMPLETED, 10)
    seen = reads(parts.store, monkeypatch)
    assert parts.registry.select([], S.COMPLETED, 10) == first
    assert parts.registry.select([], None, 2) == first[1:]
    assert seen == [("newest_ids", 3), ("newest_ids", 2)], "their views were kept: only their ids are read"
    parts.store._db.execute("DELETE FROM jobs WHERE id = ?", (jobs[0].id,))  # as retention does
    assert [v.id for v in parts.registry.select([], S.COMPLETED, 10)] == [jobs[1].id, jobs[2].id]
    with pytest.raises(NotFound):
        parts.registry.select([jobs[0].id], None, 10)


def test_select_by_ids_reads_the_store_once_and_only_for_jobs_not_held(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c, d = parts.add(4)
    dispatch(parts, a)
    parts.registry.apply(a, E.COMPLETE, transcript=TRANSCRIPT)
    dispatch(parts, d)
    parts.registry.set_progress(d, 40.0, 9.0)
    seen = reads(parts.store, monkeypatch)
    assert [j.progress for j in parts.registry.select([d.id], None, 1000)] == [40.0]
    assert seen == [], "running jobs come from memory, with their progress"
    ids = [b.id, a.id, d.id, c.id]
    assert [j.id for j in parts.registry.select(ids, None, 1000)] == ids
    assert seen == [("views", 1)], "one query, for the finished one (retention may have deleted it)"
    with pytest.raises(NotFound) as info:
        parts.registry.select([b.id, 998, a.id], None, 1000)
    assert re.findall(r"\d+", info.value.message) == ["998"]


# ---- counts --------------------------------------------------------------------------------------------

NEXT_EVENTS: dict[JobState, list[JobEvent]] = {
    S.PENDING: [E.DISPATCH, E.DISPATCH, E.CANCEL],
    S.PROCESSING: [E.COMPLETE, E.FAIL, E.FAIL, E.FAIL_FATAL, E.REQUEUE, E.CANCEL],
    S.RETRYING: [E.CANCEL],
}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_counts_match_the_store_through_a_random_sequence(tmp_path: Path, seed: int) -> None:
    parts = make(tmp_path)
    registry, rng = parts.registry, random.Random(seed)
    try:
        for _ in range(120):
            live = [registry.get(j.id) for j in parts.store.live_jobs()]
            roll = rng.random()
            if roll < 0.15 or not live:
                parts.add(rng.randint(1, 3))
            elif roll < 0.25:
                parts.clock.advance(rng.choice([1.0, 5.0, 20.0]))
                registry.release_due_retries(parts.clock())
            else:
                job = rng.choice(live)
                event = rng.choice(NEXT_EVENTS[job.state])
                changes = changes_for(event)
                if roll < 0.35:  # a commit the store refuses
                    parts.store.refuse = True
                    with pytest.raises(StorageFull):
                        registry.apply(job, event, **changes)
                    parts.store.refuse = False
                else:
                    registry.apply(job, event, **changes)
            assert registry.counts() == parts.store_counts()
            counts = registry.counts()
            assert registry.waiting_count() == counts["PENDING"] + counts["RETRYING"]
            stored = parts.store.live_jobs()
            assert {j.id: j for j in registry.held()} == {j.id: j for j in stored if j.state is not S.PENDING}
            assert sorted(queued(registry)) == [j.id for j in stored if j.state is S.PENDING]
            in_use = parts.store.spool_names_in_use()
            assert spool_files(parts) == in_use
        assert sum(registry.counts().values()) == len(parts.store.select([], None, 10_000))
    finally:
        parts.store.close()
