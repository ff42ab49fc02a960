"""The request handlers on a real registry, store and spool, with a fake fleet and fake views, called directly
(no socket): submits by passed descriptor and by path, what a submit refuses (and that it leaves no spooled
audio behind), cancels and their per-job errors, results, status, and who may do what."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest

from tests.support.inprocess import GIB, FakeClock, FakeProbe, reading, until
from whisperd import __version__
from whisperd import protocol as p
from whisperd.config import Config, DaemonConfig
from whisperd.errors import (
    BadRequest,
    Busy,
    InvalidAudio,
    NotFound,
    NotReady,
    PermissionDenied,
    QueueFull,
    ShuttingDown,
    UnknownModel,
    WhisperdError,
)
from whisperd.fleet import Fleet
from whisperd.gpupool import DevicePool
from whisperd.handlers import Caller, Handlers
from whisperd.jobs import JobEvent, JobState
from whisperd.monitors import Monitors
from whisperd.protocol import Segment, Transcript
from whisperd.registry import JobRegistry, RetryPolicy
from whisperd.spool import Spool
from whisperd.spooling import Spooler
from whisperd.sqlite_store import SqliteStore
from whisperd.store import NewJob
from whisperd.threads import DaemonThreadPool
from whisperd.views import Views

S = JobState
E = JobEvent
T0 = 1_000_000.0
USER = Caller(pid=4242, uid=1000, gid=1000)
OTHER_USER = Caller(pid=4343, uid=2000, gid=2000)
NOBODY = Caller(pid=4444, uid=65534, gid=65534)
DAEMON_UID = os.geteuid()
TRANSCRIPT = Transcript("en", 0.99, 3.0, "hello", [Segment(id=1, start=0.0, end=3.0, text="hello")])

DEVICES = [
    p.DeviceView(
        name="cpu", index=None, uuid=None, healthy=True, memory_total_bytes=None, memory_used_bytes=None,
        memory_free_bytes=None, memory_reserved_bytes=0, memory_available_bytes=None, utilization_ratio=None,
        temperature_c=None, power_w=None, workers=2, running_batches=1,
    )
]  # fmt: skip
STATS = p.StatsView(
    states={s.value: 0 for s in JobState}, queue_depth=0, running_jobs=0, workers=[], uptime_s=12.0,
    audio_seconds_total=0.0, processing_seconds_total=0.0, realtime_factor=None,
)  # fmt: skip


class FakeFleet:
    """Records what Handlers asks of the fleet: only cancel."""

    def __init__(self) -> None:
        self.cancels: list[int] = []

    def cancel_everywhere(self, job_id: int) -> None:
        self.cancels.append(job_id)


class FakeViews:
    def fleet_devices(self) -> list[p.DeviceView]:
        return self.devices()

    def devices(self) -> list[p.DeviceView]:
        return DEVICES

    def stats(self) -> p.StatsView:
        return STATS


@dataclass
class Parts:
    tmp_path: Path
    store: SqliteStore
    spool: Spool
    clock: FakeClock
    registry: JobRegistry
    fleet: FakeFleet
    handlers: Handlers
    config: Config = field(default_factory=Config)
    draining: bool = False
    wakes: int = 0
    fds: list[int] = field(default_factory=list)

    def audio(self, data: bytes = b"RIFF audio bytes", name: str | None = None) -> int:
        """An open descriptor on a fresh file holding data, closed at the end of the test."""
        path = self.tmp_path / (name or f"audio-{len(self.fds)}.wav")
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        self.fds.append(fd)
        return fd

    def spooled(self) -> list[bytes]:
        return sorted(f.read_bytes() for f in self.spool.directory.iterdir())

    def submit(self, caller: Caller = USER, count: int = 1, **options: object) -> list[p.JobView]:
        """Submit count files by passed descriptors; returns the jobs as the reply shows them."""
        fds = [self.audio(f"audio {i}".encode()) for i in range(count)]
        files = [p.SubmitFile(name=f"talk{i}.wav", fd_index=i) for i in range(count)]
        reply = call(self.handlers.submit(p.Submit(files=files, **options), caller, fds))  # type: ignore[arg-type]
        assert isinstance(reply, p.Jobs)
        return reply.jobs

    def events(self, job_id: int) -> list[str]:
        return [e.event for e in self.store.history(job_id)]


def call(coroutine: object) -> p.Reply:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    store = SqliteStore(tmp_path / "jobs.sqlite3")
    spool = Spool(tmp_path / "spool")
    clock = FakeClock(T0)
    policy = RetryPolicy(max_retries=1, backoff_s=10.0, backoff_max_s=60.0)
    registry = JobRegistry(store, spool, clock, policy, lambda view: None, lambda job, old, event: None)
    fleet = FakeFleet()
    made: Parts

    def wake() -> None:
        made.wakes += 1

    handlers = Handlers(
        registry, spool, cast(Fleet, fleet), cast(Views, FakeViews()), config=lambda: made.config,
        is_draining=lambda: made.draining, wake=wake, daemon_uid=DAEMON_UID,
    )  # fmt: skip
    made = Parts(tmp_path, store, spool, clock, registry, fleet, handlers)
    yield made
    for fd in made.fds:
        os.close(fd)
    store.close()


def refused(parts: Parts, request: p.Submit, caller: Caller, fds: list[int]) -> WhisperdError:
    """Submit, expecting a refusal that queued nothing and spooled nothing; returns the error."""
    jobs, spooled = parts.registry.counts(), parts.spooled()
    with pytest.raises(WhisperdError) as info:
        call(parts.handlers.submit(request, caller, fds))
    assert parts.registry.counts() == jobs, "nothing queued"
    assert parts.spooled() == spooled, "no audio left behind"
    return info.value


# ---- ping, gpu, stats ----------------------------------------------------------------------------------


def test_ping_gpu_and_stats_answer_from_their_owners(parts: Parts) -> None:
    pong = p.Pong(version=__version__, models=["tiny.en"])
    assert call(parts.handlers.handle(p.Ping(), NOBODY, [])) == pong
    assert call(parts.handlers.handle(p.Gpu(), NOBODY, [])) == p.Devices(devices=DEVICES)
    assert call(parts.handlers.handle(p.Stats(), NOBODY, [])) == p.StatsReply(stats=STATS)


def test_ping_names_the_running_configurations_models(parts: Parts) -> None:
    # what `whisperctl __complete models` offers for --model: the config read afresh, so a reload shows
    parts.config = Config(models={"tiny.en": "/m/tiny", "large-v3": "/m/large", "base": "/m/base"})
    reply = call(parts.handlers.handle(p.Ping(), NOBODY, []))
    assert isinstance(reply, p.Pong) and reply.models == ["base", "large-v3", "tiny.en"]


# ---- submit --------------------------------------------------------------------------------------------


def test_submit_by_descriptor_queues_a_pending_job_owned_by_the_caller(parts: Parts) -> None:
    first, second = parts.audio(b"first audio"), parts.audio(b"second audio")
    request = p.Submit(
        files=[p.SubmitFile(name="b.wav", fd_index=1), p.SubmitFile(name="a.wav", fd_index=0)],
        language="en", priority=-5, word_timestamps=True,  # above 0 is for privileged callers
    )  # fmt: skip
    reply = call(parts.handlers.handle(request, USER, [first, second]))
    assert isinstance(reply, p.Jobs) and reply.errors == []
    assert [(j.filename, j.state, j.owner_uid, j.model) for j in reply.jobs] == [
        ("b.wav", S.PENDING, USER.uid, "tiny.en"),
        ("a.wav", S.PENDING, USER.uid, "tiny.en"),
    ]
    assert all((j.language, j.priority, j.word_timestamps) == ("en", -5, True) for j in reply.jobs)
    rows = [parts.registry.get(j.id) for j in reply.jobs]
    assert [Path(r.spool_path or "").read_bytes() for r in rows] == [b"second audio", b"first audio"]
    assert all(Path(r.spool_path or "").parent == parts.spool.directory for r in rows)
    assert parts.spooled() == [b"first audio", b"second audio"], "a private copy of each"
    assert [j.id for j in parts.store.live_jobs()] == [j.id for j in reply.jobs]
    assert parts.events(reply.jobs[0].id) == ["submit"]
    assert parts.wakes == 1
    os.fstat(first)  # the caller's descriptors are the caller's: still open
    os.fstat(second)


def test_submit_refuses_an_unknown_model(parts: Parts) -> None:
    request = p.Submit(files=[p.SubmitFile(name="a.wav", fd_index=0)], model="large-v9")
    error = refused(parts, request, USER, [parts.audio()])
    assert isinstance(error, UnknownModel) and error.code == "unknown_model"
    assert parts.wakes == 0


def test_submit_refuses_no_files(parts: Parts) -> None:
    error = refused(parts, p.Submit(files=[]), USER, [parts.audio()])
    assert isinstance(error, BadRequest) and error.code == "bad_request"


@pytest.mark.parametrize("fd_index", [1, 5, -1])
def test_submit_refuses_a_descriptor_index_out_of_range(parts: Parts, fd_index: int) -> None:
    files = [p.SubmitFile(name="ok.wav", fd_index=0), p.SubmitFile(name="bad.wav", fd_index=fd_index)]
    error = refused(parts, p.Submit(files=files), USER, [parts.audio()])
    assert isinstance(error, BadRequest) and error.code == "bad_request"


def test_submit_refuses_a_file_with_neither_descriptor_nor_path(parts: Parts) -> None:
    error = refused(parts, p.Submit(files=[p.SubmitFile(name="a.wav")]), USER, [])
    assert isinstance(error, BadRequest)


def test_submit_refuses_empty_audio(parts: Parts) -> None:
    files = [p.SubmitFile(name="ok.wav", fd_index=0), p.SubmitFile(name="empty.wav", fd_index=1)]
    error = refused(parts, p.Submit(files=files), USER, [parts.audio(b"fine"), parts.audio(b"")])
    assert error.code == "invalid_audio"


def test_submit_beyond_the_queue_limit_is_refused_and_leaves_nothing_behind(parts: Parts) -> None:
    parts.config = Config(daemon=DaemonConfig(max_queued_jobs=1))
    [job] = parts.submit()
    error = refused(parts, p.Submit(files=[p.SubmitFile(name="a.wav", fd_index=0)]), USER, [parts.audio()])
    assert isinstance(error, QueueFull) and error.code == "queue_full"
    assert parts.spooled() == [b"audio 0"], "only the first job's audio"
    assert parts.registry.waiting_count() == 1 and parts.wakes == 1
    # A running job no longer counts against the limit.
    parts.registry.apply(parts.registry.get(job.id), E.DISPATCH, worker="cpu0", device="cpu")
    assert len(parts.submit()) == 1


def test_a_submit_of_several_files_must_fit_the_queue_whole(parts: Parts) -> None:
    parts.config = Config(daemon=DaemonConfig(max_queued_jobs=2))
    fds = [parts.audio(), parts.audio(), parts.audio()]
    files = [p.SubmitFile(name=f"{i}.wav", fd_index=i) for i in range(3)]
    assert isinstance(refused(parts, p.Submit(files=files), USER, fds), QueueFull)
    assert len(parts.submit(count=2)) == 2


def test_a_queue_filled_while_the_audio_was_copied_refuses_the_submit_and_discards_its_copy(
    parts: Parts,
) -> None:
    """Others submitted while this submit's audio was being spooled: the second check refuses it."""
    parts.config = Config(daemon=DaemonConfig(max_queued_jobs=1))
    registry, spool, tmp_path = parts.registry, parts.spool, parts.tmp_path

    class CrowdedSpool(Spool):
        def copy_from_fd(self, fd: int, max_bytes: int) -> tuple[str, int]:
            copied = super().copy_from_fd(fd, max_bytes)
            source = tmp_path / "meanwhile.wav"
            source.write_bytes(b"meanwhile")
            other_fd = os.open(source, os.O_RDONLY)
            try:
                other, _ = spool.copy_from_fd(other_fd, max_bytes)
            finally:
                os.close(other_fd)
            registry.add([NewJob(
                spool_path=other, spool_bytes=1, filename="meanwhile.wav", owner_uid=OTHER_USER.uid,
                model="tiny.en", language=None, task="transcribe", priority=0, word_timestamps=False,
            )])  # fmt: skip
            return copied

    handlers = Handlers(
        registry, CrowdedSpool(spool.directory), cast(Fleet, parts.fleet), cast(Views, FakeViews()),
        config=lambda: parts.config, is_draining=lambda: False, wake=lambda: None, daemon_uid=DAEMON_UID,
    )  # fmt: skip
    request = p.Submit(files=[p.SubmitFile(name="mine.wav", fd_index=0)])
    with pytest.raises(QueueFull):
        call(handlers.submit(request, USER, [parts.audio(b"mine")]))
    assert parts.spooled() == [b"meanwhile"], "the refused submit's copy is gone"
    assert [j.owner_uid for j in parts.store.live_jobs()] == [OTHER_USER.uid]


