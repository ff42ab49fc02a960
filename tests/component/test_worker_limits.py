"""What a hostile or broken job can make a worker do, seen from the whole daemon built in-process (the real
wiring, the real worker loop with the scripted transcriber of tests/support/fake_worker.py, a fake clock):
every way a job kills or wedges its worker ends the job FAILED after its retries, the slot serves the next
job, errors name the user's file, and a sandboxed worker cannot reach the daemon's files or sockets."""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.support.inprocess import FakeClock, build, run_started, submit
from whisperd.app import App
from whisperd.config import Config, SchedulerConfig, WorkersConfig
from whisperd.jobs import JobState
from whisperd.sandbox import landlock_abi


class Rig:
    def __init__(self, app: App, clock: FakeClock, tmp_path: Path) -> None:
        self.app, self.clock, self.tmp_path = app, clock, tmp_path

    def submit(self, script: str) -> int:
        (job,) = submit(self.app, self.tmp_path, script)
        return job.id

    def state(self, job_id: int) -> JobState:
        return self.app.registry.get(job_id).state

    def events(self, job_id: int) -> list[str]:
        return [e.event for e in self.app.store.history(job_id)]

    async def run_until_done(self, job_id: int, step_s: float = 1000.0, timeout_s: float = 30) -> None:
        """Tick, letting the fake clock run on so that retries come due and deadlines pass, until the job
        ends; the workers run in real time meanwhile."""

        async def loop() -> None:
            while not self.state(job_id).terminal:
                self.app.daemon.tick()
                await asyncio.sleep(0.05)
                if self.state(job_id) is not JobState.PENDING:
                    self.clock.advance(step_s)

        await asyncio.wait_for(loop(), timeout_s)


def config(**workers: object) -> Config:
    return Config(
        workers=WorkersConfig(cpu_workers=1, start_timeout_s=20, **workers),  # type: ignore[arg-type]
        scheduler=SchedulerConfig(max_batch_size=1),
    )


def scenario(tmp_path: Path, cfg: Config, body: Callable[[Rig], Awaitable[None]]) -> None:
    clock = FakeClock()
    app = build(tmp_path, cfg, clock=clock)

    run_started(app, lambda: body(Rig(app, clock, tmp_path)), 60)


def retries(cfg: Config, max_retries: int) -> Config:
    cfg.scheduler.max_retries = max_retries
    return cfg


# ---- deaths and stalls the job is to blame for -------------------------------------------------------------


def test_a_job_that_kills_its_worker_every_time_fails_after_its_retries_and_the_slot_serves_on(
    tmp_path: Path,
) -> None:
    async def body(rig: Rig) -> None:
        crasher = rig.submit("crash-always")
        await rig.run_until_done(crasher)
        job = rig.app.registry.get(crasher)
        assert (job.state, job.retries) == (JobState.FAILED, 3)
        assert rig.events(crasher).count("fail") == 4, "1 + max_retries attempts, each a death"
        after = rig.submit("segments=1")
        await rig.run_until_done(after)
        assert rig.state(after) is JobState.COMPLETED
        assert rig.app.registry.get(after).worker == "cpu0"

    scenario(tmp_path, config(restart_backoff_s=0.05, restart_backoff_max_s=30.0), body)


def test_a_job_that_stops_reporting_is_killed_at_the_progress_timeout_and_retried(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        stuck = rig.submit("segments=2 segment_s=30")
        await rig.run_until_done(stuck, step_s=61)
        job = rig.app.registry.get(stuck)
        assert (job.state, job.retries) == (JobState.FAILED, 1)
        assert rig.events(stuck) == ["submit", "dispatch", "fail", "backoff_elapsed", "dispatch", "fail"]
        assert job.error is not None and "progress_timeout_s" in job.error

    scenario(tmp_path, retries(config(progress_timeout_s=60), 1), body)


def test_a_job_whose_worker_passes_the_memory_cap_fails(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        hog = rig.submit("hog=400000000 segments=1 segment_s=30")
        await rig.run_until_done(hog, step_s=0)
        assert rig.events(hog) == ["submit", "dispatch", "fail"]
        assert rig.state(hog) is JobState.FAILED
        fine = rig.submit("segments=1")
        await rig.run_until_done(fine)
        assert rig.state(fine) is JobState.COMPLETED

    scenario(tmp_path, retries(config(max_memory_bytes=150 * 1024**2), 0), body)


# ---- replies the daemon could not use --------------------------------------------------------------------


def test_a_reply_the_daemon_cannot_decode_fails_the_job_instead_of_leaving_it_processing(
    tmp_path: Path,
) -> None:
    async def body(rig: Rig) -> None:
        garbled = rig.submit("garble segments=3 segment_s=0.3")
        await rig.run_until_done(garbled, step_s=0)
        assert rig.events(garbled) == ["submit", "dispatch", "fail"]

    scenario(tmp_path, retries(config(), 0), body)


def test_nan_in_a_transcript_completes_the_job_with_finite_numbers(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        job_id = rig.submit("nan")
        await rig.run_until_done(job_id)
        assert rig.state(job_id) is JobState.COMPLETED
        transcript = rig.app.registry.transcript(job_id)
        assert transcript is not None
        times = [x for s in transcript.segments for x in (s.start, s.end)]
        assert all(math.isfinite(x) for x in [*times, transcript.duration_s, transcript.language_probability])

    scenario(tmp_path, config(), body)


def test_a_failure_names_the_submitted_file_not_the_spool(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        job_id = rig.submit("undecodable")
        await rig.run_until_done(job_id)
        job = rig.app.registry.get(job_id)
        assert job.state is JobState.FAILED and job.retries == 0
        assert job.error is not None and job.error.startswith(f"{job.filename}: ")
        assert "spool" not in job.error

    scenario(tmp_path, config(), body)


# ---- the sandbox -----------------------------------------------------------------------------------------


async def probe(rig: Rig, script: str) -> str:
    """Run a job whose worker tries what the script says; the transcript's text says what happened."""
    job_id = rig.submit(script)
    await rig.run_until_done(job_id)
    transcript = rig.app.registry.transcript(job_id)
    assert transcript is not None, rig.app.registry.get(job_id).error
    return transcript.text


def listening_unix_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


@pytest.mark.parametrize("sandbox", [True, False])
def test_a_sandboxed_worker_cannot_open_the_database_nor_connect_to_a_unix_socket(
    tmp_path: Path, sandbox: bool
) -> None:
    if sandbox and landlock_abi() == 0:
        pytest.skip("this kernel has no Landlock (Linux 5.13 or later, with landlock among its LSMs)")
    database = tmp_path / "jobs.sqlite3"  # the daemon's own database, as build() makes it
    control = listening_unix_socket(Path(os.path.realpath(tmp_path)) / "control.sock")
    tcp = socket.create_server(("127.0.0.1", 0))
    port = tcp.getsockname()[1]

    async def body(rig: Rig) -> None:
        opened = await probe(rig, f"open={database}")
        connected = await probe(rig, f"connect={control.getsockname()}")
        over_tcp = await probe(rig, f"tcp={port}")
        if not sandbox:  # the same probes succeed without it: they do test something
            assert (opened, connected, over_tcp) == ("opened", "connected", "connected")
            return
        assert opened.startswith("refused"), opened
        assert connected.startswith("refused"), connected
        if landlock_abi() >= 4:
            assert over_tcp.startswith("refused"), over_tcp

    try:
        scenario(tmp_path, config(sandbox=sandbox), body)
    finally:
        control.close()
        tcp.close()
