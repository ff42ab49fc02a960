"""Sharing the daemon between users: the per-user limits and the priority rule at submit (Handlers on a real
registry, store and spool), and fair share end to end in-process (the real wiring, fake workers): a user who
queues after another's long queue is served in turn, and `stats` shows each user's figures."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from tests.support.inprocess import FakeClock, build, until
from whisperd import protocol as p
from whisperd.app import App
from whisperd.config import Config, DaemonConfig, SchedulerConfig, WorkersConfig
from whisperd.errors import PermissionDenied, QueueFull, WhisperdError
from whisperd.fleet import Fleet
from whisperd.handlers import Caller, Handlers
from whisperd.jobs import JobEvent, JobState
from whisperd.registry import JobRegistry, RetryPolicy
from whisperd.spool import Spool
from whisperd.sqlite_store import SqliteStore
from whisperd.views import Views

DAEMON_UID = os.geteuid()
ANA = Caller(pid=100, uid=100_001, gid=100_001)  # two unprivileged users, uids no test machine gives anyone
BEN = Caller(pid=200, uid=100_002, gid=100_002)
ROOT = Caller(pid=1, uid=0, gid=0)
DAEMON_USER = Caller(pid=2, uid=DAEMON_UID, gid=DAEMON_UID)


class NoFleet:
    def cancel(self, worker_id: str, job_id: int) -> None:
        pass


@dataclass
class Parts:
    tmp_path: Path
    store: SqliteStore
    spool: Spool
    registry: JobRegistry
    handlers: Handlers
    config: Config = field(default_factory=Config)
    fds: list[int] = field(default_factory=list)

    def audio(self, data: bytes) -> int:
        path = self.tmp_path / f"audio-{len(self.fds)}.wav"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        self.fds.append(fd)
        return fd

    def submit(self, caller: Caller, *audio: bytes, priority: int = 0) -> list[p.JobView]:
        fds = [self.audio(data) for data in audio]
        files = [p.SubmitFile(name=f"talk{i}.wav", fd_index=i) for i in range(len(audio))]
        reply = asyncio.run(self.handlers.submit(p.Submit(files=files, priority=priority), caller, fds))
        assert isinstance(reply, p.Jobs)
        return reply.jobs

    def refused(self, caller: Caller, *audio: bytes, priority: int = 0) -> WhisperdError:
        """A submit that must be refused whole: nothing queued, no spooled copy left behind."""
        counts, spooled = self.registry.counts(), sorted(os.listdir(self.spool.directory))
        with pytest.raises(WhisperdError) as info:
            self.submit(caller, *audio, priority=priority)
        assert self.registry.counts() == counts, "nothing queued"
        assert sorted(os.listdir(self.spool.directory)) == spooled, "no audio left behind"
        return info.value


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    store = SqliteStore(tmp_path / "jobs.sqlite3")
    spool = Spool(tmp_path / "spool")
    policy = RetryPolicy(max_retries=1, backoff_s=10.0, backoff_max_s=60.0)
    registry = JobRegistry(store, spool, FakeClock(), policy, lambda view: None, lambda job, old, event: None)
    made: Parts
    handlers = Handlers(
        registry, spool, cast(Fleet, NoFleet()), cast(Views, None), config=lambda: made.config,
        is_draining=lambda: False, wake=lambda: None, daemon_uid=DAEMON_UID,
    )  # fmt: skip
    made = Parts(tmp_path, store, spool, registry, handlers)
    yield made
    for fd in made.fds:
        os.close(fd)
    store.close()


def limits(**daemon: int) -> Config:
    return Config(daemon=DaemonConfig(**daemon))  # type: ignore[arg-type]


# ---- queued jobs per user --------------------------------------------------------------------------------


def test_a_user_at_the_queued_jobs_limit_is_refused_and_others_are_not(parts: Parts) -> None:
    parts.config = limits(max_queued_jobs_per_user=2)
    parts.submit(ANA, b"one", b"two")
    error = parts.refused(ANA, b"three")
    assert isinstance(error, QueueFull) and error.code == "queue_full"
    assert "max_queued_jobs_per_user" in error.message and "2" in error.message
    assert len(parts.submit(BEN, b"ben one", b"ben two")) == 2, "the limit is per user"
    assert parts.registry.user_figures(ANA.uid).waiting_jobs == 2


def test_a_submit_of_several_files_must_fit_the_user_s_limit_whole(parts: Parts) -> None:
    parts.config = limits(max_queued_jobs_per_user=2)
    parts.submit(ANA, b"one")
    assert isinstance(parts.refused(ANA, b"two", b"three"), QueueFull)
    assert len(parts.submit(ANA, b"two")) == 1


def test_running_and_finished_jobs_do_not_count_against_the_queued_limit(parts: Parts) -> None:
    parts.config = limits(max_queued_jobs_per_user=1)
    [job] = parts.submit(ANA, b"one")
    parts.refused(ANA, b"two")
    parts.registry.apply(parts.registry.get(job.id), JobEvent.DISPATCH, worker="cpu0", device="cpu")
    [second] = parts.submit(ANA, b"two")
    parts.registry.apply(parts.registry.get(second.id), JobEvent.CANCEL)
    assert len(parts.submit(ANA, b"three")) == 1


@pytest.mark.parametrize("caller", [ROOT, DAEMON_USER], ids=["root", "daemon-user"])
def test_privileged_callers_are_exempt_from_the_per_user_limits(parts: Parts, caller: Caller) -> None:
    parts.config = limits(max_queued_jobs_per_user=1, max_spool_bytes_per_user=4, max_queued_jobs=3)
    assert len(parts.submit(caller, b"first file", b"second file", b"third file")) == 3
    error = parts.refused(caller, b"fourth")
    assert isinstance(error, QueueFull) and "max_queued_jobs_per_user" not in error.message, "the global one"


# ---- spool bytes per user --------------------------------------------------------------------------------


def test_a_submit_beyond_the_user_s_spool_bytes_is_refused_after_the_copy_and_leaves_nothing(
    parts: Parts,
) -> None:
    parts.config = limits(max_spool_bytes_per_user=20)
    [first] = parts.submit(ANA, b"x" * 12)
    assert parts.registry.user_figures(ANA.uid).spool_bytes == 12
    error = parts.refused(ANA, b"y" * 9)  # 21 bytes: over by one, known only once copied
    assert isinstance(error, QueueFull) and error.code == "queue_full"
    assert "max_spool_bytes_per_user" in error.message and "20" in error.message
    assert len(parts.submit(ANA, b"y" * 8)) == 1, "exactly at the limit is allowed"
    assert len(parts.submit(BEN, b"z" * 20)) == 1, "the limit is per user"
    assert isinstance(parts.refused(ANA, b"!"), QueueFull), "at the limit: refused before copying"
    # A finished job's audio is gone from the spool, and from the user's share.
    parts.registry.apply(parts.registry.get(first.id), JobEvent.CANCEL)
    assert parts.registry.user_figures(ANA.uid).spool_bytes == 8
    assert len(parts.submit(ANA, b"w" * 12)) == 1


def test_spool_bytes_count_every_live_state(parts: Parts) -> None:
    parts.config = limits(max_spool_bytes_per_user=10)
    [job] = parts.submit(ANA, b"x" * 10)
    registry = parts.registry
    registry.apply(registry.get(job.id), JobEvent.DISPATCH, worker="cpu0", device="cpu")
    parts.refused(ANA, b"y")
    registry.apply(registry.get(job.id), JobEvent.FAIL, error="worker died")
    assert registry.get(job.id).state is JobState.RETRYING
    parts.refused(ANA, b"y")
    assert registry.user_figures(ANA.uid).spool_bytes == 10


# ---- priority --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("priority", [1, 1000])
def test_an_unprivileged_user_may_not_raise_priority_above_the_default(parts: Parts, priority: int) -> None:
    error = parts.refused(ANA, b"audio", priority=priority)
    assert isinstance(error, PermissionDenied) and error.code == "permission_denied"
    assert "user_max_priority" in error.message and str(priority) in error.message


@pytest.mark.parametrize("priority", [0, -1, -1000])
def test_anyone_may_lower_priority(parts: Parts, priority: int) -> None:
    [job] = parts.submit(ANA, b"audio", priority=priority)
    assert job.priority == priority


@pytest.mark.parametrize("caller", [ROOT, DAEMON_USER], ids=["root", "daemon-user"])
def test_privileged_callers_may_use_any_priority(parts: Parts, caller: Caller) -> None:
    [job] = parts.submit(caller, b"audio", priority=1000)
    assert job.priority == 1000


def test_the_config_may_let_users_raise_priority_up_to_a_maximum(parts: Parts) -> None:
    parts.config = Config(scheduler=SchedulerConfig(user_max_priority=10))
    assert [j.priority for j in parts.submit(ANA, b"audio", priority=10)] == [10]
    assert isinstance(parts.refused(ANA, b"audio", priority=11), PermissionDenied)


def test_a_negative_maximum_binds_users_below_zero(parts: Parts) -> None:
    parts.config = Config(scheduler=SchedulerConfig(user_max_priority=-5))
    assert isinstance(parts.refused(ANA, b"audio"), PermissionDenied)
    assert [j.priority for j in parts.submit(ANA, b"audio", priority=-5)] == [-5]


# ---- in-process: fair share and the per-user figures -------------------------------------------------------


def _dispatch_order(db_path: Path) -> list[int]:
    """Job ids in the order of their dispatch events in the job_events history."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT job_id FROM job_events WHERE event = 'dispatch' ORDER BY rowid").fetchall()
    finally:
        db.close()
    return [r[0] for r in rows]