def test_a_request_s_files_are_copied_as_many_at_once_as_its_user_may_and_kept_in_order(parts: Parts) -> None:
    """With the default daemon.max_spools_per_user (4), two copies of one request run at once: each waits here
    until the other has started, which a one-after-another copy would never reach."""
    both_started = threading.Barrier(2, timeout=10)

    class PairedSpool(Spool):
        def copy_from_fd(self, fd: int, max_bytes: int) -> tuple[str, int]:
            both_started.wait()
            return super().copy_from_fd(fd, max_bytes)

    handlers = Handlers(
        parts.registry, PairedSpool(parts.spool.directory), cast(Fleet, parts.fleet),
        cast(Views, FakeViews()), config=lambda: parts.config, is_draining=lambda: False, wake=lambda: None,
        daemon_uid=DAEMON_UID,
    )  # fmt: skip
    fds = [parts.audio(f"audio {i}".encode()) for i in range(4)]
    files = [p.SubmitFile(name=f"talk{i}.wav", fd_index=i) for i in range(4)]
    reply = call(handlers.submit(p.Submit(files=files), USER, fds))
    assert isinstance(reply, p.Jobs) and [j.filename for j in reply.jobs] == [f.name for f in files]
    for job in reply.jobs:
        path = parts.store.get(job.id).spool_path  # type: ignore[union-attr]
        assert Path(path or "").read_bytes() == f"audio {job.filename[4]}".encode(), (
            "each job has its own audio"
        )
    assert parts.registry.user_figures(USER.uid).spool_bytes == 4 * len(b"audio 0")


