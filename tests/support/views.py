"""Protocol views for the pure tests of whisperctl's screens (top, progress bars): a job, a device."""

from __future__ import annotations

from whisperd import protocol as p
from whisperd.jobs import JobState

GIB = 1024**3
NOW = 1_000_000.0


def job(job_id: int, state: JobState = JobState.PROCESSING, **fields: object) -> p.JobView:
    base: dict[str, object] = {
        "id": job_id, "state": state, "progress": 0.0, "retries": 0, "device": "cpu", "worker": "cpu-0",
        "model": "tiny.en", "language": None, "task": "transcribe", "priority": 0, "word_timestamps": False,
        "error": None, "filename": f"/home/ann/talk{job_id}.wav", "owner_uid": 1000, "audio_duration_s": None,
        "created_at": NOW - 100, "updated_at": NOW, "started_at": None, "finished_at": None,
    }  # fmt: skip
    base.update(fields)
    return p.JobView(**base)  # type: ignore[arg-type]


def done(job_id: int, finished_at: float, audio_s: float | None, processing_s: float) -> p.JobView:
    return job(
        job_id, JobState.COMPLETED, progress=100.0, audio_duration_s=audio_s,
        started_at=finished_at - processing_s, finished_at=finished_at, updated_at=finished_at,
    )  # fmt: skip


def device(name: str = "cuda:0", **fields: object) -> p.DeviceView:
    base: dict[str, object] = {
        "name": name, "index": 0, "uuid": None, "healthy": True, "memory_total_bytes": 80 * GIB,
        "memory_used_bytes": 20 * GIB, "memory_free_bytes": 60 * GIB, "memory_reserved_bytes": 0,
        "memory_available_bytes": 60 * GIB, "utilization_ratio": 0.45, "temperature_c": 61.0,
        "power_w": None, "workers": 2, "running_batches": 1,
    }  # fmt: skip
    base.update(fields)
    return p.DeviceView(**base)  # type: ignore[arg-type]


def cpu() -> p.DeviceView:
    return device(
        "cpu", index=None, memory_total_bytes=None, memory_used_bytes=None, memory_free_bytes=None,
        memory_available_bytes=None, utilization_ratio=None, temperature_c=None,
    )  # fmt: skip
