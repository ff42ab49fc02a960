"""One long job spread over several workers: the pure decisions (share_requests, place_parts) over hand-built
snapshots, and what Spread and Spreads make of the workers' answers (ranges, progress, the stitched
transcript)."""

from __future__ import annotations

import pytest

from whisperd import workerproto as wp
from whisperd.protocol import Segment, Transcript, Word
from whisperd.scheduling import DeviceStatus, PlanSettings, WorkerSlot
from whisperd.spreads import (
    Part,
    PartPlacement,
    Running,
    ShareRequest,
    Spread,
    Spreads,
    WaitingPart,
    place_parts,
    share_requests,
)

GIB = 1024**3
CPU = DeviceStatus(name="cpu", healthy=True)


def gpu(name: str, available: int, total: int = 80 * GIB) -> DeviceStatus:
    return DeviceStatus(name=name, healthy=True, memory_total_bytes=total, available_memory_bytes=available)


def run(job_id: int, remaining_s: float, worker: str = "") -> Running:
    return Running(job_id=job_id, worker_id=worker or f"w{job_id}", remaining_s=remaining_s)


def ask(job_id: int, helpers: int, worker: str = "") -> ShareRequest:
    return ShareRequest(job_id=job_id, worker_id=worker or f"w{job_id}", helpers=helpers)


# ---- share_requests -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("running", "idle", "min_part_s", "expected"),
    [
        pytest.param([run(1, 600)], 0, 60.0, [], id="no idle worker"),
        pytest.param([run(1, 600)], 3, 0.0, [], id="min_part_s 0 disables sharing"),
        pytest.param([run(1, 119.9)], 3, 60.0, [], id="less than twice min_part_s left"),
        pytest.param([run(1, 120)], 3, 60.0, [ask(1, 1)], id="exactly twice: one helper"),
        pytest.param([run(1, 600)], 3, 60.0, [ask(1, 3)], id="capped by the idle workers"),
        pytest.param([run(1, 250)], 5, 60.0, [ask(1, 3)], id="capped by remaining // min - 1"),
        pytest.param([], 3, 60.0, [], id="nothing running"),
        pytest.param(
            [run(1, 200), run(2, 600)], 2, 60.0, [ask(2, 2)], id="most audio left first, idle all promised"
        ),
        pytest.param(
            [run(2, 180), run(1, 200)], 3, 60.0, [ask(1, 2), ask(2, 1)], id="idle workers used up across"
        ),
        pytest.param(
            [run(2, 300), run(1, 300)], 2, 60.0, [ask(1, 2)], id="equal remaining: the older job first"
        ),
        pytest.param(
            [run(1, 100), run(2, 500)], 9, 60.0, [ask(2, 7)], id="a part too short is skipped, not asked"
        ),
        pytest.param(
            [run(1, 300), run(1, 300), run(2, 200)],
            6,
            60.0,
            [ask(1, 4), ask(2, 2)],
            id="a part named twice is asked once",
        ),
    ],
)
def test_share_requests(
    running: list[Running], idle: int, min_part_s: float, expected: list[ShareRequest]
) -> None:
    assert share_requests(running, ["cpu"] * idle, min_part_s) == expected


def test_share_requests_name_the_worker_of_the_part() -> None:
    requests = share_requests([run(1, 300, worker="w7"), run(1, 400, worker="w2")], ["cpu"], 60.0)
    assert requests == [ask(1, 1, worker="w2")]


# ---- place_parts ----------------------------------------------------------------------------------------


def waiting(job_id: int, index: int = 1, model: str = "small") -> WaitingPart:
    return WaitingPart(job_id=job_id, index=index, model=model)


def slot(id: str, device: str = "cpu", idle: bool = True, models: tuple[str, ...] = ()) -> WorkerSlot:
    return WorkerSlot(id=id, device=device, idle=idle, models=models)


def placed(
    job_id: int, index: int, worker: str, device: str = "cpu", reserve: int = 0, chunk: int = 8
) -> PartPlacement:
    return PartPlacement(
        job_id=job_id, index=index, worker_id=worker, device=device, reserve_bytes=reserve, chunk_batch=chunk
    )


CPU_SETTINGS = PlanSettings(cpu_chunk_batch=8)
# 2 GiB per model, 0.5 GiB per window, up to 4 windows; no safety margin, 1 GiB must stay free
GPU_SETTINGS = PlanSettings(
    default_model_memory_bytes=2 * GIB, window_memory_ratio=0.25, gpu_chunk_batch=4, memory_safety_margin=0.0
)


