"""The retention policy, a pure function: which of the oldest finished jobs to delete, by age and by count."""

from __future__ import annotations

import pytest

from whisperd.retention import FinishedJob, to_prune

NOW = 1_000_000.0
DAY = 86_400.0


def finished(*ages_s: float) -> list[FinishedJob]:
    """Jobs 1, 2, ... finished this long before NOW, oldest first."""
    return [FinishedJob(i + 1, NOW - age) for i, age in enumerate(ages_s)]


@pytest.mark.parametrize(
    ("oldest", "finished_count", "max_age_s", "max_finished_jobs", "expected"),
    [
        # nothing finished, or both bounds off: nothing goes
        ([], 0, 30 * DAY, 100, []),
        (finished(90 * DAY, 60 * DAY), 2, 0, 0, []),
        # by age alone: the ones older than max_age_s (strictly), oldest first
        (finished(40 * DAY, 31 * DAY, 29 * DAY, 1), 4, 30 * DAY, 0, [1, 2]),
        (finished(30 * DAY, 29 * DAY), 2, 30 * DAY, 0, []),
        (finished(29 * DAY, 1), 2, 30 * DAY, 0, []),
        (finished(40 * DAY, 35 * DAY), 2, 30 * DAY, 0, [1, 2]),
        # by count alone: the oldest beyond the newest max_finished_jobs
        (finished(5, 4, 3, 2, 1), 5, 0, 3, [1, 2]),
        (finished(5, 4, 3), 3, 0, 3, []),
        (finished(5, 4), 2, 0, 3, []),
        # only a batch of the oldest is given: the excess is counted over all of them, deleted batch by batch
        (finished(5, 4, 3), 10, 0, 4, [1, 2, 3]),
        (finished(5, 4, 3), 6, 0, 4, [1, 2]),
        # both: whichever deletes more
        (finished(40 * DAY, 31 * DAY, 2, 1), 4, 30 * DAY, 3, [1, 2]),
        (finished(40 * DAY, 3, 2, 1), 4, 30 * DAY, 2, [1, 2]),
        (finished(40 * DAY, 3, 2, 1), 4, 30 * DAY, 10, [1]),
        # a cap of one keeps the newest only
        (finished(3, 2, 1), 3, 0, 1, [1, 2]),
    ],
)
def test_to_prune(
    oldest: list[FinishedJob],
    finished_count: int,
    max_age_s: float,
    max_finished_jobs: int,
    expected: list[int],
) -> None:
    assert to_prune(oldest, finished_count, NOW, max_age_s, max_finished_jobs) == expected


def test_to_prune_never_goes_beyond_the_batch_it_was_given() -> None:
    oldest = finished(*(100 * DAY - i for i in range(10)))
    assert to_prune(oldest, 1_000_000, NOW, 30 * DAY, 5) == list(range(1, 11))