def test_one_bad_file_among_many_refuses_the_request_and_leaves_no_copy_behind(parts: Parts) -> None:
    fds = [parts.audio(b"fine audio"), parts.audio(b""), parts.audio(b"more audio"), parts.audio(b"last")]
    files = [p.SubmitFile(name=f"talk{i}.wav", fd_index=i) for i in range(4)]

    async def submit_then_settle() -> None:
        with pytest.raises(InvalidAudio):
            await parts.handlers.submit(p.Submit(files=files), USER, fds)
        # A copy still running when its sibling failed is abandoned, and discarded once its thread is done.
        await until(lambda: parts.spooled() == [], 10)

    asyncio.run(submit_then_settle())
    assert parts.store.live_jobs() == [] and parts.registry.counts()["PENDING"] == 0, "none queued"
    assert len(parts.submit(count=3)) == 3, "the next submit works"


def test_submit_while_draining_is_refused(parts: Parts) -> None:
    parts.draining = True
    error = refused(parts, p.Submit(files=[p.SubmitFile(name="a.wav", fd_index=0)]), USER, [parts.audio()])
    assert isinstance(error, ShuttingDown) and error.code == "shutting_down"


def test_submit_by_path_is_refused_to_an_unprivileged_caller(parts: Parts) -> None:
    assert NOBODY.uid not in (0, DAEMON_UID)
    source = parts.tmp_path / "readable.wav"
    source.write_bytes(b"audio")
    request = p.Submit(files=[p.SubmitFile(name="readable.wav", path=str(source))])
    error = refused(parts, request, NOBODY, [])
    assert isinstance(error, PermissionDenied) and error.code == "permission_denied"


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_submit_by_path_as_the_daemon_user_reads_the_file_and_closes_it(parts: Parts) -> None:
    source = parts.tmp_path / "by-path.wav"
    source.write_bytes(b"audio by path")
    daemon_user = Caller(pid=1, uid=DAEMON_UID, gid=DAEMON_UID)
    before = open_descriptors()
    request = p.Submit(files=[p.SubmitFile(name="by-path.wav", path=str(source))])
    reply = call(parts.handlers.submit(request, daemon_user, []))
    assert isinstance(reply, p.Jobs)
    assert [(j.state, j.owner_uid) for j in reply.jobs] == [(S.PENDING, DAEMON_UID)]
    assert parts.spooled() == [b"audio by path"]
    assert open_descriptors() == before, "the daemon closed what it opened"
    missing = p.Submit(files=[p.SubmitFile(name="gone.wav", path=str(parts.tmp_path / "gone.wav"))])
    assert isinstance(refused(parts, missing, daemon_user, []), BadRequest)
    assert open_descriptors() == before


