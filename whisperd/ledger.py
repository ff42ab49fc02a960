"""Per-user books kept beside the job registry, in memory: the PENDING jobs in lanes by (priority, owner,
model), oldest first, for the scheduler; and each user's figures (jobs waiting and running, jobs finished
and audio seconds done since start, bytes of spooled audio, when last served) for the submit limits and
`stats`. The registry, the one writer of job state, tells it each committed change; nothing here is
stored, so recovery rebuilds it from the store's totals and its queue (one index-only scan)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

import msgspec

from whisperd.jobs import JobEvent, JobState
from whisperd.store import JobRow, QueueEntry, UserTotal

LaneKey = tuple[int, int, str]  # priority, owner uid, model


class UserFigures(msgspec.Struct, kw_only=True):
    waiting_jobs: int = 0  # PENDING or RETRYING: what max_queued_jobs_per_user bounds
    running_jobs: int = 0  # PROCESSING
    finished_jobs: int = 0  # reached COMPLETED, FAILED or CANCELLED since the daemon started
    spool_bytes: int = 0  # audio of the user's live jobs: what max_spool_bytes_per_user bounds
    audio_seconds: float = 0.0  # audio of the user's jobs COMPLETED since the daemon started
    last_served: int = 0  # stamp of the user's latest dispatch; 0: not since start


class Ledger:
    def __init__(self, keep_lanes: bool = True) -> None:
        """keep_lanes: False with a shared store, whose queue other hosts take from: it is read, not kept."""
        self._keep_lanes = keep_lanes
        # Each lane maps its PENDING jobs' ids to when they were queued, in that order (a dict keeps it): O(1)
        # to append, to remove any job and to read the head, and about 100 bytes a job, so a million fit.
        self._lanes: dict[LaneKey, dict[int, float]] = {}
        self._users: dict[int, UserFigures] = {}
        self._stamp = 0

    # ---- told by the registry ------------------------------------------------------------------------

    def load(self, totals: Iterable[UserTotal], queue: Iterable[Sequence[QueueEntry]]) -> None:
        """At start: each user's live jobs and spooled bytes, and the PENDING jobs oldest first."""
        for total in totals:
            user = self._users.setdefault(total.owner_uid, UserFigures())
            user.spool_bytes += total.spool_bytes
            if total.state in (JobState.PENDING, JobState.RETRYING):
                user.waiting_jobs += total.jobs
            elif total.state is JobState.PROCESSING:
                user.running_jobs += total.jobs
        lanes = self._lanes
        for chunk in queue:
            for job_id, priority, owner_uid, model, queued_at in chunk:
                key = (priority, owner_uid, model)
                lane = lanes.get(key)
                if lane is None:
                    lane = lanes[key] = {}
                lane[job_id] = queued_at

    def reload_totals(self, totals: Iterable[UserTotal]) -> None:
        """A shared store's fleet-wide figures, read afresh: each user's waiting and running jobs and spooled
        bytes replaced; what this host counted since its start (finished jobs, audio, turns) kept."""
        for user in self._users.values():
            user.waiting_jobs = user.running_jobs = user.spool_bytes = 0
        self.load(totals, ())

    def moved(self, job: JobRow, old: JobState | None, event: JobEvent | None) -> None:
        """After a committed change of state (old None: a new job, entering its state)."""
        user = self._users.setdefault(job.owner_uid, UserFigures())
        if old is None:
            user.spool_bytes += job.spool_bytes or 0
        elif old is JobState.PENDING:
            key = (job.priority, job.owner_uid, job.model)
            lane = self._lanes.get(key, {})
            lane.pop(job.id, None)
            if not lane:
                self._lanes.pop(key, None)
        if old in (JobState.PENDING, JobState.RETRYING):
            user.waiting_jobs -= 1
        elif old is JobState.PROCESSING:
            user.running_jobs -= 1
        new = job.state
        if new is JobState.PENDING and self._keep_lanes:  # to the tail: FIFO within the lane
            self._lanes.setdefault((job.priority, job.owner_uid, job.model), {})[job.id] = job.queued_at
        if new in (JobState.PENDING, JobState.RETRYING):
            user.waiting_jobs += 1
        elif new is JobState.PROCESSING:
            user.running_jobs += 1
            if event is JobEvent.DISPATCH:
                self._stamp += 1
                user.last_served = self._stamp
        elif new.terminal:
            user.finished_jobs += 1
            user.spool_bytes -= job.spool_bytes or 0
            if new is JobState.COMPLETED:
                user.audio_seconds += job.audio_duration_s or 0.0

    # ---- reads ---------------------------------------------------------------------------------------

    def user(self, uid: int) -> UserFigures:
        """A copy of one user's figures (zeros for a user never seen)."""
        found = self._users.get(uid)
        return msgspec.structs.replace(found) if found is not None else UserFigures()

    def users(self) -> dict[int, UserFigures]:
        """Copies of every user's figures, by uid: users seen since start (live jobs or finished ones)."""
        return {uid: msgspec.structs.replace(f) for uid, f in sorted(self._users.items())}

    def last_served(self) -> dict[int, int]:
        return {uid: f.last_served for uid, f in self._users.items() if f.last_served}

    def lanes(self, take: int) -> Iterator[tuple[LaneKey, int, list[tuple[int, float]]]]:
        """Each lane of PENDING jobs: its key, its length and its first `take` (id, queued_at), oldest first;
        costs the number of lanes plus the jobs returned, not the length of the queue."""
        for key, jobs in self._lanes.items():
            yield key, len(jobs), list(islice(jobs.items(), take))

    def oldest_pending_since(self) -> float | None:
        """When the PENDING job that has waited longest was queued: the oldest head of the lanes."""
        return min((next(iter(lane.values())) for lane in self._lanes.values()), default=None)

    def pending_models(self) -> set[str]:
        return {model for _priority, _uid, model in self._lanes}


def spool_size(path: str) -> int:
    """Bytes of a spooled file; blocking (a stat), so run it in a thread. A file that is gone counts 0: its
    job fails when it runs."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
