"""OpenAI's audio API on whisperd's queue: POST /v1/audio/transcriptions and /v1/audio/translations (one
upload becomes one ordinary job: priority, fair share, limits, retries, metrics and the journal as any
other; the request waits for it and answers in the format asked, or streams its text as it is decoded),
GET /v1/models and /v1/models/{model}. A client that goes away before the answer cancels its job."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from aiohttp import web

from whisperd import protocol as p
from whisperd.config import Config
from whisperd.errors import BadRequest, JobFailed, NotFound, WhisperdError
from whisperd.followers import JobFollowers
from whisperd.formats import RESPONSE_FORMATS, openai_response
from whisperd.handlers import Caller, Handlers
from whisperd.http_common import (
    KEEPALIVE_S,
    OPENAI_MODEL_ALIASES,
    SSE_HEADERS,
    as_bool,
    as_float,
    as_int,
    check_known,
    model_name,
    one,
    sse,
)
from whisperd.http_intake import Intake
from whisperd.http_upload import Form
from whisperd.jobs import JobState
from whisperd.segmentfeed import SegmentFeed

_FIELDS = frozenset({
    "model", "language", "prompt", "response_format", "temperature", "timestamp_granularities[]",
    "timestamp_granularities", "stream", "priority",
})  # fmt: skip
_GRANULARITIES = frozenset({"segment", "word"})


class OpenAiRoutes:
    def __init__(
        self,
        handlers: Handlers,
        intake: Intake,
        followers: JobFollowers,
        segments: SegmentFeed,
        config: Callable[[], Config],
    ) -> None:
        self._handlers = handlers
        self._intake = intake
        self._followers = followers
        self._segments = segments
        self._config = config

    def add_to(self, app: web.Application, caller_of: Callable[[web.Request], Caller]) -> None:
        self._caller_of = caller_of
        app.router.add_post("/v1/audio/transcriptions", self.transcriptions)
        app.router.add_post("/v1/audio/translations", self.translations)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        return await self._run(request, "transcribe")

    async def translations(self, request: web.Request) -> web.StreamResponse:
        return await self._run(request, "translate")

    async def models(self, request: web.Request) -> web.Response:
        self._caller_of(request)
        return web.json_response({"object": "list", "data": [_model(name) for name in self._model_names()]})

    async def model(self, request: web.Request) -> web.Response:
        self._caller_of(request)
        name = request.match_info["model"]
        if name not in self._model_names():
            raise NotFound(f"no model {name!r} here; GET /v1/models lists them")
        return web.json_response(_model(name))

    def _model_names(self) -> list[str]:
        config = self._config()
        return sorted(config.models) + [a for a in OPENAI_MODEL_ALIASES if a not in config.models]

    async def _run(self, request: web.Request, task: str) -> web.StreamResponse:
        caller = self._caller_of(request)
        form = await self._intake.receive(request, caller)
        try:
            check_known(form.fields, _FIELDS)
            response_format = one(form.fields, "response_format") or "json"
            if response_format not in RESPONSE_FORMATS:
                raise BadRequest(f"response_format must be one of {', '.join(RESPONSE_FORMATS)}")
            granularities = frozenset(
                form.fields.get("timestamp_granularities[]", [])
                + form.fields.get("timestamp_granularities", [])
            )
            if not granularities <= _GRANULARITIES:
                raise BadRequest("timestamp_granularities[] takes segment and word")
            stream = as_bool(form.fields, "stream")
            options: dict[str, Any] = {
                "model": model_name(one(form.fields, "model"), self._config()),
                "language": one(form.fields, "language") or None,
                "prompt": one(form.fields, "prompt") or None,
                # OpenAI's 0 (its default) starts at 0 and falls back to higher ones: whisperd's None
                "temperature": as_float(form.fields, "temperature") or None,
                "task": task,
                "priority": as_int(form.fields, "priority", 0),
                "word_timestamps": "word" in granularities,
            }
        except BaseException:
            self._intake.discard(form)
            raise
        job = await self._queue(form, caller, options)
        try:
            if stream:
                return await self._stream(request, caller, job)
            final = await self._wait(job, caller)
            transcript = await self._transcript(final, caller)
            body, content_type = openai_response(transcript, response_format, task, granularities)
            return web.Response(body=body, content_type=content_type.split(";")[0], charset="utf-8")
        except (asyncio.CancelledError, ConnectionResetError):  # the client went away: nobody will read it
            await self._cancel(job, caller)
            raise

    async def _queue(self, form: Form, caller: Caller, options: dict[str, Any]) -> p.JobView:
        """The upload's job, queued. The submit is answered once its commit is durable: a client that
        leaves meanwhile cancels the job as soon as it is queued, as it would have a moment later."""
        queued = asyncio.ensure_future(self._intake.queue(form, caller, options))
        try:
            return await asyncio.shield(queued)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # refused after all: nothing to cancel
                await self._cancel(await queued, caller)
            raise

    async def _wait(self, job: p.JobView, caller: Caller) -> p.JobView:
        with self._followers.follow(job.id) as follower:
            view = await self._current(job, caller)  # after following: no change between is missed
            while not view.state.terminal:
                view = await follower.next()
        return view

    async def _current(self, job: p.JobView, caller: Caller) -> p.JobView:
        """The job as it is now (it may have moved on since it was queued)."""
        with contextlib.suppress(WhisperdError):
            reply = await self._handlers.status(p.Status(ids=[job.id], limit=1), caller, [])
            if isinstance(reply, p.Jobs) and reply.jobs:
                return reply.jobs[0]
        return job

    async def _transcript(self, final: p.JobView, caller: Caller) -> p.Transcript:
        if final.state is not JobState.COMPLETED:
            raise JobFailed(f"job {final.id} is {final.state}: {final.error or 'no reason given'}")
        reply = await self._handlers.result(p.Result(id=final.id), caller, [])
        assert isinstance(reply, p.ResultReply)
        return reply.transcript

    async def _cancel(self, job: p.JobView, caller: Caller) -> None:
        with contextlib.suppress(WhisperdError):
            await self._handlers.cancel(p.Cancel(ids=[job.id]), caller, [])

    async def _stream(self, request: web.Request, caller: Caller, job: p.JobView) -> web.StreamResponse:
        """OpenAI's transcription stream: a transcript.text.delta event per segment as it is decoded (the
        feed gives each place once, across retries, and what a slow reader missed from the transcript),
        then transcript.text.done with the whole text; an error ends it as {"error": ...}."""
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        sent = 0
        with self._followers.follow(job.id) as follower, self._segments.subscribe(job.id) as feed:
            view = await self._current(job, caller)  # after subscribing: nothing between is missed
            while not view.state.terminal:
                try:
                    async with asyncio.timeout(KEEPALIVE_S):
                        segments = await feed.get()
                except TimeoutError:
                    await response.write(b": waiting\n\n")
                    continue
                # The feed ended (the job did, or is about to say so); or it began after the job's first
                # segments (decoded before this request subscribed): the rest comes from the transcript.
                if not segments or segments[0].id != sent + 1:
                    break
                for segment in segments:
                    await response.write(_delta(segment))
                sent += len(segments)
            while not view.state.terminal:
                try:
                    async with asyncio.timeout(KEEPALIVE_S):
                        view = await follower.next()
                except TimeoutError:
                    await response.write(b": waiting\n\n")
        try:
            transcript = await self._transcript(view, caller)
        except WhisperdError as exc:
            error = {"message": exc.message, "type": "invalid_request_error", "param": None, "code": exc.code}
            await response.write(sse({"error": error}))
            await response.write_eof()
            return response
        for segment in transcript.segments[sent:]:  # what the feed did not give (another host ran it, ...)
            await response.write(_delta(segment))
        await response.write(sse({"type": "transcript.text.done", "text": transcript.text}))
        await response.write_eof()
        return response


def _delta(segment: p.Segment) -> bytes:
    return sse({"type": "transcript.text.delta", "delta": segment.text})


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "whisperd"}
