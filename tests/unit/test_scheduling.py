"""The placement decision: fits() and plan() over hand-built snapshots (fair share: test_fair_share.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from whisperd.scheduling import DeviceStatus, PlanSettings, QueuedJob, WorkerSlot, fits, plan

GIB = 1024**3
NOW = 1000.0

CPU = DeviceStatus(name="cpu", healthy=True)


def gpu(
    name: str,
    available: int,
    total: int = 80 * GIB,
    healthy: bool = True,
    running: int = 0,
) -> DeviceStatus:
    return DeviceStatus(
        name=name,
        healthy=healthy,
        memory_total_bytes=total,
        available_memory_bytes=available,
        running_batches=running,
    )


def job(id: int, model: str = "small", priority: int = 0, queued_at: float = NOW - 100) -> QueuedJob:
    return QueuedJob(id=id, model=model, priority=priority, queued_at=queued_at)


def worker(id: str, device: str = "cpu", idle: bool = True, models: tuple[str, ...] = ()) -> WorkerSlot:
    return WorkerSlot(id=id, device=device, idle=idle, models=models)


# ---- fits ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "reserve", "settings", "expected"),
    [
        (CPU, 0, PlanSettings(), True),
        (CPU, 500 * GIB, PlanSettings(), True),
        (DeviceStatus(name="cpu", healthy=False), 0, PlanSettings(), False),
        (gpu("cuda:0", int(0.9 * GIB), total=4 * GIB), 0, PlanSettings(memory_safety_margin=0.0), False),
        (gpu("cuda:0", GIB, total=4 * GIB), 0, PlanSettings(memory_safety_margin=0.0), False),
        (gpu("cuda:0", GIB + 1, total=4 * GIB), 0, PlanSettings(memory_safety_margin=0.0), True),
        (
            gpu("cuda:0", GIB, total=4 * GIB),
            0,
            PlanSettings(min_free_memory_bytes=0, memory_safety_margin=0.0),
            True,
        ),
        (gpu("cuda:0", 10 * GIB), 2 * GIB, PlanSettings(), True),
        (gpu("cuda:0", 10 * GIB), 2 * GIB + 1, PlanSettings(), False),
        (gpu("cuda:0", 10 * GIB), 0, PlanSettings(), True),
        (gpu("cuda:0", 8 * GIB), 1, PlanSettings(), False),
        (gpu("cuda:0", 40 * GIB, healthy=False), 2 * GIB, PlanSettings(), False),
    ],
    ids=[
        "cpu-fits",
        "cpu-fits-any-reserve",
        "cpu-unhealthy",
        "gpu-0.9GiB-below-min-free",
        "gpu-exactly-1GiB-not-strictly-greater",
        "gpu-1GiB-plus-1-byte",
        "gpu-min-free-0",
        "margin-8-of-80-exactly-left",
        "margin-one-byte-short",
        "margin-no-reserve",
        "margin-already-at-margin",
        "gpu-unhealthy",
    ],
)
def test_fits(device: DeviceStatus, reserve: int, settings: PlanSettings, expected: bool) -> None:
    assert fits(device, reserve, settings) is expected


# ---- plan: a table of snapshots and the exact placements -----------------------------------------------

Got = tuple[str, str, str, tuple[int, ...], int]  # worker, device, model, job ids, reserve bytes


@dataclass
class Case:
    id: str
    queue: list[QueuedJob]
    workers: list[WorkerSlot]
    devices: dict[str, DeviceStatus]
    expected: list[Got]
    settings: PlanSettings = field(default_factory=PlanSettings)
    now: float = NOW


BIG = PlanSettings(model_memory_bytes={"small": 2 * GIB, "large": 50 * GIB})


def alone(id: int) -> QueuedJob:
    """A job whose worker died while it was decoded with others: it goes in a batch of its own."""
    return QueuedJob(id=id, model="small", priority=0, queued_at=NOW - 100, alone=True)


CASES = [
    Case("empty-queue", [], [worker("w0")], {"cpu": CPU}, []),
    Case(
        "a-suspect-first-goes-alone",
        [alone(1), job(2), job(3), job(4)],
        [worker("w0"), worker("w1")],
        {"cpu": CPU},
        [("w0", "cpu", "small", (1,), 0), ("w1", "cpu", "small", (2, 3, 4), 0)],
    ),
    Case(
        "a-suspect-ends-the-batch-before-it",
        [job(1), alone(2), job(3)],
        [worker("w0"), worker("w1")],
        {"cpu": CPU},
        [("w0", "cpu", "small", (1,), 0), ("w1", "cpu", "small", (2,), 0)],
    ),
    Case("one-job-one-idle-cpu", [job(1)], [worker("w0")], {"cpu": CPU}, [("w0", "cpu", "small", (1,), 0)]),
    Case("no-workers", [job(1)], [], {"cpu": CPU}, []),
    Case(
        "busy-workers",
        [job(1), job(2)],
        [worker("w0", idle=False), worker("w1", idle=False)],
        {"cpu": CPU},
        [],
    ),
    Case("worker-on-unknown-device", [job(1)], [worker("w0", device="cuda:7")], {"cpu": CPU}, []),
    Case(
        "priority-first",
        [
            job(1, priority=0, queued_at=1.0),
            job(2, priority=5, queued_at=2.0),
            job(3, priority=1, queued_at=0.5),
        ],
        [worker("w0")],
        {"cpu": CPU},
        [("w0", "cpu", "small", (2, 3, 1), 0)],
    ),
    Case(
        "fifo-within-priority",
        [job(1, queued_at=3.0), job(2, queued_at=1.0), job(3, queued_at=2.0)],
        [worker("w0")],
        {"cpu": CPU},
        [("w0", "cpu", "small", (2, 3, 1), 0)],
    ),
    Case(
        "id-breaks-ties",
        [job(9, queued_at=1.0), job(4, queued_at=1.0), job(6, queued_at=1.0)],
        [worker("w0")],
        {"cpu": CPU},
        [("w0", "cpu", "small", (4, 6, 9), 0)],
    ),
    Case(
        "max-batch-takes-head-of-queue",
        [job(i, queued_at=float(i)) for i in range(1, 6)],
        [worker("w0")],
        {"cpu": CPU},
        [("w0", "cpu", "small", (1, 2, 3), 0)],
    ),
    Case(
        "higher-priority-model-goes-first",
        [job(1, "small", queued_at=1.0), job(2, "medium", priority=3, queued_at=2.0)],
        [worker("w0")],
        {"cpu": CPU},
        [("w0", "cpu", "medium", (2,), 0)],
    ),
    Case(
        "batches-never-mix-models",
        [job(1, "small", queued_at=1.0), job(2, "medium", queued_at=2.0), job(3, "small", queued_at=3.0)],
        [worker("w0")],
        {"cpu": CPU},
        [("w0", "cpu", "small", (1, 3), 0)],
    ),
    Case(
        "two-models-two-workers",
        [job(1, "small", queued_at=1.0), job(2, "medium", queued_at=2.0), job(3, "small", queued_at=3.0)],
        [worker("w0"), worker("w1")],
        {"cpu": CPU},
        [("w0", "cpu", "small", (1,), 0), ("w1", "cpu", "medium", (2,), 0)],
    ),
    Case(
        "10-jobs-2-workers-capped-at-3",
        [job(i, queued_at=float(i)) for i in range(1, 11)],
        [worker("w0"), worker("w1")],
        {"cpu": CPU},
        [("w0", "cpu", "small", (1, 2, 3), 0), ("w1", "cpu", "small", (4, 5, 6), 0)],
    ),
    Case(
        "4-jobs-1-idle-1-busy-batch-of-2",
        [job(i, queued_at=float(i)) for i in range(1, 5)],
        [worker("w0"), worker("w1", idle=False)],
        {"cpu": CPU},
        [("w0", "cpu", "small", (1, 2), 0)],
    ),
    Case(
        "2-jobs-2-idle-workers-one-each",
        [job(1, queued_at=1.0), job(2, queued_at=2.0)],
        [worker("w0"), worker("w1")],
        {"cpu": CPU},
        [("w0", "cpu", "small", (1,), 0), ("w1", "cpu", "small", (2,), 0)],
    ),
    Case(
        "batch-size-counts-only-healthy-devices",
        [job(i, queued_at=float(i)) for i in range(1, 5)],
        [worker("w0"), worker("g0", device="cuda:0")],
        {"cpu": CPU, "cuda:0": gpu("cuda:0", 40 * GIB, healthy=False)},
        [("w0", "cpu", "small", (1, 2, 3), 0)],
    ),
    Case(
        "min-batch-2-one-job-waits",
        [job(1, queued_at=NOW - 4.9)],
        [worker("w0")],
        {"cpu": CPU},
        [],
        settings=PlanSettings(min_batch_size=2, batch_timeout_s=5.0),
    ),
    Case(
        "min-batch-2-one-job-goes-at-timeout",
        [job(1, queued_at=NOW - 5.0)],
        [worker("w0")],
        {"cpu": CPU},
        [("w0", "cpu", "small", (1,), 0)],
        settings=PlanSettings(min_batch_size=2, batch_timeout_s=5.0),
    ),
    Case(
        "min-batch-2-two-jobs-go-at-once",
        [job(1, queued_at=NOW), job(2, queued_at=NOW)],
        [worker("w0")],
        {"cpu": CPU},
        [("w0", "cpu", "small", (1, 2), 0)],
        settings=PlanSettings(min_batch_size=2, batch_timeout_s=5.0),
    ),
    Case(
        "min-batch-waiting-model-does-not-block-ready-one",
        [job(1, "medium", priority=9, queued_at=NOW), job(2, "small", queued_at=NOW - 10)],
        [worker("w0")],
        {"cpu": CPU},
        [("w0", "cpu", "small", (2,), 0)],
        settings=PlanSettings(min_batch_size=2, batch_timeout_s=5.0),
    ),
    Case(
        "loaded-model-preferred",
        [job(1)],
        [worker("a", models=("medium",)), worker("b", models=("medium", "small")), worker("c")],
        {"cpu": CPU},
        [("b", "cpu", "small", (1,), 0)],
    ),
    Case(
        "loaded-model-beats-more-memory",
        [job(1)],
        [worker("a", device="cuda:0"), worker("b", device="cuda:1", models=("small",))],
        {"cuda:0": gpu("cuda:0", 70 * GIB), "cuda:1": gpu("cuda:1", 20 * GIB)},
        [("b", "cuda:1", "small", (1,), 2 * GIB)],
    ),
    Case(
        "gpu-0.9GiB-gets-nothing",
        [job(1)],
        [worker("g0", device="cuda:0")],
        {"cuda:0": gpu("cuda:0", int(0.9 * GIB), total=4 * GIB)},
        [],
        settings=PlanSettings(memory_safety_margin=0.0, model_memory_bytes={"small": 0}),
    ),
    Case(
        "gpu-exactly-1GiB-gets-nothing",
        [job(1)],
        [worker("g0", device="cuda:0")],
        {"cuda:0": gpu("cuda:0", GIB, total=4 * GIB)},
        [],
        settings=PlanSettings(memory_safety_margin=0.0, model_memory_bytes={"small": 0}),
    ),
    Case(
        "gpu-margin-exactly-kept-fits",
        [job(1)],
        [worker("g0", device="cuda:0")],
        {"cuda:0": gpu("cuda:0", 10 * GIB)},
        [("g0", "cuda:0", "small", (1,), 2 * GIB)],
        settings=PlanSettings(model_memory_bytes={"small": 2 * GIB}),
    ),
    Case(
        "gpu-margin-one-byte-short",
        [job(1)],
        [worker("g0", device="cuda:0")],
        {"cuda:0": gpu("cuda:0", 10 * GIB)},
        [],
        settings=PlanSettings(model_memory_bytes={"small": 2 * GIB + 1}),
    ),
    Case(
        "default-model-memory-used-for-unknown-model",
        [job(1, "other")],
        [worker("g0", device="cuda:0")],
        {"cuda:0": gpu("cuda:0", 10 * GIB)},
        [("g0", "cuda:0", "other", (1,), 2 * GIB)],
    ),
    Case(
        "unhealthy-gpu-skipped",
        [job(1)],
        [worker("g0", device="cuda:0"), worker("g1", device="cuda:1")],
        {"cuda:0": gpu("cuda:0", 70 * GIB, healthy=False), "cuda:1": gpu("cuda:1", 20 * GIB)},
        [("g1", "cuda:1", "small", (1,), 2 * GIB)],
    ),
    Case(
        "only-unhealthy-gpu-nothing",
        [job(1)],
        [worker("g0", device="cuda:0")],
        {"cuda:0": gpu("cuda:0", 70 * GIB, healthy=False)},
        [],
    ),
    Case(
        "full-gpu-jobs-go-to-next-gpu",
        [job(1)],
        [worker("g0", device="cuda:0"), worker("g1", device="cuda:1")],
        {"cuda:0": gpu("cuda:0", 9 * GIB), "cuda:1": gpu("cuda:1", 12 * GIB)},
        [("g1", "cuda:1", "small", (1,), 2 * GIB)],
    ),
    Case(
        "most-available-memory-wins",
        [job(1)],
        [worker("a", device="cuda:0"), worker("b", device="cuda:1")],
        {"cuda:0": gpu("cuda:0", 20 * GIB), "cuda:1": gpu("cuda:1", 30 * GIB)},
        [("b", "cuda:1", "small", (1,), 2 * GIB)],
    ),
    Case(
        "tie-fewer-running-batches-wins",
        [job(1)],
        [worker("a", device="cuda:0"), worker("b", device="cuda:1")],
        {"cuda:0": gpu("cuda:0", 30 * GIB, running=2), "cuda:1": gpu("cuda:1", 30 * GIB, running=1)},
        [("b", "cuda:1", "small", (1,), 2 * GIB)],
    ),
    Case(
        "gpu-preferred-over-cpu",
        [job(1)],
        [worker("a"), worker("b", device="cuda:0")],
        {"cpu": CPU, "cuda:0": gpu("cuda:0", 30 * GIB)},
        [("b", "cuda:0", "small", (1,), 2 * GIB)],
    ),
    Case(
        "same-gpu-second-reservation-fits",
        [job(1, "small", queued_at=1.0), job(2, "medium", queued_at=2.0)],
        [worker("a", device="cuda:0"), worker("b", device="cuda:0")],
        {"cuda:0": gpu("cuda:0", 12 * GIB)},
        [("a", "cuda:0", "small", (1,), 2 * GIB), ("b", "cuda:0", "medium", (2,), 2 * GIB)],
    ),
    Case(
        "same-gpu-second-reservation-does-not-fit",
        [job(1, "small", queued_at=1.0), job(2, "medium", queued_at=2.0)],
        [worker("a", device="cuda:0"), worker("b", device="cuda:0")],
        {"cuda:0": gpu("cuda:0", 11 * GIB)},
        [("a", "cuda:0", "small", (1,), 2 * GIB)],
    ),
    Case(
        "first-reservation-moves-second-batch-to-other-gpu",
        [job(1, "small", queued_at=1.0), job(2, "medium", queued_at=2.0)],
        [worker("a", device="cuda:0"), worker("b", device="cuda:0"), worker("c", device="cuda:1")],
        {"cuda:0": gpu("cuda:0", 30 * GIB), "cuda:1": gpu("cuda:1", 29 * GIB)},
        [("a", "cuda:0", "small", (1,), 2 * GIB), ("c", "cuda:1", "medium", (2,), 2 * GIB)],
    ),
    Case(
        "model-that-fits-nowhere-does-not-block",
        [job(1, "large", priority=5), job(2, "small")],
        [worker("g0", device="cuda:0")],
        {"cuda:0": gpu("cuda:0", 40 * GIB)},
        [("g0", "cuda:0", "small", (2,), 2 * GIB)],
        settings=BIG,
    ),
    Case(
        "huge-model-on-cpu-reserves-nothing",
        [job(1, "large")],
        [worker("w0")],
        {"cpu": CPU},
        [("w0", "cpu", "large", (1,), 0)],
        settings=BIG,
    ),
    Case(
        "huge-model-goes-to-cpu-when-gpu-full",
        [job(1, "large")],
        [worker("g0", device="cuda:0"), worker("w0")],
        {"cpu": CPU, "cuda:0": gpu("cuda:0", 40 * GIB)},
        [("w0", "cpu", "large", (1,), 0)],
        settings=BIG,
    ),
    Case(
        "unhealthy-cpu-nothing",
        [job(1)],
        [worker("w0")],
        {"cpu": DeviceStatus(name="cpu", healthy=False)},
        [],
    ),
]


def _run(case: Case) -> list[Got]:
    placements = plan(case.queue, case.workers, case.devices, case.now, case.settings)
    return [(p.worker_id, p.device, p.model, p.job_ids, p.reserve_bytes) for p in placements]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_plan(case: Case) -> None:
    assert _run(case) == case.expected


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_plan_does_not_depend_on_input_order(case: Case) -> None:
    reversed_case = Case(
        case.id,
        list(reversed(case.queue)),
        list(reversed(case.workers)),
        case.devices,
        case.expected,
        case.settings,
        case.now,
    )
    assert _run(reversed_case) == case.expected


def test_plan_reason_names_the_preference() -> None:
    [placement] = plan(
        [job(1)],
        [worker("g0", device="cuda:0", models=("small",))],
        {"cuda:0": gpu("cuda:0", 30 * GIB, running=1)},
        NOW,
        PlanSettings(),
    )
    assert placement.reason == "model loaded=True, available=30.0GiB, running_batches=1"


# ---- batch sizing across several placements of one model in one plan -----------------------------------


@pytest.mark.parametrize(
    ("n_jobs", "expected"),
    [(4, [(1, 2), (3, 4)]), (5, [(1, 2, 3), (4, 5)])],
    ids=["4-jobs-2-and-2", "5-jobs-3-and-2"],
)
def test_jobs_spread_evenly_over_idle_workers(n_jobs: int, expected: list[tuple[int, ...]]) -> None:
    placements = plan(
        [job(i, queued_at=float(i)) for i in range(1, n_jobs + 1)],
        [worker("w0"), worker("w1")],
        {"cpu": CPU},
        NOW,
        PlanSettings(),
    )
    assert [p.job_ids for p in placements] == expected


def test_left_over_job_below_min_batch_waits_for_timeout() -> None:
    placements = plan(
        [job(1, queued_at=NOW), job(2, queued_at=NOW), job(3, queued_at=NOW)],
        [worker("w0"), worker("w1")],
        {"cpu": CPU},
        NOW,
        PlanSettings(min_batch_size=2, batch_timeout_s=5.0),
    )
    assert [p.job_ids for p in placements] == [(1, 2)]


def test_first_batch_of_4_jobs_on_2_idle_workers_is_2() -> None:
    placements = plan(
        [job(i, queued_at=float(i)) for i in range(1, 5)],
        [worker("w0"), worker("w1")],
        {"cpu": CPU},
        NOW,
        PlanSettings(),
    )
    assert placements[0].worker_id == "w0"
    assert placements[0].job_ids == (1, 2)


# ---- batched mode: windows decoded at once, sized to the device's memory --------------------------------

WINDOWS = PlanSettings(
    model_memory_bytes={"small": 2 * GIB}, cpu_chunk_batch=8, gpu_chunk_batch=16, window_memory_ratio=0.25
)


@pytest.mark.parametrize(
    ("available", "chunk", "reserve"),
    [
        (70 * GIB, 16, 2 * GIB + 16 * GIB // 2),  # room for every window the setting allows
        (12 * GIB, 4, 2 * GIB + 4 * GIB // 2),  # 8 GiB (10 % of 80) must stay free: 4 GiB for the batch
        (10 * GIB + GIB // 2, 1, 2 * GIB + GIB // 2),  # one window, just
    ],
    ids=["roomy", "tight", "one-window"],
)
def test_a_gpu_batch_decodes_as_many_windows_at_once_as_fit_and_reserves_them(
    available: int, chunk: int, reserve: int
) -> None:
    [placement] = plan([job(1)], [worker("g0", "cuda:0")], {"cuda:0": gpu("cuda:0", available)}, NOW, WINDOWS)
    assert (placement.chunk_batch, placement.reserve_bytes) == (chunk, reserve)


def test_a_gpu_without_room_for_one_window_gets_no_batch_and_the_cpu_takes_its_own_chunk() -> None:
    assert plan([job(1)], [worker("g0", "cuda:0")], {"cuda:0": gpu("cuda:0", 10 * GIB)}, NOW, WINDOWS) == []
    [placement] = plan([job(1)], [worker("w0")], {"cpu": CPU}, NOW, WINDOWS)
    assert (placement.chunk_batch, placement.reserve_bytes) == (8, 0)
