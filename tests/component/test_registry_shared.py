"""The job registry on a shared store (a real PostgreSQL): a submit's insert runs in a thread, and the loop
may dispatch the job it committed before the submit itself resumes (a wake-up from the store's own
notification). Its watchers must still see PENDING before PROCESSING, and the counts must stay right."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.inprocess import FakeClock
from tests.support.postgres import Cluster
from whisperd.errors import StorageUnavailable
from whisperd.jobs import JobState
from whisperd.pg_store import PgStore
from whisperd.protocol import JobView
from whisperd.registry import JobRegistry, RetryPolicy
from whisperd.spool import Spool
from whisperd.store import JobRow, NewJob

_names = itertools.count()
POLICY = RetryPolicy(max_retries=2, backoff_s=10.0, backoff_max_s=15.0)


class HeldInsert(PgStore):
    """The real store, whose insert (in the submit's thread) waits after its commit until let go."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.committed = threading.Event()
        self.let_go = threading.Event()

    def insert_jobs(self, *args: Any, **kwargs: Any) -> list[JobRow]:
        rows = super().insert_jobs(*args, **kwargs)
        self.committed.set()
        self.let_go.wait(30)
        return rows


@pytest.fixture
def store(postgres: Cluster) -> Iterator[HeldInsert]:
    url = postgres.create_database(f"registry_shared_{next(_names)}")
    opened = HeldInsert(url, "here", lease_s=30.0, release="test")
    opened.open()
    yield opened
    opened.close()


def new_job(tmp_path: Path) -> NewJob:
    path = tmp_path / "spooled"
    path.write_bytes(b"RIFF....")
    return NewJob(
        spool_path=str(path), spool_bytes=8, filename="a.wav", owner_uid=1000, model="tiny.en",
        language=None, task="transcribe", priority=0, word_timestamps=False,
    )  # fmt: skip


def test_a_job_dispatched_before_its_submit_resumes_is_announced_pending_first(
    store: HeldInsert, tmp_path: Path
) -> None:
    published: list[JobView] = []
    registry = JobRegistry(
        store, Spool(tmp_path / "spool"), FakeClock(), POLICY, published.append, lambda *_: None,
        shared=store, host_id="here",
    )  # fmt: skip
    registry.recover()

    async def scenario() -> list[JobRow]:
        submit = asyncio.create_task(registry.submit([new_job(tmp_path)]))
        await asyncio.to_thread(store.committed.wait, 30)
        # the loop runs on while the submit's thread has not returned: a round dispatches the new job
        [row] = store.select([], JobState.PENDING, 10)
        won = registry.dispatch([row], worker="cpu0", device="cpu")
        assert [j.id for j in won] == [row.id]
        store.let_go.set()
        return await submit

    [job] = asyncio.run(scenario())
    states = [v.state for v in published if v.id == job.id]
    assert states == [JobState.PENDING, JobState.PROCESSING], "announced once, before its dispatch"
    registry.refresh(store.count_by_state(), store.user_totals())
    assert registry.counts()["PROCESSING"] == 1 and registry.counts()["PENDING"] == 0
    assert [j.id for j in registry.held()] == [job.id]
    assert registry.get(job.id).state is JobState.PROCESSING


class FailingCommit(PgStore):
    """The real store, whose insert fails once its rows are in (as a commit cut off would)."""

    def insert_jobs(self, *args: Any, **kwargs: Any) -> list[JobRow]:
        new_jobs, now, before_commit = args

        def then_fail(rows: list[JobRow]) -> None:
            before_commit(rows)
            raise StorageUnavailable("the connection to the job database was lost")

        return super().insert_jobs(new_jobs, now, then_fail)


def test_a_submit_whose_commit_fails_announces_nothing(postgres: Cluster, tmp_path: Path) -> None:
    url = postgres.create_database(f"registry_shared_{next(_names)}")
    store = FailingCommit(url, "here", lease_s=30.0, release="test")
    store.open()
    try:
        published: list[JobView] = []
        registry = JobRegistry(
            store, Spool(tmp_path / "spool"), FakeClock(), POLICY, published.append, lambda *_: None,
            shared=store, host_id="here",
        )  # fmt: skip
        registry.recover()
        with pytest.raises(StorageUnavailable):
            asyncio.run(registry.submit([new_job(tmp_path)]))
        assert store.select([], None, 10) == [], "rolled back"
        # a notice about the id its rows had (a sequence is not rolled back): nothing of the submit is left
        # here to be announced before it
        registry.remote_change(
            JobView(
                id=1, state=JobState.CANCELLED, progress=0.0, retries=0, device=None, worker=None,
                model="tiny.en", language=None, task="transcribe", priority=0, word_timestamps=False,
                error=None, filename="a.wav", owner_uid=1000, audio_duration_s=None, created_at=0.0,
                updated_at=0.0, started_at=None, finished_at=None, host="elsewhere",
            )
        )  # fmt: skip
        assert [v.state for v in published] == [JobState.CANCELLED], "no PENDING announced for it"
        assert registry.counts()["PENDING"] == 0
    finally:
        store.close()
