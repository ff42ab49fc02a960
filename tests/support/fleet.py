"""Several real whisperd hosts on this one machine sharing one PostgreSQL database: each with its own state
dir, socket and CPU workers. And the shared history read back from the database (job_events with host and
attempt), for the checks the fleet tests make: every job ends once, and no two attempts of a job ever ran at
the same time."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from tests.support.daemon import DaemonProcess

# Events that end an attempt on a host (PROCESSING -> something else).
ATTEMPT_ENDS = frozenset({"complete", "fail", "fail_fatal", "requeue", "cancel", "lease_expired"})


def host_config(
    url: str, host_id: str, lease_s: float = 3.0, **sections: Mapping[str, Any]
) -> dict[str, Any]:
    """A host of the fleet: short leases and heartbeats (a stopped host's jobs come back within seconds),
    one CPU worker, no GPU."""
    config: dict[str, Any] = {
        "store": {"url": url, "host_id": host_id, "lease_s": lease_s, "heartbeat_interval_s": lease_s / 3,
                  "reconnect_backoff_s": 0.2, "reconnect_backoff_max_s": 1.0, "connect_timeout_s": 1.0},
        "daemon": {"socket_mode": 0o666},
        "scheduler": {"retry_backoff_s": 0.2, "batch_timeout_s": 0.2},
        "workers": {"cpu_workers": 1, "restart_backoff_s": 0.2, "restart_backoff_max_s": 1.0},
        "transcribe": {"shard_min_audio_s": 0.0},  # one job, one host: each attempt is what is checked
        "gpu": {"enabled": False},
    }  # fmt: skip
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def start_hosts(
    root: Path, url: str, names: str = "abc", **sections: Mapping[str, Any]
) -> list[DaemonProcess]:
    hosts = [DaemonProcess(root / name, host_config(url, name, **sections)) for name in names]
    for host in hosts:
        host.start(own_group=True)
    return hosts


@dataclass(frozen=True)
class Attempt:
    job_id: int
    attempt: int
    host: str
    start: float
    end: float | None  # None: still running
    ended_by: str | None


class SharedHistory:
    """The database's view of the fleet's jobs, for the tests' checks."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql, args).fetchall()

    def events(self) -> list[tuple[int, str | None, str, str, str | None, int | None]]:
        """(job_id, from_state, to_state, event, host, attempt) in commit order."""
        rows = self._rows(
            "SELECT job_id, from_state, to_state, event, host, attempt FROM job_events ORDER BY id"
        )
        return [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def states(self) -> dict[int, str]:
        return {r[0]: r[1] for r in self._rows("SELECT id, state FROM jobs")}

    def transcripts(self) -> dict[int, bytes | None]:
        return {r[0]: r[1] for r in self._rows("SELECT id, transcript FROM jobs")}

    def attempts(self) -> list[Attempt]:
        """Each attempt of each job: the host that claimed it, from its dispatch to what ended it. Times are
        the database's own (its clock, one for every host): the order of commits."""
        rows = self._rows(
            "SELECT job_id, event, host, attempt, id FROM job_events "
            "WHERE event IN ('dispatch', 'complete', 'fail', 'fail_fatal', 'requeue', 'cancel', "
            "'lease_expired') ORDER BY id"
        )
        open_: dict[int, tuple[int, str, float]] = {}
        attempts: list[Attempt] = []
        for job_id, event, host, attempt, seq in rows:
            if event == "dispatch":
                open_[job_id] = (attempt, host, float(seq))
            elif job_id in open_:
                number, started_on, start = open_.pop(job_id)
                attempts.append(Attempt(job_id, number, started_on, start, float(seq), event))
        attempts += [Attempt(j, n, h, s, None, None) for j, (n, h, s) in open_.items()]
        return attempts


def overlapping(attempts: list[Attempt]) -> list[tuple[Attempt, Attempt]]:
    """Pairs of attempts of one job whose spans (in commit order) overlap: a job run twice at once."""
    pairs = []
    by_job = sorted(attempts, key=lambda a: (a.job_id, a.start))
    for _job, group in itertools.groupby(by_job, key=lambda a: a.job_id):
        runs = list(group)
        for first, second in itertools.pairwise(runs):
            if first.end is None or second.start < first.end:
                pairs.append((first, second))
    return pairs


def hosts_of(attempts: list[Attempt]) -> Iterator[str]:
    return (a.host for a in attempts)
