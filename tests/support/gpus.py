"""A daemon that sees GPUs: a fake libnvidia-ml.so.1 (tests/fakenvml) loaded by the real pynvml, whose
figures each test sets, with per-GPU workers running the model on the CPU (gpu.worker_device = "cpu")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.fakenvml import write_state
from tests.support.daemon import DaemonProcess

GIB = 1024**3
TOTAL = 80 * GIB


def gpu(index: int, used: int = 2 * GIB, fail: int = 0) -> dict[str, Any]:
    return {
        "name": f"Fake-H{index}00",
        "uuid": f"GPU-fake-{index}",
        "total": TOTAL,
        "used": used,
        "util": 10 + index,
        "mem_util": 5,
        "temp": 40 + index,
        "power_mw": 100_000 + index * 1000,
        "fail": fail,
    }


class Gpus:
    def __init__(self, daemon: DaemonProcess, state: Path) -> None:
        self.daemon, self.state = daemon, state

    def set(self, *gpus: dict[str, Any]) -> None:
        """Rewrite what NVML reports, then wait until the daemon's 0.2 s monitor has read it."""
        write_state(self.state, list(gpus))
        # A lost GPU is known by its health; a healthy one by its free memory.
        want = {
            f"cuda:{i}": (not g["fail"], None if g["fail"] else g["total"] - g["used"])
            for i, g in enumerate(gpus)
        }

        def seen() -> bool:
            got = {
                d.name: (d.healthy, d.memory_free_bytes if d.healthy else None)
                for d in self.daemon.client.gpu()
            }
            return got == want

        self.daemon.wait_for(seen, 10, f"the daemon to read {gpus}")


def start_gpu_daemon(folder: Path, library: Path, shard_min_audio_s: float = 0.0) -> Gpus:
    """shard_min_audio_s: 0, no job spread over both GPUs, so that each test follows one job on one GPU."""
    state = folder / "nvml-state"
    write_state(state, [gpu(0), gpu(1)])
    daemon = DaemonProcess(
        folder / "state",
        {
            "scheduler": {"gpu_monitor_interval_s": 0.2},
            "gpu": {"worker_device": "cpu"},
            "transcribe": {"shard_min_audio_s": shard_min_audio_s},
        },
        env={"LD_LIBRARY_PATH": str(library.parent), "FAKE_NVML_STATE": str(state)},
    ).start()
    return Gpus(daemon, state)
