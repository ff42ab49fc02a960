"""kill -9 of the daemon's whole process group at random moments, with jobs being submitted, queued and run
by real faster-whisper workers, round after round; then one last start that finishes everything. Checked
from the jobs and their history (job_events): no acknowledged job is lost, none completed without its
transcript, none ran twice at the same time, retries stay within the limit, and the database is intact after
every kill.

The kill delays come from a seeded generator: the seed is printed and in every failure message; set
WHISPERD_FAULT_SEED to replay it and WHISPERD_FAULT_ROUNDS for more rounds (CI runs the default)."""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from tests.support import history as h
from tests.support.daemon import DaemonProcess
from whisperctl.client import Client, RemoteError, Unreachable
from whisperd.protocol import Transcript

pytestmark = pytest.mark.e2e

ROUNDS = int(os.environ.get("WHISPERD_FAULT_ROUNDS", "30"))
MAX_RETRIES = 3
BACKLOG = 60  # jobs queued or running; the submitter waits below it, so that the last drain stays short
STARTUP_KILL_SHARE = 0.25  # rounds whose kill comes while the daemon starts up (recovering, spawning)
RETRY_LATER = {"busy", "storage_busy"}  # refusals that change nothing and ask the caller to retry
CONFIG = {
    "workers": {"cpu_workers": 2, "restart_backoff_s": 0.2, "restart_backoff_max_s": 1.0},
    "scheduler": {"retry_backoff_s": 0.2, "max_retries": MAX_RETRIES, "batch_timeout_s": 0.2},
}


@dataclass
class Submitter:
    """Submits batches of 1-3 clips for as long as it runs, whether the daemon is up or not."""

    client: Client
    clips: list[Path]
    rng: random.Random
    acked: list[int] = field(default_factory=list)
    cut_off: int = 0  # submits whose connection the kill cut before the reply
    refused: list[str] = field(default_factory=list)  # error replies but "try again later": none is expected
    busy: int = 0  # "try again later" replies (nothing was done)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                stats = self.client.stats()
            except Exception:
                time.sleep(0.02)  # down, or going down
                continue
            if stats.queue_depth + stats.running_jobs >= BACKLOG:
                time.sleep(0.05)
                continue
            files = [str(self.rng.choice(self.clips)) for _ in range(self.rng.randint(1, 3))]
            try:
                jobs = self.client.submit(files)
            except Unreachable:
                continue
            except RemoteError as exc:
                if exc.code in RETRY_LATER:
                    self.busy += 1
                else:
                    self.refused.append(f"{exc.code}: {exc}")
                continue
            except Exception:
                self.cut_off += 1  # reset, closed or timed out mid-request: the job may or may not exist
                continue
            self.acked.extend(j.id for j in jobs)
            time.sleep(self.rng.uniform(0, 0.05))


def said(job: h.Job) -> str:
    """The words of a job's stored transcript ("" if it has none)."""
    return msgspec.json.decode(job.transcript, type=Transcript).text.strip() if job.transcript else ""


