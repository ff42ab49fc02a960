"""The per-user books (whisperd.ledger) as jobs move, and the per-user table of `whisperctl stats`."""

from __future__ import annotations

from pathlib import Path

from whisperctl.render import stats_text, users_table
from whisperd.jobs import JobEvent, JobState
from whisperd.ledger import Ledger, UserFigures, spool_size
from whisperd.protocol import StatsView, UserStatsView
from whisperd.store import JobRow, QueueEntry, UserTotal

S, E = JobState, JobEvent
ANA, BEN = 1001, 1002


def row(id: int, owner: int = ANA, model: str = "small", priority: int = 0, size: int = 0) -> JobRow:
    return JobRow(
        id=id, state=S.PENDING, progress=0.0, retries=0, device=None, worker=None, model=model, language=None,
        task="transcribe", priority=priority, word_timestamps=False, error=None, filename=f"{id}.wav",
        owner_uid=owner, audio_duration_s=None, spool_path=f"/spool/{id}", spool_bytes=size, created_at=0.0,
        updated_at=0.0, queued_at=float(id), started_at=None, finished_at=None, not_before=None,
    )  # fmt: skip


def move(ledger: Ledger, job: JobRow, event: JobEvent, new: JobState) -> None:
    """What the registry does after each committed transition."""
    old, job.state = job.state, new
    ledger.moved(job, old, event)


def lanes(ledger: Ledger, take: int = 100) -> dict[tuple[int, int, str], tuple[int, list[int]]]:
    return {
        key: (count, [job_id for job_id, _queued_at in first]) for key, count, first in ledger.lanes(take)
    }


def test_pending_jobs_form_fifo_lanes_by_priority_user_and_model() -> None:
    ledger = Ledger()
    jobs = [row(1), row(2, BEN), row(3), row(4, model="large"), row(5, priority=-1)]
    for job in jobs:
        ledger.moved(job, None, None)
    assert lanes(ledger) == {
        (0, ANA, "small"): (2, [1, 3]),
        (0, BEN, "small"): (1, [2]),
        (0, ANA, "large"): (1, [4]),
        (-1, ANA, "small"): (1, [5]),
    }
    assert lanes(ledger, take=1)[(0, ANA, "small")] == (2, [1]), "only the first ones are read"
    move(ledger, jobs[0], E.DISPATCH, S.PROCESSING)
    move(ledger, jobs[3], E.CANCEL, S.CANCELLED)
    assert lanes(ledger) == {
        (0, ANA, "small"): (1, [3]),
        (0, BEN, "small"): (1, [2]),
        (-1, ANA, "small"): (1, [5]),
    }, "an emptied lane is dropped"
    move(ledger, jobs[0], E.REQUEUE, S.PENDING)
    assert lanes(ledger)[(0, ANA, "small")] == (2, [3, 1]), "back to the tail"


def test_each_user_s_figures_follow_their_jobs() -> None:
    ledger = Ledger()
    a1, a2, b1 = row(1, size=100), row(2, size=50), row(3, BEN, size=7)
    for job in (a1, a2, b1):
        ledger.moved(job, None, None)
    assert ledger.user(ANA) == UserFigures(waiting_jobs=2, spool_bytes=150)
    move(ledger, a1, E.DISPATCH, S.PROCESSING)
    assert ledger.user(ANA) == UserFigures(waiting_jobs=1, running_jobs=1, spool_bytes=150, last_served=1)
    move(ledger, a1, E.FAIL, S.RETRYING)
    assert ledger.user(ANA).waiting_jobs == 2 and ledger.user(ANA).running_jobs == 0
    move(ledger, a1, E.BACKOFF_ELAPSED, S.PENDING)
    move(ledger, a1, E.DISPATCH, S.PROCESSING)
    a1.audio_duration_s = 61.5
    move(ledger, a1, E.COMPLETE, S.COMPLETED)
    move(ledger, a2, E.CANCEL, S.CANCELLED)
    assert ledger.user(ANA) == UserFigures(finished_jobs=2, audio_seconds=61.5, last_served=2)
    assert ledger.user(BEN) == UserFigures(waiting_jobs=1, spool_bytes=7)
    assert ledger.user(4242) == UserFigures(), "a user never seen"
    assert list(ledger.users()) == [ANA, BEN]


