"""The seed's two timed monitors: GPU status every 5 s (NVML readings, health changes, a device snapshot to
watchers) and system performance every 30 s (a summary line in the log, a system snapshot to watchers)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from whisperd.gpupool import gpu_name
from whisperd.gpuprobe import GpuReading
from whisperd.protocol import DeviceSnapshot, StatsView, SystemSnapshot

if TYPE_CHECKING:
    from whisperd.daemon import Daemon

log = logging.getLogger("whisperd.monitor")


def summary_line(stats: StatsView, allocation: dict[str, list[int]]) -> str:
    """Queue state, concurrency and per-device allocation, as the seed's performance monitor reported."""
    states = " ".join(f"{s}={n}" for s, n in stats.states.items() if n) or "no jobs"
    per_device = " ".join(f"{d}:{len(jobs)}" for d, jobs in sorted(allocation.items())) or "-"
    rtf = f"{stats.realtime_factor:.1f}x" if stats.realtime_factor is not None else "-"
    return (
        f"queue {stats.queue_depth} waiting, {stats.running_jobs} running ({states}); "
        f"jobs per device {per_device}; realtime factor {rtf}"
    )


class Monitors:
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon
        self._unhealthy = {name for name, s in daemon.pool.get_gpu_status().items() if not s.healthy}

    def start(self) -> list[asyncio.Task[None]]:
        sched = self._daemon.config.scheduler
        return [
            asyncio.create_task(self._every(sched.gpu_monitor_interval_s, self.gpu_status)),
            asyncio.create_task(self._every(sched.performance_monitor_interval_s, self.performance)),
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
        daemon = self._daemon
        if daemon.pool.gpu_names:  # a CPU-only daemon never calls NVML again
            readings = await asyncio.to_thread(daemon.probe.read)
            daemon.pool.update(readings)
            self._note_health(readings)
        daemon.watchers.publish(DeviceSnapshot(devices=daemon.device_views()))

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
                self._daemon.abandon_device(name)
            elif name in self._unhealthy and name not in unhealthy:
                log.info("GPU %s answers NVML again", name, extra=fields)
        self._unhealthy = unhealthy

    async def performance(self) -> None:
        daemon = self._daemon
        stats = daemon.stats()
        allocation: dict[str, list[int]] = {}
        for worker in stats.workers:
            allocation.setdefault(worker.device, []).extend(worker.jobs)
        log.info("%s", summary_line(stats, allocation))
        daemon.watchers.publish(SystemSnapshot(stats=stats))
