"""A state dir's jobs and their history (job_events), read back without the daemon: read-only once it has
stopped, or from a copy of the files a kill -9 left behind. And what the fault tests check in it: each job's
history is one unbroken chain of transitions, and no job ever ran twice at the same time."""

from __future__ import annotations

import itertools
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

# Events that end a run on a worker (PROCESSING -> something else).
RUN_ENDS = frozenset({"complete", "fail", "fail_fatal", "requeue", "cancel"})


@dataclass(frozen=True)
class Event:
    job_id: int
    at: float
    from_state: str | None
    to_state: str
    event: str
    worker: str | None
    error: str | None


@dataclass(frozen=True)
class Job:
    id: int
    state: str
    retries: int
    error: str | None
    spool_path: str | None
    transcript: bytes | None


@dataclass(frozen=True)
class History:
    integrity: str
    jobs: dict[int, Job]
    events: dict[int, list[Event]]  # by job, in the order they were written

    def rows(self, job_id: int) -> str:
        """A job's history as lines, for failure messages."""
        return "\n".join(f"  {e}" for e in self.events.get(job_id, [])) or "  (no events)"

    def count(self, event: str) -> int:
        return sum(e.event == event for seq in self.events.values() for e in seq)


def read(db_path: Path) -> History:
    """Read-only: a connection that cannot write cannot change what it checks."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        integrity = "; ".join(r[0] for r in db.execute("PRAGMA integrity_check").fetchall())
        jobs = {
            row[0]: Job(*row)
            for row in db.execute("SELECT id, state, retries, error, spool_path, transcript FROM jobs")
        }
        events: dict[int, list[Event]] = {}
        query = "SELECT job_id, at, from_state, to_state, event, worker, error FROM job_events ORDER BY rowid"
        for row in db.execute(query):
            events.setdefault(row[0], []).append(Event(*row))
    finally:
        db.close()
    return History(integrity, jobs, events)


def read_crashed(state_dir: Path, scratch: Path) -> History:
    """What a kill -9 left: the database and its write-ahead log copied (nothing may still run on them), then
    opened as the next start would, so the log's committed transactions are replayed on the copy alone."""
    scratch.mkdir(parents=True, exist_ok=True)
    for leftover in scratch.glob("jobs.sqlite3*"):
        leftover.unlink()
    for suffix in ("", "-wal"):
        source = state_dir / f"jobs.sqlite3{suffix}"
        if source.exists():
            shutil.copyfile(source, scratch / source.name)
    sqlite3.connect(scratch / "jobs.sqlite3").close()  # replays the log into the copy
    return read(scratch / "jobs.sqlite3")


def broken_chains(history: History) -> list[str]:
    """Each job's history starts with its submit, each event starts where the last one ended, and the last one
    ends in the job's state."""
    problems = []
    for job_id, job in history.jobs.items():
        seq = history.events.get(job_id, [])
        if not seq or seq[0].event != "submit" or seq[0].from_state is not None:
            problems.append(f"job {job_id}: history does not start with its submit\n{history.rows(job_id)}")
            continue
        for before, after in itertools.pairwise(seq):
            if after.from_state != before.to_state:
                problems.append(f"job {job_id}: {after.event} from {after.from_state} after {before.to_state}"
                                f"\n{history.rows(job_id)}")  # fmt: skip
        if seq[-1].to_state != job.state:
            problems.append(f"job {job_id} is {job.state} but its history ends in {seq[-1].to_state}"
                            f"\n{history.rows(job_id)}")  # fmt: skip
    return problems


def ran_twice_at_once(history: History) -> list[str]:
    """Runs (dispatch to the event that ends it) of one job that overlap, in the order the events were
    written or on their clock; and results delivered more than once."""
    problems = []
    for job_id, seq in history.events.items():
        runs: list[tuple[float, float | None]] = []  # (dispatched at, ended at or None while running)
        for event in seq:
            if event.event == "dispatch":
                if runs and runs[-1][1] is None:
                    problems.append(f"job {job_id} dispatched while still running\n{history.rows(job_id)}")
                runs.append((event.at, None))
            elif event.event in RUN_ENDS and event.from_state == "PROCESSING" and runs:
                runs[-1] = (runs[-1][0], event.at)
        for (_, ended), (started, _) in itertools.pairwise(runs):
            if ended is not None and ended > started:
                problems.append(f"job {job_id}: a run began at {started} before the last ended at {ended}"
                                f"\n{history.rows(job_id)}")  # fmt: skip
        completions = sum(e.event == "complete" for e in seq)
        if completions > 1:
            problems.append(f"job {job_id} completed {completions} times\n{history.rows(job_id)}")
    return problems
