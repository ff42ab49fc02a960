"""whisperctl top's pure parts: the last minute's throughput, the state it follows from the watch stream,
the memory bar with its placement threshold, and the two renderings of one model."""

from __future__ import annotations

import io
import re

from rich.console import Console

from tests.support.views import GIB, NOW, cpu, device, done, job
from whisperctl.topview import (
    BLOCK_BAR,
    DeviceRow,
    PlacementRule,
    RecentJobs,
    TopState,
    bar_cells,
    memory_bar,
    plain_text,
    rich_view,
)
from whisperd import protocol as p
from whisperd.jobs import JobState


def stats(workers: list[p.WorkerView], **fields: object) -> p.StatsView:
    base: dict[str, object] = {
        "states": {"PENDING": 3, "PROCESSING": 1, "COMPLETED": 7}, "queue_depth": 3, "running_jobs": 1,
        "workers": workers, "uptime_s": 3725.0, "audio_seconds_total": 100.0,
        "processing_seconds_total": 10.0, "realtime_factor": 10.0,
        "users": [p.UserStatsView(uid=1000, queued_jobs=3, running_jobs=1, finished_jobs=7, spool_bytes=0,
                                  audio_seconds=100.0)],
    }  # fmt: skip
    base.update(fields)
    return p.StatsView(**base)  # type: ignore[arg-type]


def worker(name: str, jobs: list[int], state: str = "busy", device: str = "cpu") -> p.WorkerView:
    return p.WorkerView(
        id=name, device=device, pid=42, state=state, models=["tiny.en"], jobs=jobs, restarts=0
    )


# ---- the last minute -----------------------------------------------------------------------------------


def test_the_window_counts_only_the_last_minutes_completed_jobs() -> None:
    recent = RecentJobs(60.0)
    recent.add(done(1, NOW - 90, 30.0, 3.0))  # ended before the minute
    recent.add(done(2, NOW - 50, 60.0, 6.0))
    recent.add(done(3, NOW - 10, 40.0, 4.0))
    recent.add(job(4, JobState.FAILED, finished_at=NOW - 5))  # not a completed job
    recent.add(job(5, JobState.PROCESSING))
    assert recent.jobs_per_minute(NOW) == 2
    assert recent.realtime_factor(NOW) == (60.0 + 40.0) / (6.0 + 4.0)
    assert recent.jobs_per_minute(NOW + 15) == 1  # job 2 slid out
    assert recent.realtime_factor(NOW + 15) == 10.0
    assert recent.jobs_per_minute(NOW + 60) == 0
    assert recent.realtime_factor(NOW + 60) is None


def test_a_job_counts_once_however_often_its_end_is_seen() -> None:
    recent = RecentJobs(60.0)
    for _ in range(3):
        recent.add(done(1, NOW - 1, 20.0, 2.0))
    assert recent.jobs_per_minute(NOW) == 1


def test_jobs_without_audio_or_time_count_but_do_not_skew_the_factor() -> None:
    recent = RecentJobs(60.0)
    recent.add(done(1, NOW - 1, None, 2.0))  # an empty file: no audio length
    recent.add(done(2, NOW - 1, 30.0, 0.0))  # no measurable processing time
    assert recent.jobs_per_minute(NOW) == 2 and recent.realtime_factor(NOW) is None
    recent.add(done(3, NOW - 1, 30.0, 5.0))
    assert recent.realtime_factor(NOW) == 6.0


def test_jobs_read_newest_first_slide_out_in_finish_order() -> None:
    recent = RecentJobs(60.0)
    for i, finished_at in enumerate([NOW - 1, NOW - 30, NOW - 70, NOW - 59]):  # as status lists them
        recent.add(done(i, finished_at, 10.0, 1.0))
    assert recent.jobs_per_minute(NOW) == 3
    assert recent.jobs_per_minute(NOW + 2) == 2
    assert recent.jobs_per_minute(NOW + 31) == 1


def test_the_window_stays_bounded_without_being_asked() -> None:
    recent = RecentJobs(60.0)
    for i in range(10_000):
        recent.add(done(i, NOW + i, 1.0, 1.0))  # one a second for hours
    assert len(recent._done) <= 61


# ---- following the stream ------------------------------------------------------------------------------


