"""The job store failing under the daemon: a full disk, a database another process has locked. The daemon
built in-process (the real wiring, the fake worker) on a store whose commits fail on demand, as SQLite's do
on a full disk: a submit answers storage_full (never internal), the loop never raises, a result that
cannot be committed is kept until it can, and the daemon starts while the store refuses commits. Then a
real daemon on a small tmpfs filled up (as root), and a cancel of thousands of jobs in one commit."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.support.daemon import DaemonProcess
from tests.support.inprocess import FakeClock, FakeProbe, fake_worker_spawner, run_started, submit, until
from whisperctl.client import RemoteError
from whisperd import protocol as p
from whisperd.app import App
from whisperd.config import Config, StorageConfig, WorkersConfig
from whisperd.errors import StorageBusy, StorageFull
from whisperd.handlers import Caller
from whisperd.jobs import JobEvent, JobState
from whisperd.spool import Spool
from whisperd.sqlite_store import SqliteStore
from whisperd.store import NewJob

S = JobState
USER = Caller(pid=1, uid=1000, gid=1000)


class Disk:
    """Stands between the store and its SQLite connection. While `full`, a COMMIT fails as it does on a
    full disk: SQLite rolls the transaction back itself, then raises. `commits` counts those that went
    through."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self.full = False
        self.commits = 0

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            if self.full:
                self._db.execute("ROLLBACK")
                raise sqlite3.OperationalError("database or disk is full")
            self.commits += 1
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def store_on(path: Path, busy_timeout_s: float = 0.1) -> tuple[SqliteStore, Disk]:
    store = SqliteStore(path, busy_timeout_s=busy_timeout_s)
    disk = Disk(store._db)
    store._db = disk  # type: ignore[assignment]
    return store, disk


def config(cpu_workers: int = 1, min_free_bytes: int = 0) -> Config:
    return Config(
        workers=WorkersConfig(cpu_workers=cpu_workers, start_timeout_s=20),
        storage=StorageConfig(min_free_bytes=min_free_bytes),
    )


def make_app(tmp_path: Path, store: SqliteStore, cfg: Config, clock: FakeClock) -> App:
    return App(
        cfg, store, Spool(tmp_path / "spool"), FakeProbe(),
        spawner=fake_worker_spawner(tmp_path / "fake-worker"), clock=clock, cpu_count=2,
    )  # fmt: skip


def run(app: App, body: Callable[[], Awaitable[None]]) -> None:
    run_started(app, body, 60)


async def submit_fd(app: App, tmp_path: Path, caller: Caller = USER) -> p.Reply:
    """A submit as a client makes it, with the audio passed as a descriptor."""
    source = tmp_path / f"talk-{len(list(tmp_path.iterdir()))}.wav"
    source.write_bytes(b"segments=1")
    fd = os.open(source, os.O_RDONLY)
    try:
        files = [p.SubmitFile(name=source.name, fd_index=0)]
        return await app.handlers.submit(p.Submit(files=files), caller, [fd])
    finally:
        os.close(fd)


def spooled(tmp_path: Path) -> list[str]:
    return sorted(f.name for f in (tmp_path / "spool").iterdir())


def events(app: App, job_id: int) -> list[str]:
    return [e.event for e in app.store.history(job_id)]


def idle(app: App) -> bool:
    return all(v.state == "idle" for v in app.fleet.views())


# ---- a full disk -----------------------------------------------------------------------------------------


def test_a_submit_on_a_full_disk_answers_storage_full_and_leaves_nothing_behind(tmp_path: Path) -> None:
    store, disk = store_on(tmp_path / "jobs.sqlite3")
    app = make_app(tmp_path, store, config(cpu_workers=0), FakeClock())

    async def body() -> None:
        disk.full = True
        with pytest.raises(StorageFull) as refused:
            await submit_fd(app, tmp_path)
        assert refused.value.code == "storage_full"
        assert not store._db.in_transaction
        assert store.live_jobs() == [] and spooled(tmp_path) == [], "nothing queued, the spooled copy gone"
        assert app.registry.waiting_count() == 0

        disk.full = False  # room again: the same submit goes through
        reply = await submit_fd(app, tmp_path)
        assert isinstance(reply, p.Jobs) and [j.state for j in reply.jobs] == [S.PENDING]
        assert [j.id for j in store.live_jobs()] == [reply.jobs[0].id]

    run(app, body)


