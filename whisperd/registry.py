"""The job registry: live jobs in memory, every change written through to the store, every transition
timestamped, logged and published to watchers."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec

from whisperd.errors import NotFound
from whisperd.jobs import JobEvent, JobState, retry_delay_s, transition
from whisperd.protocol import JobView, Transcript
from whisperd.store import JobRecord, NewJob, Store

log = logging.getLogger("whisperd.jobs")

Listener = Callable[[JobView], None]
TransitionHook = Callable[[JobRecord, JobState, JobEvent], None]


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
        self._counts: Counter[JobState] = Counter()  # kept as jobs move, so reading it costs nothing
        self._listeners: list[Listener] = []
        self._transition_hooks: list[TransitionHook] = []
        # Waiting jobs (PENDING, RETRYING) by id, in the order they were (re)queued: the first is the oldest.
        self._waiting: dict[int, float] = {}

    def configure(self, max_retries: int, retry_backoff_s: float, retry_backoff_max_s: float) -> None:
        self._max_retries = max_retries
        self._backoff_s = retry_backoff_s
        self._backoff_max_s = retry_backoff_max_s

    # ---- start-up ------------------------------------------------------------------------------------

    def recover(self) -> int:
        """Load the live jobs; a job that was PROCESSING when the daemon stopped goes back to the queue."""
        counts = self._store.count_by_state()
        self._counts = Counter({JobState(s): n for s, n in counts.items()})
        requeued = 0
        for job in sorted(self._store.live_jobs(), key=lambda j: j.queued_at):
            self._live[job.id] = job
            if job.state is not JobState.PROCESSING:
                self._waiting[job.id] = job.queued_at
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

    def on_transition(self, hook: TransitionHook) -> None:
        """hook(job, old_state, event), after each transition is committed (for metrics)."""
        self._transition_hooks.append(hook)

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

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
        return {s.value: self._counts[s] for s in JobState}

    def oldest_waiting_since(self) -> float | None:
        """When the job that has waited longest was queued (None when nothing waits); constant time."""
        return next(iter(self._waiting.values()), None)

    def waiting_count(self) -> int:
        """Jobs waiting for a worker (PENDING or RETRYING): what the queue limit bounds."""
        return self._counts[JobState.PENDING] + self._counts[JobState.RETRYING]

    # ---- writes --------------------------------------------------------------------------------------

    def add(self, new_jobs: list[NewJob]) -> list[JobRecord]:
        records = self._store.insert_jobs(new_jobs, self._clock())
        for job in records:
            self._live[job.id] = job
            self._counts[job.state] += 1
            self._waiting[job.id] = job.queued_at
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
            job.not_before = now + retry_delay_s(retries, self._backoff_s, self._backoff_max_s)
        spool: str | None = None
        if new.terminal:
            job.finished_at = now
            if new is JobState.COMPLETED:
                job.progress = 100.0
            spool, job.spool_path = job.spool_path, None
        try:
            self._store.save_transition(job, old, event.value, transcript)
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
            self._store.discard_spool(spool)  # only once the commit no longer needs it
            self._live.pop(job.id, None)
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
        for hook in self._transition_hooks:
            hook(job, old, event)
        self._publish(job)

    def set_progress(self, job: JobRecord, progress: float, audio_duration_s: float) -> None:
        """Progress stays in memory (and reaches watchers); the store gets it with the next transition."""
        job.progress, job.audio_duration_s, job.updated_at = progress, audio_duration_s, self._clock()
        self._publish(job)

    def _publish(self, job: JobRecord) -> None:
        view = job.view()
        for listener in list(self._listeners):
            listener(view)
