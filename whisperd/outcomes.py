"""What the daemon makes of its workers' messages and deaths: progress, results, failures (retried, fatal,
out of memory), and the jobs a dead or killed worker leaves behind."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec

from whisperd import workerproto as wp
from whisperd.jobs import JobEvent, JobState
from whisperd.store import JobRecord
from whisperd.supervisor import Batch, WorkerHandle

if TYPE_CHECKING:
    from whisperd.daemon import Daemon

log = logging.getLogger("whisperd")


# A job still PROCESSING here that the worker calls cancelled was not cancelled by its user (that would have
# ended it already): the cancel was meant for an earlier run, so it goes back to the queue unharmed.
_FAILURE_EVENTS = {
    "fatal": JobEvent.FAIL_FATAL,
    "retryable": JobEvent.FAIL,
    "oom": JobEvent.FAIL,
    "cancelled": JobEvent.REQUEUE,
    "requeue": JobEvent.REQUEUE,
}


class WorkerOutcomes:
    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon
        self._killed: set[str] = set()  # workers killed through no fault of their running job
        self.avoid_devices: dict[int, frozenset[str]] = {}  # job id -> devices it ran out of memory on
        daemon.registry.on_transition(self._forget_finished)

    def _forget_finished(self, job: JobRecord, old: JobState, event: JobEvent) -> None:
        if job.state.terminal:
            self.avoid_devices.pop(job.id, None)

    def kill(self, handle: WorkerHandle, reason: str) -> None:
        """Kill a worker through no fault of its running job: on_exit then requeues that job unharmed."""
        log.warning("killing worker %s: %s", handle.id, reason, extra={"WORKER": handle.id})
        self._killed.add(handle.id)
        handle.kill()

    def processing_job(self, handle: WorkerHandle, job_id: int) -> JobRecord | None:
        """The live job a worker message is about, if it is still PROCESSING there (not cancelled)."""
        job = self._d.registry.find_live(job_id)
        return (
            job if job is not None and job.state is JobState.PROCESSING and job.worker == handle.id else None
        )

    def on_message(self, handle: WorkerHandle, message: wp.FromWorker) -> None:
        batch = handle.batch
        if isinstance(message, wp.Ready):
            self._d.wake()
        elif isinstance(message, wp.BatchDone):
            handle.models = set(message.models)
            if batch is not None and batch.id == message.batch_id:
                self._d.pool.release(batch.id)
                handle.batch = None
                handle.cancel_deadline = None
                self._d.wake()
        elif batch is not None:
            job = self.processing_job(handle, message.job_id)
            if isinstance(message, wp.Started):
                batch.started_job = message.job_id
            elif isinstance(message, wp.Finished | wp.Failed):
                batch.done_jobs.add(message.job_id)
                handle.cancel_deadline = None
            if job is None:
                if isinstance(message, wp.Failed) and message.kind == "cancelled":
                    log.info("worker %s stopped cancelled job %d", handle.id, message.job_id)
                return
            if isinstance(message, wp.Progress):
                self._d.registry.set_progress(job, message.progress, message.audio_duration_s)
            elif isinstance(message, wp.Finished):
                self._d.audio_seconds_total += message.transcript.duration_s
                self._d.processing_seconds_total += message.processing_s
                self._d.registry.apply(
                    job, JobEvent.COMPLETE, transcript=message.transcript,
                    audio_duration_s=message.transcript.duration_s,
                )  # fmt: skip
            elif isinstance(message, wp.Failed):
                if message.kind == "oom":
                    self._out_of_memory(handle, job)
                self._d.registry.apply(job, _FAILURE_EVENTS[message.kind], error=message.error)
                self._d.wake()

    def _out_of_memory(self, handle: WorkerHandle, job: JobRecord) -> None:
        """Count it, reserve more for this model from now on and retry the job on another GPU if one fits.
        The worker stops its batch and hands the rest back (kind "requeue") to be placed again."""
        device = handle.spec.device
        self._d.oom_events[device] = self._d.oom_events.get(device, 0) + 1
        if self._d.oom_observer is not None:
            self._d.oom_observer(device)
        self.avoid_devices[job.id] = self.avoid_devices.get(job.id, frozenset()) | {device}
        estimates = dict(self._d.settings.model_memory_bytes)
        old = estimates.get(job.model, self._d.settings.default_model_memory_bytes)
        estimates[job.model] = int(old * 1.25)
        self._d.settings = msgspec.structs.replace(self._d.settings, model_memory_bytes=estimates)
        log.warning("out of memory on %s (job %d, model %s): reserving %.1f GiB per batch from now on",
                    device, job.id, job.model, estimates[job.model] / 1024**3,
                    extra={"JOB_ID": job.id, "DEVICE": device, "MODEL": job.model})  # fmt: skip

    def on_exit(self, handle: WorkerHandle, batch: Batch | None, returncode: int) -> None:
        """A dead worker's unfinished jobs: the one it was running is retried (it may be the cause), the ones
        it had not reached go back to the queue unharmed."""
        killed_by_us = handle.id in self._killed
        self._killed.discard(handle.id)
        if batch is None:
            return
        self._d.pool.release(batch.id)
        for job_id in batch.job_ids:
            if job_id in batch.done_jobs:
                continue
            job = self.processing_job(handle, job_id)
            if job is None:
                continue
            if job_id == batch.started_job and not killed_by_us:
                self._d.registry.apply(
                    job, JobEvent.FAIL, error=f"worker {handle.id} died (exit status {returncode})"
                )
            else:
                self._d.registry.apply(job, JobEvent.REQUEUE)
        self._d.wake()
