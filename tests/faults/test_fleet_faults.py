"""Failures of a fleet of whisperd hosts sharing one PostgreSQL database (tests/support/fleet.py), each with
one CPU worker running faster-whisper: a host killed with kill -9 with jobs in flight, a host stopped
(SIGSTOP) past its lease and then resumed, and the database itself stopped and started again under load.
Checked from the database's jobs and their history (job_events, with the host and attempt of each event):
nothing acknowledged is lost, every job completes once, no two attempts of a job overlap, and a host that
lost its lease never commits over the new owner."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.fleet import SharedHistory, overlapping, start_hosts
from tests.support.postgres import Cluster
from whisperctl.client import RemoteError, Unreachable
from whisperd.jobs import JobState

pytestmark = pytest.mark.e2e

LEASE_S = 3.0


@pytest.fixture
def hosts_and_url(
    postgres: Cluster, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[list[DaemonProcess], str]]:
    url = postgres.create_database(f"faults_{request.node.name[:40].lower()}")
    hosts = start_hosts(tmp_path, url, lease_s=LEASE_S)
    yield hosts, url
    for host in hosts:
        if host.proc is not None and host.proc.poll() is None:
            os.kill(host.proc.pid, signal.SIGCONT)
            host.stop()


def by_host(host: DaemonProcess, ids: list[int]) -> dict[str, list[int]]:
    held: dict[str, list[int]] = {}
    for job in host.client.status(ids):
        if job.state is JobState.PROCESSING and job.host:
            held.setdefault(job.host, []).append(job.id)
    return held


def test_kill_9_of_a_host_with_jobs_in_flight(
    hosts_and_url: tuple[list[DaemonProcess], str], speech: dict[str, Path], figures: list[str]
) -> None:
    (a, _b, c), url = hosts_and_url
    ids = [j.id for j in a.client.submit([str(speech["medium"])] * 9)]
    a.wait_for(lambda: "c" in by_host(a, ids), timeout_s=60, what="host c running jobs")
    on_c = by_host(a, ids)["c"]
    c.kill_group()
    killed_at = time.monotonic()
    done = a.wait_terminal(ids, timeout_s=240)
    figures.append(f"fleet kill -9: {len(on_c)} jobs of the killed host done elsewhere "
                   f"{time.monotonic() - killed_at:.1f} s after the kill (lease {LEASE_S} s)")  # fmt: skip
    assert {j.state for j in done} == {JobState.COMPLETED}
    assert all(j.retries == 0 for j in done), "a host's death counts nothing against its jobs"
    history = SharedHistory(url)
    attempts = [x for x in history.attempts() if x.job_id in ids]
    assert overlapping(attempts) == []
    for job_id in on_c:
        mine = [x for x in attempts if x.job_id == job_id]
        assert [x.ended_by for x in mine if x.host == "c"] == ["lease_expired"], mine
        assert [x.host for x in mine if x.ended_by == "complete"] in (["a"], ["b"]), mine
    completes = Counter(e[0] for e in history.events() if e[3] == "complete")
    assert all(completes[job_id] == 1 for job_id in ids)


def test_a_host_stopped_past_its_lease_loses_its_late_result(
    hosts_and_url: tuple[list[DaemonProcess], str], speech: dict[str, Path]
) -> None:
    hosts, url = hosts_and_url
    a = hosts[0]
    [job] = a.client.submit([str(speech["long"])])  # seconds of work: the stop comes while it runs
    runner_name = a.wait_state(job.id, JobState.PROCESSING, timeout_s=60).host
    runner = hosts["abc".index(runner_name or "a")]
    watcher = next(h for h in hosts if h is not runner)
    assert runner.proc is not None
    os.kill(runner.proc.pid, signal.SIGSTOP)  # the daemon only: its worker goes on and finishes
    try:
        done = watcher.wait_state(job.id, JobState.COMPLETED, timeout_s=120)
    finally:
        os.kill(runner.proc.pid, signal.SIGCONT)
    assert done.host != runner_name
    # Resumed, the stopped host hears that the job is no longer its own, or tries its late result.
    runner.wait_for(lambda: not any(w.jobs for w in runner.client.stats().workers if w.host == runner_name),
                    timeout_s=30, what="the resumed host's worker idle")  # fmt: skip
    time.sleep(LEASE_S)  # a heartbeat or two of the resumed host
    events = [e for e in SharedHistory(url).events() if e[0] == job.id]
    completes = [e for e in events if e[3] == "complete"]
    assert [(e[4], e[5]) for e in completes] == [(done.host, 2)], events
    assert ("lease_expired", 1) in [(e[3], e[5]) for e in events]  # requeued by another host
    assert all(e[4] != runner_name for e in events if e[3] in ("complete", "fail", "requeue")), events
    assert runner.job(job.id).state is JobState.COMPLETED
    assert SharedHistory(url).transcripts()[job.id]


def test_postgres_stopped_and_started_under_load_loses_nothing(
    hosts_and_url: tuple[list[DaemonProcess], str], speech: dict[str, Path], postgres: Cluster,
    figures: list[str],
) -> None:  # fmt: skip
    hosts, url = hosts_and_url
    clips = [str(speech[name]) for name in ("fox", "weather", "report")]
    acked: list[int] = []
    refused: Counter[str] = Counter()
    stop = threading.Event()

    def submit() -> None:
        turn = 0
        while not stop.is_set():
            host = hosts[turn % len(hosts)]
            turn += 1
            try:
                acked.extend(j.id for j in host.client.submit([clips[turn % len(clips)]]))
            except RemoteError as exc:
                refused[exc.code] += 1
            except Unreachable:
                refused["unreachable"] += 1
            time.sleep(0.1)

    submitter = threading.Thread(target=submit)
    submitter.start()
    try:
        time.sleep(3)
        postgres.down()
        time.sleep(4)
        postgres.up()
        time.sleep(4)
    finally:
        stop.set()
        submitter.join()
    figures.append(
        f"fleet PostgreSQL down 4 s under load: {len(acked)} submits acknowledged, refused {dict(refused)}"
    )
    assert set(refused) <= {"storage_unavailable"}, refused
    assert refused["storage_unavailable"] > 0, "submits while the database was down are refused"
    done = hosts[0].wait_terminal(acked, timeout_s=300)
    assert {j.state for j in done} == {JobState.COMPLETED}
    history = SharedHistory(url)
    completes = Counter(e[0] for e in history.events() if e[3] == "complete")
    assert all(completes[job_id] == 1 for job_id in acked), completes
    assert overlapping([x for x in history.attempts() if x.job_id in acked]) == []
    assert all(history.transcripts()[job_id] for job_id in acked)
