"""A job's decoding options (submit's `prompt` and `temperature`) from the request to the transcriber,
in-process: the real wiring and the daemon's own loop, the handlers called as the socket server calls them,
worker processes running the real worker loop with the scripted transcriber (tests/support/fake_worker.py),
whose script `echo-options` makes a transcript say the options its job's spec carried. And the shared
store's schema brought from version 2 to 3 (the options' columns) with its jobs."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import msgspec
import psycopg
import pytest

from tests.support.inprocess import FakeClock, build, fake_worker_spawner, run_looping, until
from tests.support.postgres import Cluster
from whisperd import pg_queue, pg_schema
from whisperd import protocol as p
from whisperd import workerproto as wp
from whisperd.app import App
from whisperd.batch import Batch
from whisperd.config import Config, SchedulerConfig, TranscribeConfig, WorkersConfig
from whisperd.handlers import Caller
from whisperd.jobs import JobState
from whisperd.pg_store import PgStore

PROMPT = "Ana, Bob; the Q3 budget."
CALLER = Caller(pid=os.getpid(), uid=os.geteuid(), gid=os.getegid())


def config(mode: str, batch_of: int = 1) -> Config:
    """One worker; batch_of: the jobs a batch waits for (so that jobs submitted apart share one)."""
    return Config(
        workers=WorkersConfig(cpu_workers=1, start_timeout_s=20),
        transcribe=TranscribeConfig(mode=mode),  # type: ignore[arg-type]
        scheduler=SchedulerConfig(
            min_batch_size=batch_of, max_batch_size=max(batch_of, 3), batch_timeout_s=30
        ),
    )


def scenario(tmp_path: Path, cfg: Config, body: Callable[[App, list[list[int]]], Awaitable[None]]) -> None:
    """body(app, batches): batches lists the job ids of each batch dispatched."""
    batched = cfg.transcribe.mode == "batched"
    app = build(tmp_path, cfg, clock=FakeClock(), spawner=fake_worker_spawner(tmp_path / "fw", batched))
    batches: list[list[int]] = []
    dispatch = app.fleet.dispatch

    def recording(worker_id: str, jobs: Sequence[wp.JobSpec], reserve_bytes: int) -> Batch:
        batches.append([j.job_id for j in jobs])
        return dispatch(worker_id, jobs, reserve_bytes)

    app.fleet.dispatch = recording  # type: ignore[method-assign]

    run_looping(app, lambda: body(app, batches))


async def submit(app: App, tmp_path: Path, script: str, **options: object) -> int:
    """One file through Handlers.submit, its descriptor passed as the socket server passes it."""
    source = tmp_path / f"audio-{len(list(tmp_path.iterdir()))}"
    source.write_text(script)
    fd = os.open(source, os.O_RDONLY)
    try:
        request = p.Submit(files=[p.SubmitFile(name=source.name, fd_index=0)], **options)  # type: ignore[arg-type]
        reply = await app.handlers.handle(request, CALLER, [fd])
    finally:
        os.close(fd)
    assert isinstance(reply, p.Jobs)
    [job] = reply.jobs
    return job.id


async def completed(app: App, *job_ids: int) -> None:
    await until(lambda: all(app.registry.get(i).state.terminal for i in job_ids), 30)
    assert [app.registry.get(i).state for i in job_ids] == [JobState.COMPLETED] * len(job_ids)


def text(app: App, job_id: int) -> str:
    transcript = app.registry.transcript(job_id)
    assert transcript is not None
    return transcript.text


def test_a_job_s_prompt_and_temperature_reach_the_transcriber_and_come_back_to_its_owner(
    tmp_path: Path,
) -> None:
    async def body(app: App, batches: list[list[int]]) -> None:
        asked = await submit(app, tmp_path, "echo-options", prompt=PROMPT, temperature=0.0)
        plain = await submit(app, tmp_path, "echo-options")
        empty = await submit(app, tmp_path, "echo-options", prompt="")
        await completed(app, asked, plain, empty)
        assert text(app, asked) == f"prompt={PROMPT!r} temperature=0.0"
        assert text(app, plain) == "prompt=None temperature=None", "faster-whisper's defaults stand"
        assert text(app, empty) == "prompt=None temperature=None", "an empty prompt is none"
        stored = app.store.get(asked)
        assert stored is not None and (stored.prompt, stored.temperature) == (PROMPT, 0.0)
        assert app.store.history(asked)[-1].event == "complete"

        result = await app.handlers.handle(p.Result(id=asked), CALLER, [])
        assert isinstance(result, p.ResultReply)
        assert (result.prompt, result.job.temperature) == (PROMPT, 0.0)
        listed = await app.handlers.handle(p.Status(ids=[asked, plain]), CALLER, [])
        assert isinstance(listed, p.Jobs)
        assert [j.temperature for j in listed.jobs] == [0.0, None]
        wire = msgspec.json.encode(listed)
        assert b'"temperature":0.0' in wire and PROMPT.encode() not in wire, "the queue shows no prompt"

    scenario(tmp_path, config("sequential"), body)


def test_jobs_of_one_batch_with_different_options_are_each_decoded_with_their_own(tmp_path: Path) -> None:
    async def body(app: App, batches: list[list[int]]) -> None:
        ids = [
            await submit(app, tmp_path, "echo-options windows=2", prompt=PROMPT, temperature=0.0),
            await submit(app, tmp_path, "echo-options windows=2"),
            await submit(app, tmp_path, "echo-options windows=2", prompt=PROMPT, temperature=0.5),
        ]
        await completed(app, *ids)
        assert batches == [ids], "one batch: the options of its jobs differ"
        said = [f"prompt={PROMPT!r} temperature=0.0", "prompt=None temperature=None",
                f"prompt={PROMPT!r} temperature=0.5"]  # fmt: skip
        assert [text(app, i) for i in ids] == [f"w0 {s} w1 {s}" for s in said]

    scenario(tmp_path, config("batched", batch_of=3), body)


# ---- the shared store's migration ------------------------------------------------------------------------


def test_a_shared_store_of_schema_2_gets_the_options_columns_and_keeps_its_jobs(
    monkeypatch: pytest.MonkeyPatch, postgres: Cluster, tmp_path: Path
) -> None:
    url = postgres.create_database("options_v2")
    with monkeypatch.context() as older, psycopg.connect(url, autocommit=True) as conn:
        older.setattr(pg_schema, "MIGRATIONS", pg_schema.MIGRATIONS[:2])
        older.setattr(pg_schema, "LATEST", 2)
        assert pg_schema.migrate(conn, "old") == [1, 2]
        pg_queue.register_host(conn, "a", "old")
        conn.execute(
            "INSERT INTO jobs (state, model, task, filename, owner_uid, submit_host, created_at, updated_at,"
            " queued_at) VALUES ('PENDING', 'tiny.en', 'transcribe', 'a.wav', 1000, 'a', 1, 1, 1)"
        )
    store = PgStore(url, "b", lease_s=30.0, release="test")
    store.open()
    try:
        [old] = store.live_jobs()
        assert (old.prompt, old.temperature, old.view().temperature) == (None, None, None)
        assert store.views([old.id], None, 1) == [old.view()]
    finally:
        store.close()
    with psycopg.connect(url, autocommit=True) as conn:
        assert pg_schema.version(conn) == 3
        rows = conn.execute("SELECT version FROM whisperd_schema ORDER BY version").fetchall()
        assert rows == [(1,), (2,), (3,)]
