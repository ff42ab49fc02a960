"""The timed monitors in-process: NVML readings reach the pool, a GPU that stops answering has its busy
workers abandoned once (and again only after it came back and was lost anew), and snapshots reach watchers."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from tests.support.inprocess import FakeProbe, reading
from whisperd.gpupool import CPU, DevicePool
from whisperd.monitors import Monitors
from whisperd.protocol import DeviceSnapshot, DeviceView, StatsView, SystemSnapshot, WorkerView
from whisperd.threads import DaemonThreadPool

GIB = 1024**3


class FixedViews:
    def __init__(self, pool: DevicePool) -> None:
        self._pool = pool

    def devices(self) -> list[DeviceView]:
        return self._pool.views({})

    def stats(self) -> StatsView:
        worker = WorkerView(id="gpu0", device="cuda:0", pid=1, state="busy", models=[], jobs=[7], restarts=0)
        return StatsView(
            states={"PROCESSING": 1}, queue_depth=0, running_jobs=1, workers=[worker], uptime_s=1.0,
            audio_seconds_total=0.0, processing_seconds_total=0.0, realtime_factor=None,
        )  # fmt: skip


def monitors(probe: FakeProbe, pool: DevicePool) -> tuple[Monitors, list[str], list[msgspec.Struct]]:
    abandoned: list[str] = []
    published: list[msgspec.Struct] = []
    views: Any = FixedViews(pool)
    monitor = Monitors(
        probe, pool, views, abandoned.append, published.append, nvml=DaemonThreadPool(1, "nvml")
    )
    return monitor, abandoned, published


def test_readings_reach_the_pool_and_a_lost_gpu_is_abandoned_once_per_loss() -> None:
    probe = FakeProbe([reading(0), reading(1)])
    pool = DevicePool()
    pool.configure(cpu=False, readings=probe.read())
    monitor, abandoned, published = monitors(probe, pool)

    probe.readings = [reading(0, used=30 * GIB), reading(1)]
    asyncio.run(monitor.gpu_status())
    assert pool.device_status()["cuda:0"].available_memory_bytes == 50 * GIB
    assert abandoned == []
    assert isinstance(published[-1], DeviceSnapshot)
    assert [d.name for d in published[-1].devices] == ["cuda:0", "cuda:1"]

    probe.readings = [reading(0), reading(1, healthy=False)]
    asyncio.run(monitor.gpu_status())
    asyncio.run(monitor.gpu_status())  # still lost: nothing more to abandon
    assert abandoned == ["cuda:1"]
    assert not pool.device_status()["cuda:1"].healthy

    probe.readings = [reading(0), reading(1)]
    asyncio.run(monitor.gpu_status())
    assert pool.device_status()["cuda:1"].healthy
    probe.readings = [reading(0), reading(1, healthy=False)]
    asyncio.run(monitor.gpu_status())
    assert abandoned == ["cuda:1", "cuda:1"]


def test_a_cpu_only_daemon_never_reads_nvml_again() -> None:
    class CountingProbe(FakeProbe):
        reads = 0

        def read(self) -> list[Any]:
            CountingProbe.reads += 1
            return []

    pool = DevicePool(cpu=True)
    monitor, _, published = monitors(CountingProbe(), pool)
    asyncio.run(monitor.gpu_status())
    assert CountingProbe.reads == 0
    assert [d.name for d in published[-1].devices] == [CPU]  # type: ignore[attr-defined]


def test_the_performance_monitor_publishes_a_system_snapshot() -> None:
    monitor, _, published = monitors(FakeProbe(), DevicePool(cpu=True))
    asyncio.run(monitor.performance())
    [snapshot] = published
    assert isinstance(snapshot, SystemSnapshot)
    assert snapshot.stats.workers[0].jobs == [7]


def test_nvml_is_read_on_its_own_thread_when_the_default_pool_is_stuck() -> None:
    """Threads of the loop's default pool stuck in reads that never return do not stop the GPU monitor."""
    probe = FakeProbe([reading(0)])
    pool = DevicePool()
    pool.configure(cpu=False, readings=probe.read())
    monitor, _, published = monitors(probe, pool)
    release = threading.Event()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
        stuck = [asyncio.create_task(asyncio.to_thread(release.wait, 60)) for _ in range(2)]
        try:
            probe.readings = [reading(0, used=30 * GIB)]
            await asyncio.wait_for(monitor.gpu_status(), 10)
        finally:
            release.set()
            await asyncio.gather(*stuck)

    asyncio.run(scenario())
    assert pool.device_status()["cuda:0"].available_memory_bytes == 50 * GIB
    assert isinstance(published[-1], DeviceSnapshot)
