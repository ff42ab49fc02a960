"""SIGKILL of busy workers mid-job, several times, on a real daemon with real faster-whisper workers: every
job completes, the job that was running counts exactly one retry per kill, and its batch-mates go back to the
queue uncounted; checked from the jobs and their history (job_events). In sequential mode, where one job
runs at a time and can be blamed; batched mode's suspects (jobs decoded together, each run alone after a
death) are checked in tests/component/test_fleet.py and test_outcomes.py."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import history as h
from tests.support.daemon import DaemonProcess
from whisperd.jobs import JobState

pytestmark = pytest.mark.e2e

KILLS = int(os.environ.get("WHISPERD_FAULT_WORKER_KILLS", "8"))
MAX_RETRIES = 3
CONFIG = {
    "transcribe": {"mode": "sequential"},
    "workers": {"cpu_workers": 2, "restart_backoff_s": 0.2, "restart_backoff_max_s": 0.5},
    "scheduler": {"retry_backoff_s": 0.2, "max_retries": MAX_RETRIES, "max_batch_size": 3},
}


def let_go(daemon: DaemonProcess, job_id: int, kills: int) -> Callable[[], bool]:
    """The daemon has settled the killed worker's job: off that run (requeued, or retried and counted)."""

    def settled() -> bool:
        job = daemon.job(job_id)
        return job.state is not JobState.PROCESSING or job.retries >= kills

    return settled


def test_sigkill_of_busy_workers_retries_the_running_job_once_and_requeues_its_batch_mates(
    tmp_path: Path, speech: dict[str, Path], figures: list[str]
) -> None:
    daemon = DaemonProcess(tmp_path / "state", CONFIG).start()
    # A long clip first in each batch: it reports progress for seconds, which is when its worker dies; the
    # short ones behind it are its batch-mates.
    batch = [str(speech["long"]), str(speech["fox"]), str(speech["weather"])]
    ids: list[int] = []
    culprits: Counter[int] = Counter()  # job -> times its worker was killed while it ran
    mates: Counter[int] = Counter()  # job -> times it waited in a batch whose worker was killed
    try:
        deadline = time.monotonic() + 300
        while sum(culprits.values()) < KILLS:
            if time.monotonic() > deadline:
                tail = daemon.log()[-4000:]
                pytest.fail(f"only {sum(culprits.values())} kills in 300 s; the log ends:\n{tail}")
            stats = daemon.client.stats()
            if stats.queue_depth + stats.running_jobs == 0:
                ids += [j.id for j in daemon.client.submit(batch * 2)]
                continue
            target = None
            for worker in stats.workers:
                if worker.state != "busy" or not worker.pid:
                    continue
                jobs = daemon.client.status(worker.jobs)
                # Progress means the worker said it started the job: the daemon knows which one it runs.
                running = [j for j in jobs if j.state is JobState.PROCESSING and 0 < j.progress < 60]
                if running and running[0].id not in culprits:
                    waiting = [j.id for j in jobs if j.state is JobState.PROCESSING and j.id != running[0].id]
                    target = (worker.pid, running[0].id, waiting)
                    break
            if target is None:
                time.sleep(0.05)
                continue
            pid, culprit, waiting = target
            os.kill(pid, signal.SIGKILL)
            culprits[culprit] += 1
            mates.update(waiting)
            daemon.wait_for(let_go(daemon, culprit, culprits[culprit]), 30, f"job {culprit} let go")
        final = daemon.wait_terminal(ids, timeout_s=300)
        restarts = sum(w.restarts for w in daemon.client.stats().workers)
    finally:
        daemon.stop()

    stored = h.read(daemon.state_dir / "jobs.sqlite3")
    kills = sum(culprits.values())
    figures.append(
        f"SIGKILL of a busy worker: {kills} kills, {len(ids)} jobs, {sum(mates.values())} batch-mates "
        f"requeued; {sum(j.state is JobState.COMPLETED for j in final)} completed, "
        f"{sum(j.retries for j in final)} retries counted, {restarts} worker restarts"
    )
    print(figures[-1])
    assert [j.state for j in final] == [JobState.COMPLETED] * len(ids)
    assert restarts == kills
    for job_id in ids:
        events = [e.event for e in stored.events[job_id]]
        why = f"job {job_id} (running at {culprits[job_id]} kills, waiting at {mates[job_id]}):\n"
        why += stored.rows(job_id)
        # The running job: one retry counted per kill, nothing else counted.
        assert stored.jobs[job_id].retries == culprits[job_id], why
        assert events.count("fail") == culprits[job_id], why
        # Its batch-mates: back to the queue, uncounted.
        assert events.count("requeue") == mates[job_id], why
        assert events.count("dispatch") == 1 + culprits[job_id] + mates[job_id], why
        assert events[-1] == "complete", why
    assert not h.ran_twice_at_once(stored)
    assert not h.broken_chains(stored)
    assert stored.integrity == "ok"
