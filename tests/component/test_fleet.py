"""The fleet in-process: real worker processes (the real worker loop with the scripted transcriber of
tests/support/fake_worker.py), a real DevicePool, a fake clock for cancel deadlines, and a recording stand-in
for the outcomes, so what the fleet reports about each job and each death is checked call by call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import msgspec

from tests.support.inprocess import GIB, FakeClock, fake_worker_spawner, reading, until
from whisperd import workerproto as wp
from whisperd.fleet import Fleet, WorkerLimits
from whisperd.gpupool import DevicePool
from whisperd.supervisor import Spawner, WorkerSpec
from whisperd.workerspecs import worker_argv

GRACE_S = 5.0


class Interrupted(msgspec.Struct, frozen=True):
    worker_id: str
    unfinished: list[int]
    culprit: int | None
    error: str
    suspects: list[int] = []


class RecordingEvents:
    """Stands in for WorkerOutcomes."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, wp.JobMessage]] = []
        self.interrupted: list[Interrupted] = []

    def job_message(self, worker_id: str, device: str, message: wp.JobMessage) -> None:
        self.messages.append((worker_id, device, message))

    def batch_interrupted(
        self,
        worker_id: str,
        unfinished: Sequence[int],
        culprit: int | None,
        error: str,
        suspects: Sequence[int] = (),
    ) -> None:
        self.interrupted.append(Interrupted(worker_id, list(unfinished), culprit, error, list(suspects)))

    def of(self, job_id: int) -> list[str]:
        """The types of the messages about one job, in order."""
        return [type(m).__name__ for _, _, m in self.messages if m.job_id == job_id]

    def got(self, job_id: int, kind: type[wp.JobMessage]) -> bool:
        return any(isinstance(m, kind) and m.job_id == job_id for _, _, m in self.messages)


class Rig:
    def __init__(
        self, tmp_path: Path, pool: DevicePool | None = None, spawner: Spawner | None = None
    ) -> None:
        self.tmp_path = tmp_path
        self.pool = pool or DevicePool(cpu=True)
        self.events = RecordingEvents()
        self.clock = FakeClock()
        self.wakes = 0
        self.limits = WorkerLimits()  # what a test sets applies at the next check, as after a reload
        self.fleet = Fleet(
            self.pool, self.events, self._wake, self.clock, spawner or fake_worker_spawner(tmp_path / "fw"),
            cancel_grace_s=GRACE_S, restart_backoff_s=0.05, restart_backoff_max_s=0.1,
            limits=lambda: self.limits, check_interval_s=0.05,
        )  # fmt: skip

    def _wake(self) -> None:
        self.wakes += 1

    def job(self, job_id: int, script: str, max_result_bytes: int = 0, batched: bool = False) -> wp.JobSpec:
        audio = self.tmp_path / f"audio-{job_id}"
        audio.write_text(script)
        return wp.JobSpec(
            job_id=job_id, audio_path=str(audio), model="tiny.en", model_source="bundled:tiny.en",
            language=None, task="transcribe", word_timestamps=False, beam_size=5, vad_filter=False,
            max_result_bytes=max_result_bytes, mode="batched" if batched else "sequential",
        )  # fmt: skip

    def state(self, worker_id: str) -> str:
        return next(v.state for v in self.fleet.views() if v.id == worker_id)

    def pid(self, worker_id: str) -> int | None:
        return next(v.pid for v in self.fleet.views() if v.id == worker_id)


def spec(worker_id: str = "cpu0", device: str = "cpu") -> WorkerSpec:
    return WorkerSpec(id=worker_id, device=device, argv=worker_argv("cpu", "int8", 1, 2, None), env={})


def scenario(
    tmp_path: Path,
    body: Callable[[Rig], Awaitable[None]],
    pool: DevicePool | None = None,
    spawner: Spawner | None = None,
) -> Rig:
    """Run body on a fresh fleet and stop its workers whatever happens."""

    async def main() -> Rig:
        rig = Rig(tmp_path, pool, spawner)
        try:
            await body(rig)
        finally:
            await rig.fleet.stop(1)
        return rig

    coro: Coroutine[Any, Any, Rig] = asyncio.wait_for(main(), 20)
    return asyncio.run(coro)


async def started(rig: Rig, *specs: WorkerSpec) -> None:
    rig.fleet.start(specs or [spec()])
    assert await rig.fleet.wait_ready(10) == len(specs or [spec()])


# ---- life ------------------------------------------------------------------------------------------------


