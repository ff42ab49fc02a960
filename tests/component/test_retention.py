"""Retention on a real SQLite file: old finished jobs are deleted with their history and transcripts, in
small transactions on a connection of the pruner's own, the count cap holds, live jobs are never deleted,
and the registry's counts follow the store."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.inprocess import FakeClock
from whisperd.config import RetentionConfig
from whisperd.jobs import JobEvent, JobState
from whisperd.protocol import Segment, Transcript
from whisperd.registry import JobRegistry, RetryPolicy
from whisperd.retention import Retention, SqlitePruner
from whisperd.spool import Spool
from whisperd.sqlite_store import SqliteStore
from whisperd.store import JobRow, NewJob

S, E = JobState, JobEvent
DAY = 86_400.0
T0 = 1_000_000_000.0
TRANSCRIPT = Transcript("en", 0.9, 1.0, "hello", [Segment(id=1, start=0.0, end=1.0, text="hello")])


class Parts:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.store = SqliteStore(tmp_path / "jobs.sqlite3")
        self.spool = Spool(tmp_path / "spool")
        self.clock = FakeClock(T0)
        policy = RetryPolicy(max_retries=3, backoff_s=1.0, backoff_max_s=1.0)
        self.registry = JobRegistry(
            self.store, self.spool, self.clock, policy, lambda v: None, lambda *a: None
        )

    def add(self, count: int) -> list[JobRow]:
        new_jobs = []
        for _ in range(count):
            source = self.tmp_path / f"audio-{len(list(self.tmp_path.iterdir()))}"
            source.write_bytes(b"audio")
            fd = os.open(source, os.O_RDONLY)
            try:
                path, size = self.spool.copy_from_fd(fd, 1 << 20)
            finally:
                os.close(fd)
            new_jobs.append(
                NewJob(spool_path=path, spool_bytes=size, filename=source.name, owner_uid=1000,
                       model="tiny.en", language=None, task="transcribe", priority=0, word_timestamps=False)
            )  # fmt: skip
        return self.registry.add(new_jobs)

    def finish(self, jobs: list[JobRow], end: JobEvent = E.COMPLETE) -> None:
        for job in jobs:
            if end is not E.CANCEL:
                self.registry.apply(job, E.DISPATCH, worker="cpu0", device="cpu")
            transcript = TRANSCRIPT if end is E.COMPLETE else None
            self.registry.apply(job, end, transcript=transcript, error="x" if end is E.FAIL_FATAL else None)

    def stored_ids(self) -> set[int]:
        return {j.id for j in self.store.select([], None, 1_000_000)}

    def event_job_ids(self) -> set[int]:
        return {row[0] for row in self.store._db.execute("SELECT job_id FROM job_events").fetchall()}

    def store_counts(self) -> dict[str, int]:
        stored = self.store.count_by_state()
        return {s.value: stored.get(s, 0) for s in JobState}


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    made = Parts(tmp_path)
    yield made
    made.store.close()


def test_old_finished_jobs_go_with_their_history_and_live_ones_stay(parts: Parts) -> None:
    old_live = parts.add(3)  # submitted long ago, still live: never deleted, however old
    parts.registry.apply(old_live[1], E.DISPATCH, worker="cpu0", device="cpu")
    parts.registry.apply(old_live[2], E.DISPATCH, worker="cpu0", device="cpu")
    parts.registry.apply(old_live[2], E.FAIL, error="boom")  # RETRYING
    old_done, old_failed, old_cancelled = parts.add(20), parts.add(3), parts.add(2)
    parts.finish(old_done)
    parts.finish(old_failed, E.FAIL_FATAL)
    parts.finish(old_cancelled, E.CANCEL)
    parts.clock.advance(20 * DAY)
    recent = parts.add(4)
    parts.finish(recent)
    parts.clock.advance(15 * DAY)  # the first ones finished 35 days ago, the recent ones 15

    pruner = SqlitePruner(parts.store.path, batch_jobs=7)  # several transactions
    result = pruner.prune(parts.clock(), max_age_s=30 * DAY, max_finished_jobs=0)

    assert result.error is None
    assert result.removed == {S.COMPLETED: 20, S.FAILED: 3, S.CANCELLED: 2}
    kept = {j.id for j in old_live + recent}
    assert parts.stored_ids() == kept
    assert parts.event_job_ids() == kept, "history goes with its job"
    assert [s.state for s in parts.store.select([j.id for j in old_live], None, 3)] == [
        S.PENDING, S.PROCESSING, S.RETRYING
    ]  # fmt: skip
    assert all(parts.store.transcript(j.id) == TRANSCRIPT for j in recent)
    assert parts.store.history(recent[0].id)[-1].event == "complete"

    parts.registry.forget_finished(result.removed)
    assert parts.registry.counts() == parts.store_counts()
    assert pruner.prune(parts.clock(), 30 * DAY, 0).removed == {}, "nothing more to do"


def test_the_count_cap_keeps_the_newest_finished_jobs(parts: Parts) -> None:
    live = parts.add(5)
    finished = []
    for _ in range(25):
        [job] = parts.add(1)
        parts.finish([job], E.COMPLETE if job.id % 3 else E.CANCEL)
        finished.append(job)
        parts.clock.advance(60)

    result = SqlitePruner(parts.store.path, batch_jobs=4).prune(parts.clock(), 30 * DAY, max_finished_jobs=10)

    assert sum(result.removed.values()) == 15
    assert parts.stored_ids() == {j.id for j in live + finished[-10:]}
    assert parts.event_job_ids() == parts.stored_ids()
    parts.registry.forget_finished(result.removed)
    assert parts.registry.counts() == parts.store_counts()


def test_the_background_task_prunes_off_the_loop_and_the_counts_follow(parts: Parts) -> None:
    old = parts.add(6)
    parts.finish(old)
    parts.clock.advance(40 * DAY)
    parts.add(2)
    settings = RetentionConfig(max_age_s=30 * DAY, max_finished_jobs=0, prune_interval_s=3600)
    retention = Retention(SqlitePruner(parts.store.path), lambda: settings, parts.registry.forget_finished,
                          parts.clock)  # fmt: skip

    async def main() -> None:
        task = asyncio.create_task(retention.run())
        try:
            await asyncio.wait_for(_until(lambda: parts.registry.counts()["COMPLETED"] == 0), 10)
        finally:
            task.cancel()

    asyncio.run(main())
    assert parts.registry.counts() == parts.store_counts() == {**{s.value: 0 for s in S}, "PENDING": 2}
    # The daemon's own connection still writes, and the new jobs still complete.
    parts.finish([parts.registry.get(j.id) for j in parts.store.live_jobs()])
    assert parts.registry.counts() == parts.store_counts()


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def test_both_bounds_off_keep_everything(parts: Parts) -> None:
    done = parts.add(3)
    parts.finish(done)
    parts.clock.advance(1000 * DAY)
    assert SqlitePruner(parts.store.path).prune(parts.clock(), 0, 0).removed == {}
    assert parts.stored_ids() == {j.id for j in done}