# ---- cancel --------------------------------------------------------------------------------------------


def test_cancel_of_a_running_job_tells_its_worker(parts: Parts) -> None:
    [view] = parts.submit()
    job = parts.registry.get(view.id)
    parts.registry.apply(job, E.DISPATCH, worker="cpu0", device="cpu")
    wakes = parts.wakes
    reply = call(parts.handlers.handle(p.Cancel(ids=[view.id]), USER, []))
    assert isinstance(reply, p.Jobs) and reply.errors == []
    assert [(j.id, j.state) for j in reply.jobs] == [(view.id, S.CANCELLED)]
    assert parts.registry.get(view.id).state is S.CANCELLED
    assert parts.fleet.cancels == [view.id]
    assert parts.events(view.id) == ["submit", "dispatch", "cancel"]
    assert parts.spooled() == [], "its audio is no longer needed"
    assert parts.wakes == wakes + 1


def test_cancel_of_a_waiting_job_needs_no_worker(parts: Parts) -> None:
    [view] = parts.submit()
    reply = call(parts.handlers.cancel(p.Cancel(ids=[view.id]), USER, []))
    assert isinstance(reply, p.Jobs) and reply.errors == []
    assert [j.state for j in reply.jobs] == [S.CANCELLED]
    assert parts.fleet.cancels == []
    assert parts.registry.counts()["CANCELLED"] == 1 and parts.registry.waiting_count() == 0


