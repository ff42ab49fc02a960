"""Group commit (whisperd/durability.py) in the daemon built in-process: a submit is answered only once a
flush (the spool directory, then the store's WAL) has made its jobs durable; concurrent submits share
flushes; a flush that fails answers its submitters with a storage error; and the WAL stays short while
commits never pause (the checkpoints in their thread, and the brief restart on the loop)."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from tests.support.inprocess import FakeClock, build, run_started, submit, until
from whisperd import protocol as p
from whisperd.app import App
from whisperd.config import Config, DaemonConfig, StorageConfig, WorkersConfig
from whisperd.durability import Checkpoints, GroupCommit
from whisperd.errors import StorageError
from whisperd.handlers import Caller
from whisperd.jobs import JobEvent
from whisperd.sqlite_store import SqliteStore
from whisperd.sqlite_wal import Checkpointer, wal_path
from whisperd.threads import DaemonThreadPool

USER = Caller(pid=1, uid=os.geteuid(), gid=os.getegid())


class HeldStore(SqliteStore):
    """A store whose sync() counts its calls, can be held until released, and can fail on demand."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.syncs = 0
        self.released = threading.Event()
        self.released.set()
        self.failure: OSError | None = None

    def sync(self) -> None:
        self.syncs += 1
        self.released.wait(30)
        if self.failure is not None:
            raise self.failure
        super().sync()


def config() -> Config:
    return Config(
        daemon=DaemonConfig(max_spools_per_user=16),  # eight submits of one user at once
        workers=WorkersConfig(cpu_workers=0),
        storage=StorageConfig(min_free_bytes=0),
    )


def daemon(tmp_path: Path) -> tuple[App, HeldStore]:
    store = HeldStore(tmp_path / "jobs.sqlite3")
    return build(tmp_path, config(), clock=FakeClock(), store=store), store


async def submit_fd(app: App, tmp_path: Path, name: str) -> p.Reply:
    """A submit as a client makes it, with the audio passed as a descriptor."""
    source = tmp_path / name
    source.write_bytes(b"segments=1")
    fd = os.open(source, os.O_RDONLY)
    try:
        return await app.handlers.submit(p.Submit(files=[p.SubmitFile(name=name, fd_index=0)]), USER, [fd])
    finally:
        os.close(fd)


def test_a_submit_is_not_answered_before_its_flush_has_completed(tmp_path: Path) -> None:
    app, store = daemon(tmp_path)

    async def body() -> None:
        store.released.clear()
        reply = asyncio.create_task(submit_fd(app, tmp_path, "a.wav"))
        await until(lambda: store.syncs == 1 and app.registry.waiting_count() == 1)  # committed, flushing
        await asyncio.sleep(0.2)
        assert not reply.done(), "answered before its jobs were durable"
        store.released.set()
        jobs = await asyncio.wait_for(reply, 10)
        assert isinstance(jobs, p.Jobs) and len(jobs.jobs) == 1
        assert app.durability.flushes == 1

    run_started(app, body)


def test_concurrent_submits_share_flushes(tmp_path: Path) -> None:
    app, store = daemon(tmp_path)

    async def body() -> None:
        store.released.clear()  # the first flush is held while the others arrive
        first = asyncio.create_task(submit_fd(app, tmp_path, "first.wav"))
        await until(lambda: store.syncs == 1)
        others = [asyncio.create_task(submit_fd(app, tmp_path, f"other{i}.wav")) for i in range(7)]
        await until(lambda: app.registry.waiting_count() == 8)  # all committed, all waiting for a flush
        store.released.set()
        replies = await asyncio.wait_for(asyncio.gather(first, *others), 10)
        assert all(isinstance(r, p.Jobs) for r in replies)
        assert store.syncs == 2 and app.durability.flushes == 2, "eight submits, two flushes"

    run_started(app, body)


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (OSError(errno.EIO, "Input/output error"), "storage_error"),
        (OSError(errno.ENOSPC, "full"), "storage_full"),
    ],
)
def test_a_failing_flush_answers_its_submitters_with_a_storage_error_and_later_ones_go_through(
    tmp_path: Path, failure: OSError, code: str
) -> None:
    app, store = daemon(tmp_path)

    async def body() -> None:
        store.failure = failure
        store.released.clear()
        first = asyncio.create_task(submit_fd(app, tmp_path, "first.wav"))
        await until(lambda: store.syncs == 1)
        second = asyncio.create_task(submit_fd(app, tmp_path, "second.wav"))
        await until(lambda: app.registry.waiting_count() == 2)
        store.released.set()  # the first flush fails; the second, which covers the second submit, too
        for task in (first, second):
            with pytest.raises(StorageError) as refused:
                await asyncio.wait_for(task, 10)
            assert refused.value.code == code
        # committed but not acknowledged: they stay queued (docs/architecture.md)
        assert app.registry.waiting_count() == 2

        store.failure = None  # the disk answers again
        reply = await submit_fd(app, tmp_path, "third.wav")
        assert isinstance(reply, p.Jobs) and len(reply.jobs) == 1
        assert app.durability.failures == 2

    run_started(app, body)


