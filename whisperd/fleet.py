"""The fleet: every worker process and the batch each one runs. The one owner of "which worker runs what":
it hands out batches (reserving their device memory and passing their audio), follows each batch through its
worker's reports, enforces cancel deadlines, progress deadlines (on the injected clock) and the workers'
memory cap, and hands what the reports mean to the outcomes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from whisperd import workerproto as wp
from whisperd.batch import Batch
from whisperd.gpupool import DevicePool
from whisperd.protocol import WorkerView
from whisperd.scheduling import WorkerSlot
from whisperd.supervisor import Spawner, WorkerHandle, WorkerSpec

log = logging.getLogger("whisperd")
GIB = 1024**3
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class WorkerLimits(msgspec.Struct, frozen=True, kw_only=True):
    max_memory_bytes: int = 0  # resident memory of a busy worker; 0: no cap
    progress_timeout_s: float = 0.0  # longest silence of a busy worker; 0: none


def rss_bytes(pid: int) -> int | None:
    """A process's resident memory from procfs (no disk, does not block); None once it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


class WorkerEvents(Protocol):
    """What the fleet reports about jobs (implemented by outcomes.WorkerOutcomes)."""

    def job_message(self, worker_id: str, device: str, message: wp.JobMessage) -> None: ...

    def batch_interrupted(
        self,
        worker_id: str,
        unfinished: Sequence[int],
        culprit: int | None,
        error: str,
        suspects: Sequence[int] = (),
    ) -> None: ...


