"""The asynchronous API for long files, mirroring the control socket's requests as resources:

    POST   /v1/whisperd/jobs               submit (multipart: file + the socket's submit options) -> 202
    GET    /v1/whisperd/jobs               status (?state=, ?limit=, ?id= repeated) -> {"jobs": [...]}
    GET    /v1/whisperd/jobs/{id}          one job's view
    GET    /v1/whisperd/jobs/{id}/result   its transcript (?response_format= as OpenAI's, or transcript)
    GET    /v1/whisperd/jobs/{id}/events   server-sent events: the job's changes and segments, to its end
    DELETE /v1/whisperd/jobs/{id}          cancel
    GET    /v1/whisperd/stats, /v1/whisperd/gpu

Resources rather than one RPC endpoint, so plain HTTP tools (curl, a browser, a proxy's access rules) speak
it; the bodies are the protocol's own Structs (JobView, Transcript, StatsView), so docs/protocol.md describes
both. Over HTTP a caller sees its own jobs only (root's and the daemon's tokens see all): a token may be used
from another machine, where the socket's "the queue is visible to its local users" does not hold.
A client leaving an events stream does not cancel the job: that is the point of this API."""

from __future__ import annotations

import asyncio
from asyncio import FIRST_COMPLETED
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from whisperd import protocol as p
from whisperd.config import Config
from whisperd.errors import BadRequest, NotFound, PermissionDenied
from whisperd.followers import JobFollowers
from whisperd.formats import RESPONSE_FORMATS, openai_response
from whisperd.handlers import Caller, Handlers, is_privileged
from whisperd.http_common import (
    KEEPALIVE_S,
    CodedError,
    as_bool,
    as_float,
    as_int,
    check_known,
    model_name,
    one,
    sse,
)
from whisperd.http_intake import Intake
from whisperd.segmentfeed import SegmentFeed

_FIELDS = frozenset({"model", "language", "prompt", "temperature", "task", "priority", "word_timestamps"})
_encoder = msgspec.json.Encoder()


def _json(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encoder.encode(obj), status=status, content_type="application/json",
                        headers=headers)  # fmt: skip