def test_cancel_answers_each_job_on_its_own(parts: Parts) -> None:
    [mine, finished] = parts.submit(USER, count=2)
    [theirs] = parts.submit(OTHER_USER)
    parts.registry.apply(parts.registry.get(finished.id), E.CANCEL)
    request = p.Cancel(ids=[theirs.id, mine.id, finished.id, 9999])
    reply = call(parts.handlers.cancel(request, USER, []))
    assert isinstance(reply, p.Jobs)
    assert [(j.id, j.state) for j in reply.jobs] == [(mine.id, S.CANCELLED)]
    assert [(e.job_id, e.code) for e in reply.errors] == [
        (theirs.id, "permission_denied"),
        (finished.id, "bad_request"),
        (9999, "not_found"),
    ]
    assert parts.registry.get(theirs.id).state is S.PENDING, "someone else's job is left alone"
    assert parts.fleet.cancels == []


def test_cancel_of_a_completed_job_is_a_bad_request(parts: Parts) -> None:
    [view] = parts.submit()
    job = parts.registry.get(view.id)
    parts.registry.apply(job, E.DISPATCH, worker="cpu0", device="cpu")
    parts.registry.apply(job, E.COMPLETE, transcript=TRANSCRIPT)
    reply = call(parts.handlers.cancel(p.Cancel(ids=[view.id]), USER, []))
    assert isinstance(reply, p.Jobs) and reply.jobs == []
    assert [(e.job_id, e.code) for e in reply.errors] == [(view.id, "bad_request")]
    assert parts.registry.get(view.id).state is S.COMPLETED and parts.fleet.cancels == []


@pytest.mark.parametrize("uid", [0, DAEMON_UID], ids=["root", "daemon-user"])
def test_root_and_the_daemon_user_may_cancel_anyone_s_job(parts: Parts, uid: int) -> None:
    [theirs] = parts.submit(OTHER_USER)
    reply = call(parts.handlers.cancel(p.Cancel(ids=[theirs.id]), Caller(pid=1, uid=uid, gid=uid), []))
    assert isinstance(reply, p.Jobs) and reply.errors == []
    assert [j.state for j in reply.jobs] == [S.CANCELLED]


# ---- result --------------------------------------------------------------------------------------------


def test_result_before_completion_is_not_ready(parts: Parts) -> None:
    [view] = parts.submit()
    with pytest.raises(NotReady):
        call(parts.handlers.result(p.Result(id=view.id), USER, []))
    parts.registry.apply(parts.registry.get(view.id), E.DISPATCH, worker="cpu0", device="cpu")
    with pytest.raises(NotReady):
        call(parts.handlers.result(p.Result(id=view.id), USER, []))


def test_result_of_a_failed_job_is_not_ready(parts: Parts) -> None:
    [view] = parts.submit()
    job = parts.registry.get(view.id)
    parts.registry.apply(job, E.DISPATCH, worker="cpu0", device="cpu")
    parts.registry.apply(job, E.FAIL_FATAL, error="audio does not decode")
    with pytest.raises(NotReady) as info:
        call(parts.handlers.result(p.Result(id=view.id), USER, []))
    assert info.value.code == "not_ready"


