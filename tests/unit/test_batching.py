"""cut_windows: speech regions to decoding windows of at most 30 s, cut between regions."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from whisperd.batching import cut_windows

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
def test_windows_are_short_ordered_and_cover_every_bit_of_speech(speech: list[tuple[float, float]]) -> None:
    merged: list[tuple[float, float]] = []  # VAD regions do not overlap: make these not overlap either
    for start, end in speech:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    windows = cut_windows(merged, 4000.0)
    assert all(0 < end - start <= 30.0 + 1e-9 for start, end in windows)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(windows)), "in order, not overlapping"
    for start, end in merged:
        covered = sum(max(0.0, min(end, w_end) - max(start, w_start)) for w_start, w_end in windows)
        assert covered == pytest.approx(end - start), "no speech left out"
