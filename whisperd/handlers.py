"""Dispatch: one function per request type, each given the caller's identity and any passed descriptors.
Authorisation rules live here."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from whisperd import __version__
from whisperd import protocol as p
from whisperd.config import Config
from whisperd.errors import (
    BadRequest,
    NotReady,
    PermissionDenied,
    QueueFull,
    ShuttingDown,
    UnknownModel,
    WhisperdError,
)
from whisperd.fleet import Fleet
from whisperd.jobs import JobEvent
from whisperd.registry import JobRegistry
from whisperd.spool import Spool
from whisperd.store import NewJob
from whisperd.views import Views


class Caller(msgspec.Struct, frozen=True):
    pid: int
    uid: int
    gid: int


def is_privileged(caller_uid: int, daemon_uid: int) -> bool:
    return caller_uid in (0, daemon_uid)


def may_control(owner_uid: int, caller_uid: int, daemon_uid: int) -> bool:
    """Anyone who reaches the socket may see the queue; only the submitter, root or the daemon's own user
    may cancel a job or read its result."""
    return caller_uid == owner_uid or is_privileged(caller_uid, daemon_uid)


class Handlers:
    def __init__(
        self,
        registry: JobRegistry,
        spool: Spool,
        fleet: Fleet,
        views: Views,
        config: Callable[[], Config],
        is_draining: Callable[[], bool],
        wake: Callable[[], None],
        daemon_uid: int,
    ) -> None:
        """config: the running configuration, read afresh per request (a reload replaces it)."""
        self._registry = registry
        self._spool = spool
        self._fleet = fleet
        self._views = views
        self._config = config
        self._is_draining = is_draining
        self._wake = wake
        self._uid = daemon_uid
        self._table: dict[type[Any], Callable[[Any, Caller, list[int]], Awaitable[p.Reply]]] = {
            p.Ping: self.ping,
            p.Submit: self.submit,
            p.Status: self.status,
            p.Cancel: self.cancel,
            p.Result: self.result,
            p.Gpu: self.gpu,
            p.Stats: self.stats,
        }

    async def handle(self, request: p.Request, caller: Caller, fds: list[int]) -> p.Reply:
        return await self._table[type(request)](request, caller, fds)

    async def ping(self, request: p.Ping, caller: Caller, fds: list[int]) -> p.Reply:
        return p.Pong(version=__version__)

    async def submit(self, request: p.Submit, caller: Caller, fds: list[int]) -> p.Reply:
        config = self._config()
        if self._is_draining():
            raise ShuttingDown("whisperd is shutting down and accepts no new work")
        model = request.model or config.transcribe.default_model
        if model not in config.models:
            known = ", ".join(sorted(config.models))
            raise UnknownModel(f"unknown model {model!r}; this daemon serves: {known}")
        if not request.files:
            raise BadRequest("submit needs at least one file")
        limit = config.daemon.max_queued_jobs
        if self._registry.waiting_count() + len(request.files) > limit:
            raise QueueFull(f"the queue is at its limit of {limit} jobs; try again later")
        sources: list[tuple[int, bool]] = []
        spooled: list[str] = []
        try:
            for f in request.files:
                sources.append(self._open(f, caller, fds))
            for fd, _owned in sources:
                path, _ = await asyncio.to_thread(self._spool.copy_from_fd, fd, config.daemon.max_audio_bytes)
                spooled.append(path)
            if self._registry.waiting_count() + len(request.files) > limit:  # others submitted meanwhile
                raise QueueFull(f"the queue is at its limit of {limit} jobs; try again later")
            new_jobs = [
                NewJob(
                    spool_path=path, filename=f.name, owner_uid=caller.uid, model=model,
                    language=request.language, task=request.task, priority=request.priority,
                    word_timestamps=request.word_timestamps,
                )
                for path, f in zip(spooled, request.files, strict=True)
            ]  # fmt: skip
            records = self._registry.add(new_jobs)
        except BaseException:
            for path in spooled:
                self._spool.discard(path)
            raise
        finally:
            for fd, owned in sources:
                if owned:
                    os.close(fd)
        self._wake()
        return p.Jobs(jobs=[r.view() for r in records])

    def _open(self, f: p.SubmitFile, caller: Caller, fds: list[int]) -> tuple[int, bool]:
        """The descriptor to read a file from, and whether we opened it (and must close it)."""
        if f.fd_index is not None:
            if not 0 <= f.fd_index < len(fds):
                raise BadRequest(f"{f.name}: fd_index {f.fd_index} but {len(fds)} descriptors were passed")
            return fds[f.fd_index], False
        if f.path is None:
            raise BadRequest(f"{f.name}: give fd_index (a passed descriptor) or path")
        if not is_privileged(caller.uid, self._uid):
            raise PermissionDenied(
                "only root or the daemon's user may submit by path; pass the file descriptor"
            )
        try:
            return os.open(f.path, os.O_RDONLY | os.O_CLOEXEC), True
        except FileNotFoundError:
            raise BadRequest(f"no such file: {f.path}") from None
        except OSError as exc:
            raise BadRequest(f"cannot open {f.path}: {exc.strerror}") from None

    async def status(self, request: p.Status, caller: Caller, fds: list[int]) -> p.Reply:
        jobs = self._registry.select(request.ids, request.state, request.limit)
        return p.Jobs(jobs=[j.view() for j in jobs])

    async def cancel(self, request: p.Cancel, caller: Caller, fds: list[int]) -> p.Reply:
        done, errors = [], []
        for job_id in request.ids:
            try:
                job = self._registry.get(job_id)
                if not may_control(job.owner_uid, caller.uid, self._uid):
                    raise PermissionDenied(f"job {job_id} belongs to uid {job.owner_uid}")
                if job.state.terminal:
                    raise BadRequest(f"job {job_id} is already {job.state}")
                worker = job.worker
                self._registry.apply(job, JobEvent.CANCEL)
                if worker is not None:
                    self._fleet.cancel(worker, job.id)
                done.append(job.view())
            except WhisperdError as exc:
                errors.append(p.ErrorBody(code=exc.code, message=exc.message, job_id=job_id))
        self._wake()
        return p.Jobs(jobs=done, errors=errors)

    async def result(self, request: p.Result, caller: Caller, fds: list[int]) -> p.Reply:
        job = self._registry.get(request.id)
        if not may_control(job.owner_uid, caller.uid, self._uid):
            raise PermissionDenied(f"job {job.id} belongs to uid {job.owner_uid}")
        transcript = self._registry.transcript(job.id)
        if transcript is None:
            detail = f": {job.error}" if job.error else ""
            raise NotReady(f"job {job.id} is {job.state}{detail}")
        return p.ResultReply(job=job.view(), transcript=transcript)

    async def gpu(self, request: p.Gpu, caller: Caller, fds: list[int]) -> p.Reply:
        return p.Devices(devices=self._views.devices())

    async def stats(self, request: p.Stats, caller: Caller, fds: list[int]) -> p.Reply:
        return p.StatsReply(stats=self._views.stats())
