"""One long job spread over several idle workers (batched mode), in-process: the real wiring, the daemon's
own loop running, worker processes running the real worker loop with the scripted window decoder
(tests/support/fake_worker.py, FAKE_WORKER_BATCHED). A script `windows=N` is N windows 10 s apart, window k
decoded to " w<k>", so a transcript shows which windows were decoded, in which order, and how often."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.support.inprocess import FakeClock, build, fake_worker_spawner, run_looping, submit, until
from whisperd import protocol as p
from whisperd import workerproto as wp
from whisperd.app import App
from whisperd.config import Config, TranscribeConfig, WorkersConfig
from whisperd.handlers import Caller
from whisperd.jobs import JobState

WINDOWS = 12
EXPECTED = "".join(f" w{k}" for k in range(WINDOWS)).strip()


def config(workers: int = 3, mode: str = "batched", min_part_s: float = 20.0, retries: int = 2) -> Config:
    cfg = Config(
        workers=WorkersConfig(cpu_workers=workers, start_timeout_s=20),
        transcribe=TranscribeConfig(mode=mode, shard_min_audio_s=min_part_s, cpu_chunk_batch=2),  # type: ignore[arg-type]
    )
    cfg.scheduler.max_retries = retries
    return cfg


class Seen:
    """What the workers reported, per job: which workers decoded it and what they said."""

    def __init__(self, app: App) -> None:
        self.workers: dict[int, set[str]] = {}
        self.messages: list[tuple[str, wp.JobMessage]] = []
        job_message = app.outcomes.job_message

        def recording(worker_id: str, device: str, message: wp.JobMessage) -> None:
            self.messages.append((worker_id, message))
            if isinstance(message, wp.Started):
                self.workers.setdefault(message.job_id, set()).add(worker_id)
            job_message(worker_id, device, message)

        app.outcomes.job_message = recording  # type: ignore[method-assign]

    def shared(self) -> list[wp.Shared]:
        return [m for _w, m in self.messages if isinstance(m, wp.Shared)]


def scenario(tmp_path: Path, cfg: Config, body: Callable[[App, Seen], Awaitable[None]]) -> None:
    app = build(tmp_path, cfg, clock=FakeClock(), spawner=fake_worker_spawner(tmp_path / "fw", batched=True))
    seen = Seen(app)

    run_looping(app, lambda: body(app, seen))


def text(app: App, job_id: int) -> str:
    transcript = app.registry.transcript(job_id)
    assert transcript is not None
    return transcript.text


async def finished(app: App, job_id: int) -> JobState:
    await until(lambda: app.registry.get(job_id).state.terminal, 30)
    await until(lambda: all(v.state == "idle" for v in app.fleet.views()), 10)
    return app.registry.get(job_id).state


def test_a_long_job_is_spread_over_idle_workers_and_stitched_in_order(tmp_path: Path) -> None:
    async def body(app: App, seen: Seen) -> None:
        [job] = submit(app, tmp_path, f"windows={WINDOWS} window_s=0.1")
        assert await finished(app, job.id) is JobState.COMPLETED
        assert len(seen.workers[job.id]) == 3, "its worker kept a part and gave one to each idle worker"
        [answer] = seen.shared()
        assert len(answer.parts) == 2
        transcript = app.registry.transcript(job.id)
        assert transcript is not None and transcript.text == EXPECTED, "every window once, in order"
        assert [s.id for s in transcript.segments] == list(range(1, WINDOWS + 1))
        assert transcript.duration_s == 10.0 * WINDOWS
        done = app.registry.get(job.id)
        assert done.retries == 0 and done.progress == 100.0
        assert [e.event for e in app.store.history(job.id)] == ["submit", "dispatch", "complete"]

    scenario(tmp_path, config(), body)


def test_progress_counts_every_part_and_only_grows(tmp_path: Path) -> None:
    async def body(app: App, seen: Seen) -> None:
        progress: list[float] = []
        publish = app.registry._publish_watchers

        def recording(view: p.JobView) -> None:
            if view.state is JobState.PROCESSING:
                progress.append(view.progress)
            publish(view)

        app.registry._publish_watchers = recording  # type: ignore[method-assign]
        [job] = submit(app, tmp_path, f"windows={WINDOWS} window_s=0.1")
        assert await finished(app, job.id) is JobState.COMPLETED
        assert len(seen.shared()) == 1
        assert progress == sorted(progress), progress
        assert progress[-1] > 50

    scenario(tmp_path, config(), body)


def test_a_part_that_fails_is_retried_alone(tmp_path: Path) -> None:
    async def body(app: App, seen: Seen) -> None:
        [job] = submit(app, tmp_path, f"windows={WINDOWS} window_s=0.05 part-fails-once")
        assert await finished(app, job.id) is JobState.COMPLETED
        assert text(app, job.id) == EXPECTED, "the failed part decoded again, the others once"
        failed = [m for _w, m in seen.messages if isinstance(m, wp.Failed)]
        assert len(failed) == 1
        assert app.registry.get(job.id).retries == 0, "the job itself was never retried"
        assert "fail" not in [e.event for e in app.store.history(job.id)]

    scenario(tmp_path, config(), body)


def test_a_part_whose_worker_dies_is_placed_again(tmp_path: Path) -> None:
    async def body(app: App, seen: Seen) -> None:
        [job] = submit(app, tmp_path, f"windows={WINDOWS} window_s=0.05 part-crashes-once")
        assert await finished(app, job.id) is JobState.COMPLETED
        assert text(app, job.id) == EXPECTED
        assert sum(v.restarts for v in app.fleet.views()) == 1

    scenario(tmp_path, config(), body)


def test_a_part_failing_past_the_retries_fails_the_job_and_stops_the_others(tmp_path: Path) -> None:
    async def body(app: App, seen: Seen) -> None:
        [job] = submit(app, tmp_path, f"windows={WINDOWS * 2} window_s=0.2 part-fails-always")
        assert await finished(app, job.id) is JobState.FAILED
        failed = app.registry.get(job.id)
        assert failed.error is not None and "failed 2 times" in failed.error
        assert app.spreads.get(job.id) is None
        first = app.registry.get(job.id).worker
        stopped = [w for w, m in seen.messages if isinstance(m, wp.Stopped) and m.job_id == job.id]
        assert first in stopped, "the part still decoding was stopped, not run to its end"

    scenario(tmp_path, config(retries=1), body)


def test_cancel_stops_every_part(tmp_path: Path) -> None:
    async def body(app: App, seen: Seen) -> None:
        [job] = submit(app, tmp_path, f"windows={WINDOWS * 4} window_s=0.2")
        await until(lambda: sum(job.id in v.jobs for v in app.fleet.views()) == 3, 20)
        caller = Caller(uid=os.geteuid(), gid=os.getegid(), pid=os.getpid())
        reply = await app.handlers.handle(p.Cancel(ids=[job.id]), caller, [])
        assert isinstance(reply, p.Jobs) and reply.errors == []
        assert await finished(app, job.id) is JobState.CANCELLED
        stopped = {w for w, m in seen.messages if isinstance(m, wp.Stopped) and m.job_id == job.id}
        assert len(stopped) == 3, "each worker let go of its part"

    scenario(tmp_path, config(), body)


def test_short_jobs_and_sequential_mode_are_never_spread(tmp_path: Path) -> None:
    async def body(app: App, seen: Seen) -> None:
        [short] = submit(app, tmp_path, "windows=3 window_s=0.1")
        assert await finished(app, short.id) is JobState.COMPLETED
        assert seen.shared() == [] and len(seen.workers[short.id]) == 1

    scenario(tmp_path, config(), body)

    async def sequential(app: App, seen: Seen) -> None:
        [long] = submit(app, tmp_path, f"windows={WINDOWS} window_s=0.05")
        assert await finished(app, long.id) is JobState.COMPLETED
        assert seen.shared() == [] and len(seen.workers[long.id]) == 1

    scenario(tmp_path / "seq", config(mode="sequential"), sequential)
