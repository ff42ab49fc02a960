"""The daemon's scheduling round driven by hand: the whole app built in-process by the real wiring, workers
running the real worker loop with the scripted transcriber (tests/support/fake_worker.py), and a fake clock.
No run loop: each test calls tick() itself and checks the jobs' states, their histories, the batches handed
to the fleet and how long tick() says the loop may sleep."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import msgspec
import pytest

from tests.support.inprocess import FakeClock, build, run_started, submit, until
from whisperd import protocol as p
from whisperd import workerproto as wp
from whisperd.app import App
from whisperd.batch import Batch
from whisperd.config import Config, SchedulerConfig, TranscribeConfig, WorkersConfig
from whisperd.errors import ConfigError
from whisperd.estimates import baseline_from_config
from whisperd.handlers import Caller
from whisperd.jobs import JobState

PENDING, PROCESSING, RETRYING = JobState.PENDING, JobState.PROCESSING, JobState.RETRYING
COMPLETED, CANCELLED = JobState.COMPLETED, JobState.CANCELLED


class Dispatched(msgspec.Struct, frozen=True):
    worker_id: str
    jobs: list[wp.JobSpec]
    reserve_bytes: int

    @property
    def job_ids(self) -> list[int]:
        return [j.job_id for j in self.jobs]


class Rig:
    def __init__(self, app: App, clock: FakeClock, tmp_path: Path) -> None:
        self.app, self.clock, self.tmp_path = app, clock, tmp_path
        self.dispatched: list[Dispatched] = []
        dispatch = app.fleet.dispatch

        def recording_dispatch(worker_id: str, jobs: Sequence[wp.JobSpec], reserve_bytes: int) -> Batch:
            self.dispatched.append(Dispatched(worker_id, list(jobs), reserve_bytes))
            return dispatch(worker_id, jobs, reserve_bytes)

        app.fleet.dispatch = recording_dispatch  # type: ignore[method-assign]
        self.started: list[int] = []  # jobs a worker said it started
        job_message = app.outcomes.job_message

        def recording_job_message(worker_id: str, device: str, message: wp.JobMessage) -> None:
            if isinstance(message, wp.Started):
                self.started.append(message.job_id)
            job_message(worker_id, device, message)

        app.outcomes.job_message = recording_job_message  # type: ignore[method-assign]

    def submit(self, *scripts: str, priority: int = 0, model: str = "tiny.en") -> list[int]:
        return [j.id for j in submit(self.app, self.tmp_path, *scripts, priority=priority, model=model)]

    def tick(self) -> float:
        return self.app.daemon.tick()

    def state(self, job_id: int) -> JobState:
        return self.app.registry.get(job_id).state

    def states(self, *job_ids: int) -> list[JobState]:
        return [self.state(i) for i in job_ids]

    def events(self, job_id: int) -> list[str]:
        return [e.event for e in self.app.store.history(job_id)]

    async def settled(self, *job_ids: int) -> None:
        """Until these jobs are out of the workers' hands and every worker is free again."""
        await until(
            lambda: (
                all(self.state(i) is not PROCESSING for i in job_ids)
                and all(v.state == "idle" for v in self.app.fleet.views())
            ),
            10,
        )


def config(cpu_workers: int = 1, **scheduler: float | int) -> Config:
    return Config(
        workers=WorkersConfig(cpu_workers=cpu_workers, start_timeout_s=20),
        scheduler=SchedulerConfig(**scheduler),  # type: ignore[arg-type]
    )


def scenario(
    tmp_path: Path,
    cfg: Config,
    body: Callable[[Rig], Awaitable[None]],
    config_loader: Callable[[], Config] | None = None,
) -> None:
    clock = FakeClock()
    app = build(tmp_path, cfg, clock=clock, config_loader=config_loader)

    run_started(app, lambda: body(Rig(app, clock, tmp_path)), 30)


# ---- placement -------------------------------------------------------------------------------------------


