"""Prometheus metrics on two registries, for the two scrape cadences: GPU figures (`/metrics/gpu`, every
5 s) and queue and system figures (`/metrics`, every 30 s). Gauges are read from the daemon's own state at
scrape time, in constant time however long the queue; counters and histograms follow job transitions. No
job id appears in any label."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from whisperd import __version__
from whisperd.jobs import JobEvent, JobState
from whisperd.store import JobRecord

if TYPE_CHECKING:
    from whisperd.daemon import Daemon

# Transcription waits and runs from seconds to hours.
JOB_BUCKETS_S = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
TICK_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


class EventMetrics:
    """Counters and histograms fed by the daemon as things happen."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.finished = Counter(
            "whisperd_jobs_finished", "Jobs that reached a terminal state, by outcome and model",
            ["outcome", "model"], registry=registry,
        )  # fmt: skip
        self.retries = Counter(
            "whisperd_job_retries", "Failures retried (a job went to RETRYING)", registry=registry
        )
        self.requeues = Counter(
            "whisperd_job_requeues",
            "Jobs sent back to the queue through no fault of their own",
            registry=registry,
        )
        self.oom = Counter(
            "whisperd_out_of_memory_events",
            "CUDA out-of-memory errors in workers",
            ["gpu"],
            registry=registry,
        )
        self.audio = Counter(
            "whisperd_audio_seconds_transcribed",
            "Seconds of audio in completed jobs",
            ["model"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "whisperd_job_queue_wait_seconds", "Time from (re)queueing to dispatch",
            buckets=JOB_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self.processing = Histogram(
            "whisperd_job_processing_seconds", "Time from dispatch to the end of the run, by outcome",
            ["outcome"], buckets=JOB_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self.tick = Histogram(
            "whisperd_scheduler_tick_seconds", "Duration of one scheduling round",
            buckets=TICK_BUCKETS_S, registry=registry,
        )  # fmt: skip

    def on_transition(self, job: JobRecord, old: JobState, event: JobEvent) -> None:
        now = job.updated_at
        if event is JobEvent.DISPATCH:
            self.queue_wait.observe(max(0.0, now - job.queued_at))
        elif event is JobEvent.REQUEUE:
            self.requeues.inc()
        if old is JobState.PROCESSING and job.started_at is not None:
            outcome = job.state.value.lower() if job.state.terminal else "interrupted"
            self.processing.labels(outcome).observe(max(0.0, now - job.started_at))
        if job.state is JobState.RETRYING:
            self.retries.inc()
        if job.state.terminal:
            self.finished.labels(job.state.value.lower(), job.model).inc()
            if job.state is JobState.COMPLETED and job.audio_duration_s:
                self.audio.labels(job.model).inc(job.audio_duration_s)


class SystemCollector(Collector):
    """Queue, workers and scheduler figures, read from the daemon at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self._daemon
        jobs = GaugeMetricFamily("whisperd_jobs", "Jobs in the store by state", labels=["state"])
        for state, count in d.registry.counts().items():
            jobs.add_metric([state], count)
        yield jobs
        in_flight = GaugeMetricFamily(
            "whisperd_jobs_in_flight", "Jobs held by workers, by device", labels=["device"]
        )
        workers = GaugeMetricFamily(
            "whisperd_workers", "Worker processes by device and state", labels=["device", "state"]
        )
        per_device: dict[str, int] = {}
        per_state: dict[tuple[str, str], int] = {}
        restarts_by_device: dict[str, int] = {}
        for handle in d.workers.values():
            device = handle.spec.device
            per_device[device] = per_device.get(device, 0) + (
                len(handle.batch.job_ids) if handle.batch else 0
            )
            per_state[(device, handle.state)] = per_state.get((device, handle.state), 0) + 1
            restarts_by_device[device] = restarts_by_device.get(device, 0) + handle.restarts
        for device, count in per_device.items():
            in_flight.add_metric([device], count)
        for (device, state), count in per_state.items():
            workers.add_metric([device, state], count)
        yield in_flight
        yield workers
        restarts = CounterMetricFamily(
            "whisperd_worker_restarts", "Worker restarts since the daemon started", labels=["device"]
        )
        for device, count in restarts_by_device.items():
            restarts.add_metric([device], count)
        yield restarts
        rtf = d.audio_seconds_total / d.processing_seconds_total if d.processing_seconds_total else 0.0
        yield GaugeMetricFamily(
            "whisperd_realtime_factor", "Audio seconds transcribed per worker second since start", value=rtf
        )
        yield GaugeMetricFamily(
            "whisperd_scheduler_last_tick_timestamp_seconds", "When the scheduler last ran (unix time)",
            value=d.last_tick_at,
        )  # fmt: skip
        oldest = d.registry.oldest_waiting_since()
        yield GaugeMetricFamily(
            "whisperd_oldest_waiting_job_age_seconds",
            "How long the longest-waiting job has waited (0: none)",
            value=max(0.0, d.clock() - oldest) if oldest is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "whisperd_start_time_seconds", "When the daemon started (unix time)", value=d.started_at
        )
        yield GaugeMetricFamily(
            "whisperd_draining", "1 while the daemon drains for shutdown", value=int(d.draining)
        )
        info = InfoMetricFamily("whisperd_build", "Versions of whisperd and what it runs on")
        info.add_metric([], {
            "version": __version__, "python": platform.python_version(),
            "faster_whisper": _version("faster-whisper"), "ctranslate2": _version("ctranslate2"),
        })  # fmt: skip
        yield info


class GpuCollector(Collector):
    """Per-GPU figures from the latest NVML reading and whisperd's reservations."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self._daemon
        labels = ["gpu", "uuid"]
        families = {
            "up": GaugeMetricFamily("whisperd_gpu_up", "1 while NVML answers for the GPU", labels=labels),
            "util": GaugeMetricFamily(
                "whisperd_gpu_utilization_ratio", "GPU busy ratio, 0..1", labels=labels
            ),
            "total": GaugeMetricFamily("whisperd_gpu_memory_total_bytes", "GPU memory", labels=labels),
            "used": GaugeMetricFamily("whisperd_gpu_memory_used_bytes", "GPU memory in use", labels=labels),
            "free": GaugeMetricFamily("whisperd_gpu_memory_free_bytes", "GPU memory free", labels=labels),
            "reserved": GaugeMetricFamily(
                "whisperd_gpu_memory_reserved_bytes",
                "GPU memory whisperd reserved for running batches",
                labels=labels,
            ),
            "available": GaugeMetricFamily(
                "whisperd_gpu_memory_available_bytes",
                "Free memory less whisperd's reservations the driver does not show yet (what placement uses)",
                labels=labels,
            ),
            "temp": GaugeMetricFamily("whisperd_gpu_temperature_celsius", "GPU temperature", labels=labels),
            "power": GaugeMetricFamily("whisperd_gpu_power_watts", "GPU power draw", labels=labels),
            "batches": GaugeMetricFamily("whisperd_gpu_running_batches", "Batches running", labels=labels),
        }
        info = InfoMetricFamily("whisperd_gpu", "The GPU and its driver", labels=labels)
        for view in d.device_views():
            if view.index is None:
                continue  # the CPU
            key = [str(view.index), view.uuid or ""]
            families["up"].add_metric(key, int(view.healthy))
            families["reserved"].add_metric(key, view.memory_reserved_bytes)
            families["batches"].add_metric(key, view.running_batches)
            for name, value in (
                ("util", view.utilization_ratio), ("total", view.memory_total_bytes),
                ("used", view.memory_used_bytes), ("free", view.memory_free_bytes),
                ("available", view.memory_available_bytes), ("temp", view.temperature_c),
                ("power", view.power_w),
            ):  # fmt: skip
                if value is not None:
                    families[name].add_metric(key, value)
            reading = d.pool.reading(view.name)
            info.add_metric(key, {"name": (reading.name if reading else None) or "", "driver_version":
                                  d.probe.driver_version or ""})  # fmt: skip
        yield info
        yield from families.values()


def build_registries(daemon: Daemon) -> tuple[CollectorRegistry, CollectorRegistry, EventMetrics]:
    """(gpu registry, system registry, the event metrics the daemon feeds)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series: noise in every scrape
    gpu = CollectorRegistry(auto_describe=False)
    gpu.register(GpuCollector(daemon))
    system = CollectorRegistry(auto_describe=False)
    events = EventMetrics(system)
    system.register(SystemCollector(daemon))
    daemon.registry.on_transition(events.on_transition)
    return gpu, system, events