class JobRoutes:
    def __init__(
        self,
        handlers: Handlers,
        intake: Intake,
        followers: JobFollowers,
        segments: SegmentFeed,
        config: Callable[[], Config],
        daemon_uid: int,
    ) -> None:
        self._handlers = handlers
        self._intake = intake
        self._followers = followers
        self._segments = segments
        self._config = config
        self._daemon_uid = daemon_uid

    def add_to(self, app: web.Application, caller_of: Callable[[web.Request], Caller]) -> None:
        self._caller_of = caller_of
        r = app.router
        r.add_post("/v1/whisperd/jobs", self.create)
        r.add_get("/v1/whisperd/jobs", self.list)
        r.add_get("/v1/whisperd/jobs/{id}", self.get)
        r.add_get("/v1/whisperd/jobs/{id}/result", self.result)
        r.add_get("/v1/whisperd/jobs/{id}/events", self.events)
        r.add_delete("/v1/whisperd/jobs/{id}", self.cancel)
        r.add_get("/v1/whisperd/stats", self.stats)
        r.add_get("/v1/whisperd/gpu", self.gpu)

    async def create(self, request: web.Request) -> web.Response:
        caller = self._caller_of(request)
        form = await self._intake.receive(request, caller)
        try:
            check_known(form.fields, _FIELDS)
            options: dict[str, Any] = {
                "model": model_name(one(form.fields, "model"), self._config()),
                "language": one(form.fields, "language") or None,
                "prompt": one(form.fields, "prompt") or None,
                "temperature": as_float(form.fields, "temperature"),
                "task": one(form.fields, "task") or "transcribe",
                "priority": as_int(form.fields, "priority", 0),
                "word_timestamps": as_bool(form.fields, "word_timestamps"),
            }
        except BaseException:
            self._intake.discard(form)
            raise
        job = await self._intake.queue(form, caller, options)
        return _json(p.Jobs(jobs=[job]), 202, {"Location": f"/v1/whisperd/jobs/{job.id}"})

    async def list(self, request: web.Request) -> web.Response:
        caller = self._caller_of(request)
        query = request.query
        state = query.get("state") or None
        try:
            ids = [int(i) for i in query.getall("id", [])]
            limit = int(query.get("limit", "100"))
            status = msgspec.convert({"op": "status", "ids": ids, "state": state, "limit": limit}, p.Status)
        except (ValueError, msgspec.ValidationError) as exc:
            raise BadRequest(f"invalid query: {exc}") from None
        mine = not is_privileged(caller.uid, self._daemon_uid)
        if mine and not ids:  # the newest of the caller's own: read more, keep the caller's
            status = msgspec.structs.replace(status, limit=min(p.MAX_STATUS_LIMIT, status.limit * 10))
        reply = await self._handlers.status(status, caller, [])
        assert isinstance(reply, p.Jobs)
        jobs = [j for j in reply.jobs if not mine or j.owner_uid == caller.uid][-limit:]
        return _json(p.Jobs(jobs=jobs))

    async def get(self, request: web.Request) -> web.Response:
        caller = self._caller_of(request)
        return _json(await self._own(request, caller))

    async def result(self, request: web.Request) -> web.Response:
        caller = self._caller_of(request)
        job_id = _job_id(request)
        response_format = request.query.get("response_format", "transcript")
        if response_format not in (*RESPONSE_FORMATS, "transcript"):
            raise BadRequest(f"response_format must be one of {', '.join(RESPONSE_FORMATS)} or transcript")
        reply = await self._handlers.result(p.Result(id=job_id), caller, [])
        assert isinstance(reply, p.ResultReply)
        if response_format == "transcript":
            return _json(reply)
        granularities = frozenset({"segment", "word"} if reply.job.word_timestamps else {"segment"})
        body, content_type = openai_response(reply.transcript, response_format, reply.job.task, granularities)
        return web.Response(body=body, content_type=content_type.split(";")[0], charset="utf-8")

    async def cancel(self, request: web.Request) -> web.Response:
        caller = self._caller_of(request)
        reply = await self._handlers.cancel(p.Cancel(ids=[_job_id(request)]), caller, [])
        assert isinstance(reply, p.Jobs)
        if reply.errors:  # one id: its error is the answer
            error = reply.errors[0]
            raise CodedError(error.code, error.message)
        return _json(reply)

    async def stats(self, request: web.Request) -> web.Response:
        caller = self._caller_of(request)
        return _json(await self._handlers.stats(p.Stats(), caller, []))

    async def gpu(self, request: web.Request) -> web.Response:
        caller = self._caller_of(request)
        return _json(await self._handlers.gpu(p.Gpu(), caller, []))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """The job's view now and at each change (event: job), its segments as decoded (event: segments),
        until it ends; then the stream closes."""
        caller = self._caller_of(request)
        job = await self._own(request, caller)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        with self._followers.follow(job.id) as follower, self._segments.subscribe(job.id) as feed:
            view = await self._own(request, caller)  # after following: no change between is missed
            await response.prepare(request)
            await response.write(sse(view, "job"))
            views: asyncio.Future[p.JobView] | None = None
            parts: asyncio.Future[list[p.Segment]] | None = None
            reading = True  # the feed ends with the job (or once it gave the whole transcript)
            try:
                while not view.state.terminal:
                    views = views or asyncio.ensure_future(follower.next())
                    waiting: set[asyncio.Future[Any]] = {views}
                    if reading:
                        parts = parts or asyncio.ensure_future(feed.get())
                        waiting.add(parts)
                    done, _ = await asyncio.wait(waiting, timeout=KEEPALIVE_S, return_when=FIRST_COMPLETED)
                    if not done:
                        await response.write(b": waiting\n\n")
                    if parts is not None and parts in done:
                        segments, parts = parts.result(), None
                        reading = bool(segments)
                        if segments:
                            await response.write(sse({"job_id": job.id, "segments": segments}, "segments"))
                    if views in done:
                        view, views = views.result(), None
                        await response.write(sse(view, "job"))
            finally:
                for task in (views, parts):
                    if task is not None:
                        task.cancel()
        await response.write_eof()
        return response

    async def _own(self, request: web.Request, caller: Caller) -> p.JobView:
        """The job named in the path, if the caller may see it (its own, or any for root's tokens)."""
        job_id = _job_id(request)
        reply = await self._handlers.status(p.Status(ids=[job_id], limit=1), caller, [])
        assert isinstance(reply, p.Jobs)
        [job] = reply.jobs
        if job.owner_uid != caller.uid and not is_privileged(caller.uid, self._daemon_uid):
            raise PermissionDenied(f"job {job_id} belongs to another user")
        return job


def _job_id(request: web.Request) -> int:
    text = request.match_info["id"]
    if not text.isdigit() or not 1 <= int(text) <= p.MAX_JOB_ID:
        raise NotFound(f"no job {text[:40]!r}: a job id is a positive whole number")
    return int(text)
