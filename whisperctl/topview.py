"""What `whisperctl top` shows, without I/O: the state it follows (TopState, fed the watch stream's replies),
the last minute's throughput (RecentJobs), and one screen's model (TopModel) rendered as plain text or as a
rich renderable. top.py does the reading, the drawing and the keys."""

from __future__ import annotations

import bisect
import math
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from whisperctl.progress_view import audio_position, clock
from whisperd import protocol as p
from whisperd.jobs import JobState
from whisperd.protocol import printable

WINDOW_S = 60.0
_GIB = 1024**3
_STATE_ORDER = tuple(JobState)  # lifecycle order, whatever order the daemon sends them in
# Plain text stays ASCII; the terminal gets blocks. used, reserved ahead of the driver, free, threshold.
PLAIN_BAR = "#+.|"
BLOCK_BAR = "█▒░│"


class RecentJobs:
    """Jobs COMPLETED within the last window_s (by finished_at, the daemon's clock): how many, and their
    realtime factor (audio seconds over processing seconds, each job from its start to its end)."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        # Sorted by finished_at: events come in finish order, the jobs read at start newest first.
        self._done: list[tuple[float, int, float, float]] = []  # finished_at, id, audio_s, processing_s
        self._ids: set[int] = set()
        self._latest = -math.inf

    def add(self, job: p.JobView) -> None:
        if job.state is not JobState.COMPLETED or job.finished_at is None or job.id in self._ids:
            return
        processing_s = job.finished_at - job.started_at if job.started_at is not None else 0.0
        bisect.insort(self._done, (job.finished_at, job.id, job.audio_duration_s or 0.0, processing_s))
        self._ids.add(job.id)
        self._latest = max(self._latest, job.finished_at)
        self._prune(self._latest)  # bounded even if nobody asks for a figure

    def _prune(self, now: float) -> None:
        cut = bisect.bisect_right(self._done, (now - self.window_s, math.inf))
        for _, job_id, _, _ in self._done[:cut]:
            self._ids.discard(job_id)
        del self._done[:cut]

    def jobs_per_minute(self, now: float) -> float:
        self._prune(now)
        return len(self._done) * 60.0 / self.window_s

    def realtime_factor(self, now: float) -> float | None:
        """None when no job of the window has both an audio length and a processing time."""
        self._prune(now)
        timed = [(audio, spent) for _, _, audio, spent in self._done if audio > 0.0 and spent > 0.0]
        spent_s = sum(spent for _, spent in timed)
        return sum(audio for audio, _ in timed) / spent_s if spent_s > 0.0 else None


@dataclass(frozen=True)
class PlacementRule:
    """The scheduler's memory rule (scheduling.fits) as top marks it on a GPU's memory bar: no new batch
    once less than the larger of these is free."""

    min_free_memory_bytes: int = _GIB
    memory_safety_margin: float = 0.10

    def limit_bytes(self, total_bytes: int) -> int:
        """Memory in use past which the scheduler places no new batch on a device of total_bytes."""
        keep_free = max(self.min_free_memory_bytes, math.ceil(self.memory_safety_margin * total_bytes))
        return max(0, total_bytes - keep_free)


@dataclass(frozen=True)
class DeviceRow:
    name: str
    healthy: bool
    used_bytes: int | None  # what the driver reports
    taken_bytes: int | None  # used plus whisperd's reservations the driver does not show yet
    total_bytes: int | None
    limit_bytes: int | None
    utilization: float | None  # 0..1
    temperature_c: float | None
    workers: int


@dataclass(frozen=True)
class WorkerRow:
    name: str
    device: str
    state: str
    job: p.JobView | None  # its current job as last seen, when known
    job_id: int | None


@dataclass(frozen=True)
class UserRow:
    name: str
    queued: int
    running: int
    finished: int


@dataclass(frozen=True)
class TopModel:
    """One screen of top."""

    title: str
    uptime_s: float | None
    devices: list[DeviceRow]
    workers: list[WorkerRow]
    states: list[tuple[str, int]]
    users: list[UserRow]
    jobs_per_minute: float
    window_realtime_factor: float | None  # over the last minute
    total_realtime_factor: float | None  # since the daemon started


def _where(name: str, host: str | None) -> str:
    return f"{name}@{host}" if host else name  # names repeat across the hosts of a shared store


class TopState:
    """What top knows, from the watch stream: the latest snapshots, the running jobs, the last minute."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.devices: list[p.DeviceView] | None = None
        self.stats: p.StatsView | None = None
        self.running: dict[int, p.JobView] = {}
        self.recent = RecentJobs(window_s)

    @property
    def ready(self) -> bool:
        """Both snapshots seen (the daemon sends them first on a watch)."""
        return self.devices is not None and self.stats is not None

    def apply(self, reply: p.Reply) -> None:
        if isinstance(reply, p.JobEventReply):
            self.job(reply.job)
        elif isinstance(reply, p.DeviceSnapshot):
            self.devices = reply.devices
        elif isinstance(reply, p.SystemSnapshot):
            self.stats = reply.stats

    def job(self, job: p.JobView) -> None:
        if job.state is JobState.PROCESSING:
            self.running[job.id] = job
        else:
            self.running.pop(job.id, None)
        self.recent.add(job)

    def model(
        self, now: float, title: str, rule: PlacementRule, user_name: Callable[[int], str | None]
    ) -> TopModel:
        stats = self.stats
        return TopModel(
            title=title,
            uptime_s=stats.uptime_s if stats else None,
            devices=[_device_row(d, rule) for d in self.devices or ()],
            workers=self._worker_rows(stats.workers if stats else ()),
            states=[(str(s), stats.states.get(s, 0)) for s in _STATE_ORDER] if stats else [],
            users=[
                UserRow(user_name(u.uid) or str(u.uid), u.queued_jobs, u.running_jobs, u.finished_jobs)
                for u in (stats.users if stats else ())
            ],
            jobs_per_minute=self.recent.jobs_per_minute(now),
            window_realtime_factor=self.recent.realtime_factor(now),
            total_realtime_factor=stats.realtime_factor if stats else None,
        )

    def _worker_rows(self, workers: Sequence[p.WorkerView]) -> list[WorkerRow]:
        # The job events are fresher than the last system snapshot's job lists: a worker's current job is
        # the running job that names it, else the first of the snapshot's.
        on: dict[tuple[str, str | None], p.JobView] = {}
        for running in self.running.values():
            if running.worker is not None:
                on.setdefault((running.worker, running.host), running)
        rows = []
        for w in workers:
            job = on.get((w.id, w.host))
            if job is None and w.jobs:
                job = self.running.get(w.jobs[0])
            job_id = job.id if job is not None else (w.jobs[0] if w.jobs else None)
            rows.append(WorkerRow(_where(w.id, w.host), w.device, w.state, job, job_id))
        return rows


