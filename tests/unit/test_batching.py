"""cut_windows: speech regions to decoding windows of at most 30 s, cut between regions; split_windows: the
windows a worker has left, in contiguous parts to share with idle workers; decode_together: which jobs'
windows share a decoding call."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from whisperd import workerproto as wp
from whisperd.batching import AudioInfo, Prepared, cut_windows, decode_together
from whisperd.protocol import Segment, Transcript
from whisperd.sharing import split_span, split_windows

CASES = [
    # (speech regions, duration, windows)
    ([], 100.0, []),
    ([(1.0, 4.0)], 10.0, [(1.0, 4.0)]),
    ([(0.0, 10.0), (12.0, 25.0), (27.0, 29.5)], 60.0, [(0.0, 29.5)]),  # all within 30 s of the first start
    ([(0.0, 10.0), (12.0, 25.0), (27.0, 31.0)], 60.0, [(0.0, 25.0), (27.0, 31.0)]),  # cut at the silence
    ([(5.0, 95.0)], 100.0, [(5.0, 35.0), (35.0, 65.0), (65.0, 95.0)]),  # a region longer than a window
    ([(-1.0, 3.0), (8.0, 12.0)], 10.0, [(0.0, 10.0)]),  # clamped to the audio
    ([(4.0, 4.0), (6.0, 5.0)], 10.0, []),  # empty regions are dropped
]


@pytest.mark.parametrize(("speech", "duration", "expected"), CASES)
def test_cut_windows(
    speech: list[tuple[float, float]], duration: float, expected: list[tuple[float, float]]
) -> None:
    assert cut_windows(speech, duration) == expected


regions = st.lists(
    st.tuples(st.floats(0, 3600, allow_nan=False), st.floats(0.01, 60, allow_nan=False)), max_size=40
).map(lambda pairs: sorted((start, start + length) for start, length in pairs))


@given(regions)
@example([(3.190978183091925, 4.190978183091925), (4.0, 33.19097818309193)])  # 30 s and a rounding error
@example([(0.0, 1.0), (5.960464477539063e-08, 30.000000059604645)])  # 60 ns over: not cut off on its own
def test_windows_are_short_ordered_and_cover_every_bit_of_speech(speech: list[tuple[float, float]]) -> None:
    merged: list[tuple[float, float]] = []  # VAD regions do not overlap: make these not overlap either
    for start, end in speech:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    windows = cut_windows(merged, 4000.0)
    # cut_windows leaves a window up to 1 us over 30 s whole rather than cut a piece of a rounding error
    assert all(0 < end - start <= 30.0 + 1e-6 for start, end in windows)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(windows)), "in order, not overlapping"
    for start, end in merged:
        covered = sum(max(0.0, min(end, w_end) - max(start, w_start)) for w_start, w_end in windows)
        assert covered == pytest.approx(end - start), "no speech left out"


# ---- split_windows --------------------------------------------------------------------------------------


def seconds(windows: Sequence[tuple[float, float]]) -> float:
    return sum(end - start for start, end in windows)


def ones(first: int, count: int) -> list[tuple[float, float]]:
    """count windows of one second each, back to back from second `first`."""
    return [(float(i), float(i + 1)) for i in range(first, first + count)]


SPLITS = [
    # (windows, helpers, min_part_s, parts)
    pytest.param([], 2, 10.0, [], id="no windows: no part"),
    pytest.param(ones(0, 3), 0, 0.0, [ones(0, 3)], id="no helper: one part"),
    pytest.param(ones(0, 30), 2, 20.0, [ones(0, 30)], id="too little for two parts of min_part_s"),
    pytest.param(ones(0, 8), 1, 2.0, [ones(0, 4), ones(4, 4)], id="halves"),
    pytest.param(ones(0, 9), 2, 3.0, [ones(0, 3), ones(3, 3), ones(6, 3)], id="thirds"),
    pytest.param(ones(0, 9), 5, 3.0, [ones(0, 3), ones(3, 3), ones(6, 3)], id="helpers capped by min_part_s"),
    pytest.param(
        [(0.0, 30.0), (40.0, 60.0)], 5, 0.0, [[(0.0, 30.0)], [(40.0, 60.0)]], id="more helpers than windows"
    ),
    pytest.param(
        [(0.0, 10.0), *ones(10, 10)], 1, 0.0, [[(0.0, 10.0)], ones(10, 10)],
        id="balanced by seconds, not counts",
    ),
    pytest.param(
        [(0.0, 30.0), (30.0, 31.0)], 1, 10.0, [[(0.0, 30.0), (30.0, 31.0)]],
        id="a part that would fall short of min_part_s is not given away",
    ),
    pytest.param(
        [(1.0, 1.0), (2.0, 2.0)], 1, 0.0, [[(1.0, 1.0), (2.0, 2.0)]], id="windows without length: one part"
    ),
    pytest.param(
        [(0.0, 20.0), (20.0, 28.0), (28.0, 48.0)], 2, 12.0, [[(0.0, 20.0), (20.0, 28.0)], [(28.0, 48.0)]],
        id="a short middle part joins its shorter neighbour",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("windows", "helpers", "min_part_s", "expected"), SPLITS)
def test_split_windows(
    windows: list[tuple[float, float]],
    helpers: int,
    min_part_s: float,
    expected: list[list[tuple[float, float]]],
) -> None:
    assert split_windows(windows, helpers, min_part_s) == expected


# windows as a VAD cuts them: in order, not overlapping, up to 30 s each, with silences between some
cut = st.lists(st.tuples(st.floats(0, 20), st.floats(0, 30)), max_size=40).map(
    lambda gaps_lengths: list(
        itertools.accumulate(
            gaps_lengths,
            lambda window, gl: (window[1] + gl[0], window[1] + gl[0] + gl[1]),
            initial=(0.0, 0.0),
        )
    )[1:]
)


@given(cut, st.integers(0, 10), st.sampled_from([0.0, 5.0, 30.0, 60.0, 100.0]))
def test_split_windows_keeps_every_window_once_in_order_in_few_enough_long_enough_parts(
    windows: list[tuple[float, float]], helpers: int, min_part_s: float
) -> None:
    parts = split_windows(windows, helpers, min_part_s)
    assert [w for part in parts for w in part] == windows, "contiguous, in order, every window exactly once"
    assert all(parts), "no empty part"
    assert len(parts) <= helpers + 1
    if len(parts) > 1 and min_part_s > 0:
        assert all(seconds(part) >= min_part_s - 1e-6 for part in parts), "none shorter than min_part_s"
    if windows and min_part_s == 0:  # balanced: no part longer than its share plus one window
        share_s = seconds(windows) / min(helpers + 1, len(windows))
        longest_s = max(end - start for start, end in windows)
        assert all(seconds(part) <= share_s + longest_s + 1e-6 for part in parts)


# ---- split_span ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start_s", "cut_s", "end_s", "helpers", "min_part_s", "expected"),
    [
        pytest.param(0, 60, 150, 1, 30, [(0, 75), (75, 150)], id="halves"),
        pytest.param(0, 60, 600, 3, 60, [(0, 150), (150, 300), (300, 450), (450, 600)], id="quarters"),
        pytest.param(0, 300, 600, 3, 60, [(0, 300), (300, 400), (400, 500), (500, 600)],
                     id="what was searched is kept, the rest split among the helpers"),
        pytest.param(0, 60, 100, 1, 60, [(0, 100)], id="too short for two parts"),
        pytest.param(0, 90, 150, 2, 50, [(0, 90), (90, 150)], id="fewer helpers when the rest is short"),
        pytest.param(100, 160, 400, 2, 60, [(100, 200), (200, 300), (300, 400)], id="a part of a part"),
        pytest.param(0, 60, 120, 1, 0, [(0, 60), (60, 120)], id="no minimum"),
        pytest.param(0, 60, 60, 1, 0, [(0, 60)], id="all searched already"),
    ],
)  # fmt: skip
def test_split_span(
    start_s: float,
    cut_s: float,
    end_s: float,
    helpers: int,
    min_part_s: float,
    expected: list[tuple[float, float]],
) -> None:
    assert split_span(start_s, cut_s, end_s, helpers, min_part_s) == expected


# ---- decode_together: one call per set of decoding options -----------------------------------------------


class RecordingDecoder:
    """Decodes a window to one segment naming its job; records each call's options and jobs."""

    max_window_s = 30.0

    def __init__(self) -> None:
        self.calls: list[tuple[str | None, float | None, list[int]]] = []

    def decode_windows(
        self, model: Any, windows: Sequence[tuple[Any, float, float]], spec: wp.JobSpec, language: str,
        chunk_batch: int,
    ) -> Iterator[tuple[int, list[Segment]]]:  # fmt: skip
        self.calls.append((spec.prompt, spec.temperature, [job_id for job_id, _s, _e in windows]))
        for index, (job_id, start, end) in enumerate(windows):
            yield index, [Segment(id=1, start=start, end=end, text=f" {job_id}")]