def test_below_the_free_space_floor_a_submit_is_refused_before_its_audio_is_spooled(tmp_path: Path) -> None:
    store, _ = store_on(tmp_path / "jobs.sqlite3")
    app = make_app(tmp_path, store, config(cpu_workers=0, min_free_bytes=1 << 62), FakeClock())

    async def body() -> None:
        with pytest.raises(StorageFull, match="min_free_bytes"):
            await submit_fd(app, tmp_path)
        assert spooled(tmp_path) == [] and store.live_jobs() == []
        app.daemon.config.storage.min_free_bytes = 1  # as a reload would; this disk has a byte free
        reply = await submit_fd(app, tmp_path)
        assert isinstance(reply, p.Jobs) and len(reply.jobs) == 1

    run(app, body)


@pytest.mark.parametrize(
    ("script", "end", "last_event"),
    [("segments=2", S.COMPLETED, "complete"), ("undecodable", S.FAILED, "fail_fatal")],
    ids=["result", "failure"],
)
def test_a_job_ending_while_commits_fail_ends_once_they_succeed_again(
    tmp_path: Path, script: str, end: JobState, last_event: str
) -> None:
    store, disk = store_on(tmp_path / "jobs.sqlite3")
    clock = FakeClock()
    app = make_app(tmp_path, store, config(), clock)

    async def body() -> None:
        [job] = submit(app, tmp_path, script)
        app.daemon.tick()
        assert app.registry.get(job.id).state is S.PROCESSING
        disk.full = True  # the disk fills while the worker transcribes
        await until(lambda: app.registry.uncommitted() == 1 and idle(app), 20)
        for _ in range(3):  # rounds while the disk stays full: none raises, nothing changes
            clock.advance(5)
            app.daemon.tick()
        assert app.registry.get(job.id).state is S.PROCESSING, "not done before its commit"
        assert store.select([job.id], None, 1)[0].state is S.PROCESSING and store.transcript(job.id) is None
        assert [v.restarts for v in app.fleet.views()] == [0], "the worker was not harmed"

        disk.full = False
        app.daemon.tick()
        assert app.registry.uncommitted() == 0
        assert app.registry.get(job.id).state is end
        assert events(app, job.id) == ["submit", "dispatch", last_event]
        if end is S.COMPLETED:
            transcript = store.transcript(job.id)
            assert transcript is not None and transcript.text == f"job {job.id}"
        assert app.registry.counts()[end.value] == 1 and app.registry.waiting_count() == 0

    run(app, body)


def test_a_result_waiting_for_its_commit_gives_way_to_a_cancel(tmp_path: Path) -> None:
    store, disk = store_on(tmp_path / "jobs.sqlite3")
    app = make_app(tmp_path, store, config(), FakeClock())

    async def body() -> None:
        [job] = submit(app, tmp_path, "segments=1")
        app.daemon.tick()
        disk.full = True
        await until(lambda: app.registry.uncommitted() == 1 and idle(app), 20)
        disk.full = False  # room again, and its user cancels before the next round commits the result
        owner = Caller(pid=1, uid=job.owner_uid, gid=0)
        reply = await app.handlers.cancel(p.Cancel(ids=[job.id]), owner, [])
        assert isinstance(reply, p.Jobs) and [j.state for j in reply.jobs] == [S.CANCELLED]
        app.daemon.tick()
        assert app.registry.uncommitted() == 0 and store.transcript(job.id) is None
        assert events(app, job.id) == ["submit", "dispatch", "cancel"]

    run(app, body)


def test_the_loop_goes_on_while_commits_fail_and_catches_up_after(tmp_path: Path) -> None:
    store, disk = store_on(tmp_path / "jobs.sqlite3")
    clock = FakeClock()
    app = make_app(tmp_path, store, config(), clock)

    async def body() -> None:
        retried, waiting = submit(app, tmp_path, "segments=1", "segments=1")
        app.registry.apply(retried, JobEvent.DISPATCH, worker="gone", device="cpu")
        app.registry.apply(retried, JobEvent.FAIL, error="its worker died")
        clock.advance(3600)  # its backoff is over: due for release
        disk.full = True
        for _ in range(3):
            assert app.daemon.tick() > 0, "no busy loop either"
            clock.advance(5)
        assert [app.registry.get(i).state for i in (retried.id, waiting.id)] == [S.RETRYING, S.PENDING]
        assert idle(app), "nothing dispatched without its commit"

        disk.full = False
        app.daemon.tick()
        await until(lambda: all(app.registry.get(i).state is S.COMPLETED for i in (retried.id, waiting.id)))
        assert events(app, retried.id) == [
            "submit", "dispatch", "fail", "backoff_elapsed", "dispatch", "complete"
        ]  # fmt: skip

    run(app, body)