def test_kill_9_of_the_daemon_at_random_moments_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, speech: dict[str, Path], figures: list[str]
) -> None:
    seed = int(os.environ.get("WHISPERD_FAULT_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    tag = f"[seed {seed}, set WHISPERD_FAULT_SEED={seed} to replay]"
    print(f"kill -9 rounds: {tag}")
    daemon = DaemonProcess(tmp_path / "state", CONFIG)
    clips = [speech[name] for name in ("fox", "weather", "report")] * 3 + [speech["medium"]]
    submitter = Submitter(Client(str(daemon.socket), timeout_s=10), clips, random.Random(seed + 1))
    thread = threading.Thread(target=submitter.run, name="submitter", daemon=True)
    thread.start()
    startup_kills = 0
    in_flight_at_kill: list[int] = []
    try:
        for round_no in range(1, ROUNDS + 1):
            if rng.random() < STARTUP_KILL_SHARE:
                daemon.start(own_group=True, wait=False)
                time.sleep(rng.uniform(0.05, 1.0))
                startup_kills += 1
            else:
                daemon.start(own_group=True)
                time.sleep(rng.uniform(0.3, 3.0))
            before_kill = set(submitter.acked)  # each acknowledged only after its commit
            daemon.kill_group()
            crashed = h.read_crashed(daemon.state_dir, tmp_path / f"crash-{round_no}")
            assert crashed.integrity == "ok", f"round {round_no} {tag}: {crashed.integrity}"
            missing = sorted(before_kill - set(crashed.jobs))
            assert not missing, f"round {round_no} {tag}: acknowledged jobs not in the store: {missing}"
            in_flight_at_kill.append(
                sum(j.state in ("PENDING", "PROCESSING", "RETRYING") for j in crashed.jobs.values())
            )
        submitter.stop.set()
        thread.join(30)
        daemon.start(own_group=True)
        daemon.wait_for(
            lambda: (s := daemon.client.stats()).queue_depth == 0 and s.running_jobs == 0,
            300,
            f"every job ended {tag}",
        )
        assert daemon.stop() == 0
    finally:
        submitter.stop.set()
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill_group()

    final = h.read(daemon.state_dir / "jobs.sqlite3")
    acked = set(submitter.acked)
    lost = sorted(acked - set(final.jobs))
    unfinished = sorted(j.id for j in final.jobs.values() if j.state not in ("COMPLETED", "FAILED"))
    no_transcript = sorted(j.id for j in final.jobs.values() if j.state == "COMPLETED" and not said(j))
    failed_without_reason = sorted(j.id for j in final.jobs.values() if j.state == "FAILED" and not j.error)
    over_limit = sorted(j.id for j in final.jobs.values() if j.retries > MAX_RETRIES)
    twice = h.ran_twice_at_once(final)
    chains = h.broken_chains(final)
    completed = sum(j.state == "COMPLETED" for j in final.jobs.values())
    failed = sum(j.state == "FAILED" for j in final.jobs.values())
    figures.append(
        f"kill -9 of the daemon's process group {tag}: {ROUNDS} rounds ({startup_kills} during start-up); "
        f"{len(acked)} jobs acknowledged, {len(set(final.jobs) - acked)} committed but not acknowledged, "
        f"{submitter.cut_off} submits cut off, {submitter.busy} told to retry; "
        f"up to {max(in_flight_at_kill)} jobs live at a kill, {final.count('requeue')} requeued by recovery; "
        f"{completed} completed, {failed} failed; lost {len(lost)}, completed without transcript "
        f"{len(no_transcript)}, ran twice at once {len(twice)}, over the retry limit {len(over_limit)}; "
        f"integrity {final.integrity}, and ok after each of the {ROUNDS} kills"
    )
    print(figures[-1])
    assert not submitter.refused, f"{tag} submits refused: {submitter.refused[:5]}"
    assert acked, f"{tag} no submit was ever acknowledged"
    assert final.integrity == "ok", tag
    assert not lost, f"{tag} acknowledged jobs lost: {lost}"
    assert not unfinished, f"{tag} jobs not finished: " + "\n".join(final.rows(i) for i in unfinished[:5])
    assert not no_transcript, f"{tag} completed without a transcript: {no_transcript}"
    assert not failed_without_reason, f"{tag} failed without a reason: {failed_without_reason}"
    assert not over_limit, f"{tag} retried beyond {MAX_RETRIES}: {over_limit}"
    assert not twice, f"{tag}\n" + "\n".join(twice[:5])
    assert not chains, f"{tag}\n" + "\n".join(chains[:5])
    assert list((daemon.state_dir / "spool").iterdir()) == [], f"{tag} spooled audio left behind"


def test_kill_9_right_after_concurrent_submits_were_acknowledged_loses_none_of_them(
    tmp_path: Path, speech: dict[str, Path], figures: list[str]
) -> None:
    """Group commit: concurrent submits share one flush, and each is acknowledged only after it. Killed the
    moment an acknowledgement arrives (no workers, so nothing but the submits moves), the daemon restarts
    with every acknowledged job queued."""
    seed = int(os.environ.get("WHISPERD_FAULT_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    tag = f"[seed {seed}, set WHISPERD_FAULT_SEED={seed} to replay]"
    daemon = DaemonProcess(
        tmp_path / "state", {"workers": {"cpu_workers": 0}, "daemon": {"max_spools_per_user": 16}}
    )
    acked: list[int] = []
    lock = threading.Lock()
    rounds, submitters = 3, 6
    try:
        for _ in range(rounds):
            daemon.start(own_group=True)
            killed = threading.Event()
            kill_after = len(acked) + rng.randint(20, 200)

            def submit_until_killed(target: int = kill_after, killed: threading.Event = killed) -> None:
                client = Client(str(daemon.socket), timeout_s=10)
                while not killed.is_set():
                    try:
                        jobs = client.submit([str(speech["fox"])])
                    except Exception:
                        continue  # cut off by the kill, or told to retry
                    with lock:
                        acked.extend(j.id for j in jobs)
                        if len(acked) >= target and not killed.is_set():
                            killed.set()
                            daemon.kill_group()  # right after this acknowledgement, others in flight

            threads = [threading.Thread(target=submit_until_killed, daemon=True) for _ in range(submitters)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert killed.is_set(), f"{tag} the submitters stopped before the kill"
        daemon.start(own_group=True)
        found: dict[int, str] = {}
        for i in range(0, len(acked), 500):
            found.update((j.id, j.state.value) for j in daemon.client.status(acked[i : i + 500]))
        assert daemon.stop() == 0
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill_group()
    lost = sorted(set(acked) - set(found))
    figures.append(
        f"kill -9 right after an acknowledgement {tag}: {rounds} rounds, {submitters} concurrent submitters, "
        f"{len(acked)} jobs acknowledged, lost {len(lost)}"
    )
    assert not lost, f"{tag} acknowledged jobs lost: {lost[:20]}"
    assert set(found.values()) == {"PENDING"}, f"{tag} {sorted(set(found.values()))}"


def test_the_history_checks_see_a_job_run_twice_and_a_broken_chain() -> None:
    """The checks above can fail: overlapping runs, a second result and a gap in the chain are all seen."""

    def history(*events: tuple[float, str | None, str, str]) -> h.History:
        rows = [h.Event(1, at, old, new, event, "cpu0", None) for at, old, new, event in events]
        return h.History("ok", {1: h.Job(1, rows[-1].to_state, 0, None, None, b"{}")}, {1: rows})

    fine = history(
        (0, None, "PENDING", "submit"),
        (1, "PENDING", "PROCESSING", "dispatch"),
        (2, "PROCESSING", "PENDING", "requeue"),
        (3, "PENDING", "PROCESSING", "dispatch"),
        (4, "PROCESSING", "COMPLETED", "complete"),
    )
    assert h.ran_twice_at_once(fine) == [] and h.broken_chains(fine) == []
    twice = history(
        (0, None, "PENDING", "submit"),
        (1, "PENDING", "PROCESSING", "dispatch"),
        (2, "PENDING", "PROCESSING", "dispatch"),
        (3, "PROCESSING", "COMPLETED", "complete"),
    )
    assert len(h.ran_twice_at_once(twice)) == 1 and len(h.broken_chains(twice)) == 1
    overlap = history(
        (0, None, "PENDING", "submit"),
        (5, "PENDING", "PROCESSING", "dispatch"),
        (9, "PROCESSING", "PENDING", "requeue"),
        (7, "PENDING", "PROCESSING", "dispatch"),
        (8, "PROCESSING", "COMPLETED", "complete"),
        (9, "COMPLETED", "COMPLETED", "complete"),
    )
    assert len(h.ran_twice_at_once(overlap)) == 2  # a run began before the last ended; two results