@pytest.mark.parametrize(
    ("parts", "workers", "devices", "settings", "expected"),
    [
        pytest.param([], [slot("w1")], {"cpu": CPU}, CPU_SETTINGS, [], id="nothing waiting"),
        pytest.param(
            [waiting(5), waiting(3, index=2)], [slot("w1")], {"cpu": CPU}, CPU_SETTINGS,
            [placed(3, 2, "w1")], id="oldest job first",
        ),
        pytest.param(
            [waiting(3, index=2), waiting(3, index=1)], [slot("w1")], {"cpu": CPU}, CPU_SETTINGS,
            [placed(3, 1, "w1")], id="a job's earlier part first",
        ),
        pytest.param(
            [waiting(1)], [slot("w1"), slot("w2", models=("small",)), slot("w3")], {"cpu": CPU}, CPU_SETTINGS,
            [placed(1, 1, "w2")], id="a worker with the model loaded first",
        ),
        pytest.param(
            [waiting(1, model="large")], [slot("w1"), slot("w2", models=("small",))], {"cpu": CPU},
            CPU_SETTINGS, [placed(1, 1, "w1")],
            id="another model loaded does not count",
        ),
        pytest.param(
            [waiting(1), waiting(2), waiting(3)], [slot("w1"), slot("w2")], {"cpu": CPU}, CPU_SETTINGS,
            [placed(1, 1, "w1"), placed(2, 1, "w2")], id="one part per idle worker",
        ),
        pytest.param(
            [waiting(1)], [slot("w1", idle=False), slot("w2")], {"cpu": CPU}, CPU_SETTINGS,
            [placed(1, 1, "w2")], id="a busy worker is ignored",
        ),
        pytest.param(
            [waiting(1)], [slot("w1", idle=False, models=("small",))], {"cpu": CPU}, CPU_SETTINGS, [],
            id="only busy workers: nothing placed",
        ),
        pytest.param(
            [waiting(1)], [slot("w1", device="cuda:0"), slot("w2", device="cuda:1")],
            {"cuda:0": gpu("cuda:0", 2 * GIB), "cuda:1": gpu("cuda:1", 20 * GIB)}, GPU_SETTINGS,
            [placed(1, 1, "w2", device="cuda:1", reserve=4 * GIB, chunk=4)],
            id="a GPU without room is skipped",
        ),
        pytest.param(
            [waiting(1)], [slot("w1", device="cuda:0")], {"cuda:0": gpu("cuda:0", int(3.5 * GIB))},
            GPU_SETTINGS,
            [placed(1, 1, "w1", device="cuda:0", reserve=int(3.5 * GIB), chunk=3)],
            id="as many windows at once as the GPU has room for",
        ),
        pytest.param(
            [waiting(1), waiting(2)], [slot("w1", device="cuda:0"), slot("w2", device="cuda:0")],
            {"cuda:0": gpu("cuda:0", 6 * GIB)}, GPU_SETTINGS,
            [placed(1, 1, "w1", device="cuda:0", reserve=4 * GIB, chunk=4)],
            id="the room a part takes is not offered to the next",
        ),
        pytest.param(
            [waiting(1)], [slot("w1", device="cuda:9")], {"cuda:0": gpu("cuda:0", 20 * GIB)}, GPU_SETTINGS,
            [],
            id="a device not reported is not used",
        ),
    ],
)  # fmt: skip
def test_place_parts(
    parts: list[WaitingPart],
    workers: list[WorkerSlot],
    devices: dict[str, DeviceStatus],
    settings: PlanSettings,
    expected: list[PartPlacement],
) -> None:
    assert place_parts(parts, workers, devices, settings) == expected


# ---- Spread ----------------------------------------------------------------------------------------------


def transcript(
    *segments: tuple[float, float, str], language: str = "de", probability: float = 1.0
) -> Transcript:
    segs = [Segment(id=n, start=s, end=e, text=t) for n, (s, e, t) in enumerate(segments, start=1)]
    return Transcript(
        language=language, language_probability=probability, duration_s=300.0,
        text="".join(s.text for s in segs).strip(), segments=segs,
    )  # fmt: skip


