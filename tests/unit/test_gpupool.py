"""Device memory accounting: probe readings less whisperd's reservations the driver does not show yet."""

from __future__ import annotations

import pytest

from whisperd.gpupool import CPU, DevicePool, gpu_name
from whisperd.gpuprobe import GpuReading
from whisperd.scheduling import DeviceStatus

GIB = 1024**3
TOTAL = 80 * GIB


def reading(
    index: int = 0,
    used: int | None = 10 * GIB,
    total: int | None = TOTAL,
    healthy: bool = True,
    free: int | None = None,
) -> GpuReading:
    if free is None and used is not None and total is not None:
        free = total - used
    return GpuReading(
        index=index,
        uuid=f"GPU-{index}",
        name="NVIDIA H200",
        healthy=healthy,
        error=None if healthy else "GPU is lost",
        memory_total_bytes=total,
        memory_used_bytes=used,
        memory_free_bytes=free,
        utilization_ratio=0.5,
        memory_utilization_ratio=0.25,
        temperature_c=40.0,
        power_w=300.0,
    )


def available(pool: DevicePool, device: str = "cuda:0") -> int | None:
    return pool.device_status()[device].available_memory_bytes


@pytest.mark.parametrize(("index", "name"), [(0, "cuda:0"), (3, "cuda:3")], ids=["0", "3"])
def test_gpu_name(index: int, name: str) -> None:
    assert gpu_name(index) == name


def test_no_reservation_available_is_free() -> None:
    pool = DevicePool(cpu=False)
    pool.update([reading(used=10 * GIB)])
    assert pool.device_status() == {
        "cuda:0": DeviceStatus(
            name="cuda:0",
            healthy=True,
            memory_total_bytes=TOTAL,
            available_memory_bytes=70 * GIB,
            running_batches=0,
        )
    }


@pytest.mark.parametrize(
    ("used_now", "expected_available"),
    [
        (10 * GIB, 70 * GIB - 2 * GIB),  # nothing visible yet: the whole reservation counts
        (11 * GIB, 69 * GIB - 1 * GIB),  # 1 GiB of it visible: 1 GiB unseen
        (12 * GIB, 68 * GIB),  # all of it visible
        (13 * GIB, 67 * GIB),  # more than reserved visible: no unseen reservation left
        (9 * GIB, 71 * GIB - 2 * GIB),  # used shrank: still the whole reservation unseen
    ],
    ids=["unseen", "half-seen", "all-seen", "over-seen", "used-shrank"],
)
def test_reservation_counts_until_the_driver_shows_it(used_now: int, expected_available: int) -> None:
    pool = DevicePool(cpu=False)
    pool.update([reading(used=10 * GIB)])
    pool.reserve(1, "cuda:0", 2 * GIB)
    assert available(pool) == 68 * GIB
    pool.update([reading(used=used_now)])
    assert available(pool) == expected_available
    assert pool.reserved_bytes("cuda:0") == 2 * GIB
    assert pool.device_status()["cuda:0"].running_batches == 1


def test_release_gives_memory_back() -> None:
    pool = DevicePool(cpu=False)
    pool.update([reading(used=10 * GIB)])
    pool.reserve(1, "cuda:0", 2 * GIB)
    pool.release(1)
    assert available(pool) == 70 * GIB
    assert pool.reserved_bytes("cuda:0") == 0
    assert pool.device_status()["cuda:0"].running_batches == 0


def test_release_unknown_batch_is_harmless() -> None:
    pool = DevicePool(cpu=False)
    pool.update([reading()])
    pool.reserve(1, "cuda:0", 2 * GIB)
    pool.release(99)
    pool.release(1)
    pool.release(1)
    assert pool.device_status()["cuda:0"].running_batches == 0
    assert available(pool) == 70 * GIB


def test_two_reservations_from_the_earliest_baseline() -> None:
    pool = DevicePool(cpu=False)
    pool.update([reading(used=10 * GIB)])
    pool.reserve(1, "cuda:0", 2 * GIB)
    pool.update([reading(used=12 * GIB)])  # the first batch's memory is visible now
    pool.reserve(2, "cuda:0", 3 * GIB)
    assert available(pool) == 68 * GIB - 3 * GIB
    pool.update([reading(used=14 * GIB)])  # 2 GiB of the second visible
    assert available(pool) == 66 * GIB - 1 * GIB
    assert pool.reserved_bytes("cuda:0") == 5 * GIB
    assert pool.device_status()["cuda:0"].running_batches == 2


