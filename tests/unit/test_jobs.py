"""The job state machine: every (state, event) pair, legal or not, and the retry backoff."""

from __future__ import annotations

import itertools

import pytest

from whisperd.errors import IllegalTransition
from whisperd.jobs import TERMINAL_STATES, JobEvent, JobState, retry_delay_s, transition

S = JobState
E = JobEvent

# The legal transitions that keep the retry count. (PROCESSING, FAIL) depends on the retry count and has
# its own table below. Every pair not listed here (and not that one) must raise IllegalTransition.
LEGAL: dict[tuple[JobState, JobEvent], JobState] = {
    (S.PENDING, E.DISPATCH): S.PROCESSING,
    (S.PENDING, E.CANCEL): S.CANCELLED,
    (S.PROCESSING, E.COMPLETE): S.COMPLETED,
    (S.PROCESSING, E.FAIL_FATAL): S.FAILED,
    (S.PROCESSING, E.REQUEUE): S.PENDING,
    (S.PROCESSING, E.CANCEL): S.CANCELLED,
    (S.RETRYING, E.BACKOFF_ELAPSED): S.PENDING,
    (S.RETRYING, E.CANCEL): S.CANCELLED,
}
RETRY_DEPENDENT = (S.PROCESSING, E.FAIL)

ALL_PAIRS = list(itertools.product(JobState, JobEvent))
ILLEGAL = [pair for pair in ALL_PAIRS if pair not in LEGAL and pair != RETRY_DEPENDENT]


def _pair_id(pair: tuple[JobState, JobEvent]) -> str:
    return f"{pair[0].value}-{pair[1].value}"


def test_tables_cover_every_pair_exactly_once() -> None:
    assert len(ALL_PAIRS) == len(JobState) * len(JobEvent) == 42
    assert len(LEGAL) + 1 + len(ILLEGAL) == len(ALL_PAIRS)


@pytest.mark.parametrize("retries", [0, 2], ids=["retries0", "retries2"])
@pytest.mark.parametrize(("pair", "expected"), list(LEGAL.items()), ids=[_pair_id(pair) for pair in LEGAL])
def test_legal_transition_gives_next_state_and_keeps_retries(
    pair: tuple[JobState, JobEvent], expected: JobState, retries: int
) -> None:
    state, event = pair
    assert transition(state, event, retries, 3) == (expected, retries)


@pytest.mark.parametrize("max_retries", [0, 3], ids=["max0", "max3"])
@pytest.mark.parametrize("pair", ILLEGAL, ids=[_pair_id(pair) for pair in ILLEGAL])
def test_illegal_transition_raises(pair: tuple[JobState, JobEvent], max_retries: int) -> None:
    state, event = pair
    with pytest.raises(IllegalTransition) as info:
        transition(state, event, 0, max_retries)
    assert info.value.code == "illegal_transition"
    assert state.value in info.value.message


@pytest.mark.parametrize(
    ("retries", "max_retries", "expected_state", "expected_retries"),
    [
        (0, 3, S.RETRYING, 1),
        (1, 3, S.RETRYING, 2),
        (2, 3, S.RETRYING, 3),
        (3, 3, S.FAILED, 3),
        (4, 3, S.FAILED, 4),
        (0, 0, S.FAILED, 0),
        (0, 1, S.RETRYING, 1),
        (1, 1, S.FAILED, 1),
    ],
    ids=[
        "first-failure-retries",
        "second-failure-retries",
        "last-retry-left",
        "at-max-fails",
        "beyond-max-fails",
        "max0-fails-at-once",
        "max1-first-retries",
        "max1-second-fails",
    ],
)
def test_fail_from_processing_retries_while_retries_remain(
    retries: int, max_retries: int, expected_state: JobState, expected_retries: int
) -> None:
    assert transition(S.PROCESSING, E.FAIL, retries, max_retries) == (expected_state, expected_retries)


@pytest.mark.parametrize(
    "pair",
    list(itertools.product(sorted(TERMINAL_STATES), JobEvent)),
    ids=[_pair_id(pair) for pair in itertools.product(sorted(TERMINAL_STATES), JobEvent)],
)
def test_terminal_states_accept_nothing(pair: tuple[JobState, JobEvent]) -> None:
    state, event = pair
    with pytest.raises(IllegalTransition):
        transition(state, event, 0, 3)


@pytest.mark.parametrize(
    ("state", "terminal"),
    [
        (S.PENDING, False),
        (S.PROCESSING, False),
        (S.RETRYING, False),
        (S.COMPLETED, True),
        (S.FAILED, True),
        (S.CANCELLED, True),
    ],
    ids=lambda v: str(v),
)
def test_terminal_property(state: JobState, terminal: bool) -> None:
    assert state.terminal is terminal
    assert (state in TERMINAL_STATES) is terminal


@pytest.mark.parametrize(
    ("retries", "expected"),
    [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 32.0), (7, 60.0), (10, 60.0)],
    ids=["r0", "r1", "r2", "r3", "r4", "r6", "r7-capped", "r10-capped"],
)
def test_retry_delay_doubles_and_caps(retries: int, expected: float) -> None:
    delay = retry_delay_s(retries, 1.0, 60.0)
    assert delay == expected
    assert isinstance(delay, float)


def test_retry_delay_scales_with_base() -> None:
    assert retry_delay_s(3, 0.5, 60.0) == 2.0
