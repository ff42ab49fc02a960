"""How a worker splits a job it is asked to share (spreads.py is the daemon's side): pure functions.

Before its windows are cut, the job's remaining audio is split by time (`split_span`): the worker keeps the
first range, going on with its search for speech up to its end, and gives the others away to be cut where
they are decoded, so the helpers cut their ranges at once. Once the windows are cut, the ones not decoded
yet are split (`split_windows`), the cuts falling between windows, so at silences."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from whisperd.workerproto import Span


def split_span(start_s: float, cut_s: float, end_s: float, helpers: int, min_part_s: float) -> list[Span]:
    """[start_s, end_s) in at most helpers + 1 contiguous ranges of about equal length, each of at least
    min_part_s; the first is kept and reaches at least cut_s (what was searched for speech already). One
    range, the whole, when there is too little to share."""
    total_s = end_s - start_s
    parts = helpers + 1 if min_part_s <= 0 else min(helpers + 1, int(total_s // min_part_s))
    if parts < 2 or total_s <= 0:
        return [(start_s, end_s)]
    kept_end_s = max(cut_s, start_s + total_s / parts)
    rest_s = end_s - kept_end_s
    given = parts - 1 if min_part_s <= 0 else min(parts - 1, int(rest_s // min_part_s))
    if given < 1 or rest_s <= 0:
        return [(start_s, end_s)]
    bounds = [kept_end_s + rest_s * i / given for i in range(given)] + [end_s]
    return [(start_s, kept_end_s), *itertools.pairwise(bounds)]


def split_windows(windows: Sequence[Span], helpers: int, min_part_s: float) -> list[list[Span]]:
    """The windows in at most helpers + 1 contiguous parts of about equal speech (the first kept, the others
    given away), each of at least min_part_s seconds; one part (all of them) when there is too little to
    share, none when there are no windows."""
    lengths = [end - start for start, end in windows]
    total_s = sum(lengths)
    parts = min(helpers + 1, len(windows))
    if min_part_s > 0:
        parts = min(parts, int(total_s // min_part_s))
    if parts < 2 or total_s <= 0:
        return [list(windows)] if windows else []
    split: list[list[Span]] = [[] for _ in range(parts)]
    done_s = 0.0
    for window, length in zip(windows, lengths, strict=True):
        middle_s = done_s + length / 2  # a window goes to the part its middle falls in
        split[min(parts - 1, int(middle_s * parts / total_s))].append(window)
        done_s += length
    split = [part for part in split if part]
    if min_part_s > 0:
        _join_short_parts(split, min_part_s)
    return split


def _join_short_parts(parts: list[list[Span]], min_part_s: float) -> None:
    """Windows go whole, so a part may fall short of min_part_s (a 30 s window and a 1 s one in two parts):
    the shortest joins its shorter neighbour until none is short, or one part is left."""

    def seconds(part: list[Span]) -> float:
        return sum(end - start for start, end in part)

    while len(parts) > 1:
        lengths = [seconds(part) for part in parts]
        short = min(range(len(parts)), key=lengths.__getitem__)
        if lengths[short] >= min_part_s - 1e-6:  # sums of float spans: not short by a rounding error
            return
        if short == 0:
            first = 0
        elif short == len(parts) - 1 or lengths[short - 1] <= lengths[short + 1]:
            first = short - 1
        else:
            first = short
        parts[first : first + 2] = [parts[first] + parts[first + 1]]
