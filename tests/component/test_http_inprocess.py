"""The HTTP API in-process, for what is hard to arrange end to end: the real wiring (App.http_app) served by
aiohttp's test server on the daemon's own loop, worker processes running the real worker loop with the
scripted transcriber (tests/support/fake_worker.py: the uploaded "audio" is the script), and the moments
between an upload, its commit and the request following its job held open where a test needs them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.support.inprocess import build, run_looping, until
from whisperd import protocol as p
from whisperd.app import App
from whisperd.config import (
    Config,
    DaemonConfig,
    HttpConfig,
    SchedulerConfig,
    TranscribeConfig,
    WorkersConfig,
)
from whisperd.http_common import errors_middleware
from whisperd.http_upload import UploadLimits, read_form
from whisperd.jobs import JobState
from whisperd.spool import Spool
from whisperd.store import JobRow

BOUNDARY = "whisperd-test-boundary"


def config(max_upload_bytes: int = 1024 * 1024, max_spools_per_user: int = 4) -> Config:
    return Config(
        daemon=DaemonConfig(max_spools_per_user=max_spools_per_user),
        workers=WorkersConfig(cpu_workers=1, start_timeout_s=20, restart_backoff_s=0.05),
        transcribe=TranscribeConfig(mode="sequential"),
        scheduler=SchedulerConfig(retry_backoff_s=0.05),
        http=HttpConfig(max_upload_bytes=max_upload_bytes),
    )


class Rig:
    def __init__(self, app: App, client: TestClient[Any, Any], tmp_path: Path) -> None:
        self.app = app
        self.client = client
        self.spool = tmp_path / "spool"
        self.root_token, _ = app.tokens.create("root")

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.root_token}"}

    def spooled(self) -> list[str]:
        return sorted(path.name for path in self.spool.iterdir())

    def job(self, job_id: int) -> p.JobView:
        [view] = self.app.registry.select([job_id], None, 1)
        return view

    def newest(self) -> p.JobView | None:
        views = self.app.registry.select([], None, 1)
        return views[0] if views else None

    @property
    def port(self) -> int:
        port = self.client.port
        assert port is not None
        return port

    @property
    def connections(self) -> int:
        """Client connections the server has open now (a request whose client left may still be running)."""
        server = self.client.server
        if server.runner is None:
            return 0
        return sum(1 for handler in server.handler.connections if handler.transport is not None)

    async def post(self, path: str, script: bytes, token: str | None = None, **fields: str) -> Any:
        form = aiohttp.FormData()
        for name, value in fields.items():
            form.add_field(name, value)
        form.add_field("file", script, filename="script.txt", content_type="application/octet-stream")
        return await self.client.post(path, data=form, headers=self.auth(token))


def scenario(
    tmp_path: Path, cfg: Config, body: Callable[[Rig], Awaitable[None]], timeout_s: float = 60
) -> None:
    app = build(tmp_path, cfg, clock=time.time)  # a real clock: retries wait out their (short) backoff

    async def served() -> None:
        client: TestClient[Any, Any] = TestClient(TestServer(app.http_app(False)))  # cancels on disconnect
        await client.start_server()
        try:
            await body(Rig(app, client, tmp_path))
        finally:
            await client.close()

    run_looping(app, served, timeout_s)


def multipart(script: bytes, **fields: str) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="script.txt"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return b"".join(parts) + head + script + f"\r\n--{BOUNDARY}--\r\n".encode()


@contextlib.asynccontextmanager
async def raw_post(
    rig: Rig, path: str, body: bytes, token: str
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A POST over a connection of the test's own: its headers (and Content-Length) sent, its body not, so
    the test sends the body at its pace and may leave at any moment."""
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    writer.write(
        (
            f"POST {path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def status_of(reader: asyncio.StreamReader) -> int:
    line = await reader.readline()
    return int(line.split()[1])


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str | None, Any]]:
    """(event name, data as JSON) of each server-sent event, as each arrives."""
    event: str | None = None
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: ") :])
        elif not line:
            event = None


def hold_accept(app: App, after_commit: Callable[[list[JobRow]], Awaitable[None]]) -> None:
    """Run after_commit between a submit's commit and its answer (where the flush is awaited), to arrange
    what a job does before the request that made it follows it."""
    accept = app.handlers.accept

    async def held(*args: Any, **kwargs: Any) -> list[JobRow]:
        records = await accept(*args, **kwargs)
        await after_commit(records)
        return records

    app.handlers.accept = held  # type: ignore[method-assign]


# ---- uploads -----------------------------------------------------------------------------------------


