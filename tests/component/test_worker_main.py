"""The service worker's own pieces that need no model: where a shared time range is cut, and what it hands
faster-whisper of a job's options."""

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


def spec_with(prompt: str | None, temperature: float | None) -> wp.JobSpec:
    return wp.JobSpec(
        job_id=1, audio_path="", model="tiny.en", model_source="tiny.en", language="en", task="transcribe",
        word_timestamps=False, beam_size=5, vad_filter=False, prompt=prompt, temperature=temperature,
    )  # fmt: skip


# (the job's options, what faster-whisper is given of them: nothing where its own default stands)
OPTIONS = [
    pytest.param("Ana, Bob.", 0.0, {"initial_prompt": "Ana, Bob.", "temperature": 0.0}, id="both"),
    pytest.param(None, 0.6, {"temperature": 0.6}, id="temperature"),
    pytest.param("Ana, Bob.", None, {"initial_prompt": "Ana, Bob."}, id="prompt"),
    pytest.param(None, None, {}, id="defaults"),
    pytest.param("", None, {}, id="empty-prompt"),
]


@pytest.mark.parametrize(("prompt", "temperature", "given"), OPTIONS)
def test_a_job_s_options_reach_faster_whisper_s_transcribe(
    prompt: str | None, temperature: float | None, given: dict[str, object]
) -> None:
    seen: list[dict[str, object]] = []

    class Model:
        def transcribe(self, audio: object, **options: object) -> tuple[list[object], SimpleNamespace]:
            seen.append(options)
            return [], SimpleNamespace(language="en", language_probability=1.0, duration=1.0)

    segments, _info = worker().transcribe(Model(), np.zeros(16), spec_with(prompt, temperature))
    assert list(segments) == []
    [options] = seen
    assert {k: options[k] for k in ("initial_prompt", "temperature") if k in options} == given
    assert options["beam_size"] == 5 and options["vad_filter"] is False


@pytest.mark.parametrize(("prompt", "temperature", "given"), OPTIONS)
def test_a_job_s_options_reach_the_batched_pipeline(
    monkeypatch: pytest.MonkeyPatch, prompt: str | None, temperature: float | None, given: dict[str, object]
) -> None:
    import faster_whisper

    seen: list[dict[str, object]] = []

    class Pipeline:
        def __init__(self, model: object) -> None:
            pass

        def transcribe(self, audio: np.ndarray, **options: object) -> tuple[list[object], None]:
            seen.append(options)
            return [], None

    monkeypatch.setattr(faster_whisper, "BatchedInferencePipeline", Pipeline)
    windows = [(np.zeros(SAMPLE_RATE, dtype=np.float32), 0.0, 1.0)] * 3
    model = SimpleNamespace(frames_per_second=50)
    decoded = worker().decode_windows(model, windows, spec_with(prompt, temperature), "en", chunk_batch=2)
    assert list(decoded) == [(0, []), (1, []), (2, [])]
    assert len(seen) == 2, "two calls, each with the job's options"
    for options in seen:
        assert {k: options[k] for k in ("initial_prompt", "temperature") if k in options} == given