class Finishes:
    def __init__(self) -> None:
        self.texts: dict[int, str] = {}

    def progress(
        self, spec: wp.JobSpec, progress: float, duration_s: float, segments: Sequence[Segment] = ()
    ) -> None:
        pass

    def finished(self, spec: wp.JobSpec, transcript: Transcript, processing_s: float) -> None:
        self.texts[spec.job_id] = transcript.text

    def failed(self, spec: wp.JobSpec, exc: Exception) -> None:
        raise AssertionError(exc)

    def stopped(self, spec: wp.JobSpec) -> None:
        raise AssertionError(spec.job_id)

    def shared(self, spec: wp.JobSpec, language: str, kept: wp.JobPart, parts: list[wp.JobPart]) -> None:
        raise AssertionError(spec.job_id)


def prepared(job_id: int, prompt: str | None = None, temperature: float | None = None) -> Prepared:
    spec = wp.JobSpec(
        job_id=job_id, audio_path="", model="tiny.en", model_source="tiny.en", language=None,
        task="transcribe", word_timestamps=False, beam_size=5, vad_filter=False, mode="batched",
        chunk_batch=16, prompt=prompt, temperature=temperature,
    )  # fmt: skip
    return Prepared(spec=spec, audio=job_id, info=AudioInfo("en", 1.0, 2.0), windows=[(0.0, 1.0), (1.0, 2.0)])


def test_jobs_with_different_prompts_or_temperatures_are_never_decoded_in_one_call() -> None:
    jobs = [
        prepared(1), prepared(2, "Ana, Bob.", 0.0), prepared(3, "Ana, Bob.", 0.0), prepared(4, "Zoe.", 0.0),
        prepared(5, "Ana, Bob.", 0.4), prepared(6), prepared(7, None, 0.0), prepared(8, "Ana, Bob."),
    ]  # fmt: skip
    decoder, report = RecordingDecoder(), Finishes()
    decode_together(decoder, None, jobs, report, lambda _job_id: False, lambda segment, _end: segment)
    assert decoder.calls == [
        (None, None, [1, 1, 6, 6]),
        ("Ana, Bob.", 0.0, [2, 2, 3, 3]),
        ("Zoe.", 0.0, [4, 4]),
        ("Ana, Bob.", 0.4, [5, 5]),
        (None, 0.0, [7, 7]),
        ("Ana, Bob.", None, [8, 8]),
    ], "jobs alike share a call; no job is decoded with another's options"
    assert report.texts == {job_id: f"{job_id} {job_id}" for job_id in range(1, 9)}
