"""What clients are told of a GPU's placement threshold (DeviceView.placement_floor_bytes, which
`whisperctl top` marks): the running configuration's rule, moved by a reload, absent for the CPU."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support.inprocess import GIB, FakeProbe, build, reading
from whisperd.config import Config, SchedulerConfig


def test_each_gpu_view_carries_the_threshold_the_running_config_sets(tmp_path: Path) -> None:
    config = Config(scheduler=SchedulerConfig(min_free_memory_bytes=GIB, memory_safety_margin=0.1))
    reloaded = Config(scheduler=SchedulerConfig(min_free_memory_bytes=30 * GIB, memory_safety_margin=0.1))
    probe = FakeProbe([reading(0, total=80 * GIB)])
    app = build(tmp_path, config, probe, config_loader=lambda: reloaded)

    async def scenario() -> None:
        app.pool.update(probe.read())  # the GPU monitor's first reading, now
        gpu = next(d for d in app.views.devices() if d.index == 0)
        assert gpu.placement_floor_bytes == 8 * GIB, "10 % of 80 GiB beats the 1 GiB floor"
        app.daemon.reload()
        gpu = next(d for d in app.views.devices() if d.index == 0)
        assert gpu.placement_floor_bytes == 30 * GIB, "a reload moves it"
        cpu = [d for d in app.views.devices() if d.index is None]
        assert all(d.placement_floor_bytes is None for d in cpu)

    asyncio.run(scenario())