def part(
    start_s: float, end_s: float, worker: str | None = "w", position_s: float = 0.0, done: bool = False
) -> Part:
    p = Part(start_s=start_s, end_s=end_s, windows=[(start_s, end_s)], worker=worker, position_s=position_s)
    p.transcript = transcript() if done else None
    return p


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        pytest.param([part(0, 300)], 0.0, id="nothing decoded yet"),
        pytest.param([part(0, 300, position_s=150)], 50.0, id="one part half way"),
        pytest.param(
            [part(0, 100, done=True), part(100, 200, position_s=150), part(200, 300, worker=None)], 50.0,
            id="done, running with its position, waiting",
        ),
        pytest.param(
            [part(0, 100), part(100, 200, position_s=20), part(200, 300, worker=None)], 0.0,
            id="a position before the part's start counts nothing",
        ),
        pytest.param(
            [part(0, 100, position_s=250), part(100, 300)], 100 / 3, id="a position past its end: all of it"
        ),
        pytest.param(
            [part(0, 100, done=True), part(100, 300, done=True)], 99.9, id="all done: 99.9 until stitched"
        ),
    ],
)  # fmt: skip
def test_spread_progress(parts: list[Part], expected: float) -> None:
    spread = Spread(job_id=1, model="small", duration_s=300.0, parts=parts)
    assert spread.progress() == pytest.approx(expected)


def test_a_spread_is_complete_once_every_part_has_its_transcript() -> None:
    spread = Spread(
        job_id=1, model="small", duration_s=300.0, parts=[part(0, 100, done=True), part(100, 300)]
    )
    assert not spread.complete()
    spread.parts[1].transcript = transcript()
    assert spread.complete()


@pytest.mark.parametrize("finish_order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_stitched_puts_the_parts_segments_in_time_order_whatever_order_they_finished(
    finish_order: tuple[int, int, int],
) -> None:
    words = [Word(start=120.0, end=121.0, word=" c", probability=0.5)]
    first, second, third = part(0, 100), part(100, 200), part(200, 300)
    spread = Spread(job_id=1, model="small", duration_s=300.0, parts=[third, first, second], language="de")
    results = [
        (first, transcript((0, 40, " a"), (40, 90, " b"), language="de", probability=0.75)),
        (second, Transcript(language="de", language_probability=1.0, duration_s=300.0, text="c",
                            segments=[Segment(id=1, start=120.0, end=130.0, text=" c", words=words)])),
        (third, transcript((200, 250, " d"), (250, 299, " e."), language="de")),
    ]  # fmt: skip
    for index in finish_order:
        target, result = results[index]
        target.transcript = result
    stitched = spread.stitched()
    assert [(s.id, s.start, s.end, s.text) for s in stitched.segments] == [
        (1, 0, 40, " a"), (2, 40, 90, " b"), (3, 120, 130, " c"), (4, 200, 250, " d"), (5, 250, 299, " e."),
    ]  # fmt: skip
    assert stitched.segments[2].words == words
    assert stitched.text == "a b c d e."
    assert (stitched.language, stitched.language_probability) == ("de", 0.75), "the first worker's"
    assert stitched.duration_s == 300.0


def test_stitched_takes_the_language_the_first_worker_answered() -> None:
    first, second = part(0, 150), part(150, 300)
    first.transcript = transcript((0, 1, " hallo"), language="en", probability=0.6)
    second.transcript = transcript((160, 161, " welt"), language="en")
    spread = Spread(job_id=1, model="small", duration_s=300.0, parts=[first, second], language="de")
    assert spread.stitched().language == "de"
    spread.language = None  # never shared: the one part's own
    assert spread.stitched().language == "en"


# ---- Spreads ---------------------------------------------------------------------------------------------


def shared(
    kept: list[wp.Span], parts: list[list[wp.Span]], language: str = "de", span: wp.Span = (0.0, 300.0)
) -> wp.Shared:
    """The answer a worker decoding the part `span` gives when it keeps these windows and gives these."""
    starts = [windows[0][0] for windows in parts]
    ends = [*starts[1:], span[1]][: len(parts)]
    return wp.Shared(
        job_id=1, language=language,
        kept=wp.JobPart(start_s=span[0], end_s=starts[0] if parts else span[1], windows=kept),
        parts=[
            wp.JobPart(start_s=a, end_s=b, windows=w) for a, b, w in zip(starts, ends, parts, strict=True)
        ],
    )  # fmt: skip