def test_a_user_who_queues_after_another_s_long_queue_is_served_in_turn(tmp_path: Path) -> None:
    """Ana queues 20 jobs, then Ben 2, on one worker: Ben's run in the next batch, before most of Ana's
    (strict FIFO ran all of Ana's first); each user's jobs run in the order submitted."""
    config = Config(workers=WorkersConfig(cpu_workers=1, start_timeout_s=20))
    app = build(tmp_path, config, clock=FakeClock())
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()

    async def submit(caller: Caller, count: int) -> list[int]:
        fds = []
        for i in range(count):
            path = audio_dir / f"{caller.uid}-{i}"
            path.write_bytes(b"segments=1")
            fds.append(os.open(path, os.O_RDONLY))
        try:
            files = [p.SubmitFile(name=f"talk{i}.wav", fd_index=i) for i in range(count)]
            reply = await app.handlers.submit(p.Submit(files=files), caller, fds)
        finally:
            for fd in fds:
                os.close(fd)
        assert isinstance(reply, p.Jobs)
        return [j.id for j in reply.jobs]

    def settled() -> bool:
        live = app.store.live_jobs()
        return all(j.state is not JobState.PROCESSING for j in live) and all(
            v.state == "idle" for v in app.fleet.views()
        )

    async def main() -> tuple[list[int], list[int], list[p.UserStatsView]]:
        await app.daemon.start()
        try:
            ana = await submit(ANA, 20)
            app.daemon.tick()  # Ana's first batch goes at once
            ben = await submit(BEN, 2)
            while app.store.live_jobs():
                await until(settled, 10)
                app.daemon.tick()
            return ana, ben, app.views.stats().users
        finally:
            await app.drain(5)

    try:
        ana, ben, users = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        app.store.close()
    order = _dispatch_order(tmp_path / "jobs.sqlite3")
    assert sorted(order) == sorted(ana + ben), "each job dispatched once"
    assert [order.index(j) for j in ben] == [3, 5], "Ben's turn comes in the second batch: Ana, Ben, Ana, Ben"
    assert [j for j in order if j in ana] == ana, "Ana's jobs in the order she submitted them"
    assert [j for j in order if j in ben] == ben
    by_uid = {u.uid: u for u in users}
    assert (by_uid[ANA.uid].finished_jobs, by_uid[BEN.uid].finished_jobs) == (20, 2)
    assert (by_uid[ANA.uid].audio_seconds, by_uid[BEN.uid].audio_seconds) == (20.0, 2.0)
    assert all((u.queued_jobs, u.running_jobs, u.spool_bytes) == (0, 0, 0) for u in users)