def _device_row(d: p.DeviceView, rule: PlacementRule) -> DeviceRow:
    total, available = d.memory_total_bytes, d.memory_available_bytes
    taken = total - available if total is not None and available is not None else None
    return DeviceRow(
        name=_where(d.name, d.host),
        healthy=d.healthy,
        used_bytes=d.memory_used_bytes,
        taken_bytes=taken,
        total_bytes=total,
        limit_bytes=_limit_bytes(d, rule),
        utilization=d.utilization_ratio,
        temperature_c=d.temperature_c,
        workers=d.workers,
    )


def _limit_bytes(d: p.DeviceView, rule: PlacementRule) -> int | None:
    """Memory in use past which no batch is placed: as the daemon says (its running configuration), else
    by the rule top was given (a daemon older than the field)."""
    total = d.memory_total_bytes
    if not total:
        return None
    if d.placement_floor_bytes is not None:
        return max(0, total - d.placement_floor_bytes)
    return rule.limit_bytes(total)


# ---- figures ------------------------------------------------------------------------------------------


def bar_cells(row: DeviceRow, width: int) -> list[int] | None:
    """The memory bar as cell kinds: 0 used, 1 reserved ahead of the driver, 2 free, 3 the placement
    threshold (which replaces the cell it falls in); None for a device without memory figures (the CPU)."""
    if row.total_bytes is None or row.used_bytes is None or row.total_bytes <= 0 or width <= 0:
        return None
    total = row.total_bytes

    def cells(n: int) -> int:
        return min(width, max(0, round(n / total * width)))

    used = cells(row.used_bytes)
    taken = max(used, cells(row.taken_bytes if row.taken_bytes is not None else row.used_bytes))
    kinds = [0] * used + [1] * (taken - used) + [2] * (width - taken)
    if row.limit_bytes is not None:
        kinds[min(width - 1, math.floor(row.limit_bytes / total * width))] = 3
    return kinds


def memory_bar(row: DeviceRow, width: int, chars: str = PLAIN_BAR) -> str:
    kinds = bar_cells(row, width)
    return "-" if kinds is None else "".join(chars[k] for k in kinds)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / _GIB:.1f}"


def memory_text(row: DeviceRow) -> str:
    if row.total_bytes is None:
        return "-"
    return f"{_gib(row.used_bytes)}/{_gib(row.total_bytes)} GiB (limit {_gib(row.limit_bytes)})"


def _percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{round(ratio * 100)}%"


def _temperature(c: float | None) -> str:
    return "-" if c is None else f"{c:.0f}C"


