"""Per-user books kept beside the job registry, in memory: the PENDING jobs in lanes by (priority, owner,
model), oldest first, for the scheduler; and each user's figures (jobs waiting and running, jobs finished
and audio seconds done since start, bytes of spooled audio, when last served) for the submit limits and
`stats`. The registry, the one writer of job state, tells it each committed change; nothing here is
stored, so recovery rebuilds it (spool sizes by stat of the spool files, in a thread)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from itertools import islice

import msgspec

from whisperd.jobs import JobEvent, JobState
from whisperd.store import JobRow

LaneKey = tuple[int, int, str]  # priority, owner uid, model


class UserFigures(msgspec.Struct, kw_only=True):
    waiting_jobs: int = 0  # PENDING or RETRYING: what max_queued_jobs_per_user bounds
    running_jobs: int = 0  # PROCESSING
    finished_jobs: int = 0  # reached COMPLETED, FAILED or CANCELLED since the daemon started
    spool_bytes: int = 0  # audio of the user's live jobs: what max_spool_bytes_per_user bounds
    audio_seconds: float = 0.0  # audio of the user's jobs COMPLETED since the daemon started
    last_served: int = 0  # stamp of the user's latest dispatch; 0: not since start


class Ledger:
    def __init__(self) -> None:
        # Each lane is a dict used as an ordered set: O(1) to append, to remove any job, and to read the head.
        self._lanes: dict[LaneKey, dict[int, JobRow]] = {}
        self._users: dict[int, UserFigures] = {}
        self._spool_bytes: dict[int, int] = {}  # live job -> bytes of its spooled audio
        self._stamp = 0

    # ---- told by the registry ------------------------------------------------------------------------

    def moved(self, job: JobRow, old: JobState | None, event: JobEvent | None) -> None:
        """After a committed change of state (old None: a new or recovered job, entering its state)."""
        user = self._users.setdefault(job.owner_uid, UserFigures())
        if old is None:
            self._spool_bytes.setdefault(job.id, 0)
        elif old is JobState.PENDING:
            self._lane(job).pop(job.id, None)
            self._drop_empty_lane(job)
        if old in (JobState.PENDING, JobState.RETRYING):
            user.waiting_jobs -= 1
        elif old is JobState.PROCESSING:
            user.running_jobs -= 1
        new = job.state
        if new is JobState.PENDING:
            self._lane(job)[job.id] = job  # to the tail: FIFO within the lane
        if new in (JobState.PENDING, JobState.RETRYING):
            user.waiting_jobs += 1
        elif new is JobState.PROCESSING:
            user.running_jobs += 1
            if event is JobEvent.DISPATCH:
                self._stamp += 1
                user.last_served = self._stamp
        elif new.terminal:
            user.finished_jobs += 1
            user.spool_bytes -= self._spool_bytes.pop(job.id, 0)
            if new is JobState.COMPLETED:
                user.audio_seconds += job.audio_duration_s or 0.0

    def spooled(self, job: JobRow, size_bytes: int) -> None:
        """The size of a live job's spooled audio: told at submit, or measured at recovery."""
        if job.id in self._spool_bytes:  # not finished meanwhile
            user = self._users.setdefault(job.owner_uid, UserFigures())
            user.spool_bytes += size_bytes - self._spool_bytes[job.id]
            self._spool_bytes[job.id] = size_bytes

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

    def lanes(self, take: int) -> Iterator[tuple[LaneKey, int, list[JobRow]]]:
        """Each lane of PENDING jobs: its key, its length and its first `take` jobs (oldest first); costs
        the number of lanes plus the jobs returned, not the length of the queue."""
        for key, jobs in self._lanes.items():
            yield key, len(jobs), list(islice(jobs.values(), take))

    # ---- helpers -------------------------------------------------------------------------------------

    def _lane(self, job: JobRow) -> dict[int, JobRow]:
        return self._lanes.setdefault((job.priority, job.owner_uid, job.model), {})

    def _drop_empty_lane(self, job: JobRow) -> None:
        key = (job.priority, job.owner_uid, job.model)
        if not self._lanes.get(key, True):
            del self._lanes[key]


def spool_sizes(paths: Mapping[int, str]) -> dict[int, int]:
    """Bytes of each job's spooled audio, by job id; blocking (one stat each), so run it in a thread. A
    file that is gone counts 0: its job fails when it runs."""
    sizes: dict[int, int] = {}
    for job_id, path in paths.items():
        try:
            sizes[job_id] = os.stat(path).st_size
        except OSError:
            sizes[job_id] = 0
    return sizes
