"""The job state machine, stated as the guarantees the lifecycle must keep (docs/protocol.md, "The job state
machine"), not as a copy of its table; and the retry backoff."""

from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whisperd.errors import IllegalTransition
from whisperd.jobs import TERMINAL_STATES, JobEvent, JobState, retry_delay_s, transition

S = JobState
E = JobEvent

LIVE = (S.PENDING, S.PROCESSING, S.RETRYING)
TERMINAL = (S.COMPLETED, S.FAILED, S.CANCELLED)
# (retries, max_retries) pairs to try each rule with: no retries allowed, some left, none left, beyond max
RETRY_POINTS = [(0, 0), (0, 3), (2, 3), (3, 3), (1, 1), (4, 3)]

Outcome = tuple[JobState, int] | None  # None: the event is illegal in that state


def outcome(state: JobState, event: JobEvent, retries: int, max_retries: int) -> Outcome:
    """What `transition` does; an illegal event must raise IllegalTransition and nothing else."""
    try:
        return transition(state, event, retries, max_retries)
    except IllegalTransition as exc:
        assert exc.code == "illegal_transition"
        return None


def legal_from(event: JobEvent) -> set[JobState]:
    """The states from which `event` is legal, at any of RETRY_POINTS."""
    return {s for s in JobState for r, m in RETRY_POINTS if outcome(s, event, r, m) is not None}


def test_states_are_live_or_terminal() -> None:
    assert set(LIVE) | set(TERMINAL) == set(JobState)
    assert set(TERMINAL) == TERMINAL_STATES
    assert all(not s.terminal for s in LIVE)
    assert all(s.terminal for s in TERMINAL)


# ---- one guarantee per event: where it is legal, where it leads, what it does to the retry count -------

# Every event is pinned by a test below; a new event must say what it does before this passes.
SPECIFIED_EVENTS = {E.CANCEL, E.DISPATCH, E.COMPLETE, E.FAIL_FATAL, E.REQUEUE, E.FAIL, E.BACKOFF_ELAPSED}


def test_every_event_is_specified() -> None:
    assert set(JobEvent) == SPECIFIED_EVENTS


@pytest.mark.parametrize(("retries", "max_retries"), RETRY_POINTS)
@pytest.mark.parametrize("state", LIVE, ids=str)
def test_every_live_job_can_be_cancelled(state: JobState, retries: int, max_retries: int) -> None:
    assert outcome(state, E.CANCEL, retries, max_retries) == (S.CANCELLED, retries)


@pytest.mark.parametrize(("retries", "max_retries"), RETRY_POINTS)
@pytest.mark.parametrize(("state", "event"), list(itertools.product(TERMINAL, JobEvent)), ids=str)
def test_terminal_states_accept_no_event(
    state: JobState, event: JobEvent, retries: int, max_retries: int
) -> None:
    with pytest.raises(IllegalTransition) as info:
        transition(state, event, retries, max_retries)
    assert info.value.code == "illegal_transition"


def test_only_a_pending_job_can_be_dispatched_and_it_becomes_processing() -> None:
    assert legal_from(E.DISPATCH) == {S.PENDING}
    for retries, max_retries in RETRY_POINTS:
        assert outcome(S.PENDING, E.DISPATCH, retries, max_retries) == (S.PROCESSING, retries)


@pytest.mark.parametrize(
    ("event", "target"),
    [(E.COMPLETE, S.COMPLETED), (E.FAIL_FATAL, S.FAILED), (E.REQUEUE, S.PENDING)],
    ids=str,
)
def test_worker_outcomes_only_from_processing(event: JobEvent, target: JobState) -> None:
    assert legal_from(event) == {S.PROCESSING}
    for retries, max_retries in RETRY_POINTS:
        assert outcome(S.PROCESSING, event, retries, max_retries) == (target, retries)


def test_fail_is_legal_only_from_processing() -> None:
    assert legal_from(E.FAIL) == {S.PROCESSING}


@pytest.mark.parametrize("max_retries", range(6))
def test_fail_retries_while_retries_remain_then_fails(max_retries: int) -> None:
    for retries in range(max_retries + 3):
        expected = (S.RETRYING, retries + 1) if retries < max_retries else (S.FAILED, retries)
        assert outcome(S.PROCESSING, E.FAIL, retries, max_retries) == expected, (retries, max_retries)


def test_max_retries_failures_are_retried_and_the_next_one_fails() -> None:
    # default max_retries = 3: the fourth fail makes the job FAILED
    state, retries = S.PENDING, 0
    seen = []
    for _ in range(4):
        state, retries = transition(state, E.DISPATCH, retries, 3)
        state, retries = transition(state, E.FAIL, retries, 3)
        seen.append((state, retries))
        if state is S.RETRYING:
            state, retries = transition(state, E.BACKOFF_ELAPSED, retries, 3)
    assert seen == [(S.RETRYING, 1), (S.RETRYING, 2), (S.RETRYING, 3), (S.FAILED, 3)]


def test_backoff_elapsed_only_from_retrying_back_to_pending() -> None:
    assert legal_from(E.BACKOFF_ELAPSED) == {S.RETRYING}
    for retries, max_retries in RETRY_POINTS:
        assert outcome(S.RETRYING, E.BACKOFF_ELAPSED, retries, max_retries) == (S.PENDING, retries)


@pytest.mark.parametrize("max_retries", range(6))
def test_retry_count_never_decreases_nor_exceeds_max(max_retries: int) -> None:
    for state, event, retries in itertools.product(JobState, JobEvent, range(max_retries + 1)):
        result = outcome(state, event, retries, max_retries)
        if result is not None:
            assert retries <= result[1] <= max_retries, (state, event, retries, max_retries, result)


# ---- the lifecycle as a graph ------------------------------------------------------------------------

Node = tuple[JobState, int]


def successors(node: Node, max_retries: int) -> list[Node]:
    found = (outcome(node[0], event, node[1], max_retries) for event in JobEvent)
    return [n for n in found if n is not None]


def reachable(start: Node, max_retries: int) -> set[Node]:
    seen = {start}
    queue = deque([start])
    while queue:
        for nxt in successors(queue.popleft(), max_retries):
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    return seen


@pytest.mark.parametrize("max_retries", range(6))
def test_every_reachable_state_can_still_end(max_retries: int) -> None:
    nodes = reachable((S.PENDING, 0), max_retries)
    for node in nodes:
        assert any(s.terminal for s, _ in reachable(node, max_retries)), f"{node} can never end"
    expected_states = set(JobState) if max_retries > 0 else set(JobState) - {S.RETRYING}
    assert {s for s, _ in nodes} == expected_states
    assert {r for _, r in nodes} == set(range(max_retries + 1))


@settings(max_examples=300, deadline=None)
@given(
    max_retries=st.integers(min_value=0, max_value=5),
    events=st.lists(st.sampled_from(list(JobEvent)), max_size=60),
)
def test_random_event_sequences_keep_the_invariants(max_retries: int, events: list[JobEvent]) -> None:
    state, retries = S.PENDING, 0
    retried_failures = 0
    for event in events:
        try:
            new_state, new_retries = transition(state, event, retries, max_retries)
        except IllegalTransition:
            continue  # the job stays where it was
        assert not state.terminal, f"{event} left the terminal state {state}"
        assert retries <= new_retries <= max_retries
        if event is E.FAIL and new_state is S.RETRYING:
            retried_failures += 1
        else:
            assert new_retries == retries, f"{event} changed the retry count"
        state, retries = new_state, new_retries
    assert retries == retried_failures


# ---- backoff -----------------------------------------------------------------------------------------


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
