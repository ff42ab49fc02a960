"""Three real whisperd hosts on one PostgreSQL database (tests/support/fleet.py), each with its own state dir,
socket and one CPU worker running faster-whisper: submit anywhere, run anywhere, see, fetch and cancel
everything from any host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.fleet import SharedHistory, overlapping, start_hosts
from tests.support.postgres import Cluster
from whisperd.jobs import JobState

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(
    postgres: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[DaemonProcess], str]]:
    url = postgres.create_database("fleet_e2e")
    hosts = start_hosts(tmp_path_factory.mktemp("fleet"), url)
    yield hosts, url
    for host in hosts:
        host.stop()


def test_jobs_submitted_on_one_host_run_on_all_three(
    fleet: tuple[list[DaemonProcess], str], speech: dict[str, Path]
) -> None:
    (a, b, c), url = fleet
    clips = [str(speech[name]) for name in ("fox", "weather", "report")] * 3
    ids = [job.id for job in a.client.submit(clips)]
    done = a.wait_terminal(ids, timeout_s=240)
    assert {j.state for j in done} == {JobState.COMPLETED}
    attempts = [x for x in SharedHistory(url).attempts() if x.job_id in ids]
    assert {x.host for x in attempts} == {"a", "b", "c"}, attempts
    assert overlapping(attempts) == []
    # Any host lists them with the host that ran each, and hands out any result.
    listed = {j.id: j.host for j in c.client.status(ids)}
    assert set(listed.values()) == {"a", "b", "c"}
    ran_on_c = next(j for j, host in listed.items() if host == "c")
    assert b.client.result(ran_on_c).transcript.text.strip()
    shown = c.ctl("status", *map(str, ids))
    assert shown.returncode == 0 and "HOST" in shown.stdout, shown.stdout


def test_every_host_shows_every_hosts_workers(fleet: tuple[list[DaemonProcess], str]) -> None:
    (a, b, c), _url = fleet
    for host in (a, b, c):
        host.wait_for(lambda host=host: {w.host for w in host.client.stats().workers} == {"a", "b", "c"},
                      timeout_s=30, what="every host's workers")  # fmt: skip


def test_a_cancel_on_one_host_stops_the_job_on_another(
    fleet: tuple[list[DaemonProcess], str], speech: dict[str, Path]
) -> None:
    (a, b, c), url = fleet
    [job] = b.client.submit([str(speech["long"])])
    running = b.wait_state(job.id, JobState.PROCESSING, timeout_s=60)
    runner = {"a": a, "b": b, "c": c}[running.host or ""]
    other = a if runner is not a else b
    other.client.cancel([job.id])
    assert runner.wait_state(job.id, JobState.CANCELLED, timeout_s=10).state is JobState.CANCELLED
    # Its worker on the other host is free again well within the cancel grace.
    name = running.host

    def runner_idle() -> bool:
        return all(not w.jobs for w in runner.client.stats().workers if w.host == name)

    runner.wait_for(runner_idle, timeout_s=10, what="the runner's worker idle")
    events = [e for e in SharedHistory(url).events() if e[0] == job.id]
    assert [e[3] for e in events][-1] == "cancel" and "complete" not in [e[3] for e in events]