def _rtf(factor: float | None) -> str:
    return "-" if factor is None else f"{factor:.1f}x"


def job_cells(row: WorkerRow) -> tuple[str, str, str, str]:
    """JOB, PROGRESS, AUDIO and FILE of a worker's row."""
    if row.job_id is None:
        return "-", "", "", ""
    job = row.job
    if job is None:
        return str(row.job_id), "?", "", ""
    name = posixpath.basename(job.filename.rstrip("/")) or job.filename
    return str(job.id), f"{math.floor(min(max(job.progress, 0.0), 100.0))}%", audio_position(job), name


def summary(model: TopModel) -> str:
    up = "-" if model.uptime_s is None else clock(model.uptime_s)
    return (
        f"{model.title}  up {up}  last minute: {model.jobs_per_minute:g} jobs/min, realtime "
        f"{_rtf(model.window_realtime_factor)} (since start {_rtf(model.total_realtime_factor)})"
    )


def states_line(model: TopModel) -> str:
    return "queue: " + ("  ".join(f"{state} {n}" for state, n in model.states) or "-")


# ---- plain text ---------------------------------------------------------------------------------------


def _plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rows = [[printable(cell) for cell in row] for row in rows]  # users' text must not move the cursor
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def plain_text(model: TopModel, bar_width: int = 20) -> str:
    """One block of top as plain text, no escape codes (for a pipe or a log)."""
    devices = _plain_table(
        ["DEVICE", "MEMORY", "USED/TOTAL", "UTIL", "TEMP", "WORKERS"],
        [
            [
                d.name if d.healthy else f"{d.name} (unhealthy)",
                memory_bar(d, bar_width),
                memory_text(d),
                _percent(d.utilization),
                _temperature(d.temperature_c),
                str(d.workers),
            ]
            for d in model.devices
        ],
    )
    workers = _plain_table(
        ["WORKER", "DEVICE", "STATE", "JOB", "PROGRESS", "AUDIO", "FILE"],
        [[w.name, w.device, w.state, *job_cells(w)] for w in model.workers],
    )
    users = _plain_table(
        ["USER", "QUEUED", "RUNNING", "FINISHED"],
        [[u.name, str(u.queued), str(u.running), str(u.finished)] for u in model.users],
    )
    return "\n".join([printable(summary(model)), devices, workers, states_line(model), users])


# ---- the terminal -------------------------------------------------------------------------------------

_BAR_STYLES = ("green", "yellow", "grey35", "bold red")


def _bar_text(row: DeviceRow, width: int) -> Text:
    kinds = bar_cells(row, width)
    if kinds is None:
        return Text("-")
    text = Text()
    for kind in kinds:
        text.append(BLOCK_BAR[kind], style=_BAR_STYLES[kind])
    return text


def _table(*columns: str) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold reverse")
    for column in columns:
        table.add_column(column, no_wrap=True, overflow="ellipsis")
    return table


def rich_view(model: TopModel, bar_width: int = 30) -> RenderableType:
    """One screen of top for rich: devices, workers, the queue by state and by user. Cells are Text, never
    markup, since file names are users' text."""
    devices = _table("DEVICE", "MEMORY", "USED/TOTAL", "UTIL", "TEMP", "WORKERS")
    for d in model.devices:
        name = Text(d.name) if d.healthy else Text(f"{d.name} (unhealthy)", style="bold red")
        devices.add_row(
            name, _bar_text(d, bar_width), Text(memory_text(d)), Text(_percent(d.utilization)),
            Text(_temperature(d.temperature_c)), Text(str(d.workers)),
        )  # fmt: skip
    workers = _table("WORKER", "DEVICE", "STATE", "JOB", "PROGRESS", "AUDIO", "FILE")
    for w in model.workers:
        style = "bold" if w.state == "busy" else ""
        job_id, progress, audio, filename = job_cells(w)
        texts = (w.name, w.device, w.state, job_id, progress, audio, filename)
        cells = [Text(printable(c), style=style) for c in texts]
        if w.job is not None:  # a bar before its percent
            done = round(min(max(w.job.progress, 0.0), 100.0) / 100.0 * 10)
            cells[4] = Text.assemble(("━" * done, "green"), ("━" * (10 - done), "grey35"), f" {progress}")
        workers.add_row(*cells)
    users = _table("USER", "QUEUED", "RUNNING", "FINISHED")
    for u in model.users:
        users.add_row(*(Text(printable(c)) for c in (u.name, str(u.queued), str(u.running), str(u.finished))))
    return Group(
        Text(printable(summary(model)), style="bold"),
        Text("q quits", style="dim"),
        Text(""),
        devices,
        Text(""),
        workers,
        Text(""),
        Text(states_line(model), style="bold"),
        users,
    )
