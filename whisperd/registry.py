"""The job registry: live jobs in memory, every change written through to the store, every transition
timestamped, logged and published to watchers."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from whisperd.errors import NotFound
from whisperd.jobs import JobEvent, JobState, retry_delay_s, transition
from whisperd.protocol import JobView, Transcript
from whisperd.store import JobRecord, NewJob, Store

log = logging.getLogger("whisperd.jobs")

Listener = Callable[[JobView], None]


class JobRegistry:
    def __init__(
        self,
        store: Store,
        clock: Callable[[], float],
        max_retries: int,
        retry_backoff_s: float,
        retry_backoff_max_s: float,
    ) -> None:
        self._store = store
        self._clock = clock
        self._max_retries = max_retries
        self._backoff_s = retry_backoff_s
        self._backoff_max_s = retry_backoff_max_s
        self._live: dict[int, JobRecord] = {}
        self._terminal_counts: Counter[str] = Counter()
        self._listeners: list[Listener] = []

    # ---- start-up ------------------------------------------------------------------------------------

    def recover(self) -> int:
        """Load the live jobs; a job that was PROCESSING when the daemon stopped goes back to the queue."""
        counts = self._store.count_by_state()
        self._terminal_counts = Counter({s: n for s, n in counts.items() if JobState(s).terminal})
        requeued = 0
        for job in self._store.live_jobs():
            self._live[job.id] = job
            if job.state is JobState.PROCESSING:
                self.apply(job, JobEvent.REQUEUE, error=None)
                requeued += 1
        removed = self._store.remove_orphan_spool_files()
        log.info(
            "recovered %d live jobs (%d were processing); removed %d orphan spool files",
            len(self._live),
            requeued,
            removed,
        )
        return requeued

    # ---- reads ---------------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def live(self) -> list[JobRecord]:
        return list(self._live.values())

    def find_live(self, job_id: int) -> JobRecord | None:
        return self._live.get(job_id)

    def get(self, job_id: int) -> JobRecord:
        job = self._live.get(job_id) or self._store.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def select(self, ids: list[int], state: JobState | None, limit: int) -> list[JobRecord]:
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
        counts = Counter(j.state.value for j in self._live.values())
        counts.update(self._terminal_counts)
        return {s.value: counts.get(s.value, 0) for s in JobState}

    def waiting_count(self) -> int:
        """Jobs waiting for a worker (PENDING or RETRYING): what the queue limit bounds."""
        return sum(1 for j in self._live.values() if j.state is not JobState.PROCESSING)

    # ---- writes --------------------------------------------------------------------------------------

    def add(self, new_jobs: list[NewJob]) -> list[JobRecord]:
        records = self._store.insert_jobs(new_jobs, self._clock())
        for job in records:
            self._live[job.id] = job
            log.info(
                "job %d PENDING: %s (model %s)",
                job.id,
                job.filename,
                job.model,
                extra={"JOB_ID": job.id, "JOB_STATE": job.state.value, "MODEL": job.model},
            )
            self._publish(job)
        return records

    def apply(
        self, job: JobRecord, event: JobEvent, transcript: Transcript | None = None, **changes: Any
    ) -> None:
        """Take one transition through the state machine (raising if illegal), then persist and publish."""
        old = job.state
        new, retries = transition(old, event, job.retries, self._max_retries)
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
            job.not_before = now + retry_delay_s(retries, self._backoff_s, self._backoff_max_s)
        spool: str | None = None
        if new.terminal:
            job.finished_at = now
            if new is JobState.COMPLETED:
                job.progress = 100.0
            spool, job.spool_path = job.spool_path, None
        self._store.save_transition(job, old, event.value, transcript)
        if new.terminal:
            self._store.discard_spool(spool)  # only once the commit no longer needs it
            self._live.pop(job.id, None)
            self._terminal_counts[new.value] += 1
        level = logging.WARNING if new in (JobState.FAILED, JobState.RETRYING) else logging.INFO
        log.log(
            level,
            "job %d %s -> %s (%s)%s",
            job.id,
            old,
            new,
            event,
            f": {job.error}" if job.error and new is not JobState.COMPLETED else "",
            extra={
                "JOB_ID": job.id,
                "JOB_STATE": new.value,
                "MODEL": job.model,
                "DEVICE": job.device or "",
                "WORKER": job.worker or "",
                "RETRIES": job.retries,
            },
        )
        self._publish(job)

    def set_progress(self, job: JobRecord, progress: float, audio_duration_s: float) -> None:
        """Progress stays in memory (and reaches watchers); the store gets it with the next transition."""
        job.progress, job.audio_duration_s, job.updated_at = progress, audio_duration_s, self._clock()
        self._publish(job)

    def _publish(self, job: JobRecord) -> None:
        view = job.view()
        for listener in list(self._listeners):
            listener(view)
