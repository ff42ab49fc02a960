"""What each part is told of the configuration: small derived settings, rebuilt when the config changes."""

from __future__ import annotations

from whisperd import workerproto as wp
from whisperd.config import Config
from whisperd.estimates import MemoryEstimates
from whisperd.fleet import WorkerLimits
from whisperd.registry import RetryPolicy
from whisperd.scheduling import PlanSettings
from whisperd.store import JobRow


def retry_policy(config: Config) -> RetryPolicy:
    s = config.scheduler
    return RetryPolicy(
        max_retries=s.max_retries, backoff_s=s.retry_backoff_s, backoff_max_s=s.retry_backoff_max_s
    )


def plan_settings(config: Config, estimates: MemoryEstimates) -> PlanSettings:
    s, t = config.scheduler, config.transcribe
    batched = t.mode == "batched"
    return PlanSettings(
        min_batch_size=s.min_batch_size, max_batch_size=s.max_batch_size, batch_timeout_s=s.batch_timeout_s,
        min_free_memory_bytes=s.min_free_memory_bytes, memory_safety_margin=s.memory_safety_margin,
        model_memory_bytes=estimates.all_memory_bytes(),
        cpu_chunk_batch=t.cpu_chunk_batch if batched else 1,
        gpu_chunk_batch=t.gpu_chunk_batch if batched else 1,
        window_memory_ratio=config.gpu.window_memory_ratio if batched else 0.0,
    )  # fmt: skip


def job_spec(job: JobRow, config: Config, chunk_batch: int = 1) -> wp.JobSpec:
    """What a worker is told to do for one job, under the running configuration (chunk_batch: windows its
    worker decodes at once, as the plan sized them for the device's memory)."""
    assert job.spool_path is not None  # a live job keeps its audio
    t, w = config.transcribe, config.workers
    return wp.JobSpec(
        job_id=job.id, audio_path=job.spool_path, model=job.model, model_source=config.models[job.model],
        language=job.language, task=job.task, word_timestamps=job.word_timestamps, beam_size=t.beam_size,
        vad_filter=t.vad_filter, mode=t.mode, chunk_batch=chunk_batch,
        filename=job.filename, max_audio_duration_s=t.max_audio_duration_s,
        max_result_bytes=w.max_result_bytes, audio_formats=list(w.audio_formats), prompt=job.prompt,
        temperature=job.temperature,
    )  # fmt: skip


def worker_limits(config: Config) -> WorkerLimits:
    w = config.workers
    return WorkerLimits(max_memory_bytes=w.max_memory_bytes, progress_timeout_s=w.progress_timeout_s)
