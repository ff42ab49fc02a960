"""The service worker's own pieces that need no model: where a shared time range is cut."""

from __future__ import annotations

import numpy as np
import pytest

from whisperd.audiodecode import SAMPLE_RATE
from whisperd.worker import WorkerArgs
from whisperd.worker_main import FasterWhisper


def worker() -> FasterWhisper:
    return FasterWhisper(
        WorkerArgs(device="cpu", compute_type="int8", cpu_threads=1, max_models=1, preload=None)
    )


@pytest.mark.parametrize("gap_s", [4.2, 5.0, 7.9])
def test_a_shared_range_is_cut_in_the_gap_between_words(gap_s: float) -> None:
    rng = np.random.default_rng(0)
    audio = rng.uniform(-0.5, 0.5, SAMPLE_RATE * 10).astype(np.float32)  # "speech" everywhere...
    first = int(gap_s * SAMPLE_RATE)
    audio[first : first + SAMPLE_RATE // 10] = 0.0  # ...but a 100 ms pause
    cut_s = worker().quietest_s(audio, 4.0, 8.0)
    assert gap_s <= cut_s <= gap_s + 0.1


def test_a_range_shorter_than_a_frame_is_cut_in_its_middle() -> None:
    audio = np.zeros(SAMPLE_RATE, dtype=np.float32)
    assert worker().quietest_s(audio, 0.5, 0.51) == pytest.approx(0.505)
