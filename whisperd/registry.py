"""The job registry: live jobs in memory, every change written through to the store, every transition
timestamped, logged, counted and published to watchers. The only writer of job state."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from whisperd.errors import NotFound
from whisperd.jobs import JobEvent, JobState, retry_delay_s, transition
from whisperd.protocol import JobView, Transcript
from whisperd.spool import Spool
from whisperd.store import JobRow, NewJob, Store

log = logging.getLogger("whisperd.jobs")

Publish = Callable[[JobView], None]
TransitionHook = Callable[[JobRow, JobState, JobEvent], None]


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    max_retries: int
    backoff_s: float
    backoff_max_s: float


class JobRegistry:
    def __init__(
        self,
        store: Store,
        spool: Spool,
        clock: Callable[[], float],
        policy: RetryPolicy,
        publish: Publish,
        on_transition: TransitionHook,
    ) -> None:
        """publish: every change a watcher should see; on_transition: each committed transition."""
        self._store = store
        self._spool = spool
        self._clock = clock
        self.policy = policy  # replaced on reload
        self._publish_view = publish
        self._on_transition = on_transition
        self._live: dict[int, JobRow] = {}
        self._counts: Counter[JobState] = Counter()  # kept as jobs move, so reading it costs nothing
        # Waiting jobs (PENDING, RETRYING) by id, in the order they were (re)queued: the first is the oldest.
        self._waiting: dict[int, float] = {}
        self._avoid_devices: dict[int, frozenset[str]] = {}  # live job -> devices it ran out of memory on

    # ---- start-up ------------------------------------------------------------------------------------

    def recover(self) -> int:
        """Load the live jobs; a job that was PROCESSING when the daemon stopped goes back to the queue."""
        self._counts = Counter(self._store.count_by_state())
        interrupted = []
        for job in sorted(self._store.live_jobs(), key=lambda j: j.queued_at):
            self._live[job.id] = job
            if job.state is JobState.PROCESSING:
                interrupted.append(job)
            else:
                self._waiting[job.id] = job.queued_at
        for job in interrupted:  # after the waiting ones, whose places in the queue stay theirs
            self.apply(job, JobEvent.REQUEUE, error=None)
        requeued = len(interrupted)
        removed = self._spool.remove_orphans(self._store.spool_names_in_use())
        log.info("recovered %d live jobs (%d were processing); removed %d orphan spool files",
                 len(self._live), requeued, removed)  # fmt: skip
        return requeued

    # ---- reads ---------------------------------------------------------------------------------------

    def live(self) -> list[JobRow]:
        return list(self._live.values())

    def pending(self) -> list[JobRow]:
        return [j for j in self._live.values() if j.state is JobState.PENDING]

    def find_live(self, job_id: int) -> JobRow | None:
        return self._live.get(job_id)

    def get(self, job_id: int) -> JobRow:
        job = self._live.get(job_id) or self._store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def transcript(self, job_id: int) -> Transcript | None:
        return self._store.transcript(job_id)

    def select(self, ids: Sequence[int], state: JobState | None, limit: int) -> list[JobRow]:
        """The jobs named (all of them, each must exist), else the newest `limit`; optionally of one state."""
        if ids:
            found = {j.id: j for j in self._store.select(ids, None, len(ids))}
            missing = [i for i in ids if i not in found]
            if missing:
                raise NotFound(f"no job {', '.join(map(str, missing))}")
            jobs = [self._live.get(i) or found[i] for i in dict.fromkeys(ids)]  # live copies: latest progress
            return [j for j in jobs if state is None or j.state is state]
        if state is not None and not state.terminal:
            return sorted((j for j in self._live.values() if j.state is state), key=lambda j: j.id)[-limit:]
        return [self._live.get(j.id) or j for j in self._store.select([], state, limit)]

    def counts(self) -> dict[str, int]:
        return {s.value: self._counts[s] for s in JobState}

    def oldest_waiting_since(self) -> float | None:
        """When the job that has waited longest was queued (None when nothing waits); constant time."""
        return next(iter(self._waiting.values()), None)

    def waiting_count(self) -> int:
        """Jobs waiting for a worker (PENDING or RETRYING): what the queue limit bounds."""
        return self._counts[JobState.PENDING] + self._counts[JobState.RETRYING]

    def avoided_devices(self, job_id: int) -> frozenset[str]:
        return self._avoid_devices.get(job_id, frozenset())

    # ---- writes --------------------------------------------------------------------------------------

    def add(self, new_jobs: Sequence[NewJob]) -> list[JobRow]:
        records = self._store.insert_jobs(new_jobs, self._clock())
        for job in records:
            self._live[job.id] = job
            self._counts[job.state] += 1
            self._waiting[job.id] = job.queued_at
            log.info("job %d PENDING: %s (model %s)", job.id, job.filename, job.model,
                     extra={"JOB_ID": job.id, "JOB_STATE": job.state.value, "MODEL": job.model})  # fmt: skip
            self._publish_view(job.view())
        return records

    def avoid_device(self, job_id: int, device: str) -> None:
        """The job ran out of memory there: place its retry elsewhere if anything else fits."""
        if job_id in self._live:
            self._avoid_devices[job_id] = self.avoided_devices(job_id) | {device}

    def release_due_retries(self, now: float) -> float | None:
        """RETRYING jobs whose backoff has elapsed go back to the queue; returns when the next one is due."""
        next_due: float | None = None
        for job in self.live():
            if job.state is JobState.RETRYING and job.not_before is not None:
                if job.not_before <= now:
                    self.apply(job, JobEvent.BACKOFF_ELAPSED)
                else:
                    next_due = job.not_before if next_due is None else min(next_due, job.not_before)
        return next_due

    def apply(
        self, job: JobRow, event: JobEvent, transcript: Transcript | None = None, **changes: Any
    ) -> None:
        """Take one transition through the state machine (raising if illegal), then persist and publish."""
        old = job.state
        policy = self.policy
        new, retries = transition(old, event, job.retries, policy.max_retries)
        before = msgspec.structs.replace(job)  # to undo the change in memory if the store refuses it
        now = self._clock()
        job.state, job.retries, job.updated_at = new, retries, now
        for name, value in changes.items():
            setattr(job, name, value)
        if new is JobState.PROCESSING:
            job.started_at, job.progress, job.error = now, 0.0, None
        elif new is JobState.PENDING:
            job.queued_at, job.device, job.worker = now, None, None
            job.progress, job.not_before = 0.0, None
        elif new is JobState.RETRYING:
            job.not_before = now + retry_delay_s(retries, policy.backoff_s, policy.backoff_max_s)
        spool: str | None = None
        if new.terminal:
            job.finished_at = now
            if new is JobState.COMPLETED:
                job.progress = 100.0
            spool, job.spool_path = job.spool_path, None
        try:
            self._store.save_transition(job, old, event, transcript)
        except BaseException:
            for name in job.__struct_fields__:
                setattr(job, name, getattr(before, name))
            raise
        self._counts[old] -= 1
        self._counts[new] += 1
        self._waiting.pop(job.id, None)
        if new in (JobState.PENDING, JobState.RETRYING):
            self._waiting[job.id] = now  # to the tail, so the first entry stays the oldest
        if new.terminal:
            self._spool.discard(spool)  # only once the commit no longer needs it
            self._live.pop(job.id, None)
            self._avoid_devices.pop(job.id, None)
        self._log_transition(job, old, new, event)
        self._on_transition(job, old, event)
        self._publish_view(job.view())

    def set_progress(self, job: JobRow, progress: float, audio_duration_s: float) -> None:
        """Progress stays in memory (and reaches watchers); the store gets it with the next transition."""
        job.progress, job.audio_duration_s, job.updated_at = progress, audio_duration_s, self._clock()
        self._publish_view(job.view())

    @staticmethod
    def _log_transition(job: JobRow, old: JobState, new: JobState, event: JobEvent) -> None:
        level = logging.WARNING if new in (JobState.FAILED, JobState.RETRYING) else logging.INFO
        error = f": {job.error}" if job.error and new is not JobState.COMPLETED else ""
        fields = {
            "JOB_ID": job.id, "JOB_STATE": new.value, "MODEL": job.model, "DEVICE": job.device or "",
            "WORKER": job.worker or "", "RETRIES": job.retries,
        }  # fmt: skip
        log.log(level, "job %d %s -> %s (%s)%s", job.id, old, new, event, error, extra=fields)
