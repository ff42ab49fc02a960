"""Which worker processes to run: a pure function of the config and the GPUs NVML reports."""

from __future__ import annotations

import sys

from whisperd.config import Config
from whisperd.gpupool import CPU, gpu_name
from whisperd.gpuprobe import GpuReading
from whisperd.supervisor import WorkerSpec


def worker_argv(
    device: str, compute_type: str, cpu_threads: int, max_models: int, preload: tuple[str, str] | None
) -> tuple[str, ...]:
    argv: tuple[str, ...] = (
        sys.executable, "-m", "whisperd.worker_main",
        "--device", device, "--compute-type", compute_type,
        "--cpu-threads", str(cpu_threads), "--max-models", str(max_models),
    )  # fmt: skip
    if preload is not None:
        argv += ("--preload", "=".join(preload))
    return argv


def sandbox_argv(config: Config) -> tuple[str, ...]:
    """What the worker's sandbox lets through beyond Python and the system: the models the config names (a
    directory is readable; a name fetched from the hub opens HTTPS and the hub cache) and the paths added."""
    w = config.workers
    if not w.sandbox:
        return ()
    argv: tuple[str, ...] = ("--sandbox",)
    for path in w.sandbox_read_paths:
        argv += ("--sandbox-read", path)
    for source in sorted(set(config.models.values())):
        argv += ("--model-source", source)
    return argv


def worker_specs(config: Config, gpus: list[GpuReading], cpu_count: int) -> list[WorkerSpec]:
    """One worker per GPU slot, pinned with CUDA_VISIBLE_DEVICES (by UUID, which no enumeration order can
    confuse); CPU workers as configured, or one per core when no GPU worker runs."""
    w, g = config.workers, config.gpu
    default = config.transcribe.default_model
    preload = (default, config.models[default])
    confined = sandbox_argv(config)
    specs: list[WorkerSpec] = []
    if g.enabled:
        compute = g.compute_type if g.worker_device == "cuda" else w.cpu_compute_type
        argv = worker_argv(g.worker_device, compute, w.cpu_threads, w.max_models_per_worker, preload)
        argv += confined
        for gpu in gpus:
            if gpu.index in g.exclude:
                continue
            for slot in range(g.workers_per_gpu):
                env = {
                    "CUDA_VISIBLE_DEVICES": gpu.uuid or str(gpu.index),
                    "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                }
                worker_id = f"gpu{gpu.index}" + (f".{slot}" if slot else "")
                specs.append(WorkerSpec(id=worker_id, device=gpu_name(gpu.index), argv=argv, env=env))
    cpu_workers = w.cpu_workers
    if cpu_workers < 0:
        cpu_workers = 0 if specs else cpu_count
    argv = worker_argv("cpu", w.cpu_compute_type, w.cpu_threads, w.max_models_per_worker, preload) + confined
    # No OMP_NUM_THREADS: CTranslate2 takes its threads from --cpu-threads, and OMP_NUM_THREADS=1 changed the
    # decoder's numerics, so transcripts differed from a bare faster-whisper run's with the same settings.
    env = {"CUDA_VISIBLE_DEVICES": ""}
    specs += [WorkerSpec(id=f"cpu{i}", device=CPU, argv=argv, env=env) for i in range(cpu_workers)]
    return specs
