"""Which workers run, as a pure function of the config and the GPUs NVML reports."""

from __future__ import annotations

import pytest

from whisperd.config import Config, GpuConfig, WorkersConfig
from whisperd.gpuprobe import GpuReading
from whisperd.workerspecs import worker_specs

GIB = 1024**3


def reading(index: int) -> GpuReading:
    return GpuReading(
        index=index, uuid=f"GPU-{index}", name="H200", healthy=True, error=None,
        memory_total_bytes=141 * GIB, memory_used_bytes=0, memory_free_bytes=141 * GIB,
        utilization_ratio=0.0, memory_utilization_ratio=0.0, temperature_c=30.0, power_w=70.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("gpu", "workers", "gpus", "cores", "expected"),
    [
        (GpuConfig(), WorkersConfig(), [], 3, [("cpu0", "cpu"), ("cpu1", "cpu"), ("cpu2", "cpu")]),
        (GpuConfig(), WorkersConfig(), [reading(0), reading(1)], 4, [("gpu0", "cuda:0"), ("gpu1", "cuda:1")]),
        (GpuConfig(), WorkersConfig(cpu_workers=1), [reading(0)], 4, [("gpu0", "cuda:0"), ("cpu0", "cpu")]),
        (GpuConfig(exclude=[0]), WorkersConfig(), [reading(0), reading(1)], 4, [("gpu1", "cuda:1")]),
        (
            GpuConfig(workers_per_gpu=2),
            WorkersConfig(),
            [reading(3)],
            4,
            [("gpu3", "cuda:3"), ("gpu3.1", "cuda:3")],
        ),
        (GpuConfig(enabled=False), WorkersConfig(), [reading(0)], 2, [("cpu0", "cpu"), ("cpu1", "cpu")]),
        (GpuConfig(exclude=[0]), WorkersConfig(), [reading(0)], 2, [("cpu0", "cpu"), ("cpu1", "cpu")]),
        (GpuConfig(), WorkersConfig(cpu_workers=0), [], 8, []),
    ],
    ids=[
        "no-gpu-one-per-core", "gpus-no-cpu-workers", "explicit-cpu-workers-beside-gpus", "excluded-gpu",
        "two-per-gpu", "gpu-disabled", "every-gpu-excluded", "nothing",
    ],
)  # fmt: skip
def test_worker_specs(
    gpu: GpuConfig,
    workers: WorkersConfig,
    gpus: list[GpuReading],
    cores: int,
    expected: list[tuple[str, str]],
) -> None:
    specs = worker_specs(Config(gpu=gpu, workers=workers), gpus, cores)
    assert [(s.id, s.device) for s in specs] == expected


def test_gpu_workers_are_pinned_by_uuid_and_cpu_workers_see_no_gpu() -> None:
    specs = worker_specs(Config(workers=WorkersConfig(cpu_workers=1)), [reading(2)], 4)
    gpu, cpu = specs
    assert gpu.env["CUDA_VISIBLE_DEVICES"] == "GPU-2" and gpu.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert gpu.argv[gpu.argv.index("--device") + 1] == "cuda"
    assert gpu.argv[gpu.argv.index("--compute-type") + 1] == "float16"
    assert cpu.env["CUDA_VISIBLE_DEVICES"] == ""
    assert cpu.argv[cpu.argv.index("--device") + 1] == "cpu"
    assert cpu.argv[cpu.argv.index("--preload") + 1] == "tiny.en=bundled:tiny.en"


def test_rehearsal_mode_runs_gpu_workers_on_the_cpu() -> None:
    [spec] = worker_specs(Config(gpu=GpuConfig(worker_device="cpu")), [reading(0)], 4)
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "GPU-0"
    assert spec.argv[spec.argv.index("--device") + 1] == "cpu"
    assert spec.argv[spec.argv.index("--compute-type") + 1] == "int8"


def test_workers_are_told_to_sandbox_themselves_with_the_models_and_paths_the_config_names() -> None:
    config = Config(
        workers=WorkersConfig(cpu_workers=1, sandbox_read_paths=["/opt/cuda"]),
        models={"tiny.en": "bundled:tiny.en", "de": "/srv/models/de", "large": "large-v3"},
    )
    (spec,) = worker_specs(config, [], 1)
    tail = spec.argv[spec.argv.index("--sandbox") :]
    assert tail == (
        "--sandbox", "--sandbox-read", "/opt/cuda", "--model-source", "/srv/models/de",
        "--model-source", "bundled:tiny.en", "--model-source", "large-v3",
    )  # fmt: skip
    config.workers.sandbox = False
    (spec,) = worker_specs(config, [], 1)
    assert "--sandbox" not in spec.argv