def test_tick_places_pending_jobs_on_idle_workers_in_batches_of_at_most_max(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        assert rig.tick() == 2.0, "nothing due: the next round is one schedule interval away"
        assert rig.dispatched == []
        jobs = rig.submit(*["segments=1"] * 7)
        assert rig.tick() == 2.0
        assert sorted((d.worker_id, len(d.jobs)) for d in rig.dispatched) == [("cpu0", 3), ("cpu1", 3)]
        placed = [i for d in rig.dispatched for i in d.job_ids]
        assert sorted(placed) == jobs[:6], "first come, first served"
        assert rig.states(*jobs[:6]) == [PROCESSING] * 6 and rig.state(jobs[6]) is PENDING
        for d in rig.dispatched:
            assert {rig.app.registry.get(i).worker for i in d.job_ids} == {d.worker_id}
            assert all(s.model == "tiny.en" and s.model_source == "bundled:tiny.en" for s in d.jobs)
            assert d.reserve_bytes == 0, "the CPU reserves no memory"
        assert rig.tick() == 2.0
        assert len(rig.dispatched) == 2, "no worker is idle: nothing more is placed"

        await rig.settled(*jobs[:6])
        assert rig.states(*jobs[:6]) == [COMPLETED] * 6
        assert rig.state(jobs[6]) is PENDING, "the loop is not running: only a tick places work"
        rig.tick()
        assert rig.dispatched[-1].job_ids == [jobs[6]]
        await rig.settled(jobs[6])
        assert rig.events(jobs[6]) == ["submit", "dispatch", "complete"]

    scenario(tmp_path, config(cpu_workers=2), body)


def test_a_higher_priority_job_submitted_later_is_placed_first(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        (low,) = rig.submit("segments=1", priority=0)
        (high,) = rig.submit("segments=1", priority=5)
        rig.tick()
        assert [d.job_ids for d in rig.dispatched] == [[high]]
        assert (rig.state(high), rig.state(low)) == (PROCESSING, PENDING)
        await rig.settled(high)
        rig.tick()
        assert [d.job_ids for d in rig.dispatched] == [[high], [low]]
        await rig.settled(low)
        assert rig.states(high, low) == [COMPLETED, COMPLETED]

    scenario(tmp_path, config(max_batch_size=1), body)


def test_nothing_is_placed_while_draining(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        rig.app.daemon.draining = True
        (job,) = rig.submit("segments=1")
        assert rig.tick() == 2.0
        assert rig.dispatched == [] and rig.state(job) is PENDING
        rig.clock.advance(60)
        rig.tick()
        assert rig.dispatched == [] and rig.state(job) is PENDING

    scenario(tmp_path, config(), body)


def test_a_lone_job_waits_for_company_until_the_batch_timeout_passes(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        (lone,) = rig.submit("segments=1")
        assert rig.tick() == 5.0, "sleep until the batch timeout, sooner than the schedule interval"
        assert rig.state(lone) is PENDING
        rig.clock.advance(4.9)
        assert rig.tick() == pytest.approx(0.1)
        assert rig.state(lone) is PENDING
        rig.clock.advance(0.1)
        rig.tick()
        assert rig.state(lone) is PROCESSING
        assert [d.job_ids for d in rig.dispatched] == [[lone]]
        await rig.settled(lone)

        pair = rig.submit("segments=1", "segments=1")
        rig.tick()
        assert rig.states(*pair) == [PROCESSING, PROCESSING], "two make a batch at once"
        assert rig.dispatched[-1].job_ids == pair
        await rig.settled(*pair)
        assert rig.states(lone, *pair) == [COMPLETED] * 3

    scenario(tmp_path, config(min_batch_size=2, batch_timeout_s=5.0, schedule_interval_s=10.0), body)


# ---- retries and cancels ---------------------------------------------------------------------------------


def test_a_retrying_job_is_queued_again_only_once_the_clock_passes_its_backoff(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        (job,) = rig.submit("oom-once")
        rig.tick()
        await rig.settled(job)
        assert rig.state(job) is RETRYING
        not_before = rig.app.registry.get(job).not_before
        assert not_before == rig.clock.now + 0.5
        assert rig.tick() == pytest.approx(0.5), "the retry is due before the next scheduled round"
        assert rig.state(job) is RETRYING
        rig.clock.advance(0.3)
        assert rig.tick() == pytest.approx(0.2)
        assert rig.state(job) is RETRYING and len(rig.dispatched) == 1
        rig.clock.advance(0.2)
        rig.tick()
        history = rig.app.store.history(job)
        assert [e.event for e in history] == ["submit", "dispatch", "fail", "backoff_elapsed", "dispatch"]
        assert history[3].to_state is PENDING and history[3].at == not_before
        assert rig.state(job) is PROCESSING, "queued again and placed in the same round"
        await rig.settled(job)
        assert rig.state(job) is COMPLETED
        assert rig.app.registry.get(job).retries == 1

    scenario(tmp_path, config(retry_backoff_s=0.5), body)


def test_tick_kills_a_worker_that_ignores_a_cancel_once_the_grace_has_passed(tmp_path: Path) -> None:
    """The cancelled job's batch-mate goes back to the queue unharmed; the cancelled job stays cancelled."""

    async def body(rig: Rig) -> None:
        stuck, mate = rig.submit("segments=2 segment_s=60", "segments=1")
        rig.tick()
        assert rig.states(stuck, mate) == [PROCESSING, PROCESSING]
        await until(lambda: stuck in rig.started, 10)  # a cancel before that would skip it, not stop it
        pid = rig.app.fleet.views()[0].pid
        caller = Caller(pid=os.getpid(), uid=os.geteuid(), gid=os.getegid())
        reply = await rig.app.handlers.cancel(p.Cancel(ids=[stuck]), caller, [])
        assert isinstance(reply, p.Jobs) and reply.errors == []
        assert rig.state(stuck) is CANCELLED
        assert rig.tick() == 3.0, "the loop wakes for the deadline, sooner than the schedule interval"
        rig.clock.advance(2.9)
        assert rig.tick() == pytest.approx(0.1)
        await asyncio.sleep(0.2)
        assert rig.app.fleet.views()[0].pid == pid, "not yet past the grace"
        rig.clock.advance(0.1)
        assert rig.tick() == 10.0
        await rig.settled(mate)
        assert rig.app.fleet.views()[0].pid != pid
        assert rig.state(stuck) is CANCELLED
        assert rig.events(stuck) == ["submit", "dispatch", "cancel"]
        assert rig.events(mate) == ["submit", "dispatch", "requeue"]
        assert rig.state(mate) is PENDING and rig.app.registry.get(mate).retries == 0
        rig.tick()
        await rig.settled(mate)
        assert rig.state(mate) is COMPLETED

    cfg = config(schedule_interval_s=10.0)
    cfg.workers.cancel_grace_s = 3.0
    scenario(tmp_path, cfg, body)


# ---- reload ----------------------------------------------------------------------------------------------


def test_reload_pointing_a_model_elsewhere_resets_its_estimate_and_the_next_job_loads_the_new_source(
    tmp_path: Path,
) -> None:
    new_source = "/srv/models/tiny.en-finetuned"
    reloaded = Config(
        workers=WorkersConfig(cpu_workers=1, start_timeout_s=20), models={"tiny.en": new_source}
    )
    assert reloaded.gpu.model_memory_bytes == {}

    async def body(rig: Rig) -> None:
        app = rig.app
        baseline = app.estimates.memory_bytes("tiny.en")
        learned = app.estimates.learn_out_of_memory("tiny.en")
        assert learned > baseline
        app.daemon.reload()
        assert app.daemon.config.models["tiny.en"] == new_source
        assert app.estimates.memory_bytes("tiny.en") == baseline_from_config(reloaded)["tiny.en"].memory_bytes
        assert app.estimates.memory_bytes("tiny.en") < learned, "what the old weights taught is dropped"

        (job,) = rig.submit("segments=1")
        rig.tick()
        assert [[s.model_source for s in d.jobs] for d in rig.dispatched] == [[new_source]]
        await rig.settled(job)
        assert rig.state(job) is COMPLETED

    scenario(tmp_path, config(), body, config_loader=lambda: reloaded)


def test_reload_keeping_a_model_source_keeps_what_out_of_memory_errors_taught(tmp_path: Path) -> None:
    reloaded = Config(workers=WorkersConfig(cpu_workers=1, start_timeout_s=20))

    async def body(rig: Rig) -> None:
        learned = rig.app.estimates.learn_out_of_memory("tiny.en")
        rig.app.daemon.reload()
        assert rig.app.estimates.memory_bytes("tiny.en") == learned

    scenario(tmp_path, config(), body, config_loader=lambda: reloaded)


def test_reload_applies_scheduling_settings_and_keeps_restart_only_ones(tmp_path: Path) -> None:
    reloaded = Config(
        workers=WorkersConfig(cpu_workers=4, start_timeout_s=20, cancel_grace_s=9.0),
        scheduler=SchedulerConfig(schedule_interval_s=7.0, max_retries=1, max_batch_size=1),
    )

    async def body(rig: Rig) -> None:
        app = rig.app
        app.daemon.reload()
        cfg = app.daemon.config
        assert cfg.workers.cpu_workers == 1, "the running workers stay until a restart"
        assert len(app.fleet.views()) == 1
        assert cfg.workers.cancel_grace_s == 9.0 and app.fleet.cancel_grace_s == 9.0
        assert app.registry.policy.max_retries == 1
        assert rig.tick() == 7.0
        jobs = rig.submit("segments=1", "segments=1")
        rig.tick()
        assert [d.job_ids for d in rig.dispatched] == [jobs[:1]], "max_batch_size 1 applies at once"
        await rig.settled(*jobs)
        rig.tick()
        await rig.settled(*jobs)
        assert rig.states(*jobs) == [COMPLETED, COMPLETED]

    scenario(tmp_path, config(), body, config_loader=lambda: reloaded)


def test_reload_keeps_a_dropped_model_while_jobs_still_use_it(tmp_path: Path) -> None:
    running = Config(
        workers=WorkersConfig(cpu_workers=1, start_timeout_s=20),
        models={"tiny.en": "bundled:tiny.en", "base": "base-src"},
    )
    reloaded = Config(
        workers=WorkersConfig(cpu_workers=1, start_timeout_s=20), models={"tiny.en": "bundled:tiny.en"}
    )

    async def body(rig: Rig) -> None:
        rig.app.daemon.draining = True  # keep the job queued across the reload
        (job,) = rig.submit("segments=1", model="base")
        rig.app.daemon.reload()
        assert rig.app.daemon.config.models == {"tiny.en": "bundled:tiny.en", "base": "base-src"}
        rig.app.daemon.draining = False
        rig.tick()
        assert [[s.model_source for s in d.jobs] for d in rig.dispatched] == [["base-src"]]
        await rig.settled(job)
        assert rig.state(job) is COMPLETED

    scenario(tmp_path, running, body, config_loader=lambda: reloaded)


def test_a_reload_that_cannot_be_read_leaves_the_running_configuration(tmp_path: Path) -> None:
    def broken() -> Config:
        raise ConfigError("whisperd.toml: not valid TOML")

    async def body(rig: Rig) -> None:
        before = rig.app.daemon.config
        rig.app.daemon.reload()
        assert rig.app.daemon.config is before
        assert rig.tick() == 2.0

    scenario(tmp_path, config(), body, config_loader=broken)


def test_a_reload_dropping_the_default_model_is_refused_whole(tmp_path: Path) -> None:
    reloaded = Config(
        workers=WorkersConfig(cpu_workers=1, start_timeout_s=20),
        transcribe=TranscribeConfig(default_model="base"),
        models={"base": "base-src"},
        scheduler=SchedulerConfig(schedule_interval_s=7.0),
    )

    async def body(rig: Rig) -> None:
        before = rig.app.daemon.config
        rig.app.daemon.reload()
        assert rig.app.daemon.config is before, "the default model is restart-only and must stay served"
        assert rig.tick() == 2.0

    scenario(tmp_path, config(), body, config_loader=lambda: reloaded)


# ---- a queue recovered under another configuration ---------------------------------------------------------


def test_a_recovered_job_whose_model_was_dropped_from_the_config_does_not_crash_the_tick(
    tmp_path: Path,
) -> None:
    before = Config(
        workers=WorkersConfig(cpu_workers=0, start_timeout_s=20),
        models={"tiny.en": "bundled:tiny.en", "base": "base-src"},
    )
    first = build(tmp_path, before, clock=FakeClock())
    try:
        (orphan,) = submit(first, tmp_path, "segments=1", model="base")
    finally:
        first.store.close()

    async def body(rig: Rig) -> None:
        assert rig.state(orphan.id) is PENDING
        (job,) = rig.submit("segments=1")
        rig.tick()
        await rig.settled(job)
        assert rig.state(job) is COMPLETED
        assert rig.state(orphan.id) is not PROCESSING, "no worker was handed the job"

    scenario(tmp_path, config(), body)
