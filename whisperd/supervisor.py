"""One handle per worker process: spawn, read its messages, notice its death at once, restart with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping

import msgspec

from whisperd import workerproto as wp

log = logging.getLogger("whisperd.workers")

Spawner = Callable[..., Awaitable[asyncio.subprocess.Process]]
# Longest line read from a worker: a transcript of hours with word timestamps is one line. Workers fail a
# job whose result would be longer (workers.max_result_bytes, below this); a longer line still is a fault.
MAX_LINE_BYTES = 64 * 1024 * 1024
RESET_BACKOFF_AFTER_S = 60.0  # a worker that ran this long was not in a start-up loop


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
        on_fault: Callable[[WorkerHandle, str], None] | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        """on_fault: the worker broke the protocol (a line too long or undecodable), said in words for the
        job it was running; the handle kills it after the call."""
        self.spec = spec
        self._on_message = on_message
        self._on_exit = on_exit
        self._on_fault = on_fault
        self._backoff_s = restart_backoff_s
        self._backoff_max_s = restart_backoff_max_s
        self.next_backoff_s = restart_backoff_s  # before the next restart
        self._spawner = spawner
        self._max_line_bytes = max_line_bytes
        self._proc: asyncio.subprocess.Process | None = None
        self._audio: socket.socket | None = None  # the daemon's end of the worker's audio socket
        self._given_work = False  # this process was sent a batch: it got past start-up
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
        while not self._stopping:
            loop = asyncio.get_running_loop()
            started = loop.time()
            self._given_work = False
            returncode = await self._run_once()
            self._close_audio()
            if self._stopping:
                break
            self.ready.clear()
            self.models.clear()
            try:
                self._on_exit(self, returncode)
            except Exception:  # the handle must go on restarting whatever the daemon failed to record
                log.exception("handling the exit of worker %s failed", self.id)
            if self._given_work or loop.time() - started > RESET_BACKOFF_AFTER_S:
                # It started and took work, so this was no start-up loop: restart at once-ish. Deaths on a
                # job are bounded by that job's retries (each counts against it); the doubling is for a
                # worker that cannot start, whose device would be idle anyway.
                self.next_backoff_s = self._backoff_s
            backoff = self.next_backoff_s
            self.restarts += 1
            log.warning("worker %s exited with %s; restarting in %.1fs", self.id, returncode, backoff)
            with contextlib.suppress(TimeoutError):  # a stop() cuts the wait short
                await asyncio.wait_for(self._stopped.wait(), backoff)
            self.next_backoff_s = min(self._backoff_max_s, backoff * 2)

    async def _run_once(self) -> int:
        env = {**os.environ, **self.spec.env}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        try:
            self._proc = await self._spawner(
                *self.spec.argv, "--audio-fd", str(theirs.fileno()),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
                limit=self._max_line_bytes, pass_fds=(theirs.fileno(),),
            )  # fmt: skip
        except OSError as exc:
            ours.close()
            log.error("cannot start worker %s: %s", self.id, exc)
            return -1
        finally:
            theirs.close()
        self._audio = ours
        assert self._proc.stdout is not None
        if self._stopping and self._proc.stdin is not None:
            self._proc.stdin.close()  # stop() came while it was starting: let it exit at once
        log.info(
            "worker %s started (pid %d)",
            self.id,
            self._proc.pid,
            extra={"DEVICE": self.spec.device, "WORKER": self.id},
        )
        while True:
            try:
                line = await self._proc.stdout.readline()
            except ValueError:  # asyncio's LimitOverrunError, as readline() raises it
                self._fault(f"its result was larger than the daemon accepts from a worker "
                            f"({self._max_line_bytes // (1024 * 1024)} MiB)")  # fmt: skip
                break
            if not line:
                break
            try:
                message = wp.from_worker_decoder.decode(line)
            except msgspec.MsgspecError as exc:
                log.error("worker %s sent an undecodable line (%s): %.200r", self.id, exc, line)
                self._fault("its worker sent a reply the daemon cannot read")
                break
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

    def _fault(self, reason: str) -> None:
        """The worker broke the protocol: tell the fleet (whose job it was), then kill it; its death then
        settles its batch. What is left unread dies with it."""
        if self._on_fault is not None:
            try:
                self._on_fault(self, reason)
            except Exception:
                log.exception("handling a fault of worker %s failed", self.id)
        self.kill()

    def _close_audio(self) -> None:
        if self._audio is not None:
            self._audio.close()
            self._audio = None

    def send(self, message: wp.ToWorker) -> None:
        """A worker that died meanwhile gets nothing; its death is handled on its own."""
        if self._proc is None or self._proc.stdin is None:
            return
        if isinstance(message, wp.RunBatch):
            self._given_work = True
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._proc.stdin.write(wp.encode(message))

    def send_audio(self, batch_id: int, job_id: int, path: str) -> None:
        """Open a job's audio and pass the descriptor to the worker, which may not open the spool itself.
        Sent before the batch it belongs to; a file that cannot be opened is sent as none (the worker then
        fails that job). A spool file is ours and regular: the open does not block."""
        if self._audio is None:
            return
        try:
            fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            log.error("cannot open the audio of job %d (%s): %s", job_id, path, exc.strerror)
            fd = None
        try:
            message = wp.AUDIO_MESSAGE.pack(batch_id, job_id)
            if fd is None:
                self._audio.send(message)
            else:
                socket.send_fds(self._audio, [message], [fd])
        except OSError as exc:  # the worker died meanwhile: its death is handled on its own
            log.debug("cannot pass the audio of job %d to worker %s: %s", job_id, self.id, exc)
        finally:
            if fd is not None:
                os.close(fd)

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
