"""The placement threshold the GPU metrics export (and the Grafana dashboard draws) is the memory rule of
scheduling.fits() for a batch that reserves nothing: above it a GPU takes work, below it none."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from whisperd.scheduling import DeviceStatus, PlanSettings, fits, placement_floor_bytes

GIB = 1024**3


@given(
    total=st.integers(1 * GIB, 200 * GIB),
    min_free=st.integers(0, 40 * GIB),
    margin=st.floats(0.0, 0.99),
    offset=st.integers(1, 10 * GIB),
)
def test_a_gpu_takes_work_above_the_threshold_and_none_below(
    total: int, min_free: int, margin: float, offset: int
) -> None:
    settings = PlanSettings(min_free_memory_bytes=min_free, memory_safety_margin=margin)
    floor = placement_floor_bytes(total, min_free, margin)

    def device(available: int) -> DeviceStatus:
        return DeviceStatus(
            name="cuda:0", healthy=True, memory_total_bytes=total, available_memory_bytes=available
        )

    assert fits(device(floor + offset), 0, settings)
    assert not fits(device(floor - offset), 0, settings)


def test_the_larger_of_the_minimum_and_the_margin() -> None:
    assert placement_floor_bytes(80 * GIB, 1 * GIB, 0.10) == 8 * GIB
    assert placement_floor_bytes(8 * GIB, 1 * GIB, 0.10) == 1 * GIB