def asked_once(duration_s: float = 300.0, helpers: int = 2) -> tuple[Spreads, Spread, Part]:
    spreads = Spreads()
    spreads.dispatched(1, "small")
    spreads.asked(ask(1, helpers, worker="w1"), duration_s)
    spread = spreads.get(1)
    assert spread is not None
    first = spread.part_on("w1")
    assert first is not None
    return spreads, spread, first


def test_a_job_asked_to_share_is_one_part_on_its_worker_with_helpers_promised() -> None:
    spreads, spread, first = asked_once()
    assert (spread.model, spread.duration_s, spread.language) == ("small", 300.0, None)
    assert (first.start_s, first.end_s, first.windows, first.worker) == (0.0, 300.0, None, "w1")
    assert spreads.promised() == 2
    assert spreads.waiting() == []


def test_shared_turns_the_given_parts_into_ranges_waiting_for_a_worker() -> None:
    spreads, spread, first = asked_once()
    kept = [(0.0, 30.0), (30.0, 60.0), (61.0, 95.0)]
    given = [[(100.0, 130.0), (130.0, 190.0)], [(205.0, 235.0), (235.0, 280.0)]]
    spreads.shared(spread, first, shared(kept, given))
    ranges = [(p.start_s, p.end_s, p.worker) for p in spread.parts]
    assert ranges == [(0.0, 100.0, "w1"), (100.0, 205.0, None), (205.0, 300.0, None)]
    assert [p.windows for p in spread.parts] == [kept, *given]
    assert spreads.waiting() == [waiting(1, index=1), waiting(1, index=2)]
    assert spreads.promised() == 0, "answered"
    assert spread.language == "de"
    assert spreads.part(1, 2) is spread.parts[2]


def test_promised_counts_until_the_answer_even_across_jobs() -> None:
    spreads, spread, first = asked_once(helpers=2)
    spreads.dispatched(2, "small")
    spreads.asked(ask(2, 1, worker="w2"), 200.0)
    assert spreads.promised() == 3
    spreads.shared(spread, first, shared([(0.0, 30.0)], [[(150.0, 180.0)]]))
    assert spreads.promised() == 1


def test_an_answer_with_nothing_given_leaves_one_part_and_frees_the_promise() -> None:
    spreads, spread, first = asked_once()
    spreads.shared(spread, first, shared([(0.0, 30.0), (30.0, 50.0)], []))
    assert [(p.start_s, p.end_s) for p in spread.parts] == [(0.0, 300.0)]
    assert spreads.waiting() == [] and spreads.promised() == 0
    assert spread.language == "de"


def test_a_part_shared_in_turn_is_cut_again_and_the_parts_stay_in_time_order() -> None:
    spreads, spread, first = asked_once()
    spreads.shared(spread, first, shared([(0.0, 90.0)], [[(100.0, 190.0)], [(200.0, 290.0)]]))
    spread.parts[2].worker = "w3"
    spreads.asked(ask(1, 1, worker="w3"), 300.0)
    assert spreads.promised() == 1
    answer = shared([(200.0, 240.0)], [[(250.0, 290.0)]], language="fr", span=(200.0, 300.0))
    spreads.shared(spread, spread.parts[2], answer)
    assert [(p.start_s, p.end_s) for p in spread.parts] == [(0, 100), (100, 200), (200, 250), (250, 300)]
    assert spread.language == "de", "the first answer's"
    assert spreads.waiting() == [waiting(1, index=1), waiting(1, index=3)]


def test_running_offers_a_job_once_and_an_unspread_job_what_its_progress_leaves() -> None:
    spreads = Spreads()
    spreads.dispatched(1, "small")
    assert spreads.running(1, "w1", 300.0, 25.0) == run(1, 225.0, worker="w1")
    spreads.asked(ask(1, 1, worker="w1"), 300.0)
    assert spreads.running(1, "w1", 300.0, 25.0) is None, "asked once: never again"


def test_running_a_given_part_counts_from_its_position_and_offers_it_once() -> None:
    spreads, spread, first = asked_once()
    spreads.shared(spread, first, shared([(0.0, 90.0)], [[(100.0, 290.0)]]))
    assert spreads.running(1, "w2", 300.0, 0.0) is None, "not placed yet"
    given = spread.parts[1]
    given.worker, given.position_s = "w2", 40.0  # placed; no progress reported yet (before its start)
    assert spreads.running(1, "w2", 300.0, 0.0) == run(1, 200.0, worker="w2")
    given.position_s = 150.0
    assert spreads.running(1, "w2", 300.0, 0.0) == run(1, 150.0, worker="w2")
    spreads.asked(ask(1, 1, worker="w2"), 300.0)
    assert spreads.running(1, "w2", 300.0, 0.0) is None
    assert spreads.running(1, "w1", 300.0, 0.0) is None, "the first part was asked already"


