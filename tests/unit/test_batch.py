"""One batch's lifecycle: which jobs it still holds, which one runs, which one is next, and the deadline of a
cancel of the job its worker is on."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from whisperd.batch import Batch

Step = Callable[[Batch], None]


def start(job_id: int) -> Step:
    return lambda batch: batch.start(job_id)


def finish(job_id: int) -> Step:
    return lambda batch: batch.finish(job_id)


# (steps on a batch of jobs 1, 2, 3; running_job, current_job, unfinished)
LIFECYCLE: list[tuple[str, list[Step], int | None, int | None, list[int]]] = [
    ("fresh", [], None, 1, [1, 2, 3]),
    ("first-started", [start(1)], 1, 1, [1, 2, 3]),
    ("first-finished", [start(1), finish(1)], None, 2, [2, 3]),
    ("second-started", [start(1), finish(1), start(2)], 2, 2, [2, 3]),
    ("finished-without-start", [finish(1)], None, 2, [2, 3]),  # stopped before it began (cancelled)
    ("later-one-finished-first", [start(1), finish(2)], 1, 1, [1, 3]),  # a waiting batch-mate cancelled
    ("all-finished", [start(1), finish(1), start(2), finish(2), start(3), finish(3)], None, None, []),
    ("finished-twice", [start(1), finish(1), finish(1)], None, 2, [2, 3]),
    ("started-outside-the-batch", [start(9)], None, 1, [1, 2, 3]),
]


@pytest.mark.parametrize(
    ("steps", "running", "current", "unfinished"),
    [case[1:] for case in LIFECYCLE],
    ids=[case[0] for case in LIFECYCLE],
)
def test_lifecycle(
    steps: list[Step], running: int | None, current: int | None, unfinished: list[int]
) -> None:
    batch = Batch(7, [1, 2, 3])
    for step in steps:
        step(batch)
    assert batch.running_job == running
    assert batch.current_job == current
    assert batch.unfinished() == unfinished
    assert [j for j in (1, 2, 3, 9) if batch.holds(j)] == unfinished
    assert batch.id == 7 and batch.job_ids == (1, 2, 3)


def test_job_ids_are_a_copy_of_what_was_given() -> None:
    given = [4, 5]
    batch = Batch(1, given)
    given.append(6)
    assert batch.job_ids == (4, 5) and not batch.holds(6)


def test_an_empty_batch_holds_nothing() -> None:
    batch = Batch(1, [])
    assert batch.current_job is None and batch.running_job is None and batch.unfinished() == []
    assert not batch.holds(1) and not batch.cancel_overdue(1e12)


# ---- cancel deadlines ----------------------------------------------------------------------------------


def test_no_deadline_is_never_overdue() -> None:
    batch = Batch(1, [1, 2])
    batch.start(1)
    assert not batch.cancel_overdue(0.0) and not batch.cancel_overdue(1e12)


@pytest.mark.parametrize(
    ("now", "overdue"), [(99.0, False), (99.999, False), (100.0, True), (100.001, True), (1e9, True)]
)
def test_a_cancel_is_overdue_at_and_after_its_deadline(now: float, overdue: bool) -> None:
    batch = Batch(1, [1, 2])
    batch.start(1)
    batch.cancel_deadline_for(1, at=100.0)
    assert batch.cancel_overdue(now) is overdue


def test_the_deadline_is_cleared_when_that_job_finishes() -> None:
    batch = Batch(1, [1, 2])
    batch.start(1)
    batch.cancel_deadline_for(1, at=100.0)
    batch.finish(1)
    assert not batch.cancel_overdue(100.0) and not batch.cancel_overdue(1e9)


def test_the_deadline_stays_when_another_job_finishes() -> None:
    batch = Batch(1, [1, 2, 3])
    batch.start(1)
    batch.cancel_deadline_for(1, at=100.0)
    batch.finish(2)  # a waiting batch-mate was skipped
    batch.finish(3)
    assert batch.cancel_overdue(100.0)
    assert not batch.cancel_overdue(50.0)
    batch.finish(1)
    assert not batch.cancel_overdue(100.0)


def test_a_later_deadline_replaces_the_earlier_one() -> None:
    batch = Batch(1, [1, 2])
    batch.cancel_deadline_for(1, at=100.0)
    batch.finish(1)
    batch.start(2)
    batch.cancel_deadline_for(2, at=200.0)
    assert not batch.cancel_overdue(150.0) and batch.cancel_overdue(200.0)
    batch.finish(1)  # a late duplicate report about the first job does not clear the second's deadline
    assert batch.cancel_overdue(200.0)
    batch.finish(2)
    assert not batch.cancel_overdue(200.0)


def test_a_kill_for_what_a_job_did_blames_the_job_started_else_the_one_about_to_start() -> None:
    batch = Batch(1, [1, 2, 3], at=100.0)
    assert batch.blamed_job == 1, "dispatched, nothing said yet: the first job is the one it is on"
    batch.start(1)
    batch.finish(1)
    assert batch.blamed_job == 2
    batch.start(2)
    assert batch.blamed_job == 2
    batch.finish(2)
    batch.finish(3)
    assert batch.blamed_job is None


def test_silence_is_counted_from_the_dispatch_then_from_the_last_word() -> None:
    batch = Batch(1, [1], at=100.0)
    assert batch.silent_for(160.0) == 60.0
    batch.heard(150.0)
    assert batch.silent_for(160.0) == 10.0
