"""Device memory accounting: the latest probe readings plus whisperd's own reservations.

`device_status()` answers the scheduler with each device (the GPUs and, where CPU workers run, the CPU) and
its available memory: what the driver reports
free, less what whisperd reserved for batches whose memory the driver does not show yet.
"""

from __future__ import annotations

import msgspec

from whisperd.gpuprobe import GpuReading
from whisperd.protocol import DeviceView
from whisperd.scheduling import DeviceStatus

CPU = "cpu"


def gpu_name(index: int) -> str:
    return f"cuda:{index}"


class Reservation(msgspec.Struct, kw_only=True):
    device: str
    memory_bytes: int
    used_at_reserve_bytes: int  # the driver's figure when reserved, to tell how much it shows since


class DevicePool:
    def __init__(self, cpu: bool = False) -> None:
        self._cpu = cpu
        self._readings: dict[str, GpuReading] = {}
        self._reservations: dict[int, Reservation] = {}  # by batch id
        self._running: dict[str, int] = {}

    def configure(self, cpu: bool, readings: list[GpuReading]) -> None:
        """At start, once the workers are known: whether CPU workers run, and the GPUs as first read."""
        self._cpu = cpu
        self.update(readings)

    @property
    def gpu_names(self) -> list[str]:
        return list(self._readings)

    def update(self, readings: list[GpuReading]) -> None:
        self._readings = {gpu_name(r.index): r for r in readings}

    def reading(self, device: str) -> GpuReading | None:
        return self._readings.get(device)

    def reserve(self, batch_id: int, device: str, memory_bytes: int) -> None:
        reading = self._readings.get(device)
        used = reading.memory_used_bytes if reading and reading.memory_used_bytes is not None else 0
        self._reservations[batch_id] = Reservation(
            device=device, memory_bytes=memory_bytes, used_at_reserve_bytes=used
        )
        self._running[device] = self._running.get(device, 0) + 1

    def release(self, batch_id: int) -> None:
        reservation = self._reservations.pop(batch_id, None)
        if reservation is not None:
            self._running[reservation.device] -= 1

    def reserved_bytes(self, device: str) -> int:
        return sum(r.memory_bytes for r in self._reservations.values() if r.device == device)

    def _unseen_reserved_bytes(self, device: str, used_now: int) -> int:
        """Reserved memory the driver does not show yet: the reservations less the growth in used memory
        since the earliest of them. Memory another program takes meanwhile counts as ours showing up, so
        available can read high by up to that much until our batch ends; the safety margin covers it."""
        mine = [r for r in self._reservations.values() if r.device == device]
        if not mine:
            return 0
        baseline = min(r.used_at_reserve_bytes for r in mine)
        seen = max(0, used_now - baseline)
        return max(0, sum(r.memory_bytes for r in mine) - seen)

    def device_status(self) -> dict[str, DeviceStatus]:
        status: dict[str, DeviceStatus] = {}
        if self._cpu:
            status[CPU] = DeviceStatus(name=CPU, healthy=True, running_batches=self._running.get(CPU, 0))
        for name, r in self._readings.items():
            available = 0  # an unhealthy GPU, or one whose memory could not be read, gets nothing
            if r.healthy and r.memory_free_bytes is not None and r.memory_used_bytes is not None:
                available = r.memory_free_bytes - self._unseen_reserved_bytes(name, r.memory_used_bytes)
            status[name] = DeviceStatus(
                name=name,
                healthy=r.healthy and r.memory_free_bytes is not None,
                memory_total_bytes=r.memory_total_bytes,
                available_memory_bytes=available,
                running_batches=self._running.get(name, 0),
            )
        return status

    def views(self, workers_by_device: dict[str, int]) -> list[DeviceView]:
        views = []
        for name, s in self.device_status().items():
            r = self._readings.get(name)
            views.append(
                DeviceView(
                    name=name,
                    index=r.index if r else None,
                    uuid=r.uuid if r else None,
                    healthy=s.healthy,
                    memory_total_bytes=r.memory_total_bytes if r else None,
                    memory_used_bytes=r.memory_used_bytes if r else None,
                    memory_free_bytes=r.memory_free_bytes if r else None,
                    memory_reserved_bytes=self.reserved_bytes(name),
                    memory_available_bytes=s.available_memory_bytes if r else None,
                    utilization_ratio=r.utilization_ratio if r else None,
                    temperature_c=r.temperature_c if r else None,
                    power_w=r.power_w if r else None,
                    workers=workers_by_device.get(name, 0),
                    running_batches=s.running_batches,
                )
            )
        return views
