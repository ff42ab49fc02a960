"""Group commit: work is acknowledged only once it is durable, with one flush shared by every request that
waits meanwhile; and the store's log kept short. Every fsync and checkpoint runs in a thread of its own
kind, never on the event loop.

A commit returns once the store has written it, not synced it. A flush makes durable everything committed
before it started: an fsync of the spool directory (the names of the files spooled so far; each copy
fsynced its data already), then `Store.sync()`. In that order, so that a job whose row survives a power cut
also has its audio; a file whose row does not is an orphan, removed at the next start. A submit awaits
`GroupCommit.durable()`: while a flush runs, every request that arrives waits for the next one, which
covers them all, so N concurrent submits cost two flushes, not N. Other commits (dispatches, results,
cancels) only `request()` one and do not wait: they are durable a flush later, within milliseconds; a power
cut before that loses at most those last transitions, and the jobs run again (recovery requeues what was
PROCESSING): at least once, never lost. A finished job's audio is unlinked only after the flush that made
its last transition durable (`discard_when_durable`), so a job brought back by a power cut still has it.

`Checkpoints` folds the store's log into the database every interval in a thread; see sqlite_wal.py for
the brief step on the loop that keeps it short while commits never pause."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor, Future

from whisperd.errors import StorageError, os_storage_error

log = logging.getLogger("whisperd.durability")

CHECKPOINT_INTERVAL_S = 1.0


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _as_storage_error(exc: BaseException) -> BaseException:
    """What a failed flush means to those who wait for it: a StorageError, never `internal`."""
    if isinstance(exc, OSError):
        return os_storage_error(exc, "make the submitted jobs durable")
    return exc


class GroupCommit:
    def __init__(
        self,
        sync_spool: Callable[[], None],
        sync_store: Callable[[], None],
        discard: Callable[[str], None],
        executor: Executor,
    ) -> None:
        """sync_spool, sync_store: blocking, run in that order in executor's thread (one of its own: a disk
        that hangs holds that thread alone). discard: unlinks a spool file, after the flush."""
        self._sync_spool = sync_spool
        self._sync_store = sync_store
        self._discard = discard
        self._executor = executor
        self._running: asyncio.Future[None] | None = None  # the flush in its thread now
        self._next: asyncio.Future[None] | None = None  # the one after it: covers what came meanwhile
        self._discards: list[str] = []  # to unlink once the next flush has made their jobs' ends durable
        self._failing = False
        self.flushes = 0  # flushes finished (failed ones too): what tests and the bench count
        self.failures = 0

    async def durable(self) -> None:
        """Returns once everything committed before the call is durable; raises a StorageError (StorageFull)
        when the flush failed. A cancelled caller leaves the flush to finish for the others."""
        try:
            await asyncio.shield(self._schedule())
        except StorageError as exc:  # one error per caller: a shared one would gather their tracebacks
            raise type(exc)(exc.message) from None

    def request(self) -> None:
        """A flush soon, without waiting for it: for commits the daemon made on its own (results)."""
        if _loop_running():  # else (a tool, a test) the next flush or the store's close covers them
            self._schedule()

    def discard_when_durable(self, path: str | None) -> None:
        """Unlink a finished job's audio once the flush after its last commit has made that durable."""
        if not path:
            return
        if not _loop_running():  # a tool, a test: no flush will come
            self._discard(path)
            return
        self._discards.append(path)
        self._schedule()

    def _schedule(self) -> asyncio.Future[None]:
        """The flush that covers every commit made until now: one that starts now, or the next one."""
        if self._running is None:
            return self._start(asyncio.get_running_loop().create_future())
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        return self._next

    def _start(self, done: asyncio.Future[None]) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        discards, self._discards = self._discards, []
        self._running = done
        try:
            flush = self._executor.submit(self._flush, discards)
        except RuntimeError as exc:  # the pool is shut down: the daemon is stopping
            self._running = None
            done.set_exception(StorageError(f"cannot make the submitted jobs durable: {exc}"))
            done.exception()  # retrieved, for those who only requested it
            return done
        flush.add_done_callback(lambda f: self._call_on_loop(loop, done, discards, f))
        return done

    def _flush(self, discards: list[str]) -> None:
        """In the executor's thread."""
        self._sync_spool()
        self._sync_store()
        for path in discards:
            try:
                self._discard(path)
            except OSError as exc:  # the flush did its work: a file left behind is removed at next start
                log.warning("cannot remove the spooled audio %s: %s", path, exc.strerror)

    def _call_on_loop(
        self,
        loop: asyncio.AbstractEventLoop,
        done: asyncio.Future[None],
        discards: list[str],
        flush: Future[None],
    ) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._finished, done, discards, flush)

    def _finished(self, done: asyncio.Future[None], discards: list[str], flush: Future[None]) -> None:
        self._running = None
        self.flushes += 1
        exc = flush.exception()
        if exc is None:
            if self._failing:
                self._failing = False
                log.warning("the state dir takes fsyncs again: submits are acknowledged again")
            done.set_result(None)
        else:
            self.failures += 1
            self._discards[:0] = discards  # their jobs' ends may not be durable: kept for the next flush
            error = _as_storage_error(exc)
            if not self._failing:
                self._failing = True
                log.error("cannot make the latest commits durable (%s): submits are answered with a storage "
                          "error until a flush succeeds", error)  # fmt: skip
            done.set_exception(error)
            done.exception()  # retrieved: a flush only requested has nobody to raise it to
        if self._next is not None:
            waiting, self._next = self._next, None
            self._start(waiting)


class Checkpoints:
    """The task that keeps the store's log short: a checkpoint in a thread of its own every interval_s; when
    the log is still past its limit after one (commits kept coming while it ran), a second one catches up
    with what came meanwhile, then restart_log() on the loop folds in the few frames left."""

    def __init__(
        self,
        checkpoint: Callable[[], bool],
        restart_log: Callable[[], None],
        executor: Executor,
        interval_s: float = CHECKPOINT_INTERVAL_S,
    ) -> None:
        self._checkpoint = checkpoint
        self._restart_log = restart_log
        self._executor = executor
        self.interval_s = interval_s
        self.checkpoints = 0  # rounds done
        self.restarts = 0  # restart_log() calls
        self._failing = False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.round()

    async def round(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if await loop.run_in_executor(self._executor, self._checkpoint) and await loop.run_in_executor(
                self._executor, self._checkpoint
            ):
                self._restart_log()
                self.restarts += 1
        except StorageError as exc:  # the next round tries again; commits go on meanwhile
            if not self._failing:
                self._failing = True
                log.warning("checkpoint of the job store failed (%s); retried every %g s", exc.message,
                            self.interval_s)  # fmt: skip
            return
        self._failing = False
        self.checkpoints += 1
