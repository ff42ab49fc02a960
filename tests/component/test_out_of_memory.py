"""The daemon's answer to a CUDA out-of-memory error, driven in-process with real components (SQLite store,
worker subprocesses over pipes) and two injected parts: a probe reporting two GPUs, and a scripted worker
program that fails a chosen job with an out-of-memory error the first time it runs."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from whisperd.config import Config, GpuConfig, WorkersConfig
from whisperd.daemon import Daemon
from whisperd.gpuprobe import GpuReading
from whisperd.jobs import JobState
from whisperd.store import NewJob, Store

GIB = 1024**3


class TwoGpus:
    driver_version = "test"

    def start(self) -> bool:
        return True

    def read(self) -> list[GpuReading]:
        return [
            GpuReading(
                index=i,
                uuid=f"GPU-{i}",
                name="test",
                healthy=True,
                error=None,
                memory_total_bytes=80 * GIB,
                memory_used_bytes=GIB,
                memory_free_bytes=79 * GIB,
                utilization_ratio=0.0,
                memory_utilization_ratio=0.0,
                temperature_c=30.0,
                power_w=50.0,
            )
            for i in (0, 1)
        ]

    def close(self) -> None:
        pass


def scripted_spawner(state_dir: Path, oom_jobs: str) -> Any:
    async def spawn(*argv: str, env: dict[str, str], **kwargs: Any) -> asyncio.subprocess.Process:
        script = Path(__file__).parents[1] / "support" / "scripted_worker.py"
        env = {**env, "SCRIPTED_OOM_JOBS": oom_jobs, "SCRIPTED_STATE_DIR": str(state_dir)}
        return await asyncio.create_subprocess_exec(sys.executable, str(script), env=env, **kwargs)

    return spawn


def test_out_of_memory_retries_elsewhere_requeues_batch_mates_and_reserves_more(tmp_path: Path) -> None:
    config = Config(
        workers=WorkersConfig(cpu_workers=0, start_timeout_s=20), gpu=GpuConfig(worker_device="cpu")
    )
    store = Store(tmp_path)
    spooled = []
    for _ in range(3):
        path = tmp_path / f"audio{len(spooled)}"
        path.write_bytes(b"not decoded by the scripted worker")
        fd = os.open(path, os.O_RDONLY)
        spooled.append(store.spool_from_fd(fd, 1 << 20)[0])
        os.close(fd)

    async def scenario() -> tuple[Daemon, int]:
        daemon = Daemon(config, store, TwoGpus(), spawner=scripted_spawner(tmp_path, "1"))
        await daemon.start()
        before = daemon.settings.model_memory_bytes["tiny.en"]
        loop_task = asyncio.create_task(daemon.run_until_stopped())
        daemon.registry.add([
            NewJob(spool_path=p, filename=f"f{i}", owner_uid=0, model="tiny.en", language=None,
                   task="transcribe", priority=0, word_timestamps=False)
            for i, p in enumerate(spooled)
        ])  # fmt: skip
        daemon.wake()
        for _ in range(200):
            if all(daemon.registry.get(i).state.terminal for i in (1, 2, 3)):
                break
            await asyncio.sleep(0.05)
        daemon.request_stop(signal.SIGTERM)
        await loop_task
        await daemon.drain(5)
        return daemon, before

    daemon, before = asyncio.run(asyncio.wait_for(scenario(), 60))  # fail, never hang
    try:
        assert [store.get(i).state for i in (1, 2, 3)] == [JobState.COMPLETED] * 3  # type: ignore[union-attr]
        assert sum(daemon.oom_events.values()) == 1
        assert daemon.settings.model_memory_bytes["tiny.en"] == int(before * 1.25)
        first, second = [h for h in store.history(1) if h[3] == "dispatch"]
        assert first[4] != second[4], "the retry went to the other GPU"
        assert [h[3] for h in store.history(1)] == [
            "submit", "dispatch", "fail", "backoff_elapsed", "dispatch", "complete",
        ]  # fmt: skip
        assert store.get(1).retries == 1  # type: ignore[union-attr]
        assert "requeue" in [h[3] for h in store.history(2)], "the batch-mate went back to the queue"
        assert store.get(2).retries == 0  # type: ignore[union-attr]
        assert store.transcript(2).text == "job 2"  # type: ignore[union-attr]
    finally:
        store.close()