class Fleet:
    def __init__(
        self,
        pool: DevicePool,
        events: WorkerEvents,
        wake: Callable[[], None],
        clock: Callable[[], float],
        spawner: Spawner,
        cancel_grace_s: float,
        restart_backoff_s: float,
        restart_backoff_max_s: float,
        limits: Callable[[], WorkerLimits] = WorkerLimits,
        memory_of: Callable[[int], int | None] = rss_bytes,
        check_interval_s: float = 1.0,
    ) -> None:
        """limits: read at each check, so a reload applies at once. memory_of: a process's resident bytes."""
        self._pool = pool
        self._events = events
        self._wake = wake
        self._clock = clock
        self._spawner = spawner
        self.cancel_grace_s = cancel_grace_s
        self._restart_backoff = (restart_backoff_s, restart_backoff_max_s)
        self._limits = limits
        self._memory_of = memory_of
        self._check_interval_s = check_interval_s
        self._handles: dict[str, WorkerHandle] = {}
        self._batches: dict[str, Batch] = {}  # by worker id, while it runs one
        self._killed: set[str] = set()  # workers killed through no fault of their running job
        self._blamed: dict[str, str] = {}  # workers killed for what their job made them do: why
        self._next_batch_id = 1
        self._checks: asyncio.Task[None] | None = None

    # ---- life ----------------------------------------------------------------------------------------

    def start(self, specs: Sequence[WorkerSpec]) -> None:
        for spec in specs:
            handle = WorkerHandle(
                spec, self._on_message, self._on_exit, *self._restart_backoff, self._spawner,
                on_fault=self._on_fault,
            )  # fmt: skip
            self._handles[spec.id] = handle
            handle.start()
        if self._checks is None:
            self._checks = asyncio.create_task(self._check_periodically(), name="worker-limits")

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._check_interval_s)
            try:
                self.enforce_limits()
            except Exception:  # a check that failed once must not end the checks
                log.exception("checking the workers' limits failed")

    async def wait_ready(self, timeout_s: float) -> int:
        """Wait until every worker is up or timeout_s passes; returns how many are up."""
        waits = [asyncio.create_task(h.ready.wait()) for h in self._handles.values()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout_s)
            for task in pending:
                task.cancel()
        return sum(h.ready.is_set() for h in self._handles.values())

    async def stop(self, timeout_s: float) -> None:
        """Let running batches finish within timeout_s (their results still arrive), then stop the workers."""
        if self._checks is not None:
            self._checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checks
        await asyncio.gather(*(h.stop(timeout_s) for h in self._handles.values()))

    # ---- work ----------------------------------------------------------------------------------------

    def _idle(self, handle: WorkerHandle) -> bool:
        return handle.up and handle.id not in self._batches

    def any_idle(self) -> bool:
        return any(self._idle(h) for h in self._handles.values())

    def slots(self) -> list[WorkerSlot]:
        return [
            WorkerSlot(id=h.id, device=h.spec.device, idle=self._idle(h), models=tuple(sorted(h.models)))
            for h in self._handles.values()
        ]

    def pids(self) -> frozenset[int]:
        """The worker processes running now."""
        return frozenset(h.pid for h in self._handles.values() if h.pid is not None)

    def device_of(self, worker_id: str) -> str:
        return self._handles[worker_id].spec.device

    def dispatch(
        self, worker_id: str, jobs: Sequence[wp.JobSpec], reserve_bytes: int, send: bool = True
    ) -> Batch:
        """The batch is the worker's from now on (it is busy, its memory reserved); send=False: its audio is
        still on its way (another host's job), send_staged() sends it once it is here."""
        handle = self._handles[worker_id]
        together = all(j.mode == "batched" for j in jobs)
        batch = Batch(self._next_batch_id, [j.job_id for j in jobs], self._clock(), together=together)
        self._next_batch_id += 1
        self._pool.reserve(batch.id, handle.spec.device, reserve_bytes)
        self._batches[worker_id] = batch
        if send:
            self._send(handle, batch, jobs)
        return batch

    def send_staged(self, worker_id: str, batch: Batch, jobs: Sequence[wp.JobSpec]) -> bool:
        """Send a batch dispatched with send=False; False if the worker no longer holds it (it died, or its
        jobs were cancelled meanwhile)."""
        handle = self._handles.get(worker_id)
        if handle is None or self._batches.get(worker_id) is not batch:
            return False
        self._send(handle, batch, [j for j in jobs if batch.holds(j.job_id)])
        return True

    def unstage(self, worker_id: str, batch: Batch) -> None:
        """Give up a batch dispatched with send=False before it was sent: the worker is idle again."""
        if self._batches.get(worker_id) is batch:
            self._end_batch(worker_id)
            self._wake()

    @staticmethod
    def _send(handle: WorkerHandle, batch: Batch, jobs: Sequence[wp.JobSpec]) -> None:
        for job in jobs:  # the audio goes first, as descriptors: the worker cannot open the spool
            handle.send_audio(batch.id, job.job_id, job.audio_path)
        handle.send(wp.RunBatch(batch_id=batch.id, jobs=list(jobs)))

    def cancel(self, worker_id: str, job_id: int) -> None:
        """Tell the worker to stop the job. Only the job it is on gets a deadline, after which the worker is
        killed; one still waiting in the batch is skipped when its turn comes."""
        handle, batch = self._handles.get(worker_id), self._batches.get(worker_id)
        if handle is None or batch is None or not batch.holds(job_id):
            return
        if batch.current_job == job_id:
            batch.cancel_deadline_for(job_id, self._clock() + self.cancel_grace_s)
            self._wake()  # the loop then sleeps no longer than the deadline
        handle.send(wp.CancelJob(job_id=job_id))

    def cancel_everywhere(self, job_id: int) -> None:
        """Cancel the job on every worker that runs it (or a part of it)."""
        for worker_id, batch in list(self._batches.items()):
            if batch.holds(job_id):
                self.cancel(worker_id, job_id)

    def share(self, worker_id: str, job_id: int, helpers: int, min_part_s: float) -> bool:
        """Ask the worker to give parts of the job to up to `helpers` idle workers; False if it no longer
        runs it."""
        handle, batch = self._handles.get(worker_id), self._batches.get(worker_id)
        if handle is None or batch is None or not batch.holds(job_id):
            return False
        handle.send(wp.ShareJob(job_id=job_id, helpers=helpers, min_part_s=min_part_s))
        return True

    def enforce_cancel_deadlines(self) -> float | None:
        """Kill the workers whose cancelled job outlived its deadline; returns the next deadline, if any."""
        now = self._clock()
        next_deadline: float | None = None
        for worker_id, batch in list(self._batches.items()):
            if batch.cancel_overdue(now):
                self.kill(worker_id, "it did not stop a cancelled job in time")
            elif (deadline := batch.cancel_deadline) is not None:
                next_deadline = deadline if next_deadline is None else min(next_deadline, deadline)
        return next_deadline

    def abandon_device(self, device: str) -> None:
        """A GPU stopped answering: kill its busy workers, so their jobs go back to the queue unharmed."""
        for worker_id in list(self._batches):
            if self._handles[worker_id].spec.device == device:
                self.kill(worker_id, f"{device} was lost")

    def kill(self, worker_id: str, reason: str) -> None:
        """Kill a worker through no fault of its running job: its death then requeues that job unharmed."""
        log.warning("killing worker %s: %s", worker_id, reason, extra={"WORKER": worker_id})
        self._killed.add(worker_id)
        self._handles[worker_id].kill()

    def kill_for_job(self, worker_id: str, reason: str) -> None:
        """Kill a worker for what its job made it do: the job's attempt then fails with the reason (retried
        while retries remain), like a crash of the worker on its own."""
        if worker_id not in self._batches:
            self.kill(worker_id, reason)  # no job to blame
            return
        log.warning("killing worker %s: %s", worker_id, reason, extra={"WORKER": worker_id})
        self._blamed[worker_id] = reason
        self._handles[worker_id].kill()

    def enforce_limits(self) -> None:
        """Kill busy workers stuck past the progress timeout or over the memory cap; their jobs are blamed.
        Idle workers are left alone: what they hold is their loaded models, no job's doing."""
        limits, now = self._limits(), self._clock()
        for worker_id, batch in list(self._batches.items()):
            handle = self._handles[worker_id]
            if worker_id in self._killed or worker_id in self._blamed or handle.pid is None:
                continue  # already on its way out
            silent_s = batch.silent_for(now)
            if limits.progress_timeout_s and silent_s > limits.progress_timeout_s:
                timeout_s = limits.progress_timeout_s
                reason = f"its worker sent nothing for {silent_s:.0f} s"
                self.kill_for_job(worker_id, f"{reason} (workers.progress_timeout_s: {timeout_s:g})")
                continue
            rss = self._memory_of(handle.pid) if limits.max_memory_bytes else None
            if rss is not None and rss > limits.max_memory_bytes:
                cap_gib = limits.max_memory_bytes / GIB
                reason = f"its worker used {rss / GIB:.1f} GiB of memory, over the limit of {cap_gib:.1f} GiB"
                self.kill_for_job(worker_id, reason + " (workers.max_memory_bytes)")

    # ---- what workers report ---------------------------------------------------------------------------

    def _on_message(self, handle: WorkerHandle, message: wp.FromWorker) -> None:
        if isinstance(message, wp.Ready):
            self._wake()
            return
        batch = self._batches.get(handle.id)
        if isinstance(message, wp.BatchDone):
            handle.models = set(message.models)
            if batch is not None and batch.id == message.batch_id:
                self._end_batch(handle.id)
                self._wake()
            return
        if batch is None or not batch.holds(message.job_id):
            return  # about a batch already settled (the worker was killed and this is its last word)
        batch.heard(self._clock())
        if isinstance(message, wp.Started):
            batch.start(message.job_id)
        elif isinstance(message, wp.Finished | wp.Failed | wp.Stopped):
            batch.finish(message.job_id)
        self._events.job_message(handle.id, handle.spec.device, message)

    def _on_fault(self, handle: WorkerHandle, reason: str) -> None:
        self.kill_for_job(handle.id, reason)

    def _on_exit(self, handle: WorkerHandle, returncode: int) -> None:
        killed_by_us = handle.id in self._killed
        self._killed.discard(handle.id)
        blamed = self._blamed.pop(handle.id, None)
        batch = self._end_batch(handle.id)
        if batch is None:
            return
        if blamed is not None:  # the job's doing, even if a no-fault kill came too
            culprit, error = batch.blamed_job, blamed
        else:
            culprit = None if killed_by_us else batch.running_job
            error = f"its worker {handle.id} died (exit status {returncode})"
        suspects: list[int] = []
        if culprit is not None and batch.together and len(batch.unfinished()) > 1:
            # Decoded together: which of them did it cannot be told. None is counted; each runs in a batch
            # of its own next, where whatever its worker does is its own doing.
            culprit, suspects = None, batch.unfinished()
        self._events.batch_interrupted(handle.id, batch.unfinished(), culprit, error, suspects)

    def _end_batch(self, worker_id: str) -> Batch | None:
        batch = self._batches.pop(worker_id, None)
        if batch is not None:
            self._pool.release(batch.id)
        return batch

    # ---- views ---------------------------------------------------------------------------------------

    def views(self) -> list[WorkerView]:
        return [self._view(h) for h in self._handles.values()]

    def _view(self, handle: WorkerHandle) -> WorkerView:
        batch = self._batches.get(handle.id)
        if handle.stopping:
            state = "stopped"
        elif not handle.ready.is_set():
            state = "starting"
        else:
            state = "busy" if batch else "idle"
        return WorkerView(
            id=handle.id, device=handle.spec.device, pid=handle.pid, state=state,
            models=sorted(handle.models), jobs=list(batch.job_ids) if batch else [], restarts=handle.restarts,
        )  # fmt: skip
