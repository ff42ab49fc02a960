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
from whisperd.config import Config, plan_reload
from whisperd.errors import WhisperdError
from whisperd.fleet import model_memory_bytes, worker_specs
from whisperd.gpupool import CPU, DevicePool
from whisperd.gpuprobe import NullProbe, NvmlProbe
from whisperd.jobs import JobEvent, JobState
from whisperd.monitors import Monitors
from whisperd.outcomes import WorkerOutcomes
from whisperd.protocol import DeviceView, JobEventReply, StatsView, WorkerView
from whisperd.registry import JobRegistry
from whisperd.scheduling import PlanSettings, QueuedJob, WorkerSlot, plan
from whisperd.store import JobRecord, Store
from whisperd.supervisor import Batch, Spawner, WorkerHandle
from whisperd.watchers import Watchers

log = logging.getLogger("whisperd")


def plan_settings(config: Config) -> PlanSettings:
    sched = config.scheduler
    return PlanSettings(
        min_batch_size=sched.min_batch_size,
        max_batch_size=sched.max_batch_size,
        batch_timeout_s=sched.batch_timeout_s,
        min_free_memory_bytes=sched.min_free_memory_bytes,
        memory_safety_margin=sched.memory_safety_margin,
        model_memory_bytes=model_memory_bytes(config),
    )


class Daemon:
    def __init__(
        self,
        config: Config,
        store: Store,
        probe: NvmlProbe | NullProbe,
        spawner: Spawner = asyncio.create_subprocess_exec,
        clock: Callable[[], float] = time.time,
        config_loader: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self._config_loader = config_loader
        self._reload_requested = False
        self.store = store
        self.probe = probe
        self.clock = clock
        sched = config.scheduler
        self.registry = JobRegistry(
            store, clock, sched.max_retries, sched.retry_backoff_s, sched.retry_backoff_max_s
        )
        self.pool = DevicePool(cpu=False)  # set up in start(), once the GPUs are known
        self.settings = plan_settings(config)
        self.watchers = Watchers()
        self.registry.subscribe(lambda view: self.watchers.publish(JobEventReply(job=view)))
        self.workers: dict[str, WorkerHandle] = {}
        self._spawner = spawner
        self._wake = asyncio.Event()
        self._stop_signal: int | None = None
        self._stop = asyncio.Event()
        self.draining = False
        self._next_batch_id = 1
        self.outcomes = WorkerOutcomes(self)
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
                spec, self.outcomes.on_message, self.outcomes.on_exit,
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

    def request_reload(self) -> None:
        """Signal handler: record only."""
        self._reload_requested = True
        self._wake.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def reload(self) -> None:
        """Apply what can change in a running daemon; say what needs a restart."""
        if self._config_loader is None:
            log.warning("SIGHUP: no configuration file to reload")
            return
        try:
            config, applied, refused = plan_reload(self.config, self._config_loader())
        except WhisperdError as exc:
            log.error("SIGHUP: configuration not reloaded, the running one stays: %s", exc.message)
            return
        for job in self.registry.live():  # a model with jobs still queued or running stays served
            if job.model not in config.models:
                config.models[job.model] = self.config.models[job.model]
                refused.append(f"models.{job.model} (jobs still use it)")
        self.config = config
        estimates = dict(self.settings.model_memory_bytes)  # keep what out-of-memory errors taught us
        self.settings = plan_settings(self.config)
        self.settings = msgspec.structs.replace(
            self.settings, model_memory_bytes={**self.settings.model_memory_bytes, **estimates}
        )
        sched = self.config.scheduler
        self.registry.configure(sched.max_retries, sched.retry_backoff_s, sched.retry_backoff_max_s)
        logging.getLogger().setLevel(self.config.daemon.log_level.upper())
        log.info("SIGHUP: configuration reloaded; changed: %s", ", ".join(applied) or "nothing")
        if refused:
            log.warning("SIGHUP: these changed but need a restart, so they keep their running values: %s",
                        ", ".join(refused))  # fmt: skip

    def wake(self) -> None:
        self._wake.set()

    # ---- the loop ------------------------------------------------------------------------------------

    async def run_until_stopped(self) -> None:
        monitors = Monitors(self).start()
        try:
            while not self._stop.is_set():
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload()
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
        if not any(h.idle for h in self.workers.values()):
            return max(0.0, next_due - now)  # nothing can be placed; a worker that frees up wakes us
        pending = [j for j in self.registry.live() if j.state is JobState.PENDING]
        if pending:
            queue = [
                QueuedJob(
                    id=j.id,
                    model=j.model,
                    priority=j.priority,
                    queued_at=j.queued_at,
                    avoid_devices=self.outcomes.avoid_devices.get(j.id, frozenset()),
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
            batch_due = min(j.queued_at for j in pending) + self.settings.batch_timeout_s
            if self.settings.min_batch_size > 1 and batch_due > now:  # past due: a free worker wakes us
                next_due = min(next_due, batch_due)
        return max(0.0, next_due - now)

    def _dispatch(self, worker_id: str, model: str, job_ids: list[int], reserve_bytes: int) -> None:
        handle = self.workers[worker_id]
        batch = Batch(id=self._next_batch_id, job_ids=job_ids)
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
                self.outcomes.kill(handle, "cancel")

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
            # Only the job being transcribed (the first unfinished one: a worker goes in order) has a
            # deadline; one still waiting in the batch is just skipped when its turn comes.
            running = next(j for j in batch.job_ids if j not in batch.done_jobs) == job.id
            handle.cancel(job.id, time.monotonic() + self.config.workers.cancel_grace_s if running else None)
        self.wake()

    def abandon_device(self, name: str) -> None:
        """A GPU stopped answering: kill its busy workers, so their jobs go back to the queue unharmed."""
        for handle in self.workers.values():
            if handle.spec.device == name and handle.batch is not None:
                self.outcomes.kill(handle, "gpu lost")

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
