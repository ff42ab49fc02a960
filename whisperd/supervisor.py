"""One handle per worker process: spawn, read its messages, notice its death at once, restart with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping

import msgspec

from whisperd import workerproto as wp

log = logging.getLogger("whisperd.workers")

Spawner = Callable[..., Awaitable[asyncio.subprocess.Process]]


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # "cpu0", "gpu1", "gpu1.1" (a second worker on GPU 1)
    device: str  # "cpu" or "cuda:N"
    argv: tuple[str, ...]
    env: Mapping[str, str]


class WorkerHandle:
    """Owns one worker process across its restarts: spawns it, reads its messages, notices its death at once
    and restarts it with backoff. What the messages and deaths mean is the callbacks' business."""

    def __init__(
        self,
        spec: WorkerSpec,
        on_message: Callable[[WorkerHandle, wp.FromWorker], None],
        on_exit: Callable[[WorkerHandle, int], None],
        restart_backoff_s: float,
        restart_backoff_max_s: float,
        spawner: Spawner = asyncio.create_subprocess_exec,
    ) -> None:
        self.spec = spec
        self._on_message = on_message
        self._on_exit = on_exit
        self._backoff_s = restart_backoff_s
        self._backoff_max_s = restart_backoff_max_s
        self._spawner = spawner
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        self.ready = asyncio.Event()
        self.models: set[str] = set()  # loaded in the worker, as it last said
        self.restarts = 0

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def up(self) -> bool:
        """Started, said Ready, and not being stopped: it may be given work."""
        return self.ready.is_set() and not self._stopping

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker-{self.id}")

    async def _run(self) -> None:
        backoff = self._backoff_s
        while not self._stopping:
            loop = asyncio.get_running_loop()
            started = loop.time()
            returncode = await self._run_once()
            if self._stopping:
                break
            self.ready.clear()
            self.models.clear()
            try:
                self._on_exit(self, returncode)
            except Exception:  # the handle must go on restarting whatever the daemon failed to record
                log.exception("handling the exit of worker %s failed", self.id)
            if loop.time() - started > 60:
                backoff = self._backoff_s  # it ran for a while: the crash was not a start-up loop
            self.restarts += 1
            log.warning("worker %s exited with %s; restarting in %.1fs", self.id, returncode, backoff)
            with contextlib.suppress(TimeoutError):  # a stop() cuts the wait short
                await asyncio.wait_for(self._stopped.wait(), backoff)
            backoff = min(self._backoff_max_s, backoff * 2)

    async def _run_once(self) -> int:
        env = {**os.environ, **self.spec.env}
        try:
            self._proc = await self._spawner(
                *self.spec.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env=env,
                limit=64 * 1024 * 1024,  # a transcript of hours arrives as one line
            )
        except OSError as exc:
            log.error("cannot start worker %s: %s", self.id, exc)
            return -1
        assert self._proc.stdout is not None
        if self._stopping and self._proc.stdin is not None:
            self._proc.stdin.close()  # stop() came while it was starting: let it exit at once
        log.info(
            "worker %s started (pid %d)",
            self.id,
            self._proc.pid,
            extra={"DEVICE": self.spec.device, "WORKER": self.id},
        )
        while line := await self._proc.stdout.readline():
            try:
                message = wp.from_worker_decoder.decode(line)
            except msgspec.MsgspecError:
                log.error("worker %s sent an undecodable line: %.200r", self.id, line)
                continue
            if isinstance(message, wp.Ready):
                self.models = set(message.models)
                self.ready.set()
            try:
                self._on_message(self, message)
            except Exception:
                # What the daemon could not record it must not believe: restart the worker, whose exit
                # then settles its batch.
                log.exception(
                    "handling %s from worker %s failed: restarting it", type(message).__name__, self.id
                )
                self.kill()
        return await self._proc.wait()

    def send(self, message: wp.ToWorker) -> None:
        """A worker that died meanwhile gets nothing; its death is handled on its own."""
        if self._proc is None or self._proc.stdin is None:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._proc.stdin.write(wp.encode(message))

    def kill(self) -> None:
        """The death is then noticed and handled like any other (on_exit, restart)."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)

    async def stop(self, timeout_s: float) -> None:
        """Close stdin so the worker finishes its batch (its results still arrive) and exits; kill it if it
        takes longer than timeout_s."""
        self._stopping = True
        self._stopped.set()
        proc, task = self._proc, self._task
        if proc is not None and proc.returncode is None and proc.stdin is not None:
            proc.stdin.close()
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            self.kill()
            with contextlib.suppress(asyncio.CancelledError):
                await task
