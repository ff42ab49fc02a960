"""The placement decision, a pure function over snapshots: plan(queue, workers, devices, now) -> placements.

The memory rule: work goes to a GPU only while its available memory exceeds the minimum free memory
(1 GiB) and, after the batch's reservation, the safety margin (10 % of its total) stays free. A CPU device
has no memory limit. Jobs of one model form a batch of min..max size; a smaller group than min_batch_size
waits at most batch_timeout_s for company.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import msgspec


class QueuedJob(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    model: str
    priority: int
    queued_at: float
    avoid_devices: frozenset[str] = frozenset()  # devices where it ran out of memory: try elsewhere first


class WorkerSlot(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    device: str
    idle: bool
    models: tuple[str, ...] = ()  # models the worker has loaded already


class DeviceStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One device as device_status() reports it; memory figures are None for the CPU."""

    name: str
    healthy: bool
    memory_total_bytes: int | None = None
    available_memory_bytes: int | None = None
    running_batches: int = 0


class PlanSettings(msgspec.Struct, frozen=True, kw_only=True):
    min_batch_size: int = 1
    max_batch_size: int = 3
    batch_timeout_s: float = 5.0
    min_free_memory_bytes: int = 1024**3
    memory_safety_margin: float = 0.10
    model_memory_bytes: Mapping[str, int] = msgspec.field(default_factory=dict)
    default_model_memory_bytes: int = 2 * 1024**3


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    device: str
    model: str
    job_ids: tuple[int, ...]
    reserve_bytes: int  # 0 on the CPU
    reason: str  # why this device, for the debug log


def fits(device: DeviceStatus, reserve_bytes: int, settings: PlanSettings) -> bool:
    """The memory rule for one device and one batch: healthy, more than the minimum free, and the safety
    margin still free after the reservation. The CPU has no memory limit."""
    if not device.healthy:
        return False
    if device.available_memory_bytes is None or device.memory_total_bytes is None:
        return True  # the CPU
    available = device.available_memory_bytes
    if available <= settings.min_free_memory_bytes:
        return False
    margin = settings.memory_safety_margin * device.memory_total_bytes
    return available - reserve_bytes >= margin


def _queue_order(job: QueuedJob) -> tuple[int, float, int]:
    return (-job.priority, job.queued_at, job.id)


def _ready_models(queue: Sequence[QueuedJob], now: float, settings: PlanSettings) -> set[str]:
    """Models whose waiting jobs may go now: enough for a minimum batch, or the oldest waited long enough."""
    count: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for job in queue:
        count[job.model] = count.get(job.model, 0) + 1
        oldest[job.model] = min(oldest.get(job.model, job.queued_at), job.queued_at)
    return {
        model
        for model, n in count.items()
        if n >= settings.min_batch_size or now - oldest[model] >= settings.batch_timeout_s
    }


def plan(
    queue: Sequence[QueuedJob],
    workers: Sequence[WorkerSlot],
    devices: Mapping[str, DeviceStatus],
    now: float,
    settings: PlanSettings,
) -> list[Placement]:
    """Priority, then FIFO. Each idle worker takes at most one batch of one model. A batch is sized so the
    model's waiting jobs spread over all of its workers (busy ones included), between min and max."""
    waiting = sorted(queue, key=_queue_order)
    idle = [w for w in workers if w.idle]
    placed_workers = 0
    room = dict(devices)  # what is left on each device as this plan reserves
    placements: list[Placement] = []
    blocked: set[str] = set()
    while idle:
        ready = _ready_models(
            waiting, now, settings
        )  # again each round: a left-over may be below the minimum
        head = next((j for j in waiting if j.model in ready and j.model not in blocked), None)
        if head is None:
            break
        model = head.model
        reserve = settings.model_memory_bytes.get(model, settings.default_model_memory_bytes)
        candidates = [w for w in idle if w.device in room and fits(room[w.device], reserve, settings)]
        if not candidates:
            blocked.add(model)  # waiting is fine, out-of-memory is not; other models may still fit
            continue
        candidates = [w for w in candidates if w.device not in head.avoid_devices] or candidates
        worker = min(candidates, key=lambda w: _preference(w, model, room[w.device]))
        device = room[worker.device]
        of_model = [j for j in waiting if j.model == model]
        # Spread the model's jobs over the workers not yet given a batch in this plan (busy ones included).
        usable_workers = (
            sum(1 for w in workers if w.device in room and room[w.device].healthy) - placed_workers
        )
        size = math.ceil(len(of_model) / max(1, usable_workers))
        size = max(settings.min_batch_size, min(settings.max_batch_size, size))
        batch = of_model[:size]
        is_gpu = device.available_memory_bytes is not None
        placements.append(
            Placement(
                worker_id=worker.id,
                device=worker.device,
                model=model,
                job_ids=tuple(j.id for j in batch),
                reserve_bytes=reserve if is_gpu else 0,
                reason=_reason(worker, model, device),
            )
        )
        idle.remove(worker)
        placed_workers += 1
        taken = {j.id for j in batch}
        waiting = [j for j in waiting if j.id not in taken]
        room[worker.device] = msgspec.structs.replace(
            device,
            available_memory_bytes=(
                device.available_memory_bytes - reserve if device.available_memory_bytes is not None else None
            ),
            running_batches=device.running_batches + 1,
        )
    return placements


def _preference(worker: WorkerSlot, model: str, device: DeviceStatus) -> tuple[bool, int, int, str]:
    """Model already loaded first, then most available memory, then fewest running batches."""
    available = device.available_memory_bytes if device.available_memory_bytes is not None else 0
    return (model not in worker.models, -available, device.running_batches, worker.id)


def _reason(worker: WorkerSlot, model: str, device: DeviceStatus) -> str:
    parts = [f"model loaded={model in worker.models}"]
    if device.available_memory_bytes is not None:
        parts.append(f"available={device.available_memory_bytes / 1024**3:.1f}GiB")
    parts.append(f"running_batches={device.running_batches}")
    return ", ".join(parts)
