"""One WorkerHandle alone, driving the real worker loop with the scripted transcriber (tests/support/
fake_worker.py): a reply longer than the reader's line limit, and the restart backoff after deaths on a job
and after failed starts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.support.inprocess import fake_worker_spawner, until
from whisperd import workerproto as wp
from whisperd.supervisor import Spawner, WorkerHandle, WorkerSpec
from whisperd.workerspecs import worker_argv

BACKOFF_S = 0.05


class Recorder:
    def __init__(self) -> None:
        self.messages: list[wp.FromWorker] = []
        self.exits: list[int] = []
        self.faults: list[str] = []

    def on_message(self, handle: WorkerHandle, message: wp.FromWorker) -> None:
        self.messages.append(message)

    def on_exit(self, handle: WorkerHandle, returncode: int) -> None:
        self.exits.append(returncode)

    def on_fault(self, handle: WorkerHandle, reason: str) -> None:
        self.faults.append(reason)

    def finished(self, job_id: int) -> bool:
        return any(isinstance(m, wp.Finished) and m.job_id == job_id for m in self.messages)


def run_handle(
    tmp_path: Path,
    body: Callable[[WorkerHandle, Recorder], Awaitable[None]],
    spawner: Spawner | None = None,
    max_line_bytes: int = 1024 * 1024,
) -> None:
    async def main() -> None:
        recorder = Recorder()
        spec = WorkerSpec(id="cpu0", device="cpu", argv=worker_argv("cpu", "int8", 1, 2, None), env={})
        handle = WorkerHandle(
            spec, recorder.on_message, recorder.on_exit, BACKOFF_S, 10.0,
            spawner or fake_worker_spawner(tmp_path / "fw"), on_fault=recorder.on_fault,
            max_line_bytes=max_line_bytes,
        )  # fmt: skip
        handle.start()
        try:
            await body(handle, recorder)
        finally:
            await handle.stop(1)

    asyncio.run(asyncio.wait_for(main(), 30))


def give(handle: WorkerHandle, tmp_path: Path, batch_id: int, job_id: int, script: str) -> None:
    """What the fleet does to hand out a batch of one job: its audio as a descriptor, then the batch."""
    audio = tmp_path / f"audio-{job_id}"
    audio.write_text(script)
    spec = wp.JobSpec(
        job_id=job_id, audio_path=str(audio), model="tiny.en", model_source="bundled:tiny.en", language=None,
        task="transcribe", word_timestamps=False, beam_size=5, vad_filter=False,
    )  # fmt: skip
    handle.send_audio(batch_id, job_id, str(audio))
    handle.send(wp.RunBatch(batch_id=batch_id, jobs=[spec]))


def test_a_line_over_the_limit_is_a_fault_and_the_reader_lives_on_in_a_restarted_worker(
    tmp_path: Path,
) -> None:
    async def body(handle: WorkerHandle, recorder: Recorder) -> None:
        await asyncio.wait_for(handle.ready.wait(), 10)
        first_pid = handle.pid
        give(handle, tmp_path, 1, 1, "huge=2000000")  # 2 MB of text against a 1 MiB line
        await until(lambda: bool(recorder.exits), 10)
        assert len(recorder.faults) == 1, "the fleet is told, so that it blames the job"
        assert not recorder.finished(1)
        await until(lambda: handle.up and handle.pid != first_pid, 10)
        assert handle.restarts == 1
        give(handle, tmp_path, 2, 2, "segments=1")
        await until(lambda: recorder.finished(2), 10)

    run_handle(tmp_path, body)


def test_deaths_on_a_job_restart_the_worker_without_a_growing_wait(tmp_path: Path) -> None:
    """Each death is the job's, bounded by its retries: the device must not stay idle for a doubling wait."""

    async def body(handle: WorkerHandle, recorder: Recorder) -> None:
        for attempt in range(1, 5):
            await until(lambda: handle.up, 10)
            give(handle, tmp_path, attempt, 1, "crash-always")
            await until(lambda: len(recorder.exits) == attempt, 10)  # noqa: B023 - awaited at once
            assert handle.next_backoff_s == BACKOFF_S
        await until(lambda: handle.up, 10)
        assert handle.restarts == 4

    run_handle(tmp_path, body)


def test_a_worker_that_cannot_start_waits_longer_after_each_try(tmp_path: Path) -> None:
    real = fake_worker_spawner(tmp_path / "fw")
    tries = 0

    async def spawner(*argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
        nonlocal tries
        tries += 1
        if tries <= 3:
            raise FileNotFoundError(argv[0])
        return await real(*argv, **kwargs)

    async def body(handle: WorkerHandle, recorder: Recorder) -> None:
        await until(lambda: handle.up, 10)
        assert handle.restarts == 3
        assert handle.next_backoff_s == BACKOFF_S * 8, "waited 1, 2 and 4 times the backoff"

    run_handle(tmp_path, body, spawner)