def test_result_of_a_completed_job_and_whose_it_is(parts: Parts) -> None:
    [view] = parts.submit()
    job = parts.registry.get(view.id)
    parts.registry.apply(job, E.DISPATCH, worker="cpu0", device="cpu")
    parts.registry.apply(job, E.COMPLETE, transcript=TRANSCRIPT, audio_duration_s=3.0)
    reply = call(parts.handlers.handle(p.Result(id=view.id), USER, []))
    assert isinstance(reply, p.ResultReply)
    assert reply.transcript == TRANSCRIPT and reply.job.state is S.COMPLETED and reply.job.id == view.id
    with pytest.raises(PermissionDenied):
        call(parts.handlers.result(p.Result(id=view.id), OTHER_USER, []))
    root = call(parts.handlers.result(p.Result(id=view.id), Caller(pid=1, uid=0, gid=0), []))
    assert isinstance(root, p.ResultReply) and root.transcript == TRANSCRIPT


def test_result_of_another_user_s_job_is_denied_before_anything_else(parts: Parts) -> None:
    [view] = parts.submit(OTHER_USER)
    with pytest.raises(PermissionDenied):
        call(parts.handlers.result(p.Result(id=view.id), USER, []))
    with pytest.raises(NotFound):
        call(parts.handlers.result(p.Result(id=9999), USER, []))


# ---- status --------------------------------------------------------------------------------------------


def test_status_by_ids_state_and_limit(parts: Parts) -> None:
    views = parts.submit(count=4)
    parts.submit(OTHER_USER)  # anyone may see the whole queue
    running = parts.registry.get(views[1].id)
    parts.registry.apply(running, E.DISPATCH, worker="cpu0", device="cpu")
    parts.registry.set_progress(running, 25.0, 10.0)

    def status(**options: object) -> list[p.JobView]:
        reply = call(parts.handlers.handle(p.Status(**options), NOBODY, []))  # type: ignore[arg-type]
        assert isinstance(reply, p.Jobs)
        return reply.jobs

    assert [j.id for j in status(ids=[views[3].id, views[0].id])] == [views[3].id, views[0].id]
    assert [(j.id, j.progress) for j in status(state=S.PROCESSING)] == [(running.id, 25.0)]
    assert [j.id for j in status(state=S.PENDING, limit=2)] == [views[3].id, views[3].id + 1]
    assert [j.id for j in status(limit=2)] == [views[3].id, views[3].id + 1]
    assert len(status()) == 5
    assert status(state=S.COMPLETED) == []
    with pytest.raises(NotFound) as info:
        status(ids=[views[0].id, 9999])
    assert "9999" in info.value.message


# ---- spooling: reads that never return ---------------------------------------------------------------


