"""What the daemon makes of its workers' reports, on a real registry, store and spool with a fake clock: each
workerproto message for a job dispatched to worker gpu0 on cuda:0 ends in the right transition, with its
telemetry, memory estimates and devices to avoid; reports about jobs no longer running there change nothing;
a dead worker's batch is retried (its culprit) or requeued (the rest)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from tests.support.inprocess import FakeClock
from whisperd import workerproto as wp
from whisperd.estimates import OUT_OF_MEMORY_GROWTH, MemoryEstimates, ModelBudget
from whisperd.jobs import JobEvent, JobState
from whisperd.outcomes import WorkerOutcomes
from whisperd.protocol import JobView, Segment, Transcript
from whisperd.registry import JobRegistry, RetryPolicy
from whisperd.spool import Spool
from whisperd.sqlite_store import SqliteStore
from whisperd.store import JobRow, NewJob
from whisperd.telemetry import Telemetry

S = JobState
E = JobEvent
GIB = 1024**3
T0 = 1_000_000.0
POLICY = RetryPolicy(max_retries=2, backoff_s=10.0, backoff_max_s=60.0)
WORKER, DEVICE = "gpu0", "cuda:0"


def transcript(duration_s: float = 30.0) -> Transcript:
    return Transcript(
        "en", 0.99, duration_s, "hello", [Segment(id=1, start=0.0, end=duration_s, text="hello")]
    )


@dataclass
class Parts:
    tmp_path: Path
    store: SqliteStore
    clock: FakeClock
    registry: JobRegistry
    estimates: MemoryEstimates
    telemetry: Telemetry
    outcomes: WorkerOutcomes
    published: list[JobView] = field(default_factory=list)
    wakes: list[None] = field(default_factory=list)

    def dispatched(self, count: int = 1, worker: str = WORKER, device: str = DEVICE) -> list[JobRow]:
        """Fresh jobs, dispatched to that worker."""
        jobs = self.registry.add([self._new_job() for _ in range(count)])
        self.clock.advance(1)
        for job in jobs:
            self.registry.apply(job, E.DISPATCH, device=device, worker=worker)
        self.clock.advance(10)
        return jobs

    def _new_job(self) -> NewJob:
        source = self.tmp_path / f"source-{len(list(self.tmp_path.iterdir()))}.wav"
        source.write_bytes(b"RIFF....")
        fd = os.open(source, os.O_RDONLY)
        try:
            path, size = Spool(self.tmp_path / "spool").copy_from_fd(fd, 1 << 20)
        finally:
            os.close(fd)
        return NewJob(
            spool_path=path, spool_bytes=size, filename=source.name, owner_uid=1000, model="tiny.en",
            language=None, task="transcribe", priority=0, word_timestamps=False,
        )  # fmt: skip

    def events(self, job_id: int) -> list[str]:
        return [e.event for e in self.store.history(job_id)]

    def tell(self, message: wp.JobMessage, worker: str = WORKER, device: str = DEVICE) -> None:
        self.outcomes.job_message(worker, device, message)


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    store = SqliteStore(tmp_path / "jobs.sqlite3")
    clock = FakeClock(T0)
    telemetry = Telemetry()
    published: list[JobView] = []
    wakes: list[None] = []
    registry = JobRegistry(
        store, Spool(tmp_path / "spool"), clock, POLICY, published.append, telemetry.job_transition
    )
    estimates = MemoryEstimates({"tiny.en": ModelBudget("bundled:tiny.en", GIB)})
    outcomes = WorkerOutcomes(registry, estimates, telemetry, lambda: wakes.append(None))
    yield Parts(tmp_path, store, clock, registry, estimates, telemetry, outcomes, published, wakes)
    store.close()


def assert_untouched(parts: Parts) -> None:
    assert parts.telemetry.audio_seconds_total == 0.0
    assert parts.telemetry.processing_seconds_total == 0.0
    assert parts.telemetry.out_of_memory_events == {}
    assert parts.telemetry.realtime_factor() is None
    assert parts.estimates.memory_bytes("tiny.en") == GIB


# ---- one job's reports ---------------------------------------------------------------------------------


def test_started_changes_nothing(parts: Parts) -> None:
    [job] = parts.dispatched()
    before, published = msgspec.structs.replace(job), len(parts.published)
    parts.tell(wp.Started(job_id=job.id))
    assert job == before and len(parts.published) == published
    assert parts.events(job.id) == ["submit", "dispatch"]
    assert parts.wakes == []
    assert_untouched(parts)


def test_progress_is_published_and_kept_in_memory(parts: Parts) -> None:
    [job] = parts.dispatched()
    parts.tell(wp.Progress(job_id=job.id, progress=42.5, audio_duration_s=120.0))
    assert (job.state, job.progress, job.audio_duration_s) == (S.PROCESSING, 42.5, 120.0)
    assert parts.published[-1] == job.view() and parts.published[-1].progress == 42.5
    assert parts.registry.get(job.id).progress == 42.5
    assert parts.events(job.id) == ["submit", "dispatch"], "progress is no transition"
    assert len(parts.wakes) == 1, "the job's length, first known, may let idle workers share it"
    parts.tell(wp.Progress(job_id=job.id, progress=50.0, audio_duration_s=120.0))
    assert job.progress == 50.0 and len(parts.wakes) == 1, "later progress wakes nothing"


def test_finished_completes_the_job_and_counts_its_audio(parts: Parts) -> None:
    first, second = parts.dispatched(2)
    spooled = first.spool_path
    parts.tell(wp.Finished(job_id=first.id, transcript=transcript(30.0), processing_s=10.0))
    assert (first.state, first.progress, first.audio_duration_s) == (S.COMPLETED, 100.0, 30.0)
    assert first.finished_at == parts.clock() and first.error is None and first.retries == 0
    assert parts.registry.transcript(first.id) == transcript(30.0)
    assert parts.events(first.id) == ["submit", "dispatch", "complete"]
    assert parts.registry.find_live(first.id) is None
    assert spooled is not None and not Path(spooled).exists()
    assert parts.telemetry.audio_seconds_total == 30.0
    assert parts.telemetry.processing_seconds_total == 10.0
    assert parts.telemetry.realtime_factor() == 3.0
    assert second.state is S.PROCESSING, "its batch-mate runs on"

    parts.tell(wp.Finished(job_id=second.id, transcript=transcript(10.0), processing_s=10.0))
    assert parts.telemetry.audio_seconds_total == 40.0
    assert parts.telemetry.processing_seconds_total == 20.0
    assert parts.telemetry.realtime_factor() == 2.0
    assert parts.telemetry.out_of_memory_events == {}
    assert parts.estimates.memory_bytes("tiny.en") == GIB
    assert parts.registry.counts()["COMPLETED"] == 2


def test_a_fatal_failure_fails_the_job_without_a_retry(parts: Parts) -> None:
    [job] = parts.dispatched()
    parts.tell(wp.Failed(job_id=job.id, kind="fatal", error="audio does not decode"))
    assert (job.state, job.retries) == (S.FAILED, 0)
    assert job.error and "decode" in job.error
    assert parts.events(job.id) == ["submit", "dispatch", "fail_fatal"]
    assert parts.store.history(job.id)[-1].error == job.error
    assert parts.wakes == [None]
    assert parts.registry.avoided_devices(job.id) == frozenset()
    assert_untouched(parts)


def test_a_retryable_failure_retries_the_job(parts: Parts) -> None:
    [job] = parts.dispatched()
    parts.tell(wp.Failed(job_id=job.id, kind="retryable", error="worker lost its model"))
    assert (job.state, job.retries) == (S.RETRYING, 1)
    assert job.error and job.not_before == parts.clock() + POLICY.backoff_s
    assert parts.events(job.id) == ["submit", "dispatch", "fail"]
    assert parts.registry.avoided_devices(job.id) == frozenset(), "not a memory problem: any device will do"
    assert parts.wakes == [None]
    assert_untouched(parts)


def test_out_of_memory_retries_elsewhere_and_reserves_more(parts: Parts) -> None:
    [job] = parts.dispatched()
    parts.tell(wp.Failed(job_id=job.id, kind="oom", error="CUDA out of memory"))
    assert (job.state, job.retries) == (S.RETRYING, 1)
    assert job.error and parts.store.history(job.id)[-1].error == job.error
    assert parts.events(job.id) == ["submit", "dispatch", "fail"]
    assert parts.telemetry.out_of_memory_events == {DEVICE: 1}
    assert parts.estimates.memory_bytes("tiny.en") == int(GIB * OUT_OF_MEMORY_GROWTH) == int(GIB * 1.25)
    assert parts.registry.avoided_devices(job.id) == frozenset({DEVICE})
    assert parts.wakes == [None]
    assert parts.telemetry.audio_seconds_total == 0.0

    # Its retry runs out of memory on the next GPU too.
    parts.clock.advance(60)
    parts.registry.release_due_retries(parts.clock())
    parts.registry.apply(job, E.DISPATCH, device="cuda:1", worker="gpu1")
    parts.tell(wp.Failed(job_id=job.id, kind="oom", error="CUDA out of memory"), "gpu1", "cuda:1")
    assert (job.state, job.retries) == (S.RETRYING, 2)
    assert parts.telemetry.out_of_memory_events == {DEVICE: 1, "cuda:1": 1}
    assert parts.estimates.memory_bytes("tiny.en") == int(GIB * 1.25 * 1.25)
    assert parts.registry.avoided_devices(job.id) == frozenset({DEVICE, "cuda:1"})


def test_out_of_memory_with_no_retries_left_fails_the_job_and_forgets_its_devices(parts: Parts) -> None:
    [job] = parts.dispatched()
    for _ in range(POLICY.max_retries):
        parts.tell(wp.Failed(job_id=job.id, kind="oom", error="CUDA out of memory"))
        parts.clock.advance(120)
        parts.registry.release_due_retries(parts.clock())
        parts.registry.apply(job, E.DISPATCH, device=DEVICE, worker=WORKER)
    parts.tell(wp.Failed(job_id=job.id, kind="oom", error="CUDA out of memory"))
    assert (job.state, job.retries) == (S.FAILED, POLICY.max_retries)
    assert parts.registry.avoided_devices(job.id) == frozenset()
    assert parts.telemetry.out_of_memory_events == {DEVICE: POLICY.max_retries + 1}
    assert parts.estimates.memory_bytes("tiny.en") == int(GIB * 1.25 ** (POLICY.max_retries + 1))


@pytest.mark.parametrize("reason", ["cancelled", "batch_stopped"])
def test_a_stopped_job_goes_back_to_the_queue_unharmed(parts: Parts, reason: wp.StopReason) -> None:
    [job] = parts.dispatched()
    parts.tell(wp.Progress(job_id=job.id, progress=30.0, audio_duration_s=60.0))
    woken = len(parts.wakes)
    parts.tell(wp.Stopped(job_id=job.id, reason=reason))
    assert (job.state, job.retries, job.error, job.worker, job.device) == (S.PENDING, 0, None, None, None)
    assert job.progress == 0.0 and job.queued_at == parts.clock()
    assert parts.events(job.id) == ["submit", "dispatch", "requeue"]
    assert parts.registry.avoided_devices(job.id) == frozenset()
    assert len(parts.wakes) == woken + 1
    assert_untouched(parts)


# ---- reports that come too late ------------------------------------------------------------------------

MESSAGES: list[wp.JobMessage] = [
    wp.Started(job_id=0),
    wp.Progress(job_id=0, progress=50.0, audio_duration_s=60.0),
    wp.Finished(job_id=0, transcript=transcript(), processing_s=5.0),
    wp.Failed(job_id=0, kind="fatal", error="x"),
    wp.Failed(job_id=0, kind="retryable", error="x"),
    wp.Failed(job_id=0, kind="oom", error="x"),
    wp.Stopped(job_id=0, reason="cancelled"),
    wp.Stopped(job_id=0, reason="batch_stopped"),
]
MESSAGE_IDS = ["started", "progress", "finished", "fatal", "retryable", "oom", "cancelled", "batch_stopped"]


def about(message: wp.JobMessage, job_id: int) -> wp.JobMessage:
    return msgspec.structs.replace(message, job_id=job_id)


@pytest.mark.parametrize("message", MESSAGES, ids=MESSAGE_IDS)
def test_a_report_about_a_job_running_on_another_worker_changes_nothing(
    parts: Parts, message: wp.JobMessage
) -> None:
    [job] = parts.dispatched(worker="gpu1", device="cuda:1")
    before, published = msgspec.structs.replace(job), len(parts.published)
    parts.tell(about(message, job.id))  # from gpu0: it ran the job once, before a requeue
    assert job == before and parts.registry.get(job.id) == before
    assert parts.events(job.id) == ["submit", "dispatch"]
    assert len(parts.published) == published and parts.wakes == []
    assert parts.registry.avoided_devices(job.id) == frozenset()
    assert_untouched(parts)


@pytest.mark.parametrize("message", MESSAGES, ids=MESSAGE_IDS)
def test_a_report_about_a_cancelled_job_changes_nothing(parts: Parts, message: wp.JobMessage) -> None:
    [job] = parts.dispatched()
    parts.registry.apply(job, E.CANCEL)
    before, published = msgspec.structs.replace(job), len(parts.published)
    parts.tell(about(message, job.id))
    assert job == before and parts.registry.get(job.id) == before
    assert parts.events(job.id) == ["submit", "dispatch", "cancel"]
    assert parts.registry.transcript(job.id) is None
    assert len(parts.published) == published and parts.wakes == []
    assert_untouched(parts)


@pytest.mark.parametrize("message", MESSAGES, ids=MESSAGE_IDS)
def test_a_report_about_a_waiting_or_unknown_job_changes_nothing(
    parts: Parts, message: wp.JobMessage
) -> None:
    [job] = parts.dispatched()
    parts.registry.apply(job, E.REQUEUE)  # e.g. the daemon killed its worker; now waiting again
    before = msgspec.structs.replace(job)
    parts.tell(about(message, job.id))
    parts.tell(about(message, 9999))
    assert job == before and parts.events(job.id) == ["submit", "dispatch", "requeue"]
    assert parts.wakes == []
    assert_untouched(parts)


# ---- a worker's death ----------------------------------------------------------------------------------


def test_batch_interrupted_retries_the_culprit_and_requeues_the_rest(parts: Parts) -> None:
    first, culprit, last = parts.dispatched(3)
    [elsewhere] = parts.dispatched(worker="gpu1", device="cuda:1")
    parts.outcomes.batch_interrupted(
        WORKER, [first.id, culprit.id, last.id, elsewhere.id], culprit.id, "worker gpu0 died (exit status -9)"
    )
    assert (culprit.state, culprit.retries) == (S.RETRYING, 1)
    assert culprit.error and parts.store.history(culprit.id)[-1].error == culprit.error
    assert parts.events(culprit.id) == ["submit", "dispatch", "fail"]
    for job in (first, last):
        assert (job.state, job.retries, job.error) == (S.PENDING, 0, None)
        assert parts.events(job.id) == ["submit", "dispatch", "requeue"]
    assert elsewhere.state is S.PROCESSING and elsewhere.worker == "gpu1", "not that worker's job"
    assert parts.wakes == [None]
    assert parts.registry.counts() == {**{s.value: 0 for s in JobState},
                                       "PENDING": 2, "RETRYING": 1, "PROCESSING": 1}  # fmt: skip
    assert_untouched(parts)


def test_batch_interrupted_without_a_culprit_requeues_everything(parts: Parts) -> None:
    jobs = parts.dispatched(3)
    parts.outcomes.batch_interrupted(WORKER, [j.id for j in jobs], None, "worker gpu0 died (exit status -9)")
    assert [(j.state, j.retries, j.error) for j in jobs] == [(S.PENDING, 0, None)] * 3
    assert all(parts.events(j.id)[-1] == "requeue" for j in jobs)
    assert parts.wakes == [None]


def test_suspects_of_a_batch_decoded_together_are_requeued_uncounted_to_run_alone(parts: Parts) -> None:
    jobs = parts.dispatched(3)
    ids = [j.id for j in jobs]
    parts.outcomes.batch_interrupted(WORKER, ids, None, "worker gpu0 died (exit status -9)", suspects=ids[1:])
    assert [(j.state, j.retries) for j in jobs] == [(S.PENDING, 0)] * 3
    lanes = parts.registry.waiting(10, {"tiny.en"}).lanes
    assert {j.id: j.alone for lane in lanes for j in lane.jobs} == {ids[0]: False, ids[1]: True, ids[2]: True}
    parts.registry.apply(parts.registry.get(ids[1]), E.CANCEL)
    lanes = parts.registry.waiting(10, {"tiny.en"}).lanes
    assert {j.id: j.alone for lane in lanes for j in lane.jobs} == {ids[0]: False, ids[2]: True}


def test_batch_interrupted_skips_jobs_that_already_ended_or_left(parts: Parts) -> None:
    done, cancelled, requeued, culprit = parts.dispatched(4)
    parts.tell(wp.Finished(job_id=done.id, transcript=transcript(), processing_s=1.0))
    parts.registry.apply(cancelled, E.CANCEL)
    parts.registry.apply(requeued, E.REQUEUE)
    parts.outcomes.batch_interrupted(
        WORKER, [done.id, cancelled.id, requeued.id, culprit.id, 9999], culprit.id, "worker gpu0 died"
    )
    assert [j.state for j in (done, cancelled, requeued, culprit)] == [
        S.COMPLETED, S.CANCELLED, S.PENDING, S.RETRYING,
    ]  # fmt: skip
    assert parts.events(done.id)[-1] == "complete"
    assert parts.events(cancelled.id)[-1] == "cancel"
    assert parts.events(requeued.id) == ["submit", "dispatch", "requeue"]
    assert culprit.retries == 1


def test_a_culprit_with_no_retries_left_fails(parts: Parts) -> None:
    [job] = parts.dispatched()
    for _ in range(POLICY.max_retries):
        parts.outcomes.batch_interrupted(WORKER, [job.id], job.id, "worker gpu0 died")
        assert job.state is S.RETRYING
        parts.clock.advance(120)
        parts.registry.release_due_retries(parts.clock())
        parts.registry.apply(job, E.DISPATCH, device=DEVICE, worker=WORKER)
    parts.outcomes.batch_interrupted(WORKER, [job.id], job.id, "worker gpu0 died")
    assert (job.state, job.retries) == (S.FAILED, POLICY.max_retries)
    assert job.error is not None
