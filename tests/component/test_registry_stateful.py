"""The job registry and its state machine under random sequences of submits, dispatches, results, failures,
requeues, cancels, elapsing backoffs, refused commits, illegal events and restarts (Hypothesis, stateful),
on a real SQLite store and a real spool. After every step: every acknowledged job is live or terminal as an
independent model of the lifecycle says, memory and store agree, no job was ever dispatched twice at once,
retries never exceed the limit, and a terminal job has no audio left and stays terminal."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import msgspec
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.support.inprocess import FakeClock
from whisperd.errors import IllegalTransition, StorageFull
from whisperd.jobs import TERMINAL_STATES, JobEvent, JobState
from whisperd.protocol import JobView, Segment, Transcript
from whisperd.registry import JobRegistry, RetryPolicy
from whisperd.spool import Spool
from whisperd.sqlite_store import SqliteStore
from whisperd.store import JobRow, NewJob

S = JobState
E = JobEvent
POLICY = RetryPolicy(max_retries=2, backoff_s=10.0, backoff_max_s=15.0)
TRANSCRIPT = Transcript("en", 0.99, 3.0, "hello", [Segment(id=1, start=0.0, end=3.0, text="hello")])
LIVE = (S.PENDING, S.PROCESSING, S.RETRYING)
RUN_ENDS = {E.COMPLETE, E.FAIL, E.FAIL_FATAL, E.REQUEUE, E.CANCEL}
# Where each state may go (the model's own table, not the code's): anything else must raise.
LEGAL: dict[JobState, set[JobEvent]] = {
    S.PENDING: {E.DISPATCH, E.CANCEL},
    S.PROCESSING: {E.COMPLETE, E.FAIL, E.FAIL_FATAL, E.REQUEUE, E.CANCEL},
    S.RETRYING: {E.BACKOFF_ELAPSED, E.CANCEL},
}
# tmpfs where there is one: the store fsyncs every commit, which a disk makes the slowest part by far
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


class RefusingStore(SqliteStore):
    """The real store, refusing every transition while `refuse` is set (as a full disk would)."""

    refuse = False

    def _check(self) -> None:
        if self.refuse:
            raise StorageFull("the job store is full")

    def save_transition(self, *args: Any, **kwargs: Any) -> None:
        self._check()
        super().save_transition(*args, **kwargs)

    def save_transitions(self, *args: Any, **kwargs: Any) -> None:
        self._check()
        super().save_transitions(*args, **kwargs)


@dataclass
class Expected:
    """What the model says a job must be."""

    state: JobState
    retries: int = 0
    not_before: float | None = None


def changes_for(event: JobEvent, worker: str = "cpu0") -> dict[str, Any]:
    if event is E.DISPATCH:
        return {"worker": worker, "device": "cpu"}
    if event in (E.FAIL, E.FAIL_FATAL):
        return {"error": "it broke"}
    return {}


class RegistryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="registry-stateful-", dir=SCRATCH))
        self.clock = FakeClock()
        self.published: dict[int, JobState] = {}  # the last state watchers were shown, by job
        self.expected: dict[int, Expected] = {}  # every acknowledged job
        self.restarts = 0
        self.sources = itertools.count()
        self._open()

    def _open(self) -> None:
        self.store = RefusingStore(self.dir / "jobs.sqlite3")
        self.spool = Spool(self.dir / "spool")
        self.registry = JobRegistry(
            self.store, self.spool, self.clock, POLICY, self._publish, lambda job, old, event: None
        )

    def _publish(self, view: JobView) -> None:
        self.published[view.id] = view.state

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- helpers -----------------------------------------------------------------------------------------

    def _ids(self, *states: JobState) -> list[int]:
        return sorted(i for i, e in self.expected.items() if e.state in states)

    def _pick(self, data: st.DataObject, *states: JobState) -> JobRow:
        job_id = data.draw(st.sampled_from(self._ids(*states)), label="job")
        return self.registry.find_live(job_id) or self.registry.get(job_id)

    def _new_job(self) -> NewJob:
        source = self.dir / f"source-{next(self.sources)}.wav"
        source.write_bytes(b"RIFF" + os.urandom(16))
        fd = os.open(source, os.O_RDONLY)
        try:
            path, size = self.spool.copy_from_fd(fd, 1 << 20)
        finally:
            os.close(fd)
            source.unlink()
        return NewJob(
            spool_path=path, spool_bytes=size, filename=source.name, owner_uid=1000, model="tiny.en",
            language=None, task="transcribe", priority=0, word_timestamps=False,
        )  # fmt: skip

    def _apply(self, job: JobRow, event: JobEvent, worker: str = "cpu0") -> None:
        """Take the event through the registry and the same step through the model."""
        expected = self.expected[job.id]
        transcript = TRANSCRIPT if event is E.COMPLETE else None
        self.registry.apply(job, event, transcript=transcript, **changes_for(event, worker))
        now = self.clock()
        if event is E.FAIL and expected.retries < POLICY.max_retries:
            expected.retries += 1
            delay_s = min(POLICY.backoff_max_s, POLICY.backoff_s * 2 ** (expected.retries - 1))
            expected.state, expected.not_before = S.RETRYING, now + delay_s
        else:
            if event is E.FAIL:
                event_seen("retries exhausted")
            expected.state = {
                E.DISPATCH: S.PROCESSING, E.COMPLETE: S.COMPLETED, E.FAIL: S.FAILED, E.FAIL_FATAL: S.FAILED,
                E.REQUEUE: S.PENDING, E.CANCEL: S.CANCELLED, E.BACKOFF_ELAPSED: S.PENDING,
            }[event]  # fmt: skip
            expected.not_before = None

    # ---- rules -------------------------------------------------------------------------------------------

    @initialize(count=st.integers(1, 6))
    def first_submit(self, count: int) -> None:
        self.submit(count)

    @rule(count=st.integers(1, 3))
    def submit(self, count: int) -> None:
        jobs = self.registry.add([self._new_job() for _ in range(count)])
        assert len(jobs) == count
        for job in jobs:
            assert job.id not in self.expected, "an id is never given twice"
            self.expected[job.id] = Expected(S.PENDING)

    @precondition(lambda self: self._ids(S.PENDING))
    @rule(data=st.data(), worker=st.sampled_from(["cpu0", "cpu1", "gpu0"]))
    def dispatch(self, data: st.DataObject, worker: str) -> None:
        self._apply(self._pick(data, S.PENDING), E.DISPATCH, worker)

    @precondition(lambda self: self._ids(S.PROCESSING))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        job = self._pick(data, S.PROCESSING)
        self._apply(job, E.COMPLETE)
        assert self.registry.transcript(job.id) == TRANSCRIPT

    @precondition(lambda self: self._ids(S.PROCESSING))
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        self._apply(self._pick(data, S.PROCESSING), E.FAIL)

    @precondition(lambda self: self._ids(S.PROCESSING))
    @rule(data=st.data())
    def fail_fatal(self, data: st.DataObject) -> None:
        self._apply(self._pick(data, S.PROCESSING), E.FAIL_FATAL)

    @precondition(lambda self: self._ids(S.PROCESSING))
    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        self._apply(self._pick(data, S.PROCESSING), E.REQUEUE)

    @precondition(lambda self: self._ids(*LIVE))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        self._apply(self._pick(data, *LIVE), E.CANCEL)

    @precondition(lambda self: self._ids(S.PENDING))
    @rule(data=st.data(), runs=st.integers(1, POLICY.max_retries + 2))
    def fails_run_after_run(self, data: st.DataObject, runs: int) -> None:
        """A job whose worker dies on it every time: it ends FAILED after its retries, and never loops."""
        job = self._pick(data, S.PENDING)
        for _ in range(runs):
            self._apply(job, E.DISPATCH)
            self._apply(job, E.FAIL)
            if self.expected[job.id].state is not S.RETRYING:
                assert self.expected[job.id].retries == POLICY.max_retries
                break
            self.backoff_elapses(POLICY.backoff_max_s)

    @rule(seconds=st.sampled_from([0.5, 5.0, 10.0, 15.0, 30.0]))
    def backoff_elapses(self, seconds: float) -> None:
        self.clock.advance(seconds)
        now = self.clock()
        self.registry.release_due_retries(now)
        for expected in self.expected.values():
            due = expected.not_before is not None and expected.not_before <= now
            if expected.state is S.RETRYING and due:
                expected.state, expected.not_before = S.PENDING, None
                event_seen("a backoff elapsed")

    @rule()
    def restart(self) -> None:
        """The daemon stops (however abruptly: every commit is already on disk) and starts again."""
        self.store.close()
        self.clock.advance(1.0)
        self._open()
        interrupted = self._ids(S.PROCESSING)
        assert self.registry.recover() == len(interrupted)
        for job_id in interrupted:
            self.expected[job_id].state = S.PENDING
        if interrupted:
            event_seen("a restart requeued running jobs")
        self.restarts += 1

    @precondition(lambda self: self._ids(*LIVE))
    @rule(data=st.data())
    def refused_commit(self, data: st.DataObject) -> None:
        """A legal event whose commit the store refuses: nothing changes, in memory or in the store."""
        job = self._pick(data, *LIVE)
        event = data.draw(st.sampled_from(sorted(LEGAL[job.state] - {E.BACKOFF_ELAPSED})), label="event")
        before = self.store.history(job.id)
        self.store.refuse = True
        try:
            with pytest.raises(StorageFull):
                self.registry.apply(job, event, **changes_for(event))
        finally:
            self.store.refuse = False
        assert self.store.history(job.id) == before

    @precondition(lambda self: self._ids(S.PROCESSING))
    @rule(data=st.data(), worker=st.sampled_from(["cpu0", "cpu1", "gpu0"]))
    def dispatch_again(self, data: st.DataObject, worker: str) -> None:
        """A running job is never handed to a second worker (nor again to its own)."""
        self._illegal(self._pick(data, S.PROCESSING), E.DISPATCH, worker)

    @precondition(lambda self: self._ids(*TERMINAL_STATES))
    @rule(data=st.data(), event=st.sampled_from(list(JobEvent)))
    def event_for_a_finished_job(self, data: st.DataObject, event: JobEvent) -> None:
        """A finished job stays as it finished, whatever arrives late (a result, a failure, a cancel)."""
        self._illegal(self._pick(data, *TERMINAL_STATES), event)

    @precondition(lambda self: self._ids(*LIVE))
    @rule(data=st.data(), event=st.sampled_from(list(JobEvent)))
    def illegal_event(self, data: st.DataObject, event: JobEvent) -> None:
        """Any other event the lifecycle does not allow raises and changes nothing."""
        job = self._pick(data, *LIVE)
        if event not in LEGAL[job.state]:
            self._illegal(job, event)

    def _illegal(self, job: JobRow, event: JobEvent, worker: str = "cpu0") -> None:
        before, history = msgspec.structs.replace(job), self.store.history(job.id)
        with pytest.raises(IllegalTransition):
            self.registry.apply(job, event, **changes_for(event, worker))
        assert job == before and self.store.history(job.id) == history

    # ---- invariants --------------------------------------------------------------------------------------

    @invariant()
    def every_acknowledged_job_is_live_or_terminal_as_expected(self) -> None:
        stored_live = {j.id: j for j in self.store.live_jobs()}
        held = {j.id: j for j in self.registry.held()}
        assert held == {i: j for i, j in stored_live.items() if j.state is not S.PENDING}, "memory = store"
        lanes = self.registry.waiting(1_000_000, {"tiny.en"}).lanes
        queued = sorted(j.id for lane in lanes for j in lane.jobs)
        assert queued == sorted(i for i, j in stored_live.items() if j.state is S.PENDING), "lanes = store"
        live = stored_live
        for job_id, expected in self.expected.items():
            stored = self.store.get(job_id)
            assert stored is not None, f"job {job_id} was acknowledged and is gone"
            assert (stored.state, stored.retries) == (expected.state, expected.retries), job_id
            assert self.published[job_id] is expected.state, "watchers were shown where it is"
            if expected.state in TERMINAL_STATES:
                assert job_id not in live
            else:
                assert live[job_id].state is expected.state
            if expected.state is S.RETRYING:
                assert stored.not_before == expected.not_before
        assert sorted(stored_live) == self._ids(*LIVE)

    @invariant()
    def counts_are_the_stores(self) -> None:
        stored = self.store.count_by_state()
        counts = self.registry.counts()
        assert counts == {s.value: stored.get(s, 0) for s in JobState}
        assert self.registry.waiting_count() == counts["PENDING"] + counts["RETRYING"]

    @invariant()
    def retries_never_exceed_the_limit(self) -> None:
        for job in self.store.select([], None, 10_000):
            assert 0 <= job.retries <= POLICY.max_retries, job

    @invariant()
    def only_live_jobs_keep_audio(self) -> None:
        live_paths = {j.spool_path for j in self.store.live_jobs()}
        assert None not in live_paths, "a live job keeps its audio"
        assert {p.name for p in self.spool.directory.iterdir()} == {Path(str(p)).name for p in live_paths}
        for job_id in self._ids(*TERMINAL_STATES):
            stored = self.store.get(job_id)
            assert stored is not None and stored.spool_path is None

    @invariant()
    def never_dispatched_twice_at_once(self) -> None:
        for job_id in self.expected:
            history = self.store.history(job_id)
            assert not twice_at_once([None if e.event == "submit" else E(e.event) for e in history]), history


def event_seen(what: str) -> None:
    """Counted in Hypothesis's statistics (--hypothesis-show-statistics): which paths the examples reach."""
    hypothesis.event(what)


def twice_at_once(events: Sequence[JobEvent | None]) -> bool:
    """A dispatch while the last one has not ended (complete, fail, fail_fatal, requeue or cancel)."""
    running = False
    for event in events:
        if event is E.DISPATCH:
            if running:
                return True
            running = True
        elif event in RUN_ENDS:
            running = False
    return False


def test_twice_at_once_is_caught() -> None:
    assert twice_at_once([None, E.DISPATCH, E.DISPATCH])
    assert twice_at_once([None, E.DISPATCH, E.BACKOFF_ELAPSED, E.DISPATCH])
    assert not twice_at_once([None, E.DISPATCH, E.REQUEUE, E.DISPATCH, E.FAIL, E.BACKOFF_ELAPSED, E.DISPATCH])


RegistryMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=40, deadline=None)
TestRegistryStateMachine = RegistryMachine.TestCase
