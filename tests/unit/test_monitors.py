"""The 30 s performance monitor's line: queue state, concurrency and per-device allocation."""

from __future__ import annotations

import pytest

from whisperd.monitors import summary_line
from whisperd.protocol import StatsView


def stats(states: dict[str, int], rtf: float | None) -> StatsView:
    return StatsView(
        states=states, queue_depth=states.get("PENDING", 0) + states.get("RETRYING", 0),
        running_jobs=states.get("PROCESSING", 0), workers=[], uptime_s=60.0, audio_seconds_total=0.0,
        processing_seconds_total=0.0, realtime_factor=rtf,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("states", "rtf", "allocation", "expected"),
    [
        ({}, None, {}, "queue 0 waiting, 0 running (no jobs); jobs per device -; realtime factor -"),
        (
            {"PENDING": 4, "PROCESSING": 3, "RETRYING": 1, "COMPLETED": 10, "FAILED": 0},
            21.5,
            {"cuda:1": [7], "cuda:0": [5, 6], "cpu": []},
            "queue 5 waiting, 3 running (PENDING=4 PROCESSING=3 RETRYING=1 COMPLETED=10); "
            "jobs per device cpu:0 cuda:0:2 cuda:1:1; realtime factor 21.5x",
        ),
    ],
    ids=["idle", "busy"],
)
def test_summary_line(
    states: dict[str, int], rtf: float | None, allocation: dict[str, list[int]], expected: str
) -> None:
    assert summary_line(stats(states, rtf), allocation) == expected
