"""The daemon's loop: each round releases retries that are due, enforces cancel deadlines, plans (a pure
function over snapshots) and dispatches; it sleeps until the next round is due or something wakes it.
Signal handlers only record; the loop acts. SIGHUP reloads the configuration, SIGTERM drains."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import Executor

from whisperd import workerproto as wp
from whisperd.batch import Batch
from whisperd.config import Config, plan_reload
from whisperd.errors import StorageError, WhisperdError
from whisperd.estimates import MemoryEstimates, baseline_from_config
from whisperd.fleet import Fleet
from whisperd.fleetlink import FleetLink
from whisperd.gpupool import CPU, DevicePool
from whisperd.gpuprobe import GpuProbe
from whisperd.jobs import JobEvent, JobState
from whisperd.pg_audio import AudioMissing
from whisperd.registry import JobRegistry
from whisperd.scheduling import Placement, plan
from whisperd.settings import job_spec, plan_settings, retry_policy
from whisperd.spreads import PartPlacement, Running, Spreads, place_parts, share_requests
from whisperd.store import JobRow
from whisperd.telemetry import Telemetry
from whisperd.workerspecs import worker_specs

log = logging.getLogger("whisperd")
# After a claim lost to other hosts, the next round comes this soon, not a whole interval later (not at
# once: a row another host is taking right now stays locked for a moment).
RECLAIM_DELAY_S = 0.02


class Daemon:
    def __init__(
        self,
        config: Config,
        registry: JobRegistry,
        fleet: Fleet,
        pool: DevicePool,
        probe: GpuProbe,
        estimates: MemoryEstimates,
        telemetry: Telemetry,
        wakeup: asyncio.Event,
        clock: Callable[[], float],
        cpu_count: int,
        config_loader: Callable[[], Config] | None = None,
        nvml: Executor | None = None,
        spreads: Spreads | None = None,
        link: FleetLink | None = None,
    ) -> None:
        """nvml: the thread NVML is called on, the monitors' too (None: the loop's default pool). spreads:
        the jobs spread over several workers, shared with the outcomes. link: with a shared store, the
        other hosts (fleetlink.py): their jobs' audio is fetched before a batch holding them is sent."""
        self._link = link
        self._staging: set[asyncio.Task[None]] = set()
        self.config = config  # replaced as a whole on reload; others read it through this attribute
        self._registry, self._fleet, self._pool, self._probe = registry, fleet, pool, probe
        self._estimates, self._telemetry = estimates, telemetry
        self._wakeup = wakeup
        self._clock = clock
        self._cpu_count = cpu_count
        self._config_loader = config_loader
        self._nvml = nvml
        self._spreads = spreads or Spreads()
        self._reload_requested = False
        self._stop_signal: int | None = None
        self._stop = asyncio.Event()
        self.draining = False
        self._tidying: asyncio.Task[None] | None = None
        # Run after each reload (SIGHUP), whatever became of the configuration: what else SIGHUP re-reads
        # (the HTTP API's tokens), wired by app.py so that the daemon needs to know none of it.
        self.reload_hooks: list[Callable[[], None]] = []

    async def start(self) -> None:
        """Recover the queue, read the devices, start the workers and wait until they are up."""
        started_at = time.time()  # wall clock, as the spool files' times are
        if measured := await asyncio.to_thread(self._registry.measure_spools):
            log.info("measured the spooled audio of %d jobs queued by an older release", measured)
        self._registry.recover()
        # Orphans are few and harm nothing meanwhile: found after the start, off the loop, not before it.
        self._tidying = asyncio.create_task(self._remove_orphan_spools(started_at))
        readings = []
        loop = asyncio.get_running_loop()
        if self.config.gpu.enabled and await loop.run_in_executor(self._nvml, self._probe.start):
            readings = await loop.run_in_executor(self._nvml, self._probe.read)
            log.info("NVML driver %s: %s", self._probe.driver_version,
                     ", ".join(f"cuda:{r.index} {r.name}" for r in readings) or "no GPUs")  # fmt: skip
        specs = worker_specs(self.config, readings, self._cpu_count)
        self._pool.configure(cpu=any(s.device == CPU for s in specs), readings=readings)
        self._fleet.start(specs)
        if not specs:
            log.warning("no workers configured: jobs will wait until workers are configured")
        up = await self._fleet.wait_ready(self.config.workers.start_timeout_s)
        log.info("%d workers up", up)
        unserved = sorted(self._registry.models_in_use() - set(self.config.models))
        if unserved:  # they stay queued: nothing accepted is dropped because the config changed
            log.warning("queued jobs name models the configuration does not serve (%s): they wait until "
                        "[models] names them again, or are cancelled", ", ".join(unserved))  # fmt: skip

    async def _remove_orphan_spools(self, before: float) -> None:
        try:
            removed = await asyncio.to_thread(self._registry.remove_orphan_spools, before)
        except (OSError, WhisperdError) as exc:  # they stay, harmless, until a later start
            log.warning("could not look for orphan spool files: %s", getattr(exc, "message", exc))
            return
        if removed:
            log.info("removed %d orphan spool files (of submits that never committed)", removed)

    # ---- signals -------------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop, signum)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    def request_stop(self, signum: int) -> None:
        """Signal handler: record only."""
        self._stop_signal = signum
        self._stop.set()
        self._wakeup.set()

    def request_reload(self) -> None:
        """Signal handler: record only."""
        self._reload_requested = True
        self._wakeup.set()

    def reload(self) -> None:
        """SIGHUP: the configuration, then the reload hooks."""
        try:
            self._reload_config()
        finally:
            for hook in self.reload_hooks:
                hook()

    def _reload_config(self) -> None:
        """Apply what can change in a running daemon; say what needs a restart."""
        if self._config_loader is None:
            log.warning("SIGHUP: no configuration file to reload")
            return
        try:
            config, applied, refused = plan_reload(self.config, self._config_loader())
        except WhisperdError as exc:
            log.error("SIGHUP: configuration not reloaded, the running one stays: %s", exc.message)
            return
        for model in sorted(self._registry.models_in_use()):  # a model still queued or running stays served
            if model not in config.models and model in self.config.models:
                config.models[model] = self.config.models[model]
                refused.append(f"models.{model} (jobs still use it)")
        self.config = config
        self._estimates.replace_baseline(baseline_from_config(config))
        self._registry.policy = retry_policy(config)
        self._fleet.cancel_grace_s = config.workers.cancel_grace_s
        logging.getLogger().setLevel(config.daemon.log_level.upper())
        log.info("SIGHUP: configuration reloaded; changed: %s", ", ".join(applied) or "nothing")
        if refused:
            log.warning("SIGHUP: these changed but need a restart, so they keep their running values: %s",
                        ", ".join(refused))  # fmt: skip

    # ---- the loop ------------------------------------------------------------------------------------

    async def run_until_stopped(self) -> None:
        while not self._stop.is_set():
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            timeout = self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            self._wakeup.clear()
        log.info("signal %s received: draining", self._stop_signal)

    def tick(self) -> float:
        """One scheduling round, timed; returns how long the loop may sleep before the next."""
        started = time.perf_counter()
        try:
            return self._tick()
        except StorageError as exc:  # never out of the loop: what the store refused is retried next round
            self._registry.note_store_error(exc)
            return self.config.scheduler.schedule_interval_s
        finally:
            self._telemetry.tick(time.perf_counter() - started, self._clock())

    def _tick(self) -> float:
        now = self._clock()
        next_due = now + self.config.scheduler.schedule_interval_s
        store_ok = self._registry.retry_deferred()  # first: a refused requeue must land before a dispatch
        for job_id in self._registry.take_lost():  # another host took it over or ended it: stop it here
            self._fleet.cancel_everywhere(job_id)
        for due in (self._registry.release_due_retries(now), self._fleet.enforce_cancel_deadlines()):
            if due is not None:
                next_due = min(next_due, due)
        self._settle_spreads()
        if not store_ok or self.draining or not self._fleet.any_idle():
            return max(0.0, next_due - now)  # nothing can be placed; a worker that frees up wakes us
        settings = plan_settings(self.config, self._estimates)
        # Parts of a job spread over several workers first: that job is under way already.
        if waiting_parts := self._spreads.waiting():
            parts = place_parts(waiting_parts, self._fleet.slots(), self._pool.device_status(), settings)
            for part in parts:
                self._dispatch_part(part)
        slots = self._fleet.slots()
        # One plan places at most a batch per idle worker, so no lane needs more than this many jobs read.
        take = max(1, sum(1 for s in slots if s.idle)) * self.config.scheduler.max_batch_size
        waiting = self._registry.waiting(take, self.config.models)
        if waiting.lanes:
            for placement in plan(waiting, slots, self._pool.device_status(), now, settings):
                if not self._dispatch(placement):  # other hosts took those jobs first: plan again soon
                    next_due = min(next_due, now + RECLAIM_DELAY_S)
            batch_due = min(lane.jobs[0].queued_at for lane in waiting.lanes) + settings.batch_timeout_s
            if settings.min_batch_size > 1 and batch_due > now:  # past due: a free worker wakes us
                next_due = min(next_due, batch_due)
        self._share_with_idle()
        return max(0.0, next_due - now)

    def _settle_spreads(self) -> None:
        """A spread job that ended (cancelled, failed) has its parts still running stopped."""
        for job_id in self._spreads.shareable():
            job = self._registry.find_live(job_id)
            if job is None or job.state is not JobState.PROCESSING:
                if self._spreads.get(job_id) is not None:
                    self._fleet.cancel_everywhere(job_id)
                self._spreads.forget(job_id)

    def _share_with_idle(self) -> None:
        """Workers still idle after the plan (nothing queued they can take) help the running jobs with the
        most audio left (see spreads.py)."""
        min_part_s = self.config.transcribe.shard_min_audio_s
        # Idle workers, less those promised to requests not answered yet and those parts waiting will take
        idle = [s.device for s in self._fleet.slots() if s.idle]
        idle = idle[: max(0, len(idle) - self._spreads.promised() - len(self._spreads.waiting()))]
        if not idle or min_part_s <= 0:
            return
        running: list[Running] = []
        jobs: dict[int, JobRow] = {}
        for job_id in self._spreads.shareable():
            job = self._registry.find_live(job_id)
            if job is None or job.state is not JobState.PROCESSING or not job.audio_duration_s:
                continue
            jobs[job_id] = job
            spread = self._spreads.get(job_id)
            workers = [job.worker or ""]
            if spread is not None:
                workers = sorted({p.worker for p in spread.parts if p.worker and p.transcript is None})
            for worker_id in workers:
                part = self._spreads.running(
                    job_id, worker_id, job.audio_duration_s, job.progress, job.device or CPU
                )
                if part is not None:
                    running.append(part)
        for request in share_requests(running, idle, min_part_s):
            if self._fleet.share(request.worker_id, request.job_id, request.helpers, min_part_s):
                job = jobs[request.job_id]
                self._spreads.asked(request, job.audio_duration_s or 0.0, job.device or CPU)

    def _dispatch_part(self, placement: PartPlacement) -> None:
        spread = self._spreads.get(placement.job_id)
        job = self._registry.find_live(placement.job_id)
        if spread is None or job is None or job.state is not JobState.PROCESSING:
            return
        part = spread.parts[placement.index]
        spec = job_spec(job, self.config, chunk_batch=placement.chunk_batch)
        spec.mode = "batched"  # a part is cut into windows, whatever the mode now
        spec.part = wp.JobPart(start_s=part.start_s, end_s=part.end_s, windows=part.windows)
        spec.shard_min_audio_s = self.config.transcribe.shard_min_audio_s
        spec.language = spread.language or spec.language
        log.debug("placing part %.0f-%.0f s of job %d on %s", part.start_s, part.end_s, job.id,
                  placement.worker_id)  # fmt: skip
        part.worker, part.device = placement.worker_id, placement.device
        self._fleet.dispatch(placement.worker_id, [spec], placement.reserve_bytes)

    def _dispatch(self, placement: Placement) -> bool:
        """Dispatch the placement's jobs; False when others took some of them first (a shared store)."""
        log.debug("placing jobs %s on %s: %s", placement.job_ids, placement.worker_id, placement.reason)
        jobs = self._registry.queued(placement.job_ids)
        # One commit for the batch; refused, it raises with every job still PENDING and nothing sent. With
        # a shared store, jobs another host claimed first are left out (none at all: the worker stays idle).
        jobs = self._registry.dispatch(jobs, device=placement.device, worker=placement.worker_id)
        complete = len(jobs) == len(placement.job_ids)
        if not jobs:
            return complete
        specs = [job_spec(j, self.config, chunk_batch=placement.chunk_batch) for j in jobs]
        for spec in specs:
            if spec.mode == "batched":
                spec.shard_min_audio_s = self.config.transcribe.shard_min_audio_s
                self._spreads.dispatched(spec.job_id, spec.model)
        link = self._link
        remote = [j.id for j in jobs if link is not None and not self._audio_here(j, link.host_id)]
        if link is None or not remote:
            self._fleet.dispatch(placement.worker_id, specs, placement.reserve_bytes)
            return complete
        for spec in specs:  # accepted by another host: its audio comes from the database into the cache
            if spec.job_id in remote:
                spec.audio_path = str(link.audio.where(spec.job_id))
        batch = self._fleet.dispatch(placement.worker_id, specs, placement.reserve_bytes, send=False)
        task = asyncio.create_task(self._fetch_then_send(link, placement.worker_id, batch, specs, remote))
        self._staging.add(task)
        task.add_done_callback(self._staging.discard)
        return complete

    @staticmethod
    def _audio_here(job: JobRow, host_id: str) -> bool:
        """The job's audio is in this host's spool: it accepted the job and still has the file (a submit
        whose reply failed after its commit discarded its copies; the database has them)."""
        path = job.spool_path
        return job.submit_host in (None, host_id) and path is not None and os.path.exists(path)

    async def _fetch_then_send(
        self, link: FleetLink, worker_id: str, batch: Batch, specs: list[wp.JobSpec], remote: list[int]
    ) -> None:
        """Send a batch once the audio of its other hosts' jobs is here. If it cannot be fetched, the jobs go
        back to the queue (the database unreachable: nothing counted against them) or fail (their audio is
        gone from it), and the worker is idle again."""
        try:
            await link.fetch(remote)
        except (StorageError, OSError) as exc:  # OSError: the local cache (a full disk, its permissions)
            missing = isinstance(exc, AudioMissing)
            reason = exc.message if isinstance(exc, StorageError) else str(exc)
            log.warning("cannot fetch the audio of jobs %s: %s", remote, reason)
            for job_id in batch.job_ids:
                job = self._registry.find_live(job_id)
                if job is not None and job.state is JobState.PROCESSING and job.worker == worker_id:
                    if missing and job_id in remote:
                        self._registry.apply_or_defer(job, JobEvent.FAIL_FATAL, error=reason)
                    else:
                        self._registry.apply_or_defer(job, JobEvent.REQUEUE)
            self._fleet.unstage(worker_id, batch)
            return
        live = [s for s in specs if (job := self._registry.find_live(s.job_id)) and job.worker == worker_id]
        if not live or not self._fleet.send_staged(worker_id, batch, live):
            self._fleet.unstage(worker_id, batch)

    async def drain(self, timeout_s: float) -> None:
        """Dispatch nothing more; let running batches finish within timeout_s; what is left stays queued
        (a job still PROCESSING goes back to the queue at the next start)."""
        self.draining = True
        await self._fleet.stop(timeout_s)
        if self._link is not None:  # another host may run them now rather than after this one's lease
            unfinished = [j for j in self._registry.held() if j.state is JobState.PROCESSING]
            try:
                self._registry.apply_many(unfinished, JobEvent.REQUEUE)
            except StorageError as exc:  # their leases expire and another host requeues them
                log.warning("could not hand back %d unfinished jobs: %s", len(unfinished), exc.message)
        if self._tidying is not None:  # its thread reads the store, which closes after the drain
            await self._tidying
        if not self._registry.retry_deferred():  # those jobs are still PROCESSING in the store: run again
            log.error("%d job changes could not be committed before the stop; their jobs run again at the "
                      "next start", self._registry.uncommitted())  # fmt: skip
        self._probe.close()