def test_an_upload_refused_while_it_streams_leaves_no_spool_file(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        big = b"segments=1 " + b"x" * (600 * 1024)  # past max_upload_bytes, the Content-Length within bounds
        async with raw_post(rig, "/v1/audio/transcriptions", multipart(big), rig.root_token) as (rd, wr):
            wr.write(multipart(big))
            await wr.drain()
            assert await status_of(rd) == 413
        response = await rig.post("/v1/whisperd/jobs", big)
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "audio_too_large"
        assert rig.spooled() == []
        assert rig.newest() is None, "no job was made"

        # A Content-Length past the limit is refused before a byte of the body is read.
        huge = multipart(b"segments=1 " + b"z" * (8 * 1024 * 1024))
        async with raw_post(rig, "/v1/audio/transcriptions", huge, rig.root_token) as (rd, _wr):
            assert await status_of(rd) == 413
        assert rig.spooled() == []

        # A client that leaves half way: its upload is dropped, nothing stays in the spool.
        small = b"segments=1 " + b"y" * (200 * 1024)
        whole = multipart(small)
        async with raw_post(rig, "/v1/whisperd/jobs", whole, rig.root_token) as (_rd, wr):
            wr.write(whole[: len(whole) // 2])
            await wr.drain()
            await until(lambda: bool(rig.spooled()))  # its file part is being written
        await until(lambda: rig.spooled() == [])  # the server saw it leave, and dropped its upload
        assert rig.newest() is None

        # The same upload in full is taken: the limit, not the route, refused the others.
        ok = await rig.post("/v1/whisperd/jobs", small)
        assert ok.status == 202, await ok.text()

    scenario(tmp_path, config(max_upload_bytes=512 * 1024), body)


def test_a_user_past_its_uploads_at_once_is_told_busy_while_others_upload(tmp_path: Path) -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody here to upload besides root")

    async def body(rig: Rig) -> None:
        nobody_token, _ = rig.app.tokens.create("nobody")
        script = b"segments=1 " + b" " * (64 * 1024)
        whole = multipart(script)
        async with raw_post(rig, "/v1/whisperd/jobs", whole, rig.root_token) as (rd, wr):
            wr.write(whole[: len(whole) // 2])
            await wr.drain()
            await until(lambda: bool(rig.spooled()))  # root's one upload at once is being received

            busy = await rig.post("/v1/whisperd/jobs", b"segments=1")
            assert busy.status == 429
            assert (await busy.json())["error"]["code"] == "busy"
            other = await rig.post("/v1/whisperd/jobs", b"segments=1", token=nobody_token)
            assert other.status == 202, await other.text()
            [theirs] = (await other.json())["jobs"]
            assert theirs["owner_uid"] == nobody.pw_uid

            wr.write(whole[len(whole) // 2 :])
            await wr.drain()
            assert await status_of(rd) == 202, "root's own upload went on"
        again = await rig.post("/v1/whisperd/jobs", b"segments=1")
        assert again.status == 202, "its upload done, root may upload again"

    scenario(tmp_path, config(max_spools_per_user=1), body)


# ---- following a job ---------------------------------------------------------------------------------


def test_a_stream_gives_each_segment_once_as_decoded_across_a_retry(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        response = await rig.post(
            "/v1/audio/transcriptions", b"segments=6 segment_s=0.3", stream="true", response_format="json"
        )
        assert response.status == 200 and response.content_type == "text/event-stream"
        deltas: list[str] = []
        states_at_delta: list[JobState] = []
        done: dict[str, Any] | None = None
        killed = False
        async for _event, data in sse_events(response):
            if data["type"] == "transcript.text.delta":
                deltas.append(data["delta"])
                job = rig.newest()
                assert job is not None
                states_at_delta.append(job.state)
                if len(deltas) == 2 and not killed:  # the worker dies half way: the job runs again
                    [pid] = rig.app.fleet.pids()
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            else:
                assert data["type"] == "transcript.text.done"
                done = data
        assert done is not None
        job = rig.newest()
        assert job is not None and job.state is JobState.COMPLETED
        dispatches = [e for e in rig.app.store.history(job.id) if e.to_state is JobState.PROCESSING]
        assert len(dispatches) == 2, "the kill made it run again"
        assert states_at_delta[0] is JobState.PROCESSING, "deltas come as the job runs, not at its end"
        assert len(deltas) == 6, f"each of the 6 segments once: {deltas}"
        assert "".join(deltas).strip() == done["text"] == f"job {job.id}"

    scenario(tmp_path, config(), body)


def test_a_stream_that_follows_its_job_late_gives_every_segment_in_order(tmp_path: Path) -> None:
    """The job decodes its first segments before the request subscribes to them (between the commit and
    the answer of the submit): the stream still gives each segment once, in order."""

    async def body(rig: Rig) -> None:
        async def after_commit(records: list[JobRow]) -> None:
            [record] = records
            await until(lambda: rig.job(record.id).progress > 0)  # a segment or more decoded already

        hold_accept(rig.app, after_commit)
        response = await rig.post("/v1/audio/transcriptions", b"segments=5 segment_s=0.2", stream="true")
        deltas = []
        done = None
        async for _event, data in sse_events(response):
            if data["type"] == "transcript.text.delta":
                deltas.append(data["delta"])
            else:
                done = data
        job = rig.newest()
        assert job is not None and done is not None
        assert deltas[0] == f"job {job.id}" and len(deltas) == 5, deltas
        assert "".join(deltas).strip() == done["text"]

    scenario(tmp_path, config(), body)


def test_a_request_whose_job_ended_before_it_followed_still_gets_its_answer(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        async def after_commit(records: list[JobRow]) -> None:
            [record] = records
            await until(lambda: rig.job(record.id).state.terminal)

        hold_accept(rig.app, after_commit)
        plain = await rig.post("/v1/audio/transcriptions", b"segments=2", response_format="text")
        assert plain.status == 200
        job = rig.newest()
        assert job is not None and await plain.text() == f"job {job.id}\n"

        streamed = await rig.post("/v1/audio/transcriptions", b"segments=3", stream="true")
        events = [data async for _event, data in sse_events(streamed)]
        job = rig.newest()
        assert job is not None
        assert [e["type"] for e in events] == ["transcript.text.delta"] * 3 + ["transcript.text.done"]
        assert events[-1]["text"] == f"job {job.id}"

        failed = await rig.post("/v1/audio/transcriptions", b"undecodable")
        assert failed.status == 422
        assert (await failed.json())["error"]["code"] == "job_failed"
        failed_stream = await rig.post("/v1/audio/transcriptions", b"undecodable", stream="true")
        assert [data async for _event, data in sse_events(failed_stream)] == [
            {"error": {"message": ANY, "type": "invalid_request_error", "param": None, "code": "job_failed"}}
        ]

        created = await rig.post("/v1/whisperd/jobs", b"segments=2")
        [view] = (await created.json())["jobs"]
        async with rig.client.get(
            f"/v1/whisperd/jobs/{view['id']}/events", headers=rig.auth()
        ) as events_reply:
            seen = [(event, data) async for event, data in sse_events(events_reply)]
        assert [event for event, _ in seen] == ["job"]
        assert seen[0][1]["state"] == "COMPLETED"

    scenario(tmp_path, config(), body)


def test_the_events_stream_gives_each_state_and_every_segment_once(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        created = await rig.post("/v1/whisperd/jobs", b"segments=8 segment_s=0.15")
        assert created.status == 202
        [view] = (await created.json())["jobs"]
        async with rig.client.get(f"/v1/whisperd/jobs/{view['id']}/events", headers=rig.auth()) as reply:
            seen = [(event, data) async for event, data in sse_events(reply)]
        states = [data["state"] for event, data in seen if event == "job"]
        ids = [s["id"] for event, data in seen if event == "segments" for s in data["segments"]]
        assert states[-1] == "COMPLETED" and "PROCESSING" in states
        assert ids == list(range(1, 9)), "every segment, once, in order"
        result = await rig.client.get(f"/v1/whisperd/jobs/{view['id']}/result", headers=rig.auth())
        transcript = (await result.json())["transcript"]
        assert [s["id"] for s in transcript["segments"]] == ids
        verbose = await rig.client.get(
            f"/v1/whisperd/jobs/{view['id']}/result", params={"response_format": "verbose_json"},
            headers=rig.auth(),
        )  # fmt: skip
        body = await verbose.json()
        assert len(body["segments"]) == 8 and "words" not in body, "no word timestamps were asked for"

    scenario(tmp_path, config(), body)


def test_a_client_that_leaves_while_its_job_is_committed_cancels_it(tmp_path: Path) -> None:
    """The client goes away after the job's commit and before the submit's answer (while the flush is
    awaited): the job is cancelled all the same, not left to run for nobody."""

    async def body(rig: Rig) -> None:
        committed = asyncio.Event()
        release = asyncio.Event()

        async def after_commit(records: list[JobRow]) -> None:
            committed.set()
            await release.wait()

        hold_accept(rig.app, after_commit)
        whole = multipart(b"segments=20 segment_s=0.2")
        async with raw_post(rig, "/v1/audio/transcriptions", whole, rig.root_token) as (_rd, wr):
            wr.write(whole)
            await wr.drain()
            await committed.wait()
        await until(lambda: rig.connections == 0)  # the server saw it leave, and cancelled its request
        release.set()
        job = rig.newest()
        assert job is not None
        await until(lambda: rig.job(job.id).state.terminal)
        assert rig.job(job.id).state is JobState.CANCELLED

    scenario(tmp_path, config(), body)


def test_a_client_that_leaves_a_stream_cancels_its_job_but_one_leaving_events_does_not(
    tmp_path: Path,
) -> None:
    async def body(rig: Rig) -> None:
        streamed = await rig.post("/v1/audio/transcriptions", b"segments=50 segment_s=0.1", stream="true")
        async for _event, data in sse_events(streamed):
            assert data["type"] == "transcript.text.delta"
            break  # a delta came: the job runs; the client goes
        streamed.close()
        job = rig.newest()
        assert job is not None
        await until(lambda: rig.job(job.id).state.terminal)
        assert rig.job(job.id).state is JobState.CANCELLED

        created = await rig.post("/v1/whisperd/jobs", b"segments=10 segment_s=0.1")
        [view] = (await created.json())["jobs"]
        events = await rig.client.get(f"/v1/whisperd/jobs/{view['id']}/events", headers=rig.auth())
        async for event, _data in sse_events(events):
            if event == "segments":
                break
        events.close()
        await until(lambda: rig.job(view["id"]).state.terminal)
        assert rig.job(view["id"]).state is JobState.COMPLETED, "leaving the events stream is not a cancel"

    scenario(tmp_path, config(), body)


def test_a_client_gone_while_answered_is_no_error_of_ours(caplog: pytest.LogCaptureFixture) -> None:
    """A write to a client that left raises ConnectionResetError: not a failure of whisperd's to log."""

    async def handler(request: web.Request) -> web.Response:
        raise ConnectionResetError("Cannot write to closing transport")  # as aiohttp's writer says it

    async def main() -> None:
        app = web.Application(middlewares=[errors_middleware])
        app.router.add_get("/v1/models", handler)
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/v1/models")
            assert response.status != 500

    with caplog.at_level(logging.DEBUG):
        asyncio.run(asyncio.wait_for(main(), 30))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# ---- the spool file's descriptor ---------------------------------------------------------------------


class GatedThreads(ThreadPoolExecutor):
    """Threads in which the call named `held` waits until the test opens the gate. Each call's name is
    logged as it returns; the spool file made (create) is remembered, and whether the descriptor a held
    write was given still named that file when the write ran."""

    def __init__(self, held: str) -> None:
        super().__init__(4)
        self.held = held
        self.waiting = threading.Event()
        self.gate = threading.Event()
        self.returned: list[str] = []
        self.created: tuple[int, int] | None = None  # (device, inode)
        self.wrote_to_it: bool | None = None

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        name = getattr(fn, "__name__", repr(fn))

        def run() -> Any:
            if name == self.held:
                self.waiting.set()
                self.gate.wait(30)
                if name == "_write_all":
                    self.wrote_to_it = self._names_created(args[0])
            try:
                result = fn(*args, **kwargs)
                if name == "create":
                    self.created = self._identity(result[0])
                return result
            finally:
                self.returned.append(name)

        return super().submit(run)

    @staticmethod
    def _identity(fd: int) -> tuple[int, int]:
        stat = os.fstat(fd)
        return stat.st_dev, stat.st_ino

    def _names_created(self, fd: int) -> bool:
        try:
            return self._identity(fd) == self.created
        except OSError:  # closed
            return False


def upload_scenario(tmp_path: Path, held: str) -> GatedThreads:
    """An upload of 3 MiB whose client leaves while the call `held` runs in a spool thread; returns the
    threads once the request has ended and the held call was let go. The client sends no further than
    the server reads (past that aiohttp stops reading, and sees the client leave only once it reads
    again)."""
    spool = Spool(tmp_path / "spool")
    threads = GatedThreads(held)
    ended = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        try:
            await read_form(request, spool, threads, UploadLimits(max_bytes=1 << 30, max_duration_s=0))
        finally:
            ended.set()
        return web.Response()

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/upload", handler)
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        try:
            whole = multipart(os.urandom(3 * 1024 * 1024))
            _reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
            writer.write(
                (
                    f"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: {len(whole)}\r\n"
                    f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\r\n"
                ).encode()
            )
            for at in range(0, len(whole), 16 * 1024):
                writer.write(whole[at : at + 16 * 1024])
                await writer.drain()
                await asyncio.sleep(0.01)
                if threads.waiting.is_set():
                    break
            assert threads.waiting.is_set()
            writer.close()  # the client leaves while the call runs
            await until(ended.is_set)
            threads.gate.set()
            await until(lambda: held in threads.returned and not any(spool.directory.iterdir()))
        finally:
            await client.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        threads.gate.set()
        threads.shutdown()
    return threads


def test_a_spool_file_is_not_closed_under_the_write_that_ran_when_its_client_left(tmp_path: Path) -> None:
    threads = upload_scenario(tmp_path, held="_write_all")
    assert threads.wrote_to_it is True, "the write went into the spool file, through its own descriptor"


def test_a_spool_file_made_when_its_client_left_is_removed(tmp_path: Path) -> None:
    threads = upload_scenario(tmp_path, held="create")
    assert threads.created is not None and "_write_all" not in threads.returned
