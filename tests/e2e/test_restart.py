"""Stop whisperd with work in flight (SIGTERM drains, kill -9 does not) and start it again: every job
completes, none is lost, none runs twice at the same time."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from whisperd.jobs import JobState

pytestmark = pytest.mark.e2e

ENDS = {"requeue", "fail", "fail_fatal", "complete", "cancel"}


def history(state_dir: Path) -> dict[int, list[str]]:
    with sqlite3.connect(state_dir / "jobs.sqlite3") as db:
        rows = db.execute("SELECT job_id, event FROM job_events ORDER BY rowid").fetchall()
    events: dict[int, list[str]] = {}
    for job_id, event in rows:
        events.setdefault(job_id, []).append(event)
    return events


def assert_never_ran_twice_at_once(events: dict[int, list[str]]) -> None:
    for job_id, seq in events.items():
        running = False
        for event in seq:
            if event == "dispatch":
                assert not running, f"job {job_id} dispatched while still running: {seq}"
                running = True
            elif event in ENDS:
                running = False
        assert seq.count("complete") == 1, f"job {job_id} completed {seq.count('complete')} times: {seq}"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm-drains", "kill-9"])
def test_restart_with_jobs_pending_and_processing(tmp_path: Path, speech: dict[str, Path], sig: int) -> None:
    config = {"workers": {"cpu_workers": 2}, "daemon": {"drain_timeout_s": 60}}
    daemon = DaemonProcess(tmp_path / "state", config).start()
    # Two workers take batches of three; the last three wait.
    short = [speech[name] for name in ("fox", "weather", "report")]
    clips = [speech["medium"], *short, *short, speech["medium"], speech["fox"]]
    ids = [j.id for j in daemon.client.submit([str(c) for c in clips])]
    daemon.wait_for(
        lambda: sum(j.state is JobState.PROCESSING for j in daemon.client.status(ids)) >= 2,
        60,
        "two processing",
    )
    before = daemon.client.status(ids)
    processing = [j.id for j in before if j.state is JobState.PROCESSING]
    pending = [j.id for j in before if j.state is JobState.PENDING]
    assert pending, f"some work must still wait: {[(j.id, j.state, j.worker) for j in before]}"
    worker_pids = [w.pid for w in daemon.client.stats().workers if w.pid]
    daemon.stop(sig, timeout_s=120)

    if sig == signal.SIGKILL:
        # The workers die with their daemon, so nothing of the old run can overlap the new one.
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in worker_pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in worker_pids), "workers outlived a killed daemon"
    else:
        # Draining let the running jobs finish and left the waiting ones queued.
        states = {j: e[-1] for j, e in history(daemon.state_dir).items()}
        assert all(states[j] == "complete" for j in processing), states
        assert all(states[j] == "submit" for j in pending), states
        assert "draining" in daemon.log()

    again = DaemonProcess(tmp_path / "state", config)
    again.socket, again.client = daemon.socket, daemon.client
    again.start()
    try:
        final = again.wait_terminal(ids, timeout_s=300)
        assert [j.state for j in final] == [JobState.COMPLETED] * len(ids)
        assert_never_ran_twice_at_once(history(again.state_dir))
        # A finished job's audio goes once its end is durable: a flush after the last result, not before.
        again.wait_for(lambda: list((again.state_dir / "spool").iterdir()) == [], 10, "no spooled audio left")
    finally:
        again.stop()


def test_a_worker_that_ignores_cancel_past_the_grace_is_killed(
    tmp_path: Path, speech: dict[str, Path]
) -> None:
    daemon = DaemonProcess(tmp_path / "state", {"workers": {"cpu_workers": 1, "cancel_grace_s": 0.1}}).start()
    try:
        [job] = daemon.client.submit([str(speech["long"])])
        daemon.wait_state(job.id, JobState.PROCESSING)
        time.sleep(1.0)  # decoding under way: batched mode reports progress only as its calls end
        assert daemon.client.cancel([job.id]).jobs[0].state is JobState.CANCELLED
        daemon.wait_for(lambda: daemon.client.stats().workers[0].restarts == 1, 10, "the worker killed")
        [after] = daemon.client.submit([str(speech["fox"])])
        [final] = daemon.wait_terminal([after.id], timeout_s=120)
        assert final.state is JobState.COMPLETED and final.retries == 0, "a restarted worker serves on"
        assert daemon.job(job.id).state is JobState.CANCELLED
        assert daemon.client.stats().workers[0].restarts == 1
    finally:
        daemon.stop()