def test_reservations_are_per_device() -> None:
    pool = DevicePool(cpu=False)
    pool.update([reading(0, used=10 * GIB), reading(1, used=20 * GIB)])
    pool.reserve(1, "cuda:1", 4 * GIB)
    status = pool.device_status()
    assert status["cuda:0"].available_memory_bytes == 70 * GIB
    assert status["cuda:1"].available_memory_bytes == 56 * GIB
    assert (status["cuda:0"].running_batches, status["cuda:1"].running_batches) == (0, 1)
    assert (pool.reserved_bytes("cuda:0"), pool.reserved_bytes("cuda:1")) == (0, 4 * GIB)


@pytest.mark.parametrize(
    "bad",
    [
        reading(healthy=False, used=None, total=None, free=None),
        reading(healthy=True, used=None, total=TOTAL, free=None),
    ],
    ids=["unhealthy-no-memory", "memory-unreadable"],
)
def test_gpu_without_memory_figures_is_unhealthy_with_nothing_available(bad: GpuReading) -> None:
    pool = DevicePool(cpu=False)
    pool.update([bad])
    status = pool.device_status()["cuda:0"]
    assert status.healthy is False
    assert status.available_memory_bytes == 0


def test_unhealthy_gpu_with_memory_figures_has_nothing_available() -> None:
    pool = DevicePool(cpu=False)
    pool.update([reading(healthy=False, used=10 * GIB)])
    status = pool.device_status()["cuda:0"]
    assert status.healthy is False
    assert status.available_memory_bytes == 0


def test_update_replaces_readings() -> None:
    pool = DevicePool(cpu=False)
    pool.update([reading(0), reading(1)])
    assert pool.gpu_names == ["cuda:0", "cuda:1"]
    pool.update([reading(1)])
    assert pool.gpu_names == ["cuda:1"]
    assert pool.reading("cuda:0") is None
    assert pool.reading("cuda:1") == reading(1)


@pytest.mark.parametrize(
    ("cpu", "readings", "names"),
    [
        (False, [], []),
        (True, [], ["cpu"]),
        (False, [reading(0)], ["cuda:0"]),
        (True, [reading(0), reading(1)], ["cpu", "cuda:0", "cuda:1"]),
    ],
    ids=["nothing", "cpu-only", "gpu-only", "cpu-and-gpus"],
)
def test_devices_present(cpu: bool, readings: list[GpuReading], names: list[str]) -> None:
    pool = DevicePool(cpu=cpu)
    pool.update(readings)
    status = pool.device_status()
    assert list(status) == names
    if cpu:
        assert status[CPU] == DeviceStatus(name="cpu", healthy=True)
        assert status[CPU].memory_total_bytes is None
        assert status[CPU].available_memory_bytes is None


def test_cpu_running_batches() -> None:
    pool = DevicePool(cpu=True)
    pool.reserve(1, CPU, 0)
    pool.reserve(2, CPU, 0)
    assert pool.device_status()[CPU].running_batches == 2
    pool.release(1)
    assert pool.device_status()[CPU].running_batches == 1


def test_views() -> None:
    pool = DevicePool(cpu=True)
    pool.update([reading(0, used=10 * GIB), reading(1, healthy=False, used=None, total=None, free=None)])
    pool.reserve(1, "cuda:0", 2 * GIB)
    pool.reserve(2, CPU, 0)
    views = {v.name: v for v in pool.views({"cpu": 4, "cuda:0": 2})}
    assert list(views) == ["cpu", "cuda:0", "cuda:1"]

    cpu = views["cpu"]
    assert (cpu.index, cpu.uuid, cpu.healthy) == (None, None, True)
    assert (cpu.memory_total_bytes, cpu.memory_used_bytes, cpu.memory_free_bytes) == (None, None, None)
    assert (cpu.memory_reserved_bytes, cpu.memory_available_bytes) == (0, None)
    assert (cpu.workers, cpu.running_batches) == (4, 1)

    g0 = views["cuda:0"]
    assert (g0.index, g0.uuid, g0.healthy) == (0, "GPU-0", True)
    assert (g0.memory_total_bytes, g0.memory_used_bytes, g0.memory_free_bytes) == (TOTAL, 10 * GIB, 70 * GIB)
    assert (g0.memory_reserved_bytes, g0.memory_available_bytes) == (2 * GIB, 68 * GIB)
    assert (g0.utilization_ratio, g0.temperature_c, g0.power_w) == (0.5, 40.0, 300.0)
    assert (g0.workers, g0.running_batches) == (2, 1)

    g1 = views["cuda:1"]
    assert (g1.index, g1.healthy, g1.memory_available_bytes) == (1, False, 0)
    assert (g1.memory_reserved_bytes, g1.workers, g1.running_batches) == (0, 0, 0)
