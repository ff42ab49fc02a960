"""Dispatch: one function per request type, each given the caller's identity and any passed descriptors.
Authorisation rules live here."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from whisperd import __version__
from whisperd import protocol as p
from whisperd.config import Config, DaemonConfig
from whisperd.errors import (
    BadRequest,
    NotFound,
    NotReady,
    PermissionDenied,
    QueueFull,
    ShuttingDown,
    StorageFull,
    UnknownModel,
    WhisperdError,
)
from whisperd.fleet import Fleet
from whisperd.jobs import JobEvent, JobState
from whisperd.registry import JobRegistry
from whisperd.spool import Spool
from whisperd.spooling import Spooler
from whisperd.store import JobRow, NewJob
from whisperd.threads import DaemonThreadPool
from whisperd.tokens import TokenBook, TokenInfo
from whisperd.views import Views

log = logging.getLogger("whisperd")


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


_COPIES_PER_SUBMIT = 4  # files of one submit copied at once, at most


async def _nothing_to_wait_for() -> None:
    return None


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
        spooler: Spooler | None = None,
        free_bytes: Callable[[], int] | None = None,
        durable: Callable[[], Awaitable[None]] | None = None,
        tokens: TokenBook | None = None,
    ) -> None:
        """config: the running configuration, read afresh per request (a reload replaces it). spooler: copies
        audio into the spool in threads of its own (None: a pool of the default daemon.spool_threads).
        durable: returns once every commit so far is durable (GroupCommit.durable; None: none waited for).
        tokens: the HTTP API's bearer tokens, which privileged callers manage (None: none kept)."""
        self._registry = registry
        self._spool = spool
        self._spooler = spooler or Spooler(spool, DaemonThreadPool(DaemonConfig().spool_threads, "spool"))
        # free_bytes: what the state dir's file system has free (statvfs; None: of the spool's directory)
        self._free_bytes = free_bytes or (lambda: shutil.disk_usage(spool.directory).free)
        self._fleet = fleet
        self._views = views
        self._config = config
        self._is_draining = is_draining
        self._wake = wake
        self._uid = daemon_uid
        self._durable = durable or _nothing_to_wait_for
        self._tokens = tokens
        self._table: dict[type[Any], Callable[[Any, Caller, list[int]], Awaitable[p.Reply]]] = {
            p.Ping: self.ping,
            p.Submit: self.submit,
            p.Status: self.status,
            p.Cancel: self.cancel,
            p.Result: self.result,
            p.Gpu: self.gpu,
            p.Stats: self.stats,
            p.TokenCreate: self.token_create,
            p.TokenRevoke: self.token_revoke,
            p.TokenList: self.token_list,
        }

    async def handle(self, request: p.Request, caller: Caller, fds: list[int]) -> p.Reply:
        return await self._table[type(request)](request, caller, fds)

    async def ping(self, request: p.Ping, caller: Caller, fds: list[int]) -> p.Reply:
        return p.Pong(version=__version__, models=sorted(self._config().models))

    async def submit(self, request: p.Submit, caller: Caller, fds: list[int]) -> p.Reply:
        config = self._config()
        model = self.check_submit(request, caller, config)
        sources: list[tuple[int, bool]] = []
        copies: dict[int, tuple[str, int]] = {}  # file's index -> its spool path and size, as they finish
        try:
            for f in request.files:
                sources.append(self._open(f, caller, fds))
            try:
                await self._copy_all([fd for fd, _owned in sources], request.files, caller, config, copies)
            except BaseException:
                for path, _size in copies.values():
                    self._spool.discard(path)
                raise
        finally:
            for fd, owned in sources:
                if owned:
                    os.close(fd)
        records = await self.accept(request, caller, model, [copies[i] for i in range(len(request.files))])
        return p.Jobs(jobs=[r.view() for r in records])

    def check_submit(self, request: p.Submit, caller: Caller, config: Config) -> str:
        """What refuses a submit before any audio is read (the HTTP API asks before it reads an upload);
        returns the model the jobs will use."""
        if self._is_draining():
            raise ShuttingDown("whisperd is shutting down and accepts no new work")
        self._check_free_space(config.storage.min_free_bytes)
        model = request.model or config.transcribe.default_model
        if model not in config.models:
            known = ", ".join(sorted(config.models))
            raise UnknownModel(f"unknown model {model!r}; this daemon serves: {known}")
        if not request.files:
            raise BadRequest("submit needs at least one file")
        self._check_priority(request.priority, caller, config)
        limit = config.daemon.max_queued_jobs
        if self._registry.waiting_count() + len(request.files) > limit:
            raise QueueFull(f"the queue is at its limit of {limit} jobs; try again later")
        self._check_user_limits(caller, config, len(request.files), len(request.files))  # audio: >= 1 byte
        return model

    async def accept(
        self, request: p.Submit, caller: Caller, model: str, spooled: list[tuple[str, int]]
    ) -> list[JobRow]:
        """Queue the spooled files (spool path, bytes) of a submit checked by check_submit (which gave the
        model), one job each, as the caller; returns the jobs as committed, once durable. The spool files
        are the jobs' from here: discarded if refused."""
        try:
            config = self._config()
            limit = config.daemon.max_queued_jobs
            if self._registry.waiting_count() + len(request.files) > limit:  # others submitted meanwhile
                raise QueueFull(f"the queue is at its limit of {limit} jobs; try again later")
            paths = [path for path, _size in spooled]
            sizes = {i: size for i, (_path, size) in enumerate(spooled)}
            # No await from here to the commit, so what others submitted meanwhile is counted (with a shared
            # store the insert itself is awaited, and the limits are the fleet's as of its last heartbeat).
            self._check_user_limits(caller, config, len(request.files), sum(sizes.values()))
            new_jobs = [
                NewJob(
                    spool_path=path, spool_bytes=sizes[i], filename=f.name, owner_uid=caller.uid, model=model,
                    language=request.language, task=request.task, priority=request.priority,
                    word_timestamps=request.word_timestamps, prompt=request.prompt or None,
                    temperature=request.temperature,
                )
                for i, (path, f) in enumerate(zip(paths, request.files, strict=True))
            ]  # fmt: skip
            records = await self._registry.submit(new_jobs)
        except BaseException:
            for path, _size in spooled:
                self._spool.discard(path)
            raise
        self._wake()
        # No reply before the jobs are durable (one flush shared with every submit meanwhile). If the flush
        # fails the caller gets its storage error, though the jobs are committed: they stay queued and run,
        # but the caller never learns their ids (docs/architecture.md, the walk of a job).
        await self._durable()
        return records

    async def _copy_all(
        self,
        fds: list[int],
        files: list[p.SubmitFile],
        caller: Caller,
        config: Config,
        copies: dict[int, tuple[str, int]],
    ) -> None:
        """Copy the files into the spool, several at once, into `copies` as each finishes. The first error
        stops the others and is raised as it is; what was copied is in `copies` for the caller to discard."""
        d = config.daemon
        todo = iter(enumerate(zip(fds, files, strict=True)))

        async def copy_next() -> None:
            for i, (fd, f) in todo:  # shared: each file is taken once, by whichever copier is free
                copies[i] = await self._spooler.copy(
                    fd, f.name, caller.uid, d.max_audio_bytes, d.max_spools_per_user, d.spool_timeout_s
                )

        # Half the user's copies at most (and no more than the disk gains from), so that another submit of
        # the same user still finds a free one.
        free = max(1, d.max_spools_per_user - self._spooler.in_progress(caller.uid))
        width = min(len(files), _COPIES_PER_SUBMIT, max(1, d.max_spools_per_user // 2), free)
        if width == 1:
            return await copy_next()
        try:
            async with asyncio.TaskGroup() as copiers:
                for _ in range(width):
                    copiers.create_task(copy_next())
        except BaseExceptionGroup as failed:  # the others were cancelled: answer the first error itself
            raise failed.exceptions[0] from None

    def _check_priority(self, priority: int, caller: Caller, config: Config) -> None:
        """Lowering one's priority is anyone's right; raising it above the configured maximum is not."""
        highest = config.scheduler.user_max_priority
        if priority > highest and not is_privileged(caller.uid, self._uid):
            raise PermissionDenied(
                f"priority {priority} is above {highest}, the highest a user may ask for "
                "(scheduler.user_max_priority); only root or the daemon's user may go higher"
            )

    def _check_user_limits(self, caller: Caller, config: Config, jobs: int, audio_bytes: int) -> None:
        """One user's share of the queue and of the spool. Root and the daemon's user are exempt: they run
        the service (max_queued_jobs still binds them)."""
        if is_privileged(caller.uid, self._uid):
            return
        d = config.daemon
        user = self._registry.user_figures(caller.uid)
        if user.waiting_jobs + jobs > d.max_queued_jobs_per_user:
            raise QueueFull(
                f"uid {caller.uid} has {user.waiting_jobs} jobs waiting and the limit per user is "
                f"{d.max_queued_jobs_per_user} (daemon.max_queued_jobs_per_user); try again when some ran"
            )
        if user.spool_bytes + audio_bytes > d.max_spool_bytes_per_user:
            raise QueueFull(
                f"uid {caller.uid}'s live jobs hold {user.spool_bytes} bytes of audio, and {audio_bytes} "
                f"more would pass the limit per user of {d.max_spool_bytes_per_user} bytes "
                "(daemon.max_spool_bytes_per_user); try again when some have finished"
            )

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
        # On the loop, so nothing may block: O_NONBLOCK opens a FIFO without waiting for a writer (the spool
        # then refuses it), O_NOCTTY keeps a terminal from becoming ours, O_NOFOLLOW refuses a symlink that
        # could point anywhere the daemon may read.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW
        try:
            return os.open(f.path, flags), True
        except FileNotFoundError:
            raise BadRequest(f"no such file: {f.path}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BadRequest(f"{f.path} is a symbolic link; give the path of the file itself") from None
            raise BadRequest(f"cannot open {f.path}: {exc.strerror}") from None

    async def status(self, request: p.Status, caller: Caller, fds: list[int]) -> p.Reply:
        return p.Jobs(jobs=self._registry.select(request.ids, request.state, request.limit))

    def _check_free_space(self, floor_bytes: int) -> None:
        """Keep room for the results of the work already accepted: no new work below the floor."""
        try:
            free = self._free_bytes() if floor_bytes else floor_bytes
        except OSError:
            return  # cannot tell: a disk that is really full still refuses the spooling (storage_full)
        if free < floor_bytes:
            raise StorageFull(
                f"whisperd's disk is nearly full ({free} bytes free, below storage.min_free_bytes of "
                f"{floor_bytes}): no new work is taken until space is freed"
            )

    async def cancel(self, request: p.Cancel, caller: Caller, fds: list[int]) -> p.Reply:
        """Every job this caller may cancel, in one commit; the others get an error each, in request order."""
        outcomes: list[tuple[int, WhisperdError | None]] = []  # in request order; None: to be cancelled
        jobs: dict[int, JobRow] = {}
        for job_id in request.ids:
            try:
                job = self._registry.get(job_id)
                if not may_control(job.owner_uid, caller.uid, self._uid):
                    raise PermissionDenied(f"job {job_id} belongs to uid {job.owner_uid}")
                if job.state.terminal or job_id in jobs:  # a repeated id finds it cancelled already
                    state = job.state if job.state.terminal else JobState.CANCELLED
                    raise BadRequest(f"job {job_id} is already {state}")
                jobs[job_id] = job
                outcomes.append((job_id, None))
            except WhisperdError as exc:
                outcomes.append((job_id, exc))
        running = [job_id for job_id, job in jobs.items() if job.worker is not None]
        try:
            self._registry.apply_many(list(jobs.values()), JobEvent.CANCEL)
        except WhisperdError as refused:  # the store refused the commit: none of them is cancelled
            outcomes = [(job_id, refused if exc is None else exc) for job_id, exc in outcomes]
            jobs = {}
        for job_id in running:  # its worker, and those of its parts if it was spread over several
            if job_id in jobs:
                self._fleet.cancel_everywhere(job_id)
        errors = [
            p.ErrorBody(code=exc.code, message=exc.message, job_id=job_id)
            for job_id, exc in outcomes
            if exc is not None
        ]
        self._wake()
        return p.Jobs(jobs=[job.view() for job in jobs.values()], errors=errors)

    async def result(self, request: p.Result, caller: Caller, fds: list[int]) -> p.Reply:
        job = self._registry.get(request.id)
        if not may_control(job.owner_uid, caller.uid, self._uid):
            raise PermissionDenied(f"job {job.id} belongs to uid {job.owner_uid}")
        transcript = self._registry.transcript(job.id)
        if transcript is None:
            detail = f": {job.error}" if job.error else ""
            raise NotReady(f"job {job.id} is {job.state}{detail}")
        return p.ResultReply(job=job.view(), transcript=transcript, prompt=job.prompt)

    async def gpu(self, request: p.Gpu, caller: Caller, fds: list[int]) -> p.Reply:
        return p.Devices(devices=self._views.fleet_devices())

    async def stats(self, request: p.Stats, caller: Caller, fds: list[int]) -> p.Reply:
        return p.StatsReply(stats=self._views.stats())

    # ---- HTTP API tokens: a token acts as its user, so only privileged callers make, revoke or list them

    def _token_book(self, caller: Caller, doing: str) -> TokenBook:
        if not is_privileged(caller.uid, self._uid):
            raise PermissionDenied(f"only root or the daemon's user may {doing} HTTP API tokens")
        if self._tokens is None:
            raise BadRequest("this daemon keeps no HTTP API tokens")
        return self._tokens

    async def token_create(self, request: p.TokenCreate, caller: Caller, fds: list[int]) -> p.Reply:
        book = self._token_book(caller, "create")
        # In a thread: the user database may be a network service (LDAP, sssd), and the file is fsynced.
        token, info = await asyncio.to_thread(book.create, request.user, request.comment)
        log.info("HTTP API token %s made for %s (uid %d) by uid %d", info.id, info.user, info.uid, caller.uid)
        return p.TokenCreated(token=token, info=_token_view(info))

    async def token_revoke(self, request: p.TokenRevoke, caller: Caller, fds: list[int]) -> p.Reply:
        book = self._token_book(caller, "revoke")
        info = book.get(request.id)
        if not await asyncio.to_thread(book.revoke, request.id):
            raise NotFound(f"no HTTP API token {p.printable(request.id)!r} (`whisperctl token list`)")
        log.info("HTTP API token %s revoked by uid %d", request.id, caller.uid)
        return p.TokenRevoked(id=request.id, info=_token_view(info) if info is not None else None)

    async def token_list(self, request: p.TokenList, caller: Caller, fds: list[int]) -> p.Reply:
        return p.Tokens(tokens=[_token_view(info) for info in self._token_book(caller, "list").tokens()])


def _token_view(info: TokenInfo) -> p.TokenView:
    return p.TokenView(
        id=info.id, user=info.user, uid=info.uid, created_at=info.created_at, comment=info.comment
    )
