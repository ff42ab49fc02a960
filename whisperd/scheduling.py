"""The placement decision, a pure function over snapshots: plan(queue, workers, devices, now) -> placements.

The order: priority first; at equal priority, round robin by user (the user served least recently goes
next, each job placed is one turn); within one user, FIFO. The queue comes as lanes, one per (priority,
user, model), each oldest first, so a plan reads only the heads and lengths of the lanes and the jobs it
places, however long the queue (see docs/architecture.md, "Fair share").

The memory rule: work goes to a GPU only while its available memory exceeds the minimum free memory
(1 GiB) and, after the batch's reservation, the safety margin (10 % of its total) stays free. A CPU device
has no memory limit. Jobs of one model form a batch of min..max size; a smaller group than min_batch_size
waits at most batch_timeout_s for company.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence, Set

import msgspec


class QueuedJob(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    model: str
    priority: int
    queued_at: float
    avoid_devices: frozenset[str] = frozenset()  # devices where it ran out of memory: try elsewhere first
    owner_uid: int = 0
    alone: bool = False  # in a batch of its own (its worker died while it was decoded with others)


class Lane(msgspec.Struct, frozen=True, kw_only=True):
    """One user's waiting jobs of one model at one priority, oldest first. `jobs` may be only the first
    ones (as many as one plan can place: idle workers x max batch size); `count` is all of them."""

    priority: int
    owner_uid: int
    model: str
    jobs: tuple[QueuedJob, ...]
    count: int


class Waiting(msgspec.Struct, frozen=True, kw_only=True):
    """The queue as plan() reads it: its lanes, and when each user was last served (a stamp that grows
    with every job dispatched; a user not named was never served and goes first)."""

    lanes: tuple[Lane, ...] = ()
    last_served: Mapping[int, int] = msgspec.field(default_factory=dict)


def waiting_of(jobs: Iterable[QueuedJob], last_served: Mapping[int, int] | None = None) -> Waiting:
    """A flat list of jobs as lanes, each in FIFO order (queued_at, then id)."""
    grouped: dict[tuple[int, int, str], list[QueuedJob]] = {}
    for job in jobs:
        grouped.setdefault((job.priority, job.owner_uid, job.model), []).append(job)
    lanes = tuple(
        Lane(priority=p, owner_uid=uid, model=model, count=len(js),
             jobs=tuple(sorted(js, key=lambda j: (j.queued_at, j.id))))
        for (p, uid, model), js in grouped.items()
    )  # fmt: skip
    return Waiting(lanes=lanes, last_served=dict(last_served or {}))


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
    # Batched decoding: windows decoded at once per worker, and what each reserves on a GPU (a share of the
    # model's figure); 1 and 0: sequential decoding, whose reservation is the model's alone.
    cpu_chunk_batch: int = 1
    gpu_chunk_batch: int = 1
    window_memory_ratio: float = 0.0


class Placement(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    device: str
    model: str
    job_ids: tuple[int, ...]
    reserve_bytes: int  # 0 on the CPU
    reason: str  # why this device, for the debug log
    chunk_batch: int = 1  # windows its worker decodes at once (batched mode)


def placement_floor_bytes(memory_total_bytes: int, min_free_memory_bytes: int, margin: float) -> int:
    """The available memory a GPU needs before any batch is placed on it: fits()' rule for a batch that
    reserves nothing (a real batch needs its reservation on top of the margin). Exported as a gauge so that
    dashboards draw the threshold the running configuration sets."""
    return max(min_free_memory_bytes, math.ceil(margin * memory_total_bytes))


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


def reservation(model: str, device: DeviceStatus, settings: PlanSettings) -> tuple[int, int] | None:
    """What one batch of the model reserves on the device and the windows its worker decodes at once, or
    None when it does not fit. On a GPU, as many windows at once as there is room for (at least one)."""
    reserve = settings.model_memory_bytes.get(model, settings.default_model_memory_bytes)
    window_bytes = math.ceil(reserve * settings.window_memory_ratio)
    if not fits(device, reserve + window_bytes, settings):
        return None
    if device.available_memory_bytes is None:
        return 0, settings.cpu_chunk_batch
    wanted = range(settings.gpu_chunk_batch, 1, -1)
    chunk = next((c for c in wanted if fits(device, reserve + c * window_bytes, settings)), 1)
    return reserve + chunk * window_bytes, chunk


def taken(device: DeviceStatus, reserve_bytes: int) -> DeviceStatus:
    """The device once a batch reserving this much runs on it."""
    available = device.available_memory_bytes
    return msgspec.structs.replace(
        device,
        available_memory_bytes=available - reserve_bytes if available is not None else None,
        running_batches=device.running_batches + 1,
    )


class _Cursor:
    """A lane as one plan takes jobs from it."""

    __slots__ = ("lane", "taken")

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.taken = 0

    def remaining(self) -> int:
        return self.lane.count - self.taken

    def head(self) -> QueuedJob | None:
        return self.lane.jobs[self.taken] if self.taken < min(self.lane.count, len(self.lane.jobs)) else None


def _ready_models(lanes: Sequence[_Cursor], now: float, settings: PlanSettings) -> set[str]:
    """Models whose waiting jobs may go now: enough for a minimum batch, or the oldest waited long enough."""
    count: dict[str, int] = {}
    oldest: dict[str, float] = {}
    for lane in lanes:
        head = lane.head()
        if head is None:
            continue
        model = lane.lane.model
        count[model] = count.get(model, 0) + lane.remaining()
        oldest[model] = min(oldest.get(model, head.queued_at), head.queued_at)
    return {
        model
        for model, n in count.items()
        if n >= settings.min_batch_size or now - oldest[model] >= settings.batch_timeout_s
    }


def _next(lanes: Sequence[_Cursor], served: Mapping[int, int], allowed: Set[str]) -> _Cursor | None:
    """The lane whose head goes next among those of allowed models: highest priority, then the user served
    least recently, then the oldest job (so one user's jobs stay FIFO)."""
    best: _Cursor | None = None
    best_key: tuple[int, int, float, int] | None = None
    for lane in lanes:
        head = lane.head()
        if head is None or lane.lane.model not in allowed:
            continue
        key = (-lane.lane.priority, served.get(lane.lane.owner_uid, 0), head.queued_at, head.id)
        if best_key is None or key < best_key:
            best, best_key = lane, key
    return best


def plan(
    queue: Waiting | Sequence[QueuedJob],
    workers: Sequence[WorkerSlot],
    devices: Mapping[str, DeviceStatus],
    now: float,
    settings: PlanSettings,
) -> list[Placement]:
    """Priority, then round robin by user, then FIFO. Each idle worker takes at most one batch of one
    model. A batch is sized so the model's waiting jobs spread over all of its workers (busy ones included),
    between min and max, and is filled in the same order (a batch may hold several users' jobs)."""
    waiting = queue if isinstance(queue, Waiting) else waiting_of(queue)
    lanes = [_Cursor(lane) for lane in waiting.lanes if lane.count > 0]
    served = dict(waiting.last_served)
    stamp = max(served.values(), default=0)
    idle = [w for w in workers if w.idle]
    placed_workers = 0
    room = dict(devices)  # what is left on each device as this plan reserves
    placements: list[Placement] = []
    blocked: set[str] = set()
    while idle:
        ready = _ready_models(lanes, now, settings)  # again each round: a left-over may be below the minimum
        first = _next(lanes, served, ready - blocked)
        head = first.head() if first is not None else None
        if head is None:
            break
        model = head.model
        candidates = [w for w in idle if w.device in room and reservation(model, room[w.device], settings)]
        if not candidates:
            blocked.add(model)  # waiting is fine, out-of-memory is not; other models may still fit
            continue
        candidates = [w for w in candidates if w.device not in head.avoid_devices] or candidates
        worker = min(candidates, key=lambda w: _preference(w, model, room[w.device]))
        device = room[worker.device]
        of_model = sum(lane.remaining() for lane in lanes if lane.lane.model == model)
        # Spread the model's jobs over the workers not yet given a batch in this plan (busy ones included).
        usable_workers = (
            sum(1 for w in workers if w.device in room and room[w.device].healthy) - placed_workers
        )
        size = math.ceil(of_model / max(1, usable_workers))
        size = max(settings.min_batch_size, min(settings.max_batch_size, size))
        batch: list[QueuedJob] = []
        while len(batch) < size and (lane := _next(lanes, served, {model})) is not None:
            job = lane.head()
            assert job is not None  # _next returns only lanes with a head
            if batch and (job.alone or batch[0].alone):
                break  # a job under suspicion goes in a batch of its own
            batch.append(job)
            lane.taken += 1
            stamp += 1
            served[lane.lane.owner_uid] = stamp  # one job placed is one turn
        fit = reservation(model, device, settings)
        assert fit is not None  # a candidate
        reserve, chunk = fit
        placements.append(
            Placement(
                worker_id=worker.id,
                device=worker.device,
                model=model,
                job_ids=tuple(j.id for j in batch),
                reserve_bytes=reserve,
                reason=_reason(worker, model, device),
                chunk_batch=chunk,
            )
        )
        idle.remove(worker)
        placed_workers += 1
        room[worker.device] = taken(device, reserve)
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