class StuckSpool(Spool):
    """A file system that hangs: reading audio that starts with b"stuck" blocks until the test releases it
    (bounded, so that a failing test never hangs)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.release = threading.Event()

    def copy_from_fd(self, fd: int, max_bytes: int) -> tuple[str, int]:
        if os.pread(fd, 5, 0) == b"stuck":
            self.release.wait(60)
        return super().copy_from_fd(fd, max_bytes)


def stuck_handlers(parts: Parts, threads: int) -> tuple[Handlers, Spooler, StuckSpool]:
    spool = StuckSpool(parts.spool.directory)
    spooler = Spooler(spool, DaemonThreadPool(threads, "spool"))
    handlers = Handlers(
        parts.registry, spool, cast(Fleet, parts.fleet), cast(Views, FakeViews()),
        config=lambda: parts.config, is_draining=lambda: False, wake=lambda: None, daemon_uid=DAEMON_UID,
        spooler=spooler,
    )  # fmt: skip
    return handlers, spooler, spool


def one_file(parts: Parts, handlers: Handlers, caller: Caller, data: bytes) -> asyncio.Task[p.Reply]:
    request = p.Submit(files=[p.SubmitFile(name="talk.wav", fd_index=0)])
    return asyncio.create_task(handlers.submit(request, caller, [parts.audio(data)]))


def test_reads_that_never_return_hold_only_their_user_s_spool_threads(parts: Parts) -> None:
    """Eight submits of one user whose reads hang (more than the loop's default pool has threads): two hold
    spool threads, the rest are refused at once; another user's submit and the GPU monitor's NVML reading
    go on meanwhile."""
    parts.config = Config(daemon=DaemonConfig(max_spools_per_user=2, spool_timeout_s=60.0))
    handlers, spooler, spool = stuck_handlers(parts, threads=4)
    probe = FakeProbe([reading(0)])
    pool = DevicePool()
    pool.configure(cpu=False, readings=probe.read())
    monitor = Monitors(
        probe, pool, cast(Views, FakeViews()), lambda name: None, lambda event: None,
        nvml=DaemonThreadPool(1, "nvml"),
    )  # fmt: skip

    async def scenario() -> None:
        stuck = [one_file(parts, handlers, USER, b"stuck audio") for _ in range(8)]
        try:
            await until(lambda: sum(t.done() for t in stuck) == 6, timeout_s=10)
            refused = [t.exception() for t in stuck if t.done()]
            assert all(isinstance(e, Busy) and e.code == "busy" for e in refused), refused
            assert spooler.in_progress(USER.uid) == 2

            async with asyncio.timeout(10):
                reply = await one_file(parts, handlers, OTHER_USER, b"other audio")
                probe.readings = [reading(0, used=30 * GIB)]
                await monitor.gpu_status()
            assert isinstance(reply, p.Jobs) and [j.owner_uid for j in reply.jobs] == [OTHER_USER.uid]
            assert pool.device_status()["cuda:0"].available_memory_bytes == 50 * GIB
        finally:
            spool.release.set()
        held = [t for t in stuck if not t.done()]
        replies = await asyncio.wait_for(asyncio.gather(*held), 10)
        assert all(isinstance(r, p.Jobs) for r in replies), "released, the two held copies finish"
        await until(lambda: spooler.in_progress(USER.uid) == 0, timeout_s=10)

    asyncio.run(scenario())
    assert sorted(j.owner_uid for j in parts.store.live_jobs()) == [USER.uid, USER.uid, OTHER_USER.uid]


def test_the_deadline_answers_a_caller_whose_read_hangs_and_its_thread_still_counts(parts: Parts) -> None:
    parts.config = Config(daemon=DaemonConfig(max_spools_per_user=1, spool_timeout_s=0.3))
    handlers, spooler, spool = stuck_handlers(parts, threads=2)

    async def scenario() -> None:
        try:
            with pytest.raises(InvalidAudio) as info:
                await asyncio.wait_for(one_file(parts, handlers, USER, b"stuck audio"), 10)
            assert info.value.code == "invalid_audio"
            # Its thread still reads (it cannot be interrupted): it still counts against its user.
            assert spooler.in_progress(USER.uid) == 1
            with pytest.raises(Busy):
                await one_file(parts, handlers, USER, b"fine audio")
        finally:
            spool.release.set()
        await until(lambda: spooler.in_progress(USER.uid) == 0, timeout_s=10)
        reply = await one_file(parts, handlers, USER, b"fine audio")
        assert isinstance(reply, p.Jobs)

    asyncio.run(scenario())
    assert [j.owner_uid for j in parts.store.live_jobs()] == [USER.uid]
    assert parts.spooled() == [b"fine audio"], "the copy that finished after its deadline was discarded"


def test_a_copy_that_waits_for_a_thread_past_the_deadline_is_busy(parts: Parts) -> None:
    parts.config = Config(daemon=DaemonConfig(max_spools_per_user=2, spool_timeout_s=0.3))
    handlers, spooler, spool = stuck_handlers(parts, threads=1)

    async def scenario() -> None:
        held = one_file(parts, handlers, USER, b"stuck audio")
        try:
            await until(lambda: spooler.in_progress(USER.uid) == 1, timeout_s=10)
            with pytest.raises(Busy) as info:
                await asyncio.wait_for(one_file(parts, handlers, OTHER_USER, b"other audio"), 10)
            assert info.value.code == "busy"
            assert spooler.in_progress(OTHER_USER.uid) == 0, "never started: its slot is free at once"
        finally:
            spool.release.set()
        with pytest.raises(InvalidAudio):
            await asyncio.wait_for(held, 10)
        await until(lambda: spooler.in_progress(USER.uid) == 0, timeout_s=10)

    asyncio.run(scenario())
    assert parts.store.live_jobs() == [] and parts.spooled() == []
