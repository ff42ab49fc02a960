"""The daemon's parts built in-process by the real wiring (whisperd.app), with the I/O at the edges faked:
a probe that reports chosen GPUs, worker processes running the real worker loop with a scripted transcriber
(tests/support/fake_worker.py), and audio files that are the script."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from whisperd.app import App
from whisperd.config import Config
from whisperd.gpuprobe import GpuReading
from whisperd.spool import Spool
from whisperd.sqlite_store import SqliteStore
from whisperd.store import JobRow, NewJob
from whisperd.supervisor import Spawner

GIB = 1024**3


def reading(index: int, used: int = GIB, total: int = 80 * GIB, healthy: bool = True) -> GpuReading:
    return GpuReading(
        index=index, uuid=f"GPU-{index}", name="test", healthy=healthy, error=None if healthy else "lost",
        memory_total_bytes=total, memory_used_bytes=used if healthy else None,
        memory_free_bytes=total - used if healthy else None, utilization_ratio=0.0,
        memory_utilization_ratio=0.0, temperature_c=30.0, power_w=50.0,
    )  # fmt: skip


class FakeProbe:
    """NVML as a list the test edits."""

    driver_version = "test"

    def __init__(self, readings: Sequence[GpuReading] = ()) -> None:
        self.readings = list(readings)
        self.closed = False

    def start(self) -> bool:
        return bool(self.readings)

    def read(self) -> list[GpuReading]:
        return list(self.readings)

    def close(self) -> None:
        self.closed = True


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def fake_worker_spawner(state_dir: Path, batched: bool = False) -> Spawner:
    """Starts tests/support/fake_worker.py with the worker arguments the daemon chose; batched: its
    transcriber decodes windows too (batched mode)."""
    state_dir.mkdir(parents=True, exist_ok=True)

    async def spawn(*argv: str, env: dict[str, str], **kwargs: Any) -> asyncio.subprocess.Process:
        worker_args = list(argv[argv.index("whisperd.worker_main") + 1 :])
        env = {**env, "FAKE_WORKER_STATE": str(state_dir)}
        if batched:
            env["FAKE_WORKER_BATCHED"] = "1"
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.support.fake_worker", *worker_args, env=env, **kwargs
        )

    return spawn


def build(
    tmp_path: Path,
    config: Config,
    probe: FakeProbe | None = None,
    clock: Callable[[], float] | None = None,
    spawner: Spawner | None = None,
    config_loader: Callable[[], Config] | None = None,
    store: SqliteStore | None = None,
) -> App:
    """store: the job store (None: a SqliteStore in tmp_path)."""
    store = store or SqliteStore(tmp_path / "jobs.sqlite3")
    return App(
        config, store, Spool(tmp_path / "spool"), probe or FakeProbe(),
        spawner=spawner or fake_worker_spawner(tmp_path / "fake-worker"),
        clock=clock or FakeClock(), config_loader=config_loader, cpu_count=2,
    )  # fmt: skip


def submit(
    app: App, tmp_path: Path, *scripts: str, model: str = "tiny.en", priority: int = 0
) -> list[JobRow]:
    """Spool each script as a job's audio and queue the jobs, as a submit does."""
    spool = Spool(tmp_path / "spool")
    new_jobs = []
    for i, script in enumerate(scripts):
        source = tmp_path / f"audio-{os.getpid()}-{len(list(tmp_path.iterdir()))}-{i}"
        source.write_text(script)
        fd = os.open(source, os.O_RDONLY)
        try:
            path, size = spool.copy_from_fd(fd, 1 << 20)
        finally:
            os.close(fd)
        new_jobs.append(
            NewJob(spool_path=path, spool_bytes=size, filename=source.name, owner_uid=os.geteuid(),
                   model=model, language=None, task="transcribe", priority=priority, word_timestamps=False)
        )  # fmt: skip
    jobs = app.registry.add(new_jobs)
    app.wakeup.set()
    return jobs


async def until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait on the running loop until condition holds; fail, never hang."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def run_started(app: App, body: Callable[[], Awaitable[None]], timeout_s: float = 30.0) -> None:
    """Start the app's daemon, run body on its loop, drain, close the store: fail, never hang."""

    async def main() -> None:
        await app.daemon.start()
        try:
            await body()
        finally:
            await app.drain(5)

    try:
        asyncio.run(asyncio.wait_for(main(), timeout_s))
    finally:
        app.store.close()


def run_looping(app: App, body: Callable[[], Awaitable[None]], timeout_s: float = 60.0) -> None:
    """run_started(), with the daemon's scheduling loop running meanwhile (stopped before the drain)."""

    async def main() -> None:
        await app.daemon.start()
        loop = asyncio.create_task(app.daemon.run_until_stopped())
        try:
            await body()
        finally:
            app.daemon.request_stop(15)
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            await app.drain(5)

    try:
        asyncio.run(asyncio.wait_for(main(), timeout_s))
    finally:
        app.store.close()
