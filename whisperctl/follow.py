"""Following jobs until they end, for `submit --wait` and `wait`: progress bars on a terminal (rich, loaded
only then), else one line per change on stderr, or nothing (--quiet, --json)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from whisperctl.client import Client
from whisperd import protocol as p

if TYPE_CHECKING:
    from whisperctl.progress_view import JobBars


class Lines:
    """Progress as one line on stderr per change of state or percent (stderr not a terminal), or nothing
    (quiet)."""

    def __init__(self, quiet: bool) -> None:
        self._quiet = quiet
        self._shown: dict[int, tuple[str, int]] = {}

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def show(self, job: p.JobView) -> None:
        from whisperctl import render

        key = (job.state.value, int(job.progress))
        if not self._quiet and self._shown.get(job.id) != key:
            self._shown[job.id] = key
            print(render.job_event_line(job), file=sys.stderr, flush=True)

    def measured(self, stats: p.StatsView) -> None:
        pass


def bars(quiet: bool) -> bool:
    """Progress bars rather than lines: on a terminal (rich is imported only then)."""
    return not quiet and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def follow(client: Client, ids: Sequence[int], timeout_s: float | None, quiet: bool) -> dict[int, p.JobView]:
    """Follow jobs until each is terminal; progress (bars or lines) goes to stderr. Raises TimeoutError."""
    display: Lines | JobBars = Lines(quiet)
    if bars(quiet):
        from whisperctl.progress_view import JobBars

        display = JobBars()
    deadline = time.monotonic() + timeout_s if timeout_s else None
    with client.watch() as events, display:
        # Read the state after subscribing, so no transition between the two is missed.
        jobs = {j.id: j for j in client.status(ids)}
        for job in jobs.values():
            display.show(job)
        for event in events:
            if all(j.state.terminal for j in jobs.values()):
                break
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError
            if isinstance(event, p.JobEventReply) and event.job.id in jobs:
                jobs[event.job.id] = event.job
                display.show(event.job)
                if all(j.state.terminal for j in jobs.values()):
                    break
            elif isinstance(event, p.SystemSnapshot):  # the daemon's realtime factor, for the ETA
                display.measured(event.stats)
    return jobs
