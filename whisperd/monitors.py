"""The two timed monitors: GPU status every 5 s (NVML readings, health changes, a device snapshot to
watchers) and system performance every 30 s (a summary line in the log, a system snapshot to watchers)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

import msgspec

from whisperd.gpupool import DevicePool, gpu_name
from whisperd.gpuprobe import GpuProbe, GpuReading
from whisperd.protocol import DeviceSnapshot, StatsView, SystemSnapshot
from whisperd.views import Views, jobs_by_device

log = logging.getLogger("whisperd.monitor")


def summary_line(stats: StatsView, allocation: dict[str, list[int]]) -> str:
    """Queue state, concurrency and per-device allocation: one line for the log every 30 s."""
    states = " ".join(f"{s}={n}" for s, n in stats.states.items() if n) or "no jobs"
    per_device = " ".join(f"{d}:{len(jobs)}" for d, jobs in sorted(allocation.items())) or "-"
    rtf = f"{stats.realtime_factor:.1f}x" if stats.realtime_factor is not None else "-"
    return (
        f"queue {stats.queue_depth} waiting, {stats.running_jobs} running ({states}); "
        f"jobs per device {per_device}; realtime factor {rtf}"
    )


class Monitors:
    def __init__(
        self,
        probe: GpuProbe,
        pool: DevicePool,
        views: Views,
        abandon_device: Callable[[str], None],
        publish: Callable[[msgspec.Struct], None],
        *,
        nvml: Executor,
    ) -> None:
        """nvml: the one thread NVML is called on, apart from the loop's default pool, so that nothing else
        (a hung spool read, say) can keep the GPU monitor from its readings."""
        self._probe = probe
        self._nvml = nvml
        self._pool = pool
        self._views = views
        self._abandon_device = abandon_device
        self._publish = publish
        self._unhealthy: set[str] = set()

    def start(self, gpu_interval_s: float, performance_interval_s: float) -> list[asyncio.Task[None]]:
        self._unhealthy = {name for name, s in self._pool.device_status().items() if not s.healthy}
        return [
            asyncio.create_task(self._every(gpu_interval_s, self.gpu_status)),
            asyncio.create_task(self._every(performance_interval_s, self.performance)),
        ]

    @staticmethod
    async def _every(interval_s: float, action: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await action()
            except Exception:  # a monitor must never stop the daemon
                log.exception("monitor failed")

    async def gpu_status(self) -> None:
        if self._pool.gpu_names:  # a CPU-only daemon never calls NVML again
            readings = await asyncio.get_running_loop().run_in_executor(self._nvml, self._probe.read)
            self._pool.update(readings)
            self._note_health(readings)
        self._publish(DeviceSnapshot(devices=self._views.devices()))

    def _note_health(self, readings: list[GpuReading]) -> None:
        """A GPU that stops answering NVML gets no new work (the plan skips it) and its running jobs go back
        to the queue, to finish on the others."""
        unhealthy = {gpu_name(r.index) for r in readings if not r.healthy}
        for reading in readings:
            name = gpu_name(reading.index)
            fields = {"DEVICE": name, "GPU_INDEX": reading.index}
            if name in unhealthy and name not in self._unhealthy:
                log.error("GPU %s stopped answering NVML (%s): its jobs go back to the queue", name,
                          reading.error, extra=fields)  # fmt: skip
                self._abandon_device(name)
            elif name in self._unhealthy and name not in unhealthy:
                log.info("GPU %s answers NVML again", name, extra=fields)
        self._unhealthy = unhealthy

    async def performance(self) -> None:
        stats = self._views.stats()
        log.info("%s", summary_line(stats, jobs_by_device(stats.workers)))
        self._publish(SystemSnapshot(stats=stats))
