"""What the daemon counts as things happen: the one sink every component reports events to. It feeds the
Prometheus counters and histograms of `/metrics` and keeps the running totals that `stats` shows; gauges are
read from their owners at scrape time (metrics.py) and are not fed here."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from whisperd.jobs import JobEvent, JobState
from whisperd.store import JobRow

# Transcription waits and runs from seconds to hours.
JOB_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
TICK_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Telemetry:
    def __init__(self, collectors: CollectorRegistry | None = None) -> None:
        """collectors: where the counters and histograms are exposed (a private one when None)."""
        exposed = collectors if collectors is not None else CollectorRegistry(auto_describe=False)
        self.audio_seconds_total = 0.0
        self.processing_seconds_total = 0.0
        self.out_of_memory_events: dict[str, int] = {}  # by device
        self.last_tick_at = 0.0
        self._finished = Counter(
            "whisperd_jobs_finished", "Jobs that reached a terminal state, by outcome and model",
            ["outcome", "model"], registry=exposed,
        )  # fmt: skip
        self._retries = Counter(
            "whisperd_job_retries", "Failures retried (a job went to RETRYING)", registry=exposed
        )
        self._requeues = Counter(
            "whisperd_job_requeues", "Jobs sent back to the queue through no fault of their own",
            registry=exposed,
        )  # fmt: skip
        self._oom = Counter(
            "whisperd_out_of_memory_events",
            "CUDA out-of-memory errors in workers",
            ["gpu"],
            registry=exposed,
        )
        self._audio = Counter(
            "whisperd_audio_seconds_transcribed", "Seconds of audio in completed jobs", ["model"],
            registry=exposed,
        )  # fmt: skip
        self._queue_wait = Histogram(
            "whisperd_job_queue_wait_seconds", "Time from (re)queueing to dispatch",
            buckets=JOB_BUCKETS_S, registry=exposed,
        )  # fmt: skip
        self._processing = Histogram(
            "whisperd_job_processing_seconds", "Time from dispatch to the end of the run, by outcome",
            ["outcome"], buckets=JOB_BUCKETS_S, registry=exposed,
        )  # fmt: skip
        self._tick = Histogram(
            "whisperd_scheduler_tick_seconds", "Duration of one scheduling round",
            buckets=TICK_BUCKETS_S, registry=exposed,
        )  # fmt: skip

    def job_transition(self, job: JobRow, old: JobState, event: JobEvent) -> None:
        """After each committed transition."""
        now = job.updated_at
        if event is JobEvent.DISPATCH:
            self._queue_wait.observe(max(0.0, now - job.queued_at))
        elif event is JobEvent.REQUEUE:
            self._requeues.inc()
        if old is JobState.PROCESSING and job.started_at is not None:
            outcome = job.state.value.lower() if job.state.terminal else "interrupted"
            self._processing.labels(outcome).observe(max(0.0, now - job.started_at))
        if job.state is JobState.RETRYING:
            self._retries.inc()
        if job.state.terminal:
            self._finished.labels(job.state.value.lower(), job.model).inc()

    def job_completed(self, model: str, audio_s: float, processing_s: float) -> None:
        """A worker's result was committed: its audio and the worker time it took."""
        self.audio_seconds_total += audio_s
        self.processing_seconds_total += processing_s
        self._audio.labels(model).inc(audio_s)

    def out_of_memory(self, device: str) -> None:
        self.out_of_memory_events[device] = self.out_of_memory_events.get(device, 0) + 1
        self._oom.labels(device.removeprefix("cuda:")).inc()

    def tick(self, duration_s: float, at: float) -> None:
        self._tick.observe(duration_s)
        self.last_tick_at = at

    def realtime_factor(self) -> float | None:
        """Audio seconds per worker second since start; None before the first completed job."""
        if not self.processing_seconds_total:
            return None
        return self.audio_seconds_total / self.processing_seconds_total
