"""The job lifecycle: one explicit state machine. An illegal transition raises."""

from __future__ import annotations

import enum

from whisperd.errors import IllegalTransition


class JobState(enum.StrEnum):
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    RETRYING = "RETRYING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


class JobEvent(enum.StrEnum):
    DISPATCH = "dispatch"  # the scheduler hands the job to a worker
    COMPLETE = "complete"  # the worker returned a result
    FAIL = "fail"  # a failure a retry may fix (worker died, CUDA out of memory, ...)
    FAIL_FATAL = "fail_fatal"  # a failure no retry fixes (audio that does not decode, empty audio)
    BACKOFF_ELAPSED = "backoff_elapsed"  # a RETRYING job goes back to the tail of the queue
    # work interrupted through no fault of the job: a daemon restart, its worker killed by the daemon or
    # dead while the job waited in its batch, a batch stopped by a batch-mate's out-of-memory error
    REQUEUE = "requeue"
    CANCEL = "cancel"  # the user cancels, from any live state


_TABLE: dict[tuple[JobState, JobEvent], JobState] = {
    (JobState.PENDING, JobEvent.DISPATCH): JobState.PROCESSING,
    (JobState.PENDING, JobEvent.CANCEL): JobState.CANCELLED,
    (JobState.PROCESSING, JobEvent.COMPLETE): JobState.COMPLETED,
    (JobState.PROCESSING, JobEvent.FAIL_FATAL): JobState.FAILED,
    (JobState.PROCESSING, JobEvent.REQUEUE): JobState.PENDING,
    (JobState.PROCESSING, JobEvent.CANCEL): JobState.CANCELLED,
    (JobState.RETRYING, JobEvent.BACKOFF_ELAPSED): JobState.PENDING,
    (JobState.RETRYING, JobEvent.CANCEL): JobState.CANCELLED,
}


def transition(state: JobState, event: JobEvent, retries: int, max_retries: int) -> tuple[JobState, int]:
    """The next state and retry count. FAIL retries while retries remain (the count goes up), else FAILED."""
    if state is JobState.PROCESSING and event is JobEvent.FAIL:
        if retries < max_retries:
            return JobState.RETRYING, retries + 1
        return JobState.FAILED, retries
    try:
        return _TABLE[(state, event)], retries
    except KeyError:
        raise IllegalTransition(f"a {state} job cannot take the event {event!r}") from None


def retry_delay_s(retries: int, base_s: float, max_s: float) -> float:
    """Exponential backoff before a RETRYING job is queued again: base, 2*base, 4*base ... capped."""
    return float(min(max_s, base_s * 2 ** max(0, retries - 1)))
