"""Turns protocol objects into text for whisperctl: transcript files and status tables. Pure: no I/O."""

from __future__ import annotations

import math
import posixpath
import time
from collections.abc import Callable, Sequence

# The transcript writers live with the daemon (the HTTP API writes the same subtitles): re-exported here.
from whisperd.formats import FORMATS as FORMATS
from whisperd.formats import format_timestamp as format_timestamp
from whisperd.formats import format_transcript as format_transcript
from whisperd.jobs import JobState
from whisperd.protocol import DeviceView, JobView, StatsView, TokenView, printable

_GIB = 1024**3
# Lifecycle order, fixed so the summary line reads the same whatever the daemon happens to report.
_STATE_ORDER = (
    JobState.PENDING,
    JobState.PROCESSING,
    JobState.RETRYING,
    JobState.COMPLETED,
    JobState.FAILED,
    JobState.CANCELLED,
)


# ---- tables -------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    # Cells hold what users typed (file names): escaped, so that no cell can move the cursor or add a line.
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    # rstrip: padding the last column only leaves trailing spaces.
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))  # clock skew between daemon and client must not show "-3s"
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _duration(seconds: float) -> str:
    total = max(0, int(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _progress(progress: float) -> str:
    # Floor, so a job at 99.6% never reads "100%" while still running.
    return f"{math.floor(min(max(progress, 0.0), 100.0))}%"


def _basename(filename: str) -> str:
    return posixpath.basename(filename.rstrip("/")) or filename


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f}"


def _hosted(header: list[str], rows: list[list[str]], hosts: Sequence[str | None], before: str) -> str:
    """The table, with a HOST column before `before` when any row has a host (a shared store: several
    hosts, one queue); a daemon with a store of its own sends none, and its tables stay as they were."""
    if any(host is not None for host in hosts):
        at = header.index(before)
        header = [*header[:at], "HOST", *header[at:]]
        rows = [[*row[:at], host or "-", *row[at:]] for row, host in zip(rows, hosts, strict=True)]
    return _table(header, rows)


def jobs_table(jobs: list[JobView], now: float) -> str:
    rows = [
        [
            str(job.id),
            str(job.state),
            _progress(job.progress),
            job.model,
            job.device or "-",
            _age(now - job.created_at),
            _basename(job.filename),
        ]
        for job in jobs
    ]
    header = ["ID", "STATE", "PROGRESS", "MODEL", "DEVICE", "AGE", "FILE"]
    return _hosted(header, rows, [job.host for job in jobs], before="DEVICE")


def devices_table(devices: list[DeviceView]) -> str:
    rows: list[list[str]] = []
    for d in devices:
        used, total = d.memory_used_bytes, d.memory_total_bytes
        rows.append(
            [
                d.name,
                "yes" if d.healthy else "no",
                "-" if d.utilization_ratio is None else f"{round(d.utilization_ratio * 100)}%",
                "-" if used is None or total is None else f"{_gib(used)}/{_gib(total)} GiB",
                "-" if d.memory_available_bytes is None else f"{_gib(d.memory_available_bytes)} GiB",
                f"{_gib(d.memory_reserved_bytes)} GiB",
                "-" if d.temperature_c is None else f"{d.temperature_c:.0f}C",
                "-" if d.power_w is None else f"{d.power_w:.0f}W",
                str(d.workers),
                str(d.running_batches),
            ]
        )
    header = ["DEVICE", "HEALTHY", "UTIL", "MEM USED/TOTAL", "AVAILABLE", "RESERVED", "TEMP", "POWER"]
    return _hosted([*header, "WORKERS", "BATCHES"], rows, [d.host for d in devices], before="DEVICE")


def _size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def users_table(stats: StatsView, user_name: Callable[[int], str | None]) -> str:
    """Each user's share; user_name resolves a uid on the client's side (None: unknown there)."""
    rows = [
        [
            user_name(u.uid) or "-",
            str(u.uid),
            str(u.queued_jobs),
            str(u.running_jobs),
            str(u.finished_jobs),
            _size(u.spool_bytes),
            _duration(u.audio_seconds),
        ]
        for u in stats.users
    ]
    return _table(["USER", "UID", "QUEUED", "RUNNING", "FINISHED", "SPOOL", "AUDIO DONE"], rows)


def tokens_table(tokens: list[TokenView]) -> str:
    """The HTTP API's tokens: ids and users, never a secret (the daemon has none to send)."""
    rows = [
        [t.id, t.user, str(t.uid), time.strftime("%Y-%m-%d %H:%M", time.gmtime(t.created_at)), t.comment]
        for t in tokens
    ]
    return _table(["ID", "USER", "UID", "CREATED (UTC)", "COMMENT"], rows)


def stats_text(stats: StatsView, user_name: Callable[[int], str | None] = lambda uid: None) -> str:
    counts = "  ".join(f"{state} {stats.states.get(state, 0)}" for state in _STATE_ORDER)
    rtf = "-" if stats.realtime_factor is None else f"{stats.realtime_factor:.1f}x"
    summary = [
        f"jobs: {counts}",
        f"queue depth: {stats.queue_depth}  running: {stats.running_jobs}",
        f"uptime: {_duration(stats.uptime_s)}",
        f"audio: {stats.audio_seconds_total:.1f}s  realtime factor: {rtf}",
    ]
    rows = [
        [
            w.id,
            w.device,
            "-" if w.pid is None else str(w.pid),
            w.state,
            ",".join(w.models) or "-",
            ",".join(str(j) for j in w.jobs) or "-",
            str(w.restarts),
        ]
        for w in stats.workers
    ]
    header = ["WORKER", "DEVICE", "PID", "STATE", "MODELS", "JOBS", "RESTARTS"]
    workers = _hosted(header, rows, [w.host for w in stats.workers], before="DEVICE")
    users = "\n" + users_table(stats, user_name) if stats.users else ""  # none from an older daemon
    return "\n".join(summary) + "\n\n" + workers + users


def job_event_line(job: JobView) -> str:
    where = job.worker or job.device
    if job.host is not None:  # a shared store: the host running it (worker names repeat across hosts)
        where = f"{where}@{job.host}" if where else job.host
    line = f"job {job.id} {job.state} {_progress(job.progress)} {where or '-'} {_basename(job.filename)}"
    return printable(f"{line}: {job.error}" if job.error else line)


def job_failed_line(job: JobView) -> str:
    return printable(f"job {job.id} {job.state}: {job.error or ''} ({job.filename})")