def test_stats_show_each_user_s_share_and_a_restart_measures_the_spool_again(tmp_path: Path) -> None:
    config = Config(workers=WorkersConfig(cpu_workers=0, start_timeout_s=5))  # nothing runs: all stay queued
    sizes = {ANA.uid: [5, 7], BEN.uid: [11]}

    async def submit_all(app: App) -> None:
        for caller in (ANA, BEN):
            fds = []
            for i, size in enumerate(sizes[caller.uid]):
                path = tmp_path / f"{caller.uid}-{i}"
                path.write_bytes(b"x" * size)
                fds.append(os.open(path, os.O_RDONLY))
            files = [p.SubmitFile(name=f"f{i}", fd_index=i) for i in range(len(fds))]
            try:
                await app.handlers.submit(p.Submit(files=files), caller, fds)
            finally:
                for fd in fds:
                    os.close(fd)

    def figures(app: App) -> list[tuple[int, int, int, int]]:
        return [(u.uid, u.queued_jobs, u.running_jobs, u.spool_bytes) for u in app.views.stats().users]

    expected = [(ANA.uid, 2, 0, 12), (BEN.uid, 1, 0, 11)]
    for restart in (False, True):
        app = build(tmp_path, config, clock=FakeClock())

        async def main(app: App = app, restart: bool = restart) -> list[tuple[int, int, int, int]]:
            await app.daemon.start()
            try:
                if not restart:
                    await submit_all(app)
                return figures(app)
            finally:
                await app.drain(5)

        try:
            assert asyncio.run(asyncio.wait_for(main(), 30)) == expected, f"restart={restart}"
        finally:
            app.store.close()