def test_workers_start_idle_and_views_follow_their_state(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        rig.fleet.start([spec("cpu0"), spec("cpu1")])
        assert [v.state for v in rig.fleet.views()] == ["starting", "starting"]
        assert not rig.fleet.any_idle()
        assert await rig.fleet.wait_ready(10) == 2
        assert rig.wakes >= 2, "each Ready wakes the daemon"
        assert [(v.id, v.state, v.jobs) for v in rig.fleet.views()] == [
            ("cpu0", "idle", []),
            ("cpu1", "idle", []),
        ]
        assert all(v.pid is not None and v.restarts == 0 for v in rig.fleet.views())
        assert [(s.id, s.device, s.idle, s.models) for s in rig.fleet.slots()] == [
            ("cpu0", "cpu", True, ()), ("cpu1", "cpu", True, ()),
        ]  # fmt: skip

        rig.fleet.dispatch("cpu1", [rig.job(1, "segments=50 segment_s=0.1")], 0)
        assert [v.state for v in rig.fleet.views()] == ["idle", "busy"]
        assert next(v.jobs for v in rig.fleet.views() if v.id == "cpu1") == [1]
        assert [s.idle for s in rig.fleet.slots()] == [True, False]
        assert rig.fleet.any_idle()
        await until(lambda: rig.events.got(1, wp.Started), 10)
        await rig.fleet.stop(0.2)
        assert [v.state for v in rig.fleet.views()] == ["stopped", "stopped"]
        assert not rig.fleet.any_idle()

    scenario(tmp_path, body)


def test_wait_ready_gives_up_after_its_timeout(tmp_path: Path) -> None:
    async def cannot_start(*argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
        raise FileNotFoundError(argv[0])

    async def body(rig: Rig) -> None:
        rig.fleet.start([spec()])
        assert await rig.fleet.wait_ready(0.3) == 0
        assert rig.state("cpu0") == "starting"
        assert not rig.fleet.any_idle()
        assert rig.events.interrupted == []

    scenario(tmp_path, body, spawner=cannot_start)


# ---- work ------------------------------------------------------------------------------------------------


def test_a_batch_runs_and_its_messages_are_forwarded_with_worker_and_device(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await started(rig)
        wakes = rig.wakes
        batch = rig.fleet.dispatch("cpu0", [rig.job(1, "segments=2"), rig.job(2, "segments=1")], 0)
        assert batch.job_ids == (1, 2)
        await until(lambda: rig.fleet.any_idle(), 10)
        assert rig.events.of(1) == ["Started", "Progress", "Progress", "Finished"]
        assert rig.events.of(2) == ["Started", "Progress", "Finished"]
        assert {(w, d) for w, d, _ in rig.events.messages} == {("cpu0", "cpu")}
        finished = [m for _, _, m in rig.events.messages if isinstance(m, wp.Finished)]
        assert [m.transcript.text for m in finished] == ["job 1", "job 2"]
        assert rig.wakes > wakes, "the end of a batch wakes the daemon"
        assert rig.fleet.slots()[0].models == ("tiny.en",), "the models the worker says it holds"
        assert rig.events.interrupted == []

        second = rig.fleet.dispatch("cpu0", [rig.job(3, "segments=1")], 0)
        assert second.id == batch.id + 1
        await until(lambda: rig.events.got(3, wp.Finished), 10)

    scenario(tmp_path, body)


def test_a_gpu_batch_reserves_memory_until_its_worker_says_it_is_done(tmp_path: Path) -> None:
    pool = DevicePool()
    pool.configure(cpu=False, readings=[reading(0, used=GIB, total=80 * GIB)])

    async def body(rig: Rig) -> None:
        await started(rig, spec("gpu0", "cuda:0"))
        before = pool.device_status()["cuda:0"]
        assert before.available_memory_bytes == 79 * GIB and before.running_batches == 0
        rig.fleet.dispatch("gpu0", [rig.job(1, "segments=2 segment_s=0.1")], 3 * GIB)
        assert pool.reserved_bytes("cuda:0") == 3 * GIB
        during = pool.device_status()["cuda:0"]
        assert during.available_memory_bytes == 76 * GIB and during.running_batches == 1
        await until(lambda: rig.events.got(1, wp.Finished), 10)
        assert {(w, d) for w, d, _ in rig.events.messages} == {("gpu0", "cuda:0")}
        await until(lambda: rig.fleet.any_idle(), 10)
        assert pool.reserved_bytes("cuda:0") == 0
        after = pool.device_status()["cuda:0"]
        assert after.available_memory_bytes == 79 * GIB and after.running_batches == 0

    scenario(tmp_path, body, pool)


# ---- cancels ---------------------------------------------------------------------------------------------


def test_a_cancel_not_obeyed_in_time_kills_the_worker_once_the_clock_passes_the_grace(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await started(rig)
        first_pid = rig.pid("cpu0")
        rig.fleet.dispatch("cpu0", [rig.job(1, "segments=50 segment_s=0.2"), rig.job(2, "segments=1")], 0)
        await until(lambda: rig.events.got(1, wp.Started), 10)
        # No await from the cancel to the kill: no report of the worker's can reach the fleet in between,
        # so what happens depends on the fake clock alone.
        assert rig.fleet.enforce_cancel_deadlines() is None
        wakes = rig.wakes
        rig.fleet.cancel("cpu0", 1)
        assert rig.wakes == wakes + 1, "the loop must learn of the deadline"
        deadline = rig.clock.now + GRACE_S
        assert rig.fleet.enforce_cancel_deadlines() == deadline
        rig.clock.advance(GRACE_S - 0.01)
        assert rig.fleet.enforce_cancel_deadlines() == deadline
        assert rig.state("cpu0") == "busy" and rig.events.interrupted == []
        rig.clock.advance(0.01)
        assert rig.fleet.enforce_cancel_deadlines() is None, "past due: killed, not waited for"
        await until(lambda: bool(rig.events.interrupted), 10)
        (interrupted,) = rig.events.interrupted
        assert interrupted.worker_id == "cpu0"
        assert interrupted.unfinished == [1, 2]
        assert interrupted.culprit is None, "the fleet killed it: nobody is to blame"
        await until(lambda: rig.fleet.any_idle(), 10)
        assert rig.pid("cpu0") != first_pid
        assert next(v.restarts for v in rig.fleet.views()) == 1
        assert pool_is_empty(rig)

    scenario(tmp_path, body)


def test_a_cancel_obeyed_in_time_clears_the_deadline(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await started(rig)
        pid = rig.pid("cpu0")
        rig.fleet.dispatch("cpu0", [rig.job(1, "segments=50 segment_s=0.05"), rig.job(2, "segments=1")], 0)
        await until(lambda: rig.events.got(1, wp.Started), 10)
        rig.fleet.cancel("cpu0", 1)
        await until(lambda: rig.events.got(1, wp.Stopped), 10)
        stopped = [m for _, _, m in rig.events.messages if isinstance(m, wp.Stopped)]
        assert [s.reason for s in stopped] == ["cancelled"]
        rig.clock.advance(10 * GRACE_S)
        assert rig.fleet.enforce_cancel_deadlines() is None, "the stop cleared the deadline"
        await until(lambda: rig.events.got(2, wp.Finished), 10)
        await asyncio.sleep(0.1)
        assert rig.events.interrupted == []
        assert rig.pid("cpu0") == pid

    scenario(tmp_path, body)


def test_a_cancel_of_a_job_waiting_in_the_batch_sets_no_deadline(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await started(rig)
        pid = rig.pid("cpu0")
        rig.fleet.dispatch("cpu0", [rig.job(1, "segments=4 segment_s=0.1"), rig.job(2, "segments=1")], 0)
        await until(lambda: rig.events.got(1, wp.Started), 10)
        rig.fleet.cancel("cpu0", 2)
        rig.fleet.cancel("cpu0", 99)  # not in the batch: ignored
        rig.fleet.cancel("cpu9", 1)  # no such worker: ignored
        assert rig.fleet.enforce_cancel_deadlines() is None
        rig.clock.advance(10 * GRACE_S)
        assert rig.fleet.enforce_cancel_deadlines() is None
        await until(lambda: rig.fleet.any_idle(), 10)
        assert rig.events.of(1)[-1] == "Finished"
        assert rig.events.of(2) == ["Stopped"], "skipped when its turn came, never started"
        assert rig.events.interrupted == []
        assert rig.pid("cpu0") == pid

    scenario(tmp_path, body)


# ---- deaths ----------------------------------------------------------------------------------------------


def test_a_worker_that_dies_on_its_own_blames_the_job_it_was_running(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await started(rig)
        rig.fleet.dispatch(
            "cpu0", [rig.job(1, "segments=1"), rig.job(2, "crash-once"), rig.job(3, "segments=1")], 0
        )
        await until(lambda: bool(rig.events.interrupted), 10)
        (interrupted,) = rig.events.interrupted
        assert interrupted.worker_id == "cpu0"
        assert interrupted.culprit == 2
        assert interrupted.unfinished == [2, 3], "the finished job is not handed back"
        assert "3" in interrupted.error  # the exit status
        assert rig.events.of(1)[-1] == "Finished"
        await until(lambda: rig.fleet.any_idle(), 10)
        assert rig.state("cpu0") == "idle"
        # the restarted worker takes work; the crash happens once only
        rig.fleet.dispatch("cpu0", [rig.job(2, "crash-once")], 0)
        await until(lambda: rig.events.got(2, wp.Finished), 10)
        assert len(rig.events.interrupted) == 1

    scenario(tmp_path, body)


def test_a_worker_that_dies_decoding_jobs_together_blames_none_and_each_runs_alone_next(
    tmp_path: Path,
) -> None:
    """Batched mode: the jobs of a batch are decoded together, so the one that killed the worker cannot be
    told. None counts a retry; each is a suspect, to run in a batch of its own."""

    async def body(rig: Rig) -> None:
        await started(rig)
        jobs = [rig.job(1, "segments=1", batched=True), rig.job(2, "crash-once", batched=True)]
        rig.fleet.dispatch("cpu0", [*jobs, rig.job(3, "segments=1", batched=True)], 0)
        await until(lambda: bool(rig.events.interrupted), 10)
        (interrupted,) = rig.events.interrupted
        assert interrupted.culprit is None
        assert interrupted.suspects == interrupted.unfinished == [2, 3]
        await until(lambda: rig.fleet.any_idle(), 10)
        rig.fleet.dispatch("cpu0", [rig.job(2, "crash-once", batched=True)], 0)  # alone, it dies no more
        await until(lambda: rig.events.got(2, wp.Finished), 10)

    scenario(tmp_path, body)


def test_a_worker_that_dies_on_a_job_decoded_alone_blames_it(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await started(rig)
        rig.fleet.dispatch("cpu0", [rig.job(7, "crash-once", batched=True)], 0)
        await until(lambda: bool(rig.events.interrupted), 10)
        (interrupted,) = rig.events.interrupted
        assert (interrupted.culprit, interrupted.suspects) == (7, [])

    scenario(tmp_path, body)


def test_a_worker_the_fleet_kills_blames_nobody(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await started(rig)
        rig.fleet.dispatch("cpu0", [rig.job(1, "crash-once"), rig.job(2, "segments=1")], 0)
        rig.fleet.kill("cpu0", "test")  # whether or not it said Started: its death is not the job's doing
        await until(lambda: bool(rig.events.interrupted), 10)
        (interrupted,) = rig.events.interrupted
        assert (interrupted.unfinished, interrupted.culprit) == ([1, 2], None)

    scenario(tmp_path, body)


def test_abandon_device_kills_the_busy_workers_on_that_device_only(tmp_path: Path) -> None:
    pool = DevicePool(cpu=True)
    pool.configure(cpu=True, readings=[reading(0), reading(1)])

    async def body(rig: Rig) -> None:
        await started(rig, spec("gpu0", "cuda:0"), spec("gpu0.1", "cuda:0"), spec("gpu1", "cuda:1"), spec())
        pids = {v.id: v.pid for v in rig.fleet.views()}
        long = "segments=50 segment_s=0.2"
        rig.fleet.dispatch("gpu0", [rig.job(1, long)], GIB)
        rig.fleet.dispatch("gpu1", [rig.job(2, long)], GIB)
        rig.fleet.dispatch("cpu0", [rig.job(3, long)], 0)
        # gpu0.1 is idle on the lost device: nothing of its to hand back
        await until(lambda: all(rig.events.got(j, wp.Started) for j in (1, 2, 3)), 10)
        rig.fleet.abandon_device("cuda:0")
        await until(lambda: bool(rig.events.interrupted), 10)
        await asyncio.sleep(0.2)
        assert rig.events.interrupted == [Interrupted("gpu0", [1], None, rig.events.interrupted[0].error)], (
            "the job goes back unharmed"
        )
        assert pool.reserved_bytes("cuda:0") == 0 and pool.reserved_bytes("cuda:1") == GIB
        views = {v.id: v for v in rig.fleet.views()}
        assert views["gpu1"].state == "busy" and views["gpu1"].pid == pids["gpu1"]
        assert views["cpu0"].state == "busy" and views["cpu0"].pid == pids["cpu0"]
        assert views["gpu0.1"].pid == pids["gpu0.1"] and views["gpu0.1"].restarts == 0
        assert views["gpu0"].restarts == 1

    scenario(tmp_path, body, pool)


# ---- kills the job is to blame for ------------------------------------------------------------------------


def test_a_worker_killed_for_its_job_blames_the_job_it_was_running(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await started(rig)
        rig.fleet.dispatch("cpu0", [rig.job(1, "segments=50 segment_s=0.1"), rig.job(2, "segments=1")], 0)
        await until(lambda: rig.events.got(1, wp.Started), 10)
        rig.fleet.kill_for_job("cpu0", "it did something bad")
        await until(lambda: bool(rig.events.interrupted), 10)
        assert rig.events.interrupted == [Interrupted("cpu0", [1, 2], 1, "it did something bad")]
        await until(lambda: rig.fleet.any_idle(), 10)
        rig.fleet.kill_for_job("cpu0", "idle")  # no job to blame: nobody is
        await until(lambda: rig.fleet.any_idle() and next(v.restarts for v in rig.fleet.views()) == 2, 10)
        assert len(rig.events.interrupted) == 1

    scenario(tmp_path, body)


def test_a_job_silent_past_the_progress_timeout_has_its_worker_killed_and_is_blamed(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await started(rig)
        pid = rig.pid("cpu0")
        rig.limits = WorkerLimits(progress_timeout_s=60)
        rig.fleet.dispatch("cpu0", [rig.job(1, "segments=2 segment_s=30"), rig.job(2, "segments=1")], 0)
        await until(lambda: rig.events.got(1, wp.Started), 10)
        rig.clock.advance(59)  # the fake clock: the worker's real time is not what counts
        rig.fleet.enforce_limits()
        await asyncio.sleep(0.2)
        assert rig.events.interrupted == [] and rig.pid("cpu0") == pid
        rig.clock.advance(2)
        await until(lambda: bool(rig.events.interrupted), 10)
        (interrupted,) = rig.events.interrupted
        assert (interrupted.unfinished, interrupted.culprit) == ([1, 2], 1)
        assert "progress_timeout_s" in interrupted.error
        await until(lambda: rig.fleet.any_idle(), 10)

    scenario(tmp_path, body)


def test_a_busy_worker_over_the_memory_cap_is_killed_and_its_job_blamed(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await started(rig)
        rig.limits = WorkerLimits(max_memory_bytes=150 * 1024**2)
        await asyncio.sleep(0.3)
        assert rig.events.interrupted == [] and next(v.restarts for v in rig.fleet.views()) == 0, (
            "an idle worker under the cap is left alone"
        )
        rig.fleet.dispatch("cpu0", [rig.job(1, "hog=400000000 segments=1 segment_s=30")], 0)
        await until(lambda: bool(rig.events.interrupted), 15)
        (interrupted,) = rig.events.interrupted
        assert (interrupted.unfinished, interrupted.culprit) == ([1], 1)
        assert "max_memory_bytes" in interrupted.error
        await until(lambda: rig.fleet.any_idle(), 10)

    scenario(tmp_path, body)


def test_a_reply_over_the_line_limit_blames_its_job_and_the_worker_serves_again(tmp_path: Path) -> None:
    """70 MB of transcript on one line, past the daemon's 64 MiB: the reader survives, the worker restarts."""

    async def body(rig: Rig) -> None:
        await started(rig)
        rig.fleet.dispatch("cpu0", [rig.job(1, "huge=70000000"), rig.job(2, "segments=1")], 0)
        await until(lambda: bool(rig.events.interrupted), 15)
        (interrupted,) = rig.events.interrupted
        assert (interrupted.unfinished, interrupted.culprit) == ([1, 2], 1)
        await until(lambda: rig.fleet.any_idle(), 10)
        rig.fleet.dispatch("cpu0", [rig.job(3, "segments=1")], 0)
        await until(lambda: rig.events.got(3, wp.Finished), 10)

    scenario(tmp_path, body)


def test_a_worker_fails_a_result_over_max_result_bytes_itself(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await started(rig)
        pid = rig.pid("cpu0")
        rig.fleet.dispatch("cpu0", [rig.job(1, "huge=5000", 4096), rig.job(2, "segments=1", 4096)], 0)
        await until(lambda: rig.events.got(2, wp.Finished), 10)
        (failed,) = [m for _, _, m in rig.events.messages if isinstance(m, wp.Failed)]
        assert (failed.job_id, failed.kind) == (1, "fatal")
        assert rig.events.interrupted == [] and rig.pid("cpu0") == pid

    scenario(tmp_path, body)


def test_an_undecodable_reply_blames_the_running_job_instead_of_leaving_it_running(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        await started(rig)
        rig.fleet.dispatch("cpu0", [rig.job(1, "garble segments=3 segment_s=0.5")], 0)
        await until(lambda: bool(rig.events.interrupted), 10)
        (interrupted,) = rig.events.interrupted
        assert (interrupted.unfinished, interrupted.culprit) == ([1], 1)
        await until(lambda: rig.fleet.any_idle(), 10)

    scenario(tmp_path, body)


def pool_is_empty(rig: Rig) -> bool:
    return all(s.running_batches == 0 for s in rig.pool.device_status().values())
