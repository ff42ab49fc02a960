"""The figures of submit --wait's and wait's progress bars: percent, audio position, ETA from the job's own
rate once it has moved, else the daemon's; and the bars themselves, drawn on a console that is no terminal."""

from __future__ import annotations

import io

from rich.console import Console

from tests.support.views import NOW, job
from whisperctl.progress_view import (
    JobBars,
    audio_position,
    clock,
    eta_s,
    eta_text,
    job_label,
    job_rate,
    percent,
)
from whisperd import protocol as p
from whisperd.jobs import JobState


def test_clock_reads_minutes_then_hours() -> None:
    assert clock(0) == "0:00" and clock(83.9) == "1:23" and clock(296) == "4:56"
    assert clock(3725) == "1:02:05" and clock(-3) == "0:00"


def test_percent_and_position_follow_the_progress() -> None:
    running = job(1, progress=28.1, audio_duration_s=296.0)
    assert percent(running) == "28%" and audio_position(running) == "1:23/4:56"
    assert percent(job(1, progress=99.9)) == "99%"  # never 100% while it runs
    assert audio_position(job(1, progress=10.0)) == "-"  # its length is not known yet


def test_the_jobs_own_rate_once_it_has_moved() -> None:
    # 25 % of 200 s of audio in 10 s: 5x realtime; 150 s left at 5x is 30 s from the report, 28 s from now.
    running = job(1, progress=25.0, audio_duration_s=200.0, started_at=NOW - 10, updated_at=NOW)
    assert job_rate(running) == 5.0
    assert eta_s(running, daemon_realtime_factor=50.0, now=NOW + 2) == 28.0
    assert eta_text(running, 50.0, NOW + 2) == "ETA 0:28"


def test_the_daemons_rate_before_the_job_has_moved() -> None:
    started = job(1, progress=0.0, audio_duration_s=200.0, started_at=NOW - 5, updated_at=NOW - 5)
    assert job_rate(started) is None
    assert eta_s(started, daemon_realtime_factor=10.0, now=NOW) == 15.0
    assert eta_s(started, daemon_realtime_factor=None, now=NOW) is None
    assert eta_text(started, None, NOW) == "ETA -:--"


def test_no_eta_while_queued_and_none_shown_once_done() -> None:
    assert eta_s(job(1, JobState.PENDING, audio_duration_s=20.0), 10.0, NOW) is None
    assert eta_s(job(1, JobState.COMPLETED, progress=100.0), 10.0, NOW) == 0.0
    assert eta_text(job(1, JobState.FAILED), 10.0, NOW) == ""
    overdue = job(1, progress=50.0, audio_duration_s=100.0, started_at=NOW - 10, updated_at=NOW - 5)
    assert eta_s(overdue, None, NOW + 100) == 0.0  # late, not negative


def test_the_label_escapes_and_cuts_the_file_name() -> None:
    assert job_label(job(3, filename="/a/b/talk.wav")) == "job 3 talk.wav"
    label = job_label(job(3, filename="/a/" + "x" * 100 + "\x1b[2J.wav"))
    assert "\x1b" not in label and len(label) <= len("job 3 ") + 40


def test_the_bars_show_each_job_with_its_figures() -> None:
    out = io.StringIO()
    console = Console(file=out, width=140, color_system=None, force_terminal=False)
    with JobBars(console) as bars:
        daemon = p.StatsView(
            states={}, queue_depth=0, running_jobs=0, workers=[], uptime_s=1.0,
            audio_seconds_total=0.0, processing_seconds_total=0.0, realtime_factor=8.0,
        )  # fmt: skip
        bars.measured(daemon)
        bars.show(job(1, progress=25.0, audio_duration_s=200.0, started_at=NOW - 10, updated_at=NOW))
        bars.show(job(2, JobState.PENDING, filename="/x/queued.wav"))
        bars.show(job(1, JobState.COMPLETED, progress=100.0, audio_duration_s=200.0))
    text = out.getvalue()
    for expected in ("job 1 talk1.wav", "100%", "3:20/3:20", "COMPLETED", "job 2 queued.wav", "PENDING"):
        assert expected in text, expected
