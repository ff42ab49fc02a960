"""Progress bars for `submit --wait` and `wait` on a terminal: one bar per job with its percent, its audio
position and an ETA from the measured realtime factor. The figures are pure functions of a job's view (and
the clock), so they are tested without a terminal; JobBars draws them with rich on stderr."""

from __future__ import annotations

import math
import posixpath
import time
from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID
from rich.text import Text

from whisperd.jobs import JobState
from whisperd.protocol import JobView, StatsView, printable

MAX_LABEL_CHARS = 40


def clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on; negative times read 0:00."""
    total = max(0, math.floor(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def percent(job: JobView) -> str:
    # Floor, as render does: a running job never reads 100%.
    return f"{math.floor(min(max(job.progress, 0.0), 100.0))}%"


def audio_position(job: JobView) -> str:
    """Where the decoding is in the audio, e.g. 1:23/4:56; "-" until a worker has read the audio's length."""
    if job.audio_duration_s is None:
        return "-"
    duration = job.audio_duration_s
    return f"{clock(duration * min(max(job.progress, 0.0), 100.0) / 100.0)}/{clock(duration)}"


def job_rate(job: JobView) -> float | None:
    """The job's own realtime factor (audio seconds decoded per second since it started, on the daemon's
    clock), once it has moved; None before."""
    if job.audio_duration_s is None or job.started_at is None or job.progress <= 0.0:
        return None
    elapsed_s = job.updated_at - job.started_at
    if elapsed_s <= 0.0:
        return None
    return job.audio_duration_s * min(job.progress, 100.0) / 100.0 / elapsed_s


def eta_s(job: JobView, daemon_realtime_factor: float | None, now: float) -> float | None:
    """Seconds until the job is done: its audio at the measured rate (its own once it has moved, else the
    daemon's since start) less the time it has run; 0 once terminal, None while unknown (queued, its
    audio not read yet, or no rate measured anywhere)."""
    if job.state.terminal:
        return 0.0
    if job.state is not JobState.PROCESSING or job.audio_duration_s is None or job.started_at is None:
        return None
    rate = job_rate(job) or daemon_realtime_factor
    if not rate or rate <= 0.0:
        return None
    return max(0.0, job.audio_duration_s / rate - max(0.0, now - job.started_at))


def eta_text(job: JobView, daemon_realtime_factor: float | None, now: float) -> str:
    if job.state.terminal:
        return ""
    eta = eta_s(job, daemon_realtime_factor, now)
    return "ETA -:--" if eta is None else f"ETA {clock(math.ceil(eta))}"


def job_label(job: JobView) -> str:
    """job ID FILE, the file's base name escaped (users name files) and cut to MAX_LABEL_CHARS."""
    name = printable(posixpath.basename(job.filename.rstrip("/")) or job.filename)
    if len(name) > MAX_LABEL_CHARS:
        name = name[: MAX_LABEL_CHARS - 1] + "…"
    return f"job {job.id} {name}"


def state_text(job: JobView) -> str:
    return f"{job.state} (retry {job.retries})" if job.retries and not job.state.terminal else str(job.state)


class _Cell(ProgressColumn):
    """A text cell computed from the task's job (Text, never markup: file names are users' text)."""

    def __init__(self, cell: Callable[[JobView], str], style: str = "") -> None:
        super().__init__()
        self._cell, self._style = cell, style

    def render(self, task: Task) -> Text:
        return Text(self._cell(task.fields["job"]), style=self._style, no_wrap=True)


class JobBars:
    """One bar per job on stderr, redrawn in place, left on screen when done."""

    def __init__(self, console: Console | None = None) -> None:
        self.realtime_factor: float | None = None  # the daemon's, from its system snapshots
        self._progress = Progress(
            _Cell(job_label),
            BarColumn(),
            _Cell(percent),
            _Cell(audio_position, "cyan"),
            _Cell(state_text, "bold"),
            _Cell(lambda job: eta_text(job, self.realtime_factor, time.time()), "magenta"),
            console=console or Console(stderr=True),
            refresh_per_second=4,  # the ETA counts down between the worker's reports
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._tasks: dict[int, TaskID] = {}

    def __enter__(self) -> JobBars:
        self._progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.refresh()  # the final states, then the cursor back below the bars
        self._progress.stop()

    def show(self, job: JobView) -> None:
        completed = 100.0 if job.state is JobState.COMPLETED else job.progress
        task = self._tasks.get(job.id)
        if task is None:
            task = self._progress.add_task("", total=100.0, job=job)
            self._tasks[job.id] = task
        self._progress.update(task, completed=completed, job=job)

    def measured(self, stats: StatsView) -> None:
        self.realtime_factor = stats.realtime_factor
