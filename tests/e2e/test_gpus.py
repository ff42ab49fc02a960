"""Several GPUs, as a fake libnvidia-ml.so.1 reports them through the real pynvml, with per-GPU workers
running the model on the CPU (gpu.worker_device = "cpu"): placement by memory, pinning, reservations, a GPU
that fills up and a GPU that stops answering."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from tests.fakenvml import build_fake_nvml, gcc_path
from tests.support.daemon import DaemonProcess
from tests.support.gpus import GIB, TOTAL, Gpus, gpu, start_gpu_daemon
from whisperd.jobs import JobState

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(gcc_path() is None, reason="gcc builds the fake NVML")]


def devices_of(daemon: DaemonProcess, ids: list[int]) -> list[str | None]:
    return [j.device for j in daemon.client.status(ids)]


def test_one_worker_per_gpu_pinned_by_uuid(gpus: Gpus) -> None:
    workers = {w.id: w for w in gpus.daemon.client.stats().workers}
    assert {w: v.device for w, v in workers.items()} == {"gpu0": "cuda:0", "gpu1": "cuda:1"}
    for index in (0, 1):
        pid = workers[f"gpu{index}"].pid
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"CUDA_VISIBLE_DEVICES=GPU-fake-{index}".encode() in environ
    assert "NVML driver" in gpus.daemon.log()


def test_gpu_shows_the_libraries_figures(gpus: Gpus) -> None:
    gpus.set(gpu(0), gpu(1))
    devices = {d.name: d for d in gpus.daemon.client.gpu()}
    assert set(devices) == {"cuda:0", "cuda:1"}, "no CPU device when GPU workers run"
    one = devices["cuda:1"]
    assert (one.index, one.uuid, one.healthy, one.workers) == (1, "GPU-fake-1", True, 1)
    assert (one.memory_total_bytes, one.memory_used_bytes, one.memory_free_bytes) == (
        TOTAL,
        2 * GIB,
        78 * GIB,
    )
    assert one.utilization_ratio == pytest.approx(0.11) and one.temperature_c == 41 and one.power_w == 101.0
    table = gpus.daemon.ctl("gpu").stdout
    assert "cuda:1" in table and "2.0/80.0 GiB" in table


def test_work_goes_to_every_gpu_and_reservations_are_released(gpus: Gpus, speech: dict[str, Path]) -> None:
    gpus.set(gpu(0), gpu(1))
    ids = [j.id for j in gpus.daemon.client.submit([str(speech["fox"])] * 4)]
    final = gpus.daemon.wait_terminal(ids)
    assert [j.state for j in final] == [JobState.COMPLETED] * 4
    assert set(devices_of(gpus.daemon, ids)) == {"cuda:0", "cuda:1"}
    devices = gpus.daemon.client.gpu()
    assert [d.memory_reserved_bytes for d in devices] == [0, 0]
    assert [d.memory_available_bytes for d in devices] == [78 * GIB, 78 * GIB]


def test_a_running_batch_reserves_memory_the_driver_does_not_show_yet(
    gpus: Gpus, speech: dict[str, Path]
) -> None:
    gpus.set(gpu(0), gpu(1))
    [job] = gpus.daemon.client.submit([str(speech["medium"])])
    running = gpus.daemon.wait_state(job.id, JobState.PROCESSING)
    device = {d.name: d for d in gpus.daemon.client.gpu()}[running.device or ""]
    # The built-in estimate for tiny in float16, and a quarter of it again for each of the 16 windows the
    # worker may decode at once in batched mode (gpu.window_memory_ratio, transcribe.gpu_chunk_batch).
    reserve = GIB // 2 + 16 * (GIB // 8)
    assert device.memory_reserved_bytes == reserve
    assert device.memory_available_bytes == 78 * GIB - reserve
    gpus.daemon.wait_terminal([job.id])


def test_a_gpu_below_the_minimum_free_memory_gets_nothing(gpus: Gpus, speech: dict[str, Path]) -> None:
    gpus.set(gpu(0, used=TOTAL - int(0.9 * GIB)), gpu(1))
    ids = [j.id for j in gpus.daemon.client.submit([str(speech["fox"])] * 3)]
    assert [j.state for j in gpus.daemon.wait_terminal(ids)] == [JobState.COMPLETED] * 3
    assert devices_of(gpus.daemon, ids) == ["cuda:1"] * 3
    # Both full: jobs wait PENDING rather than run a GPU out of memory, and go once memory frees up.
    gpus.set(gpu(0, used=TOTAL - GIB // 2), gpu(1, used=TOTAL - GIB // 2))
    [waiting] = gpus.daemon.client.submit([str(speech["fox"])])
    time.sleep(1.0)  # a submit wakes the scheduler at once: a placement would have come in milliseconds
    assert gpus.daemon.job(waiting.id).state is JobState.PENDING
    gpus.set(gpu(0), gpu(1))
    assert gpus.daemon.wait_terminal([waiting.id])[0].state is JobState.COMPLETED


def test_a_gpu_that_stops_answering_has_its_jobs_finished_elsewhere(
    gpus: Gpus, speech: dict[str, Path]
) -> None:
    gpus.set(gpu(0), gpu(1))
    [job] = gpus.daemon.client.submit([str(speech["long"])])
    lost = gpus.daemon.wait_state(job.id, JobState.PROCESSING).device
    assert lost in ("cuda:0", "cuda:1")
    index = int(lost[-1])
    gpus.set(*(gpu(i, fail=int(i == index)) for i in (0, 1)))
    assert {d.name: d.healthy for d in gpus.daemon.client.gpu()}[lost] is False
    [final] = gpus.daemon.wait_terminal([job.id], timeout_s=300)
    assert final.state is JobState.COMPLETED and final.retries == 0, "requeued, not failed"
    assert final.device != lost
    with sqlite3.connect(gpus.daemon.state_dir / "jobs.sqlite3") as db:
        events = [e for (e,) in db.execute("SELECT event FROM job_events WHERE job_id = ?", (job.id,))]
    assert events == ["submit", "dispatch", "requeue", "dispatch", "complete"]
    assert f"GPU {lost} stopped answering NVML" in gpus.daemon.log()
    gpus.set(gpu(0), gpu(1))
    assert f"GPU {lost} answers NVML again" in gpus.daemon.log()


def test_a_long_job_is_spread_over_both_gpus_and_a_part_on_a_lost_one_is_decoded_on_the_other(
    tmp_path: Path, speech: dict[str, Path]
) -> None:
    gpus = start_gpu_daemon(tmp_path, build_fake_nvml(tmp_path / "lib"), shard_min_audio_s=30.0)
    try:
        gpus.daemon.wait_for(
            lambda: sorted(w.state for w in gpus.daemon.client.stats().workers) == ["idle", "idle"],
            timeout_s=120, what="both GPU workers ready",
        )  # fmt: skip
        [job] = gpus.daemon.client.submit([str(speech["long"])])
        gpus.daemon.wait_for(
            lambda: sorted(w.device for w in gpus.daemon.client.stats().workers if job.id in w.jobs)
            == ["cuda:0", "cuda:1"],
            timeout_s=120, what="a part of the job on each GPU",
        )  # fmt: skip
        first = gpus.daemon.job(job.id).device or ""
        gpus.set(*(gpu(i, fail=int(f"cuda:{i}" == first)) for i in (0, 1)))
        [final] = gpus.daemon.wait_terminal([job.id], timeout_s=300)
        assert final.state is JobState.COMPLETED and final.retries == 0
        transcript = gpus.daemon.client.result(job.id).transcript
        starts = [s.start for s in transcript.segments]
        assert starts == sorted(starts) and transcript.segments[-1].end > transcript.duration_s - 30
        assert {"morning", "quarterly", "budget"} <= set(transcript.text.lower().replace(",", " ").split())
    finally:
        gpus.daemon.stop()