def test_the_state_follows_snapshots_and_job_events() -> None:
    state = TopState()
    assert not state.ready
    state.apply(p.DeviceSnapshot(devices=[cpu()]))
    state.apply(p.SystemSnapshot(stats=stats([worker("cpu-0", [7]), worker("cpu-1", [], "idle")])))
    assert state.ready
    state.apply(p.JobEventReply(job=job(7, progress=40.0, audio_duration_s=100.0, started_at=NOW - 4)))
    model = state.model(NOW, "whisperd", PlacementRule(), lambda uid: "ann" if uid == 1000 else None)
    [busy, idle] = model.workers
    assert busy.job is not None and busy.job.progress == 40.0 and idle.job_id is None
    assert ("PENDING", 3) in model.states and ("RETRYING", 0) in model.states
    assert [(u.name, u.queued, u.running) for u in model.users] == [("ann", 3, 1)]
    state.apply(p.JobEventReply(job=done(7, NOW - 1, 100.0, 5.0)))
    model = state.model(NOW, "whisperd", PlacementRule(), lambda uid: None)
    assert model.jobs_per_minute == 1 and model.window_realtime_factor == 20.0
    assert model.workers[0].job is None and model.workers[0].job_id == 7  # the snapshot is older
    assert model.users[0].name == "1000"  # unknown here: the uid


def test_a_worker_shows_the_running_job_that_names_it_over_the_older_snapshot() -> None:
    state = TopState()
    state.apply(p.DeviceSnapshot(devices=[]))
    state.apply(p.SystemSnapshot(stats=stats([worker("cpu-0", [], "idle")])))
    state.apply(p.JobEventReply(job=job(9, progress=10.0, worker="cpu-0")))
    [row] = state.model(NOW, "t", PlacementRule(), lambda uid: None).workers
    assert row.job_id == 9


# ---- the memory bar ------------------------------------------------------------------------------------


def test_the_placement_threshold_is_the_larger_of_the_two_rules() -> None:
    rule = PlacementRule(min_free_memory_bytes=GIB, memory_safety_margin=0.10)
    assert rule.limit_bytes(80 * GIB) == 72 * GIB  # 10 % of 80 GiB beats 1 GiB
    assert rule.limit_bytes(8 * GIB) == 7 * GIB  # 1 GiB beats 10 % of 8 GiB
    assert rule.limit_bytes(GIB // 2) == 0


def row(used: int, taken: int, total: int = 80 * GIB, limit: int | None = 72 * GIB) -> DeviceRow:
    return DeviceRow("cuda:0", True, used, taken, total, limit, 0.5, 60.0, 1)


def test_the_bar_shows_used_reserved_free_and_the_threshold() -> None:
    assert memory_bar(row(20 * GIB, 40 * GIB), 20) == "#####+++++........|."  # the mark at 72 of 80 GiB
    kinds = bar_cells(row(24 * GIB, 24 * GIB, limit=40 * GIB), 10)
    assert kinds == [0, 0, 0, 2, 2, 3, 2, 2, 2, 2]


def test_a_full_device_keeps_its_threshold_visible_and_the_cpu_has_no_bar() -> None:
    assert memory_bar(row(80 * GIB, 80 * GIB, limit=80 * GIB), 8) == "#######|"
    assert memory_bar(DeviceRow("cpu", True, None, None, None, None, None, None, 2), 8) == "-"


# ---- the two renderings --------------------------------------------------------------------------------


def sample_model() -> TopState:
    state = TopState()
    state.apply(p.DeviceSnapshot(devices=[cpu(), device("cuda:0", memory_used_bytes=20 * GIB)]))
    state.apply(p.SystemSnapshot(stats=stats([worker("cpu-0", [7]), worker("gpu-0", [], "idle", "cuda:0")])))
    state.apply(p.JobEventReply(job=job(7, progress=25.0, audio_duration_s=296.0, started_at=NOW - 9,
                                        filename="/home/ann/meet\x1b[2Jing.wav")))  # fmt: skip
    state.apply(p.JobEventReply(job=done(6, NOW - 2, 30.0, 3.0)))
    return state


def test_plain_text_names_every_part_and_has_no_escape_codes() -> None:
    text = plain_text(sample_model().model(NOW, "whisperd on /run/x", PlacementRule(), lambda uid: "ann"))
    assert "\x1b" not in text  # neither ours nor a file name's
    for expected in ("cuda:0", "cpu-0", "gpu-0", "PENDING 3", "ann", "25%", "1:14/4:56", "limit 72.0"):
        assert expected in text, expected
    assert re.search(r"1 jobs/min, realtime 10\.0x", text)
    assert re.search(r"cuda:0\s+#+\.+\|\.+\s+20\.0/80\.0 GiB", text)


def test_the_rich_view_renders_the_same_content() -> None:
    out = io.StringIO()
    console = Console(file=out, width=160, color_system=None, force_terminal=False)
    console.print(rich_view(sample_model().model(NOW, "whisperd", PlacementRule(), lambda uid: "ann")))
    text = out.getvalue()
    for expected in ("cuda:0", "cpu-0", "25%", "1:14/4:56", "PENDING 3", "ann", "q quits", BLOCK_BAR[3]):
        assert expected in text, expected
    assert "\x1b[2J" not in text  # a file name cannot clear the screen
