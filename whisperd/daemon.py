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

from whisperd import workerproto as wp
from whisperd.config import Config
from whisperd.gpupool import CPU, DevicePool
from whisperd.gpuprobe import NullProbe, NvmlProbe
from whisperd.jobs import JobEvent, JobState
from whisperd.protocol import DeviceSnapshot, DeviceView, JobEventReply, StatsView, SystemSnapshot, WorkerView
from whisperd.registry import JobRegistry
from whisperd.scheduling import PlanSettings, QueuedJob, WorkerSlot, plan
from whisperd.store import JobRecord, Store
from whisperd.supervisor import Batch, Spawner, WorkerHandle, WorkerSpec, worker_argv
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
        self.pool = DevicePool(cpu=self._cpu_worker_count() > 0)
        self.settings = PlanSettings(
            min_batch_size=sched.min_batch_size,
            max_batch_size=sched.max_batch_size,
            batch_timeout_s=sched.batch_timeout_s,
            min_free_memory_bytes=sched.min_free_memory_bytes,
            memory_safety_margin=sched.memory_safety_margin,
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
        self._killed_for_cancel: set[str] = set()
        self.started_at = clock()
        self.audio_seconds_total = 0.0
        self.processing_seconds_total = 0.0

    # ---- set-up --------------------------------------------------------------------------------------

    def _cpu_worker_count(self) -> int:
        n = self.config.workers.cpu_workers
        return os.cpu_count() or 1 if n < 0 else n

    def _worker_specs(self) -> list[WorkerSpec]:
        w = self.config.workers
        default = self.config.transcribe.default_model
        preload = (default, self.config.models[default])
        argv = worker_argv("cpu", w.cpu_compute_type, w.cpu_threads, w.max_models_per_worker, preload)
        env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(w.cpu_threads)}
        return [
            WorkerSpec(id=f"cpu{i}", device=CPU, argv=argv, env=env) for i in range(self._cpu_worker_count())
        ]

    async def start(self) -> None:
        """Recover the queue, read the devices, start the workers and wait until they are up."""
        self.registry.recover()
        if self.probe.start():
            self.pool.update(await asyncio.to_thread(self.probe.read))
        for spec in self._worker_specs():
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
        monitors = [
            asyncio.create_task(self._every(self.config.scheduler.gpu_monitor_interval_s, self._gpu_monitor)),
            asyncio.create_task(
                self._every(self.config.scheduler.performance_monitor_interval_s, self._performance_monitor)
            ),
        ]
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
        """One scheduling round; returns how long the loop may sleep before the next."""
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
                QueuedJob(id=j.id, model=j.model, priority=j.priority, queued_at=j.queued_at) for j in pending
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
                self._killed_for_cancel.add(handle.id)
                handle.cancel_deadline = None
                handle.kill()

    # ---- worker events -------------------------------------------------------------------------------

    def _processing_job(self, handle: WorkerHandle, job_id: int) -> JobRecord | None:
        """The live job a worker message is about, if it is still PROCESSING there (not cancelled)."""
        for job in self.registry.live():
            if job.id == job_id:
                return job if job.state is JobState.PROCESSING and job.worker == handle.id else None
        return None

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
                event = JobEvent.FAIL_FATAL if message.kind == "fatal" else JobEvent.FAIL
                self.registry.apply(job, event, error=message.error)
                self.wake()

    def _on_worker_exit(self, handle: WorkerHandle, batch: Batch | None, returncode: int) -> None:
        """A dead worker's unfinished jobs: the one it was running is retried (it may be the cause), the ones
        it had not reached go back to the queue unharmed."""
        killed_for_cancel = handle.id in self._killed_for_cancel
        self._killed_for_cancel.discard(handle.id)
        if batch is None:
            return
        self.pool.release(batch.id)
        for job_id in batch.job_ids:
            if job_id in batch.done_jobs:
                continue
            job = self._processing_job(handle, job_id)
            if job is None:
                continue
            if job_id == batch.started_job and not killed_for_cancel:
                self.registry.apply(
                    job, JobEvent.FAIL, error=f"worker {handle.id} died (exit status {returncode})"
                )
            else:
                self.registry.apply(job, JobEvent.REQUEUE)
        self.wake()

    # ---- user actions --------------------------------------------------------------------------------

    def cancel(self, job: JobRecord) -> None:
        self.registry.apply(job, JobEvent.CANCEL)
        if job.worker is not None and job.worker in self.workers:
            handle = self.workers[job.worker]
            if handle.batch is not None and job.id in handle.batch.job_ids:
                handle.cancel(job.id, time.monotonic() + self.config.workers.cancel_grace_s)
        self.wake()

    # ---- monitors ------------------------------------------------------------------------------------

    async def _every(self, interval_s: float, action: Callable[[], object]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                result = action()
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("monitor failed")

    async def _gpu_monitor(self) -> None:
        self.pool.update(await asyncio.to_thread(self.probe.read))
        self.watchers.publish(DeviceSnapshot(devices=self.device_views()))

    def _performance_monitor(self) -> None:
        stats = self.stats()
        log.info(
            "queue %d waiting, %d running; %s; workers %s",
            stats.queue_depth, stats.running_jobs,
            " ".join(f"{s}={n}" for s, n in stats.states.items() if n),
            " ".join(f"{w.id}:{w.state}" for w in stats.workers),
        )  # fmt: skip
        self.watchers.publish(SystemSnapshot(stats=stats))

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
