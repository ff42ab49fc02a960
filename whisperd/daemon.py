"""The daemon: builds the components, runs the tick loop (snapshot, plan, apply) and the monitors, reacts to
worker messages and deaths, and drains on a signal. Signal handlers only record; the loop acts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

import msgspec

from whisperd import workerproto as wp
from whisperd.config import Config
from whisperd.fleet import model_memory_bytes, worker_specs
from whisperd.gpupool import CPU, DevicePool
from whisperd.gpuprobe import NullProbe, NvmlProbe
from whisperd.jobs import JobEvent, JobState
from whisperd.monitors import Monitors
from whisperd.protocol import DeviceView, JobEventReply, StatsView, WorkerView
from whisperd.registry import JobRegistry
from whisperd.scheduling import PlanSettings, QueuedJob, WorkerSlot, plan
from whisperd.store import JobRecord, Store
from whisperd.supervisor import Batch, Spawner, WorkerHandle
from whisperd.watchers import Watchers

log = logging.getLogger("whisperd")


class Daemon:
    def __init__(
        self,
        config: Config,
        store: Store,
        probe: NvmlProbe | NullProbe,
        spawner: Spawner = asyncio.create_subprocess_exec,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.probe = probe
        self.clock = clock
        sched = config.scheduler
        self.registry = JobRegistry(
            store, clock, sched.max_retries, sched.retry_backoff_s, sched.retry_backoff_max_s
        )
        self.pool = DevicePool(cpu=False)  # set up in start(), once the GPUs are known
        self.settings = PlanSettings(
            min_batch_size=sched.min_batch_size,
            max_batch_size=sched.max_batch_size,
            batch_timeout_s=sched.batch_timeout_s,
            min_free_memory_bytes=sched.min_free_memory_bytes,
            memory_safety_margin=sched.memory_safety_margin,
            model_memory_bytes=model_memory_bytes(config),
        )
        self.watchers = Watchers()
        self.registry.subscribe(lambda view: self.watchers.publish(JobEventReply(job=view)))
        self.workers: dict[str, WorkerHandle] = {}
        self._spawner = spawner
        self._wake = asyncio.Event()
        self._stop_signal: int | None = None
        self._stop = asyncio.Event()
        self.draining = False
        self._next_batch_id = 1
        self._kill_reasons: dict[str, str] = {}  # worker id -> why we killed it
        self._avoid_devices: dict[int, frozenset[str]] = {}  # job id -> devices it ran out of memory on
        self.started_at = clock()
        self.last_tick_at = 0.0
        self.oom_events: dict[str, int] = {}
        self.tick_observer: Callable[[float], None] | None = None  # metrics: each round's duration
        self.oom_observer: Callable[[str], None] | None = None  # metrics: out-of-memory on a device
        self.audio_seconds_total = 0.0
        self.processing_seconds_total = 0.0

    # ---- set-up --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover the queue, read the devices, start the workers and wait until they are up."""
        self.registry.recover()
        readings = []
        if self.config.gpu.enabled and self.probe.start():
            readings = await asyncio.to_thread(self.probe.read)
            log.info("NVML driver %s: %s", self.probe.driver_version,
                     ", ".join(f"cuda:{r.index} {r.name}" for r in readings) or "no GPUs")  # fmt: skip
        specs = worker_specs(self.config, readings, os.cpu_count() or 1)
        self.pool = DevicePool(cpu=any(s.device == CPU for s in specs))
        self.pool.update(readings)
        for spec in specs:
            w = self.config.workers
            handle = WorkerHandle(
                spec, self._on_worker_message, self._on_worker_exit,
                w.restart_backoff_s, w.restart_backoff_max_s, self._spawner,
            )  # fmt: skip
            self.workers[spec.id] = handle
            handle.start()
        if not self.workers:
            log.warning("no workers configured: jobs will wait until workers are configured")
        waits = [asyncio.create_task(h.ready.wait()) for h in self.workers.values()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=self.config.workers.start_timeout_s)
            for task in pending:
                task.cancel()
        log.info("%d workers up", sum(h.ready.is_set() for h in self.workers.values()))

    def request_stop(self, signum: int) -> None:
        """Signal handler: record only."""
        self._stop_signal = signum
        self._stop.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)

    def wake(self) -> None:
        self._wake.set()

    # ---- the loop ------------------------------------------------------------------------------------

    async def run_until_stopped(self) -> None:
        monitors = Monitors(self).start()
        try:
            while not self._stop.is_set():
                timeout = self.tick()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                self._wake.clear()
        finally:
            for task in monitors:
                task.cancel()
        log.info("signal %s received: draining", self._stop_signal)

    def tick(self) -> float:
        """One scheduling round, timed; returns how long the loop may sleep before the next."""
        started = time.perf_counter()
        try:
            return self._tick()
        finally:
            self.last_tick_at = self.clock()
            if self.tick_observer is not None:
                self.tick_observer(time.perf_counter() - started)

    def _tick(self) -> float:
        now = self.clock()
        next_due = now + self.config.scheduler.schedule_interval_s
        for job in self.registry.live():
            if job.state is JobState.RETRYING and job.not_before is not None:
                if job.not_before <= now:
                    self.registry.apply(job, JobEvent.BACKOFF_ELAPSED)
                else:
                    next_due = min(next_due, job.not_before)
        self._enforce_cancel_deadlines()
        if self.draining:
            return max(0.0, next_due - now)
        pending = [j for j in self.registry.live() if j.state is JobState.PENDING]
        if pending:
            queue = [
                QueuedJob(
                    id=j.id,
                    model=j.model,
                    priority=j.priority,
                    queued_at=j.queued_at,
                    avoid_devices=self._avoid_devices.get(j.id, frozenset()),
                )
                for j in pending
            ]
            slots = [
                WorkerSlot(id=h.id, device=h.spec.device, idle=h.idle, models=tuple(sorted(h.models)))
                for h in self.workers.values()
            ]
            for placement in plan(queue, slots, self.pool.get_gpu_status(), now, self.settings):
                log.debug(
                    "placing jobs %s on %s: %s", placement.job_ids, placement.worker_id, placement.reason
                )
                self._dispatch(
                    placement.worker_id, placement.model, list(placement.job_ids), placement.reserve_bytes
                )
            if self.settings.min_batch_size > 1:
                next_due = min(next_due, min(j.queued_at for j in pending) + self.settings.batch_timeout_s)
        return max(0.0, next_due - now)

    def _dispatch(self, worker_id: str, model: str, job_ids: list[int], reserve_bytes: int) -> None:
        handle = self.workers[worker_id]
        batch = Batch(id=self._next_batch_id, job_ids=job_ids, model=model)
        self._next_batch_id += 1
        self.pool.reserve(batch.id, handle.spec.device, reserve_bytes)
        specs = []
        t = self.config.transcribe
        for job_id in job_ids:
            job = self.registry.get(job_id)
            self.registry.apply(job, JobEvent.DISPATCH, device=handle.spec.device, worker=handle.id)
            assert job.spool_path is not None
            specs.append(
                wp.JobSpec(
                    job_id=job.id, audio_path=job.spool_path, model=job.model,
                    model_source=self.config.models[job.model], language=job.language, task=job.task,
                    word_timestamps=job.word_timestamps, beam_size=t.beam_size, vad_filter=t.vad_filter,
                )
            )  # fmt: skip
        handle.run_batch(batch, specs)

    def _enforce_cancel_deadlines(self) -> None:
        now = time.monotonic()
        for handle in self.workers.values():
            if handle.cancel_deadline is not None and handle.cancel_deadline <= now:
                log.warning("worker %s did not stop a cancelled job in time: killing it", handle.id)
                handle.cancel_deadline = None
                self._kill(handle, "cancel")

    def _kill(self, handle: WorkerHandle, reason: str) -> None:
        """Kill a worker through no fault of its running job: on_exit then requeues that job unharmed."""
        self._kill_reasons[handle.id] = reason
        handle.kill()

    # ---- worker events -------------------------------------------------------------------------------

    def _processing_job(self, handle: WorkerHandle, job_id: int) -> JobRecord | None:
        """The live job a worker message is about, if it is still PROCESSING there (not cancelled)."""
        job = self.registry.find_live(job_id)
        return (
            job if job is not None and job.state is JobState.PROCESSING and job.worker == handle.id else None
        )

    def _on_worker_message(self, handle: WorkerHandle, message: wp.FromWorker) -> None:
        batch = handle.batch
        if isinstance(message, wp.Ready):
            self.wake()
        elif isinstance(message, wp.BatchDone):
            handle.models = set(message.models)
            if batch is not None and batch.id == message.batch_id:
                self.pool.release(batch.id)
                handle.batch = None
                handle.cancel_deadline = None
                self.wake()
        elif batch is not None:
            job = self._processing_job(handle, message.job_id)
            if isinstance(message, wp.Started):
                batch.started_job = message.job_id
            elif isinstance(message, wp.Finished | wp.Failed):
                batch.done_jobs.add(message.job_id)
                handle.cancel_deadline = None
            if job is None:
                if isinstance(message, wp.Failed) and message.kind == "cancelled":
                    log.info("worker %s stopped cancelled job %d", handle.id, message.job_id)
                return
            if isinstance(message, wp.Progress):
                self.registry.set_progress(job, message.progress, message.audio_duration_s)
            elif isinstance(message, wp.Finished):
                self.audio_seconds_total += message.transcript.duration_s
                self.processing_seconds_total += message.processing_s
                self.registry.apply(
                    job, JobEvent.COMPLETE, transcript=message.transcript,
                    audio_duration_s=message.transcript.duration_s,
                )  # fmt: skip
            elif isinstance(message, wp.Failed):
                if message.kind == "oom":
                    self._out_of_memory(handle, batch, job)
                event = JobEvent.FAIL_FATAL if message.kind == "fatal" else JobEvent.FAIL
                self.registry.apply(job, event, error=message.error)
                self.wake()

    def _out_of_memory(self, handle: WorkerHandle, batch: Batch, job: JobRecord) -> None:
        """Count it, reserve more for this model from now on, retry the job on another GPU if one fits, and
        take the batch's jobs not yet started back to the queue, to be placed again in smaller batches."""
        device = handle.spec.device
        self.oom_events[device] = self.oom_events.get(device, 0) + 1
        if self.oom_observer is not None:
            self.oom_observer(device)
        self._avoid_devices[job.id] = self._avoid_devices.get(job.id, frozenset()) | {device}
        estimates = dict(self.settings.model_memory_bytes)
        old = estimates.get(job.model, self.settings.default_model_memory_bytes)
        estimates[job.model] = int(old * 1.25)
        self.settings = msgspec.structs.replace(self.settings, model_memory_bytes=estimates)
        log.warning("out of memory on %s (job %d, model %s): reserving %.1f GiB per batch from now on",
                    device, job.id, job.model, estimates[job.model] / 1024**3,
                    extra={"JOB_ID": job.id, "DEVICE": device, "MODEL": job.model})  # fmt: skip
        for other_id in batch.job_ids:
            other = self._processing_job(handle, other_id)
            if other is not None and other_id != job.id and other_id not in batch.done_jobs:
                handle.cancel(other_id, None)  # not started: the worker skips it
                self.registry.apply(other, JobEvent.REQUEUE)

    def _on_worker_exit(self, handle: WorkerHandle, batch: Batch | None, returncode: int) -> None:
        """A dead worker's unfinished jobs: the one it was running is retried (it may be the cause), the ones
        it had not reached go back to the queue unharmed."""
        killed_by_us = self._kill_reasons.pop(handle.id, None) is not None
        if batch is None:
            return
        self.pool.release(batch.id)
        for job_id in batch.job_ids:
            if job_id in batch.done_jobs:
                continue
            job = self._processing_job(handle, job_id)
            if job is None:
                continue
            if job_id == batch.started_job and not killed_by_us:
                self.registry.apply(
                    job, JobEvent.FAIL, error=f"worker {handle.id} died (exit status {returncode})"
                )
            else:
                self.registry.apply(job, JobEvent.REQUEUE)
        self.wake()

    # ---- user actions --------------------------------------------------------------------------------

    def cancel(self, job: JobRecord) -> None:
        self.registry.apply(job, JobEvent.CANCEL)
        handle = self.workers.get(job.worker or "")
        batch = handle.batch if handle is not None else None
        if (
            handle is not None
            and batch is not None
            and job.id in batch.job_ids
            and job.id not in batch.done_jobs
        ):
            # Only the job being transcribed has a deadline; one still waiting in the batch is just skipped.
            running = batch.started_job == job.id
            handle.cancel(job.id, time.monotonic() + self.config.workers.cancel_grace_s if running else None)
        self.wake()

    def abandon_device(self, name: str) -> None:
        """A GPU stopped answering: kill its busy workers, so their jobs go back to the queue unharmed."""
        for handle in self.workers.values():
            if handle.spec.device == name and handle.batch is not None:
                self._kill(handle, "gpu lost")

    # ---- views ---------------------------------------------------------------------------------------

    def device_views(self) -> list[DeviceView]:
        per_device: dict[str, int] = {}
        for h in self.workers.values():
            per_device[h.spec.device] = per_device.get(h.spec.device, 0) + 1
        return self.pool.views(per_device)

    def stats(self) -> StatsView:
        counts = self.registry.counts()
        workers = [
            WorkerView(
                id=h.id, device=h.spec.device, pid=h.pid, state=h.state, models=sorted(h.models),
                jobs=list(h.batch.job_ids) if h.batch else [], restarts=h.restarts,
            )
            for h in self.workers.values()
        ]  # fmt: skip
        rtf = (
            self.audio_seconds_total / self.processing_seconds_total
            if self.processing_seconds_total
            else None
        )
        return StatsView(
            states=counts,
            queue_depth=counts[JobState.PENDING] + counts[JobState.RETRYING],
            running_jobs=counts[JobState.PROCESSING],
            workers=workers,
            uptime_s=self.clock() - self.started_at,
            audio_seconds_total=self.audio_seconds_total,
            processing_seconds_total=self.processing_seconds_total,
            realtime_factor=rtf,
        )

    # ---- shutdown ------------------------------------------------------------------------------------

    async def drain(self, timeout_s: float) -> None:
        """Dispatch nothing more; let running batches finish within timeout_s; what is left stays queued
        (a job still PROCESSING goes back to the queue at the next start)."""
        self.draining = True
        await asyncio.gather(*(h.stop(timeout_s) for h in self.workers.values()))
        self.probe.close()
        self.watchers.close()