def test_the_daemon_starts_while_commits_fail_and_requeues_its_interrupted_jobs_later(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    before = SqliteStore(path)
    [job] = before.insert_jobs([new_job(tmp_path)], now=1.0)
    job.state, job.worker, job.device, job.updated_at = S.PROCESSING, "cpu0", "cpu", 2.0
    before.save_transition(job, S.PENDING, JobEvent.DISPATCH)  # the daemon died while it ran
    before.close()

    store, disk = store_on(path)
    disk.full = True
    app = make_app(tmp_path, store, config(), FakeClock())

    async def body() -> None:  # start() above did not raise
        assert app.registry.get(job.id).state is S.PROCESSING and app.registry.uncommitted() == 1
        app.daemon.tick()
        assert store.select([job.id], None, 1)[0].state is S.PROCESSING and idle(app)

        disk.full = False
        app.daemon.tick()
        await until(lambda: app.registry.get(job.id).state is S.COMPLETED)
        assert events(app, job.id) == ["submit", "dispatch", "requeue", "dispatch", "complete"]

    run(app, body)


def new_job(tmp_path: Path) -> NewJob:
    audio = tmp_path / "spool" / "interrupted.audio"
    audio.parent.mkdir(parents=True, exist_ok=True)
    audio.write_text("segments=1")
    return NewJob(
        spool_path=str(audio), spool_bytes=10, filename="talk.wav", owner_uid=1000, model="tiny.en",
        language=None, task="transcribe", priority=0, word_timestamps=False,
    )  # fmt: skip


# ---- a locked database -----------------------------------------------------------------------------------


def test_a_locked_database_fails_fast_and_what_it_refused_is_committed_later(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = SqliteStore(path, busy_timeout_s=0.1)
    assert store._db.execute("PRAGMA busy_timeout").fetchone() == (100,), "a write waits 100 ms, not 5 s"
    clock = FakeClock()
    app = make_app(tmp_path, store, config(), clock)
    other = sqlite3.connect(path, isolation_level=None)  # an sqlite3 shell, a backup...

    async def body() -> None:
        [job] = submit(app, tmp_path, "segments=1")
        app.daemon.tick()
        other.execute("BEGIN IMMEDIATE")
        try:
            await until(lambda: app.registry.uncommitted() == 1 and idle(app), 20)
            files = spooled(tmp_path)
            with pytest.raises(StorageBusy) as refused:
                await submit_fd(app, tmp_path)
            assert refused.value.code == "storage_busy" and spooled(tmp_path) == files
            clock.advance(5)
            app.daemon.tick()  # does not raise
            assert app.registry.get(job.id).state is S.PROCESSING
        finally:
            other.execute("ROLLBACK")
        app.daemon.tick()
        assert app.registry.get(job.id).state is S.COMPLETED
        assert events(app, job.id) == ["submit", "dispatch", "complete"]

    try:
        run(app, body)
    finally:
        other.close()


# ---- a cancel of many jobs -------------------------------------------------------------------------------


def test_a_cancel_of_two_thousand_jobs_is_one_commit_and_keeps_each_error(tmp_path: Path) -> None:
    store, disk = store_on(tmp_path / "jobs.sqlite3")
    app = make_app(tmp_path, store, config(cpu_workers=0), FakeClock())

    async def body() -> None:
        audio = tmp_path / "spool" / "shared.audio"
        audio.write_text("x")
        mine = app.registry.add([new_job(tmp_path)] * 2000)
        [theirs] = app.registry.add([msgspec.structs.replace(new_job(tmp_path), owner_uid=2000)])
        [done] = app.registry.add([new_job(tmp_path)])
        app.registry.apply(done, JobEvent.CANCEL)
        ids = [j.id for j in mine]
        request = p.Cancel(ids=[*ids[:1000], 999_999, theirs.id, done.id, *ids[1000:], ids[0]])

        disk.full = True  # refused: none is cancelled, each says why
        reply = await app.handlers.cancel(request, USER, [])
        assert isinstance(reply, p.Jobs) and reply.jobs == []
        assert [e.code for e in reply.errors] == [
            *["storage_full"] * 1000, "not_found", "permission_denied", "bad_request",
            *["storage_full"] * 1000, "bad_request",
        ]  # fmt: skip
        assert app.registry.waiting_count() == 2001

        disk.full = False
        commits = disk.commits
        reply = await app.handlers.cancel(request, USER, [])
        assert disk.commits == commits + 1, "one commit for the whole request"
        assert isinstance(reply, p.Jobs) and [j.id for j in reply.jobs] == ids
        assert all(j.state is S.CANCELLED for j in reply.jobs)
        assert [(e.job_id, e.code) for e in reply.errors] == [
            (999_999, "not_found"), (theirs.id, "permission_denied"), (done.id, "bad_request"),
            (ids[0], "bad_request"),
        ]  # fmt: skip
        assert {s.state for s in store.select(ids, None, len(ids))} == {S.CANCELLED}
        assert all(events(app, i) == ["submit", "cancel"] for i in (ids[0], ids[999], ids[-1]))
        [(count,)] = store._db.execute("SELECT COUNT(*) FROM job_events WHERE event = 'cancel'").fetchall()
        assert count == 2001
        assert app.registry.counts()["CANCELLED"] == 2001 and app.registry.waiting_count() == 1

    run(app, body)


# ---- a real full file system -----------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs: room for the database, its reserve and a little audio."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "small-fs"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system to its last byte with one file."""
    path = directory / "filler"
    with open(path, "wb", buffering=0) as out:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    return path


def test_the_store_opens_on_a_full_file_system_by_giving_back_its_reserve(small_fs: Path) -> None:
    store = SqliteStore(small_fs / "jobs.sqlite3")
    [job] = store.insert_jobs([new_job(small_fs)], now=1.0)
    store.close()  # a clean close removes the -wal and -shm files, which a full disk cannot make again
    assert (small_fs / "jobs.sqlite3.reserve").stat().st_size > 0
    fill(small_fs)
    store = SqliteStore(small_fs / "jobs.sqlite3")
    try:
        assert [j.id for j in store.live_jobs()] == [job.id]
        assert not (small_fs / "jobs.sqlite3.reserve").exists()
    finally:
        store.close()


def test_a_real_daemon_on_a_full_disk_refuses_clearly_stays_up_and_starts_again(
    tmp_path: Path, small_fs: Path
) -> None:
    daemon = DaemonProcess(
        tmp_path / "daemon",
        {"workers": {"cpu_workers": 0}, "storage": {"min_free_bytes": 0}},
        env={"WHISPERD_STATE_DIR": str(small_fs)},  # the log and config stay on the big disk
    ).start()
    audio = tmp_path / "talk.wav"
    audio.write_bytes(b"RIFF" + b"\0" * 1000)
    try:
        [first] = daemon.client.submit([str(audio)])
        filler = fill(small_fs)

        with pytest.raises(RemoteError) as refused:  # the spool cannot take the audio
            daemon.client.submit([str(audio)])
        assert refused.value.code == "storage_full"
        cancel = daemon.client.cancel([first.id])  # the database cannot take the commit
        assert [e.code for e in cancel.errors] == ["storage_full"] and cancel.jobs == []
        assert daemon.job(first.id).state is S.PENDING

        assert daemon.stop() == 0, "a clean stop, the disk still full"
        daemon.start()  # and a start on it
        assert daemon.job(first.id).state is S.PENDING
        with pytest.raises(RemoteError) as refused:
            daemon.client.submit([str(audio)])
        assert refused.value.code == "storage_full"

        filler.unlink()
        [second] = daemon.client.submit([str(audio)])
        assert [j.id for j in daemon.client.cancel([first.id, second.id]).jobs] == [first.id, second.id]
        assert daemon.proc is not None and daemon.proc.poll() is None, "it never exited on its own"
        assert "Traceback" not in daemon.log()
    finally:
        daemon.stop()
