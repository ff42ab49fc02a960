"""Fair share in the placement decision: plan() over hand-built queues of several users. Priority first, then
round robin by user (the user served least recently goes next), then FIFO within a user; batching intact."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import pytest

from whisperd.scheduling import DeviceStatus, PlanSettings, QueuedJob, Waiting, WorkerSlot, plan, waiting_of

NOW = 1000.0
CPU = DeviceStatus(name="cpu", healthy=True)


def worker(id: str) -> WorkerSlot:
    return WorkerSlot(id=id, device="cpu", idle=True)


A, B, C = 1001, 1002, 1003  # users


def ujob(id: int, owner: int, queued_at: float, model: str = "small", priority: int = 0) -> QueuedJob:
    return QueuedJob(id=id, model=model, priority=priority, queued_at=queued_at, owner_uid=owner)


# User A queued 1,000 jobs (ids 1..1000) before user B queued 2 (ids 2001, 2002).
A_THEN_B = [ujob(i, A, float(i)) for i in range(1, 1001)] + [ujob(2000 + i, B, 2000.0 + i) for i in (1, 2)]
ONE_PER_BATCH = PlanSettings(max_batch_size=1)
MIXED_MODELS = [ujob(1, A, 1.0), ujob(2, A, 2.0), ujob(3, B, 3.0, "medium"), ujob(4, B, 4.0)]


@dataclass
class FairCase:
    id: str
    queue: list[QueuedJob]
    workers: int
    expected: list[tuple[int, ...]]  # the batches, in placement order
    settings: PlanSettings = field(default_factory=PlanSettings)
    last_served: dict[int, int] = field(default_factory=dict)


FAIR_CASES = [
    FairCase(
        "equal-priority-users-alternate-after-1000-jobs-of-one",
        A_THEN_B, 4, [(1,), (2001,), (2,), (2002,)], ONE_PER_BATCH,
    ),
    FairCase(
        "user-served-last-waits-for-the-other",
        A_THEN_B, 4, [(2001,), (1,), (2002,), (2,)], ONE_PER_BATCH, last_served={A: 7},
    ),
    FairCase(
        "a-returning-user-goes-before-the-one-served-since",
        A_THEN_B, 2, [(2001,), (1,)], ONE_PER_BATCH, last_served={A: 9, B: 4},
    ),
    FairCase(
        "three-users-take-turns",
        [ujob(i, A, float(i)) for i in range(1, 5)] + [ujob(10 + i, B, 10.0 + i) for i in range(1, 3)]
        + [ujob(20 + i, C, 20.0 + i) for i in range(1, 3)],
        7, [(1,), (11,), (21,), (2,), (12,), (22,), (3,)], ONE_PER_BATCH,
    ),
    FairCase(
        "priority-wins-over-fairness",
        [ujob(1, A, 1.0, priority=5), ujob(2, A, 2.0, priority=5), ujob(3, B, 0.5)],
        3, [(1,), (2,), (3,)], ONE_PER_BATCH, last_served={A: 9},
    ),
    FairCase(
        "negative-priority-goes-after-every-user-at-zero",
        [ujob(1, A, 1.0, priority=-1), ujob(2, B, 2.0), ujob(3, B, 3.0)],
        3, [(2,), (3,), (1,)], ONE_PER_BATCH, last_served={B: 9},
    ),
    FairCase(
        "one-batch-of-one-model-takes-turns-between-users",
        A_THEN_B, 1, [(1, 2001, 2)],
    ),
    FairCase(
        "next-batch-continues-the-turns",
        A_THEN_B, 2, [(1, 2001, 2), (2002, 3, 4)],
    ),
    FairCase(
        "batches-never-mix-models-across-users",
        MIXED_MODELS,
        1, [(1, 4, 2)],
    ),
    FairCase(
        "the-user-whose-turn-it-is-chooses-the-model",
        MIXED_MODELS,
        1, [(3,)], last_served={A: 5},
    ),
    FairCase(
        "per-user-order-stays-fifo",
        [ujob(5, A, 5.0), ujob(3, A, 3.0), ujob(9, B, 1.0), ujob(4, A, 4.0), ujob(8, B, 2.0),
         ujob(1, A, 3.0)],
        6, [(9,), (1,), (8,), (3,), (4,), (5,)], ONE_PER_BATCH,
    ),
    FairCase(
        "min-batch-counts-every-users-jobs-of-the-model",
        [ujob(1, A, NOW), ujob(2, B, NOW)],
        1, [(1, 2)], PlanSettings(min_batch_size=2, batch_timeout_s=5.0),
    ),
]  # fmt: skip


def _fair_run(case: FairCase, queue: Waiting | list[QueuedJob] | None = None) -> list[tuple[int, ...]]:
    waiting = queue if queue is not None else waiting_of(case.queue, case.last_served)
    workers = [worker(f"w{i}") for i in range(case.workers)]
    return [p.job_ids for p in plan(waiting, workers, {"cpu": CPU}, NOW, case.settings)]


@pytest.mark.parametrize("case", FAIR_CASES, ids=[c.id for c in FAIR_CASES])
def test_fair_share(case: FairCase) -> None:
    assert _fair_run(case) == case.expected


@pytest.mark.parametrize("case", FAIR_CASES, ids=[c.id for c in FAIR_CASES])
def test_fair_share_does_not_depend_on_input_order(case: FairCase) -> None:
    waiting = waiting_of(list(reversed(case.queue)), case.last_served)
    reordered = Waiting(lanes=tuple(reversed(waiting.lanes)), last_served=waiting.last_served)
    assert _fair_run(case, reordered) == case.expected


def _truncated(waiting: Waiting, keep: int) -> Waiting:
    """Each lane with only its first `keep` jobs, as the daemon passes them, its count unchanged."""
    lanes = tuple(msgspec.structs.replace(lane, jobs=lane.jobs[:keep]) for lane in waiting.lanes)
    return Waiting(lanes=lanes, last_served=waiting.last_served)


@pytest.mark.parametrize("case", FAIR_CASES, ids=[c.id for c in FAIR_CASES])
def test_a_plan_needs_only_the_first_jobs_of_each_lane(case: FairCase) -> None:
    """Idle workers x max batch size jobs per lane are enough: the rest of a long queue is never read."""
    keep = case.workers * case.settings.max_batch_size
    assert _fair_run(case, _truncated(waiting_of(case.queue, case.last_served), keep)) == case.expected


def test_rounds_carry_the_turns_over_so_a_late_user_is_not_starved() -> None:
    """Round after round on one worker, as the daemon runs it (each dispatch stamps its user): B's two jobs
    go in the first rounds although A queued 1,000 jobs first."""
    queue = list(A_THEN_B)
    served: dict[int, int] = {}
    order: list[int] = []
    for _ in range(4):
        [placement] = plan(waiting_of(queue, served), [worker("w0")], {"cpu": CPU}, NOW, ONE_PER_BATCH)
        [job_id] = placement.job_ids
        owner = next(j.owner_uid for j in queue if j.id == job_id)
        served[owner] = max(served.values(), default=0) + 1
        order.append(job_id)
        queue = [j for j in queue if j.id != job_id]
    assert order == [1, 2001, 2, 2002]


def test_waiting_of_groups_lanes_by_priority_user_and_model_in_fifo_order() -> None:
    waiting = waiting_of([ujob(3, A, 2.0), ujob(1, A, 2.0), ujob(2, A, 1.0, "medium"), ujob(4, B, 0.0)])
    lanes = {(lane.priority, lane.owner_uid, lane.model): lane for lane in waiting.lanes}
    assert {k: ([j.id for j in lane.jobs], lane.count) for k, lane in lanes.items()} == {
        (0, A, "small"): ([1, 3], 2),
        (0, A, "medium"): ([2], 1),
        (0, B, "small"): ([4], 1),
    }