def test_a_finished_job_s_audio_is_removed_only_after_its_end_is_durable(tmp_path: Path) -> None:
    app, store = daemon(tmp_path)

    async def body() -> None:
        [job] = submit(app, tmp_path, "segments=1")
        assert job.spool_path is not None
        spooled = Path(job.spool_path)
        store.released.clear()
        reply = await app.handlers.cancel(p.Cancel(ids=[job.id]), USER, [])
        assert isinstance(reply, p.Jobs) and reply.jobs[0].state.terminal
        await until(lambda: store.syncs == 1)  # the cancel asked for a flush, held
        assert spooled.exists(), "the audio of a job whose end is not durable yet is still needed"
        store.released.set()
        await until(lambda: not spooled.exists())

    run_started(app, body)


class _Gate:
    """A flush step that waits for release, and counts."""

    def __init__(self) -> None:
        self.calls = 0
        self.open = threading.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.open.wait(30)


def test_flushes_run_the_spool_directory_before_the_store_and_only_one_at_a_time() -> None:
    order: list[str] = []
    gate = _Gate()

    def spool() -> None:
        order.append("spool")
        gate()

    barrier = GroupCommit(
        spool, lambda: order.append("store"), lambda path: None, DaemonThreadPool(1, "flush")
    )

    async def main() -> None:
        first = asyncio.create_task(barrier.durable())
        await until(lambda: gate.calls == 1)
        rest = [asyncio.create_task(barrier.durable()) for _ in range(20)]
        barrier.request()
        await asyncio.sleep(0.05)
        assert gate.calls == 1 and not any(t.done() for t in (first, *rest))
        gate.open.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), 10)

    asyncio.run(main())
    assert order == ["spool", "store", "spool", "store"] and barrier.flushes == 2


def test_a_flush_only_requested_that_fails_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise OSError(errno.EIO, "Input/output error")

    barrier = GroupCommit(broken, lambda: None, lambda path: None, DaemonThreadPool(1, "flush"))

    async def main() -> None:
        barrier.request()
        await until(lambda: barrier.flushes == 1)
        with pytest.raises(StorageError):
            await barrier.durable()

    asyncio.run(main())
    assert barrier.failures == 2
    assert "Traceback" not in caplog.text and "never retrieved" not in caplog.text


# ---- the WAL ---------------------------------------------------------------------------------------------


def test_the_wal_starts_over_while_commits_never_pause(tmp_path: Path) -> None:
    """A PASSIVE checkpoint in a thread lets the WAL start over only if no commit came while it ran: with
    commits one after another it never does, and the WAL grows with every commit. The restart on the loop
    after a checkpoint that left it past its limit makes it start over (truncated back to the limit) again
    and again."""
    limit_bytes = 256 * 1024
    store = SqliteStore(tmp_path / "jobs.sqlite3")
    store._checkpointer.limit_bytes = limit_bytes  # below CHECKPOINT_MIN_BYTES: past the limit is enough
    app = build(tmp_path, config(), clock=FakeClock(), store=store)
    checkpoints = Checkpoints(store.checkpoint, store.restart_log, DaemonThreadPool(1, "checkpoint"), 0.01)
    sizes: list[int] = []

    async def body() -> None:
        [job] = submit(app, tmp_path, "segments=1")
        task = asyncio.create_task(checkpoints.run())
        try:
            for _ in range(3000):  # commits one after another, as fast as the loop makes them
                store.save_transition(job, job.state, JobEvent.DISPATCH)  # a row and a history row
                sizes.append(wal_path(store.path).stat().st_size)
                await asyncio.sleep(0)
        finally:
            task.cancel()

    run_started(app, body, timeout_s=120)
    started_over = sum(1 for before, after in itertools.pairwise(sizes) if after < before)
    assert checkpoints.checkpoints > 0 and checkpoints.restarts > 0
    assert started_over >= 2, f"the WAL never started over: it grew to {max(sizes)} bytes"


def test_a_checkpoint_waits_until_the_wal_holds_enough_then_copies_all_of_it(tmp_path: Path) -> None:
    path = tmp_path / "any.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t (x BLOB)")
    checkpointer = Checkpointer(path, min_bytes=256 * 1024)
    try:
        db.execute("INSERT INTO t VALUES (zeroblob(1000))")
        few = checkpointer.pending_bytes()
        assert 0 < few < 256 * 1024
        assert checkpointer.run() is False and checkpointer.pending_bytes() == few, "too little to copy yet"
        for _ in range(100):
            db.execute("INSERT INTO t VALUES (zeroblob(4000))")  # a page and more each
        assert checkpointer.pending_bytes() >= 256 * 1024
        assert checkpointer.run() is False  # below the limit after it
        assert checkpointer.pending_bytes() == 0, "all of it copied"
        assert checkpointer.run() is False, "nothing to copy: the next commit starts the WAL over"

        checkpointer.min_bytes, checkpointer.limit_bytes = 1 << 40, 1024  # little to copy, but past the limit
        db.execute("INSERT INTO t VALUES (zeroblob(4000))")
        assert 0 < checkpointer.pending_bytes() < 256 * 1024
        assert checkpointer.run() is True, "past its limit: only a restart on the writing connection helps"
        assert checkpointer.pending_bytes() == 0
    finally:
        checkpointer.close()
        db.close()
