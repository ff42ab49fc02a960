"""The service worker's own pieces that need no model: where a shared time range is cut."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from whisperd import workerproto as wp
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


def test_windows_decoded_together_are_clips_that_tile_their_array_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """faster-whisper reads each clip's bounds as int(seconds * 16000). Windows of these lengths came back
    overlapping by one sample, and faster-whisper failed the whole batch ("non-negative timestamp expected":
    its clips outlasted the audio); found by bench/fleet.py, where three such jobs shared a batch."""
    import faster_whisper

    seen: list[tuple[list[tuple[int, int]], int]] = []

    class Pipeline:
        def __init__(self, model: object) -> None:
            pass

        def transcribe(
            self, audio: np.ndarray, *, clip_timestamps: list[dict[str, float]], **options: object
        ) -> tuple[list[object], None]:
            bounds = [(int(c["start"] * SAMPLE_RATE), int(c["end"] * SAMPLE_RATE)) for c in clip_timestamps]
            seen.append((bounds, len(audio)))
            return [], None

    monkeypatch.setattr(faster_whisper, "BatchedInferencePipeline", Pipeline)
    lengths = [8002, 8003, 8009]
    windows = [(np.zeros(n, dtype=np.float32), 0.0, n / SAMPLE_RATE + 1.0) for n in lengths]  # each whole
    spec = wp.JobSpec(job_id=1, audio_path="", model="tiny.en", model_source="tiny.en", language="en",
                      task="transcribe", word_timestamps=False, beam_size=1, vad_filter=False)  # fmt: skip
    model = SimpleNamespace(frames_per_second=50)
    decoded = list(worker().decode_windows(model, windows, spec, "en", chunk_batch=4))
    assert decoded == [(0, []), (1, []), (2, [])]
    [(bounds, total)] = seen
    assert bounds == [(0, 8002), (8002, 16005), (16005, 24014)] and total == 24014