def placement(p: Part) -> tuple[str | None, float]:
    return p.worker, p.position_s


def test_a_part_let_go_waits_again_from_its_start() -> None:
    spreads, spread, first = asked_once()
    spreads.shared(spread, first, shared([(0.0, 90.0)], [[(100.0, 290.0)]]))
    given = spread.parts[1]
    given.worker, given.position_s = "w2", 150.0
    assert spreads.waiting() == []
    given.let_go()
    assert placement(given) == (None, 100.0)
    assert spreads.waiting() == [waiting(1, index=1)]


def test_forget_drops_the_spread_and_the_job_s_shareability() -> None:
    spreads, _spread, _first = asked_once()
    spreads.dispatched(2, "small")
    spreads.forget(1)
    assert spreads.get(1) is None and list(spreads) == []
    assert spreads.shareable() == [2]
    assert spreads.promised() == 0


# ---- GPUs: a part never goes where another part of its job is decoded -----------------------------------


def busy(job_id: int, remaining_s: float, *gpus: str) -> Running:
    return Running(job_id=job_id, worker_id=f"w{job_id}", remaining_s=remaining_s, busy_gpus=frozenset(gpus))


@pytest.mark.parametrize(
    ("running", "idle", "expected"),
    [
        pytest.param([busy(1, 600, "cuda:0")], ["cuda:0"], [], id="the only idle worker shares its GPU"),
        pytest.param(
            [busy(1, 600, "cuda:0")], ["cuda:0", "cuda:1", "cuda:2"], [ask(1, 2)],
            id="the other GPUs help",
        ),
        pytest.param([busy(1, 600)], ["cpu", "cpu"], [ask(1, 2)], id="CPU workers always help"),
        pytest.param(
            [busy(1, 600, "cuda:0"), busy(2, 300, "cuda:1")], ["cuda:0", "cuda:1"],
            [ask(1, 1), ask(2, 1)],
            id="each job takes the GPU the other decodes on",
        ),
        pytest.param(
            [busy(1, 600, "cuda:0", "cuda:1")], ["cuda:1", "cuda:2"], [ask(1, 1)],
            id="every GPU of a spread job counts",
        ),
    ],
)  # fmt: skip
def test_share_requests_on_gpus(
    running: list[Running], idle: list[str], expected: list[ShareRequest]
) -> None:
    assert share_requests(running, idle, 60.0) == expected


def test_place_parts_keeps_a_job_s_parts_on_different_gpus() -> None:
    workers = [slot("a0", device="cuda:0"), slot("a1", device="cuda:0"), slot("b0", device="cuda:1")]
    devices = {"cuda:0": gpu("cuda:0", 60 * GIB), "cuda:1": gpu("cuda:1", 60 * GIB)}
    parts = [
        WaitingPart(job_id=1, index=1, model="small", busy_gpus=frozenset({"cuda:0"})),
        WaitingPart(job_id=1, index=2, model="small", busy_gpus=frozenset({"cuda:0"})),
        WaitingPart(job_id=2, index=1, model="small"),
    ]
    placements = place_parts(parts, workers, devices, GPU_SETTINGS)
    assert [(p.job_id, p.index, p.device) for p in placements] == [(1, 1, "cuda:1"), (2, 1, "cuda:0")]


def test_shared_time_ranges_become_parts_cut_where_they_are_decoded() -> None:
    spreads, spread, first = asked_once()
    answer = wp.Shared(
        job_id=1, language="en", kept=wp.JobPart(start_s=0.0, end_s=100.0),
        parts=[wp.JobPart(start_s=100.0, end_s=200.0), wp.JobPart(start_s=200.0, end_s=300.0)],
    )  # fmt: skip
    spreads.shared(spread, first, answer)
    assert [(p.start_s, p.end_s, p.windows) for p in spread.parts] == [
        (0.0, 100.0, None), (100.0, 200.0, None), (200.0, 300.0, None),
    ]  # fmt: skip
