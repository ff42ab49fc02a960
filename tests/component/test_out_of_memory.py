"""The daemon's answer to a CUDA out-of-memory error, driven in-process through the real wiring, with a probe
reporting two GPUs and workers running the real worker loop whose transcriber fails a chosen job with an
out-of-memory error the first time it runs."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from tests.support.inprocess import FakeProbe, build, reading, submit, until
from whisperd.config import Config, GpuConfig, WorkersConfig
from whisperd.jobs import JobState


def test_out_of_memory_retries_elsewhere_requeues_batch_mates_and_reserves_more(tmp_path: Path) -> None:
    config = Config(
        workers=WorkersConfig(cpu_workers=0, start_timeout_s=20), gpu=GpuConfig(worker_device="cpu")
    )
    app = build(tmp_path, config, FakeProbe([reading(0), reading(1)]), clock=time.time)
    before = app.estimates.memory_bytes("tiny.en")

    async def scenario() -> None:
        await app.daemon.start()
        loop_task = asyncio.create_task(app.run())
        submit(app, tmp_path, "oom-once", "segments=1", "segments=1")
        await until(lambda: all(app.registry.get(i).state.terminal for i in (1, 2, 3)))
        app.daemon.request_stop(signal.SIGTERM)
        await loop_task
        await app.drain(5)

    asyncio.run(asyncio.wait_for(scenario(), 60))
    store = app.store
    try:
        assert [app.registry.get(i).state for i in (1, 2, 3)] == [JobState.COMPLETED] * 3
        assert sum(app.telemetry.out_of_memory_events.values()) == 1
        assert app.estimates.memory_bytes("tiny.en") == int(before * 1.25)
        first, second = [e for e in store.history(1) if e.event == "dispatch"]
        assert first.worker != second.worker, "the retry went to the other GPU"
        assert [e.event for e in store.history(1)] == [
            "submit", "dispatch", "fail", "backoff_elapsed", "dispatch", "complete",
        ]  # fmt: skip
        assert app.registry.get(1).retries == 1
        assert "requeue" in [e.event for e in store.history(2)], "the batch-mate went back to the queue"
        assert app.registry.get(2).retries == 0
        assert store.transcript(2).text == "job 2"  # type: ignore[union-attr]
    finally:
        store.close()
