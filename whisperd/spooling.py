"""Spooling submitted audio off the event loop, in a bounded pool of threads of its own, with a per-user limit
on copies in progress and a deadline per copy.

A descriptor whose reads never return (a FUSE file system that hangs) holds its thread until the read returns,
if ever: Python cannot interrupt a thread blocked in a system call. So the deadline answers the caller and
abandons the copy, but the copy still counts against its user (and holds its thread) until the thread is
free again; a copy that finishes after it was abandoned is discarded. One user can therefore hold at most
`per_user` threads, and the loop, NVML and the other users' submits never wait for them."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from concurrent.futures import Executor, Future

from whisperd.errors import Busy, InvalidAudio
from whisperd.spool import Spool


class _Copy:
    """One copy in the pool; read and written on the loop's thread only."""

    def __init__(self, uid: int, fd: int) -> None:
        self.uid = uid
        self.fd = fd
        self.abandoned = False  # the caller gave up waiting: the copy, if it ever ends, is not wanted


class Spooler:
    def __init__(self, spool: Spool, executor: Executor) -> None:
        self._spool = spool
        self._executor = executor
        self._in_progress: Counter[int] = Counter()  # uid -> copies whose thread has not finished

    def in_progress(self, uid: int) -> int:
        return self._in_progress[uid]

    async def copy(
        self, fd: int, name: str, uid: int, max_bytes: int, per_user: int, timeout_s: float
    ) -> tuple[str, int]:
        """Copy the open file fd into the spool for user uid; returns the spool path and the bytes copied.
        Raises Busy when uid
        already has per_user copies in progress or no thread took this one within timeout_s, InvalidAudio
        when the read did not finish within timeout_s, and whatever Spool.copy_from_fd raises."""
        if self._in_progress[uid] >= per_user:
            raise Busy(
                f"{name}: {self._in_progress[uid]} of your files are still being read (at most {per_user} "
                "at once); try again when they are done"
            )
        # The thread reads a descriptor of its own: the caller's is closed when the request ends, and its
        # number may be reused for another file while a stuck read still holds this one.
        try:
            own_fd = os.dup(fd)
        except OSError as exc:
            raise InvalidAudio(f"{name}: cannot read the audio: {exc.strerror}") from None
        loop = asyncio.get_running_loop()
        copy = _Copy(uid, own_fd)
        try:
            future = self._executor.submit(self._spool.copy_from_fd, own_fd, max_bytes)
        except BaseException:
            os.close(own_fd)
            raise
        self._in_progress[uid] += 1
        future.add_done_callback(lambda done: self._call_on_loop(loop, copy, done))
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            copy.abandoned = True
            self._discard_if_done(future)
            if future.cancel():  # it was still waiting for a thread
                raise Busy(
                    f"{name}: every spool thread stayed busy for {timeout_s:g} s; try again later"
                ) from None
            raise InvalidAudio(
                f"{name}: reading the audio took longer than {timeout_s:g} s (daemon.spool_timeout_s); "
                "is it on a file system that does not answer?"
            ) from None
        except BaseException:
            copy.abandoned = True  # the request was cancelled: nobody takes this copy any more
            if not future.cancel():
                self._discard_if_done(future)
            raise

    def _discard_if_done(self, future: Future[tuple[str, int]]) -> None:
        """A copy that finished just as its caller gave up (its result was on its way to the caller, so the
        accounting in _finished kept it): nobody takes it now."""
        if future.done() and not future.cancelled() and future.exception() is None:
            self._spool.discard(future.result()[0])

    def _call_on_loop(
        self, loop: asyncio.AbstractEventLoop, copy: _Copy, done: Future[tuple[str, int]]
    ) -> None:
        """In the pool's thread (or the loop's, when cancelled): the accounting belongs to the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is gone, nothing to count
            loop.call_soon_threadsafe(self._finished, copy, done)

    def _finished(self, copy: _Copy, done: Future[tuple[str, int]]) -> None:
        os.close(copy.fd)
        self._in_progress[copy.uid] -= 1
        if self._in_progress[copy.uid] <= 0:
            del self._in_progress[copy.uid]
        if copy.abandoned and not done.cancelled() and done.exception() is None:
            self._spool.discard(done.result()[0])  # finished after its caller was answered: not wanted
