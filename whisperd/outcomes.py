"""What the daemon makes of its workers' reports and deaths: progress, results, failures (retried, fatal, out
of memory), jobs let go of, and the jobs a dead worker leaves behind. Each ends in one registry transition."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from whisperd import workerproto as wp
from whisperd.estimates import MemoryEstimates
from whisperd.jobs import JobEvent, JobState
from whisperd.registry import JobRegistry
from whisperd.store import JobRow
from whisperd.telemetry import Telemetry

log = logging.getLogger("whisperd")

_FAILURE_EVENTS: dict[wp.FailureKind, JobEvent] = {
    "fatal": JobEvent.FAIL_FATAL,
    "retryable": JobEvent.FAIL,
    "oom": JobEvent.FAIL,
}


class WorkerOutcomes:
    def __init__(
        self,
        registry: JobRegistry,
        estimates: MemoryEstimates,
        telemetry: Telemetry,
        wake: Callable[[], None],
    ) -> None:
        self._registry = registry
        self._estimates = estimates
        self._telemetry = telemetry
        self._wake = wake

    def _processing_job(self, worker_id: str, job_id: int) -> JobRow | None:
        """The live job a report is about, if it is still PROCESSING on that worker (not cancelled since)."""
        job = self._registry.find_live(job_id)
        ok = job is not None and job.state is JobState.PROCESSING and job.worker == worker_id
        return job if ok else None

    def job_message(self, worker_id: str, device: str, message: wp.JobMessage) -> None:
        job = self._processing_job(worker_id, message.job_id)
        if job is None:  # cancelled by its user meanwhile: that transition has been taken already
            return
        if isinstance(message, wp.Progress):
            self._registry.set_progress(job, message.progress, message.audio_duration_s)
        elif isinstance(message, wp.Finished):
            duration_s = message.transcript.duration_s
            # A commit the store refuses keeps the transcript in memory until a later round commits it.
            self._registry.apply_or_defer(
                job, JobEvent.COMPLETE, transcript=message.transcript, audio_duration_s=duration_s
            )
            self._telemetry.job_completed(job.model, duration_s, message.processing_s)
        elif isinstance(message, wp.Failed):
            if message.kind == "oom":
                self._out_of_memory(device, job)
            self._registry.apply_or_defer(job, _FAILURE_EVENTS[message.kind], error=message.error)
            self._wake()
        elif isinstance(message, wp.Stopped):
            # Still PROCESSING, so not cancelled by its user (that would have ended it already): the stop
            # was meant for an earlier run, or the batch stopped. Either way it goes back to the queue.
            self._registry.apply_or_defer(job, JobEvent.REQUEUE)
            self._wake()

    def _out_of_memory(self, device: str, job: JobRow) -> None:
        """Count it, reserve more for this model from now on and retry the job on another GPU if one fits.
        The worker stops its batch and hands the rest back (Stopped, batch_stopped) to be placed again."""
        self._telemetry.out_of_memory(device)
        self._registry.avoid_device(job.id, device)
        reserve_bytes = self._estimates.learn_out_of_memory(job.model)
        log.warning("out of memory on %s (job %d, model %s): reserving %.1f GiB per batch from now on",
                    device, job.id, job.model, reserve_bytes / 1024**3,
                    extra={"JOB_ID": job.id, "DEVICE": device, "MODEL": job.model})  # fmt: skip

    def batch_interrupted(
        self,
        worker_id: str,
        unfinished: Sequence[int],
        culprit: int | None,
        error: str,
        suspects: Sequence[int] = (),
    ) -> None:
        """A worker died with these jobs unfinished. The culprit, the one it was running when it died of its
        own accord, is retried (it may be the cause); the others go back to the queue unharmed. Suspects (of
        a batch decoded together, where no one job can be blamed) each run alone next."""
        for job_id in unfinished:
            job = self._processing_job(worker_id, job_id)
            if job is None:
                continue
            if job_id == culprit:
                self._registry.apply_or_defer(job, JobEvent.FAIL, error=error)
            else:
                self._registry.apply_or_defer(job, JobEvent.REQUEUE)
            if job_id in suspects:
                self._registry.run_alone(job_id)
        self._wake()
