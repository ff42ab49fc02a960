"""One batch on one worker, and its lifecycle: the worker goes through its jobs in order, starting and
finishing each; a cancel of the job it is on gets a deadline."""

from __future__ import annotations

from collections.abc import Sequence


class Batch:
    def __init__(
        self, batch_id: int, job_ids: Sequence[int], at: float = 0.0, together: bool = False
    ) -> None:
        """together: its jobs are decoded together (batched mode), so none of them alone can be blamed for
        what its worker does while they run."""
        self.id = batch_id
        self.job_ids = tuple(job_ids)
        self.together = together and len(self.job_ids) > 1
        self.heard_at = at  # when its worker last said something about it (dispatched, at first)
        self._started: int | None = None
        self._finished: set[int] = set()
        self._cancel_deadline: tuple[int, float] | None = None  # (job id, when its worker must be killed)

    def heard(self, at: float) -> None:
        self.heard_at = at

    def silent_for(self, now: float) -> float:
        """How long its worker has said nothing about it: past workers.progress_timeout_s, it is stuck."""
        return now - self.heard_at

    @property
    def blamed_job(self) -> int | None:
        """The job to blame when its worker is killed for what it does (stuck, too much memory, a broken
        reply): the one it started, else the one it is about to start."""
        return self.running_job if self.running_job is not None else self.current_job

    def start(self, job_id: int) -> None:
        self._started = job_id

    def finish(self, job_id: int) -> None:
        self._finished.add(job_id)
        if self._cancel_deadline is not None and self._cancel_deadline[0] == job_id:
            self._cancel_deadline = None

    def holds(self, job_id: int) -> bool:
        """The job is in this batch and not finished."""
        return job_id in self.job_ids and job_id not in self._finished

    @property
    def running_job(self) -> int | None:
        """The job the worker said it started and has not finished: the one to blame if the worker dies."""
        return self._started if self._started is not None and self.holds(self._started) else None

    @property
    def current_job(self) -> int | None:
        """The first unfinished job: the one the worker is on, or about to start."""
        return next((j for j in self.job_ids if j not in self._finished), None)

    def unfinished(self) -> list[int]:
        return [j for j in self.job_ids if j not in self._finished]

    def cancel_deadline_for(self, job_id: int, at: float) -> None:
        self._cancel_deadline = (job_id, at)

    @property
    def cancel_deadline(self) -> float | None:
        """When the worker must be killed if the cancelled job it is on has not stopped by then."""
        return self._cancel_deadline[1] if self._cancel_deadline is not None else None

    def cancel_overdue(self, now: float) -> bool:
        """A cancelled job is still running past its deadline."""
        deadline = self.cancel_deadline
        return deadline is not None and deadline <= now
