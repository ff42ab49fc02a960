"""What the daemon makes of its workers' reports and deaths: progress, results, failures (retried, fatal, out
of memory), jobs let go of, and the jobs a dead worker leaves behind. Each ends in one registry transition."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from whisperd import workerproto as wp
from whisperd.estimates import MemoryEstimates
from whisperd.jobs import JobEvent, JobState
from whisperd.registry import JobRegistry
from whisperd.segmentfeed import SegmentFeed
from whisperd.spreads import Part, Spread, Spreads
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
        spreads: Spreads | None = None,
        segments: SegmentFeed | None = None,
    ) -> None:
        """segments: where the segments of running jobs go as they are decoded (None: nowhere)."""
        self._registry = registry
        self._estimates = estimates
        self._telemetry = telemetry
        self._wake = wake
        self._spreads = spreads or Spreads()
        self._segments = segments if segments is not None else SegmentFeed()

    def _processing_job(self, worker_id: str, job_id: int) -> JobRow | None:
        """The live job a report is about, if it is still PROCESSING on that worker (not cancelled since)."""
        job = self._registry.find_live(job_id)
        ok = job is not None and job.state is JobState.PROCESSING and job.worker == worker_id
        return job if ok else None

    def job_message(self, worker_id: str, device: str, message: wp.JobMessage) -> None:
        spread = self._spreads.get(message.job_id)
        if spread is not None:
            self._part_message(worker_id, device, spread, message)
            return
        job = self._processing_job(worker_id, message.job_id)
        if job is None:  # cancelled by its user meanwhile: that transition has been taken already
            return
        if isinstance(message, wp.Progress):
            first = job.audio_duration_s is None
            self._registry.set_progress(job, message.progress, message.audio_duration_s)
            if message.segments:
                self._segments.publish(job.id, message.segments)
            if first:  # its length known: idle workers may now share it (spreads.py)
                self._wake()
        elif isinstance(message, wp.Finished):
            duration_s = message.transcript.duration_s
            self._segments.finish(job.id, message.transcript)  # before the transition, which ends its feed
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

    def _part_message(self, worker_id: str, device: str, spread: Spread, message: wp.JobMessage) -> None:
        """A report about one part of a job spread over several workers."""
        job = self._registry.find_live(spread.job_id)
        part = spread.part_on(worker_id)
        if job is None or job.state is not JobState.PROCESSING or part is None:
            return  # the job ended (cancelled, failed) meanwhile, or the part was placed again
        if isinstance(message, wp.Progress):
            part.position_s = message.progress * spread.duration_s / 100
            self._registry.set_progress(job, spread.progress(), spread.duration_s)
        elif isinstance(message, wp.Shared):
            self._spreads.shared(spread, part, message)
            self._wake()
        elif isinstance(message, wp.Finished):
            part.transcript, part.processing_s, part.promised = message.transcript, message.processing_s, 0
            if spread.complete():
                transcript = spread.stitched()
                self._spreads.forget(job.id)
                self._segments.finish(job.id, transcript)  # the parts' segments were not published
                self._registry.apply_or_defer(
                    job, JobEvent.COMPLETE, transcript=transcript, audio_duration_s=transcript.duration_s
                )
                processing_s = sum(p.processing_s for p in spread.parts)
                self._telemetry.job_completed(job.model, transcript.duration_s, processing_s)
            else:
                self._registry.set_progress(job, spread.progress(), spread.duration_s)
        elif isinstance(message, wp.Failed):
            if message.kind == "oom":
                self._out_of_memory(device, job)
            self._part_failed(job, spread, part, message.error, fatal=message.kind == "fatal")
        elif isinstance(message, wp.Stopped):  # let go of through no fault of its own: placed again
            part.let_go()
            self._wake()

    def _part_failed(self, job: JobRow, spread: Spread, part: Part, error: str, fatal: bool = False) -> None:
        """A part that failed is placed again on its own, while the retry policy allows; past that (or
        failing in a way no retry fixes) the job fails, and its other parts are stopped by the loop."""
        part.failures += 1
        part.let_go()
        if fatal or part.failures > self._registry.policy.max_retries:
            where = f"its audio from {part.start_s:.0f} s to {part.end_s:.0f} s"
            tries = f"{part.failures} time{'s' * (part.failures > 1)}"
            self._registry.apply_or_defer(job, JobEvent.FAIL_FATAL, error=f"{where} failed {tries}: {error}")
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
            spread = self._spreads.get(job_id)
            part = spread.part_on(worker_id) if spread is not None else None
            if spread is not None:
                live = self._registry.find_live(job_id)
                if part is not None and live is not None and live.state is JobState.PROCESSING:
                    if job_id == culprit:
                        self._part_failed(live, spread, part, error)
                    else:
                        part.let_go()  # placed again, unharmed
                continue
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