def test_last_served_grows_with_each_dispatch_and_names_only_users_served() -> None:
    ledger = Ledger()
    a, b, c = row(1), row(2, BEN), row(3)
    for job in (a, b, c):
        ledger.moved(job, None, None)
    assert ledger.last_served() == {}
    move(ledger, a, E.DISPATCH, S.PROCESSING)
    move(ledger, b, E.DISPATCH, S.PROCESSING)
    assert ledger.last_served() == {ANA: 1, BEN: 2}
    move(ledger, c, E.DISPATCH, S.PROCESSING)
    assert ledger.last_served() == {ANA: 3, BEN: 2}


def test_recovered_books_come_from_the_store_s_totals_and_its_queue() -> None:
    ledger = Ledger()
    totals = [
        UserTotal(owner_uid=ANA, state=S.PENDING, jobs=2, spool_bytes=30),
        UserTotal(owner_uid=ANA, state=S.PROCESSING, jobs=1, spool_bytes=5),
        UserTotal(owner_uid=BEN, state=S.RETRYING, jobs=1, spool_bytes=7),
    ]
    queue: list[list[QueueEntry]] = [[(4, 0, ANA, "small", 40.0)], [(7, 0, ANA, "small", 70.0)]]
    ledger.load(totals, iter(queue))
    assert ledger.user(ANA) == UserFigures(waiting_jobs=2, running_jobs=1, spool_bytes=35)
    assert ledger.user(BEN) == UserFigures(waiting_jobs=1, spool_bytes=7)
    assert lanes(ledger) == {(0, ANA, "small"): (2, [4, 7])}, "in the order the store read them"
    running = row(1, size=5)
    running.state = S.PROCESSING
    move(ledger, running, E.REQUEUE, S.PENDING)
    assert ledger.user(ANA) == UserFigures(waiting_jobs=3, spool_bytes=35), "a requeue is no turn served"
    assert lanes(ledger)[(0, ANA, "small")] == (3, [4, 7, 1])


def test_the_oldest_pending_job_and_the_models_queued_are_read_from_the_lanes() -> None:
    ledger = Ledger()
    assert ledger.oldest_pending_since() is None and ledger.pending_models() == set()
    a, b, c = row(5, model="large"), row(3, BEN), row(9)
    for job in (a, b, c):
        ledger.moved(job, None, None)
    assert ledger.oldest_pending_since() == 3.0
    assert ledger.pending_models() == {"small", "large"}
    move(ledger, b, E.DISPATCH, S.PROCESSING)
    assert ledger.oldest_pending_since() == 5.0
    move(ledger, a, E.CANCEL, S.CANCELLED)
    assert ledger.pending_models() == {"small"}


def test_spool_size_stats_the_file_and_counts_a_missing_one_as_zero(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"12345")
    assert [spool_size(str(tmp_path / "a")), spool_size(str(tmp_path / "gone"))] == [5, 0]


# ---- whisperctl stats ------------------------------------------------------------------------------------


def stats(users: list[UserStatsView]) -> StatsView:
    return StatsView(
        states={}, queue_depth=0, running_jobs=0, workers=[], uptime_s=1.0, audio_seconds_total=0.0,
        processing_seconds_total=0.0, realtime_factor=None, users=users,
    )  # fmt: skip


USERS = [
    UserStatsView(uid=0, queued_jobs=0, running_jobs=1, finished_jobs=12, spool_bytes=3 * 1024**3 // 2,
                  audio_seconds=3725.0),
    UserStatsView(uid=1001, queued_jobs=20, running_jobs=2, finished_jobs=0, spool_bytes=512,
                  audio_seconds=0.0),
]  # fmt: skip


def test_users_table_names_users_known_on_the_client_side() -> None:
    names = {0: "root"}
    assert users_table(stats(USERS), names.get) == (
        "USER  UID   QUEUED  RUNNING  FINISHED  SPOOL    AUDIO DONE\n"
        "root  0     0       1        12        1.5 GiB  1h02m05s\n"
        "-     1001  20      2        0         512 B    0s\n"
    )


def test_stats_text_ends_with_the_users_and_leaves_them_out_when_the_daemon_sent_none() -> None:
    table = (
        "USER  UID   QUEUED  RUNNING  FINISHED  SPOOL    AUDIO DONE\n"
        "-     0     0       1        12        1.5 GiB  1h02m05s\n"
        "-     1001  20      2        0         512 B    0s\n"
    )
    assert stats_text(stats(USERS)).endswith("RESTARTS\n\n" + table), "no names resolved by default"
    assert "USER" not in stats_text(stats([]))
