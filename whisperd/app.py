"""The one place that knows every part of the daemon and wires them together; each part takes only the
narrow collaborators it uses. The command line (cli.py) and in-process tests both build the daemon here."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, disable_created_metrics

from whisperd import protocol as p
from whisperd.config import Config
from whisperd.daemon import Daemon
from whisperd.durability import Checkpoints, GroupCommit
from whisperd.errors import StorageError
from whisperd.estimates import MemoryEstimates, baseline_from_config
from whisperd.fleet import Fleet
from whisperd.fleetlink import FleetLink, HostSnapshot, SharedStore
from whisperd.followers import JobFollowers
from whisperd.gpupool import DevicePool
from whisperd.gpuprobe import GpuProbe
from whisperd.handlers import Handlers
from whisperd.http_api import api_app
from whisperd.jobs import JobEvent, JobState
from whisperd.metrics import FleetCollector, SystemCollector, gpu_collectors
from whisperd.monitors import Monitors
from whisperd.outcomes import WorkerOutcomes
from whisperd.pg_audio import AudioCache
from whisperd.registry import JobRegistry
from whisperd.retention import Pruner, Retention
from whisperd.scheduling import placement_floor_bytes
from whisperd.segmentfeed import SegmentFeed
from whisperd.settings import retry_policy, worker_limits
from whisperd.spool import Spool
from whisperd.spooling import Spooler
from whisperd.spreads import Spreads
from whisperd.store import JobRow, Store
from whisperd.supervisor import Spawner
from whisperd.telemetry import Telemetry
from whisperd.threads import DaemonThreadPool
from whisperd.tokens import TokenBook, tokens_path
from whisperd.views import Views
from whisperd.watchers import Watchers


class App:
    def __init__(
        self,
        config: Config,
        store: Store,
        spool: Spool,
        probe: GpuProbe,
        spawner: Spawner = asyncio.create_subprocess_exec,
        clock: Callable[[], float] = time.time,
        config_loader: Callable[[], Config] | None = None,
        cpu_count: int | None = None,
        pruner: Pruner | None = None,
        shared: SharedStore | None = None,
        audio_cache: AudioCache | None = None,
    ) -> None:
        """pruner: deletes finished jobs past [retention] in the background (None: nothing is deleted).
        shared: the store again when many hosts share it (config [store] url), with audio_cache, where other
        hosts' audio is fetched to."""
        self.store = store
        self.wakeup = asyncio.Event()
        wake = self.wakeup.set
        self.watchers = Watchers()
        # Segments of running jobs as they are decoded, to the HTTP API's streams (the outcomes publish them).
        self.segment_feed = SegmentFeed()
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series: noise in every scrape
        self.system_metrics = CollectorRegistry(auto_describe=False)
        self.telemetry = Telemetry(self.system_metrics)
        # Commits are not synced on the loop: a flush in a thread of its own makes them durable, shared by
        # every submit waiting meanwhile; the daemon's own commits (results, dispatches) ask for one, no wait.
        flush = DaemonThreadPool(1, "flush")
        self.durability = GroupCommit(spool.sync_directory, store.sync, spool.discard, flush)
        self.checkpoints = Checkpoints(store.checkpoint, store.restart_log, DaemonThreadPool(1, "checkpoint"))

        def committed(job: JobRow, old: JobState, event: JobEvent) -> None:
            self.telemetry.job_transition(job, old, event)
            self.durability.request()

        self.followers = JobFollowers()  # the HTTP API's requests waiting for their jobs

        def published(view: p.JobView) -> None:
            self.watchers.publish(p.JobEventReply(job=view))
            self.followers.publish(view)
            self.segment_feed.job_changed(view)  # a job that ended ends its streams

        self.registry = JobRegistry(
            store, spool, clock, retry_policy(config),
            publish=published,
            on_transition=committed, discard=self.durability.discard_when_durable, shared=shared,
            host_id=config.store.host_id if shared is not None else None,
            forget_audio=audio_cache.discard if audio_cache is not None else None,
        )  # fmt: skip
        self.estimates = MemoryEstimates(baseline_from_config(config), clock)
        # Blocking calls off the loop, each kind in threads of its own: a read that never returns (a hung
        # file system, a GPU fallen off the bus) holds only its own kind's threads.
        self.nvml = DaemonThreadPool(1, "nvml")
        self.spooler = Spooler(spool, DaemonThreadPool(config.daemon.spool_threads, "spool"))
        self.pool = DevicePool()
        self.spreads = Spreads()  # jobs spread over several workers: the loop places, the outcomes stitch
        self.outcomes = WorkerOutcomes(
            self.registry, self.estimates, self.telemetry, wake, self.spreads, self.segment_feed
        )
        w = config.workers
        self.fleet = Fleet(
            self.pool, self.outcomes, wake, clock, spawner,
            w.cancel_grace_s, w.restart_backoff_s, w.restart_backoff_max_s,
            limits=lambda: worker_limits(self.daemon.config),
        )  # fmt: skip
        self.link: FleetLink | None = None
        if shared is not None:
            assert audio_cache is not None, "a shared store needs a cache for other hosts' audio"
            self.link = FleetLink(
                shared, self.registry, lambda: HostSnapshot(workers=self.views.workers(),
                                                            devices=self.views.devices()),
                wake, audio_cache, DaemonThreadPool(2, "fleet"), config.store.heartbeat_interval_s,
                config.store.lease_s,
            )  # fmt: skip
        self.views = Views(
            self.registry, self.fleet, self.pool, self.telemetry, clock,
            others=self.link.others if self.link is not None else None,
            host_id=self.link.host_id if self.link is not None else None,
            placement_floor=self._placement_floor_bytes,
        )  # fmt: skip
        self.daemon = Daemon(
            config, self.registry, self.fleet, self.pool, probe, self.estimates, self.telemetry,
            self.wakeup, clock, cpu_count or os.cpu_count() or 1, config_loader, nvml=self.nvml,
            spreads=self.spreads, link=self.link,
        )  # fmt: skip
        # The HTTP API's bearer tokens: http.tokens_file, in the state dir (with none configured, as in
        # in-process tests, the spool's parent); read again on each SIGHUP.
        state_dir = Path(config.daemon.state_dir) if config.daemon.state_dir else spool.directory.parent
        self.tokens = TokenBook(tokens_path(config.http.tokens_file, state_dir))
        self.daemon.reload_hooks.append(self._reload_tokens)
        self._spool = spool
        self._uploads = DaemonThreadPool(4, "upload")  # HTTP uploads written into the spool
        self.handlers = Handlers(
            self.registry, spool, self.fleet, self.views, config=lambda: self.daemon.config,
            is_draining=lambda: self.daemon.draining, wake=wake, daemon_uid=os.geteuid(),
            spooler=self.spooler, durable=self.durability.durable, tokens=self.tokens,
        )  # fmt: skip
        self.monitors = Monitors(
            probe, self.pool, self.views, self.fleet.abandon_device, self.watchers.publish, nvml=self.nvml
        )
        self.system_metrics.register(
            SystemCollector(self.registry, self.views, self.telemetry, clock, lambda: self.daemon.draining)
        )
        if self.link is not None:  # the fleet's series, with a shared store only
            self.system_metrics.register(FleetCollector(self.link, config.store.lease_s))
        self.retention = (
            Retention(pruner, lambda: self.daemon.config.retention, self.registry.forget_finished, clock)
            if pruner is not None
            else None
        )
        self.gpu_metrics = gpu_collectors(self.views, self.pool, probe, self._placement_floor_bytes)

    def http_app(self, with_metrics: bool) -> web.Application:
        """The HTTP API's application (http.listen); with_metrics: it serves the metrics paths too (both at
        one address)."""
        metrics = {"/metrics": self.system_metrics, "/metrics/gpu": self.gpu_metrics}
        return api_app(
            self.handlers, self._spool, self._uploads, self.followers, self.segment_feed, self.tokens,
            lambda: self.daemon.config, os.geteuid(), metrics if with_metrics else None,
        )  # fmt: skip

    def _reload_tokens(self) -> None:
        """In a thread: the user database may be a network service (LDAP, sssd). identify() goes on with
        the old book until the new one replaces it whole."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # called off the loop: here and now
            self.tokens.reload()
            return
        loop.run_in_executor(None, self.tokens.reload)

    def _placement_floor_bytes(self, memory_total_bytes: int) -> int:
        s = self.daemon.config.scheduler  # the running configuration: a reload moves the threshold
        return placement_floor_bytes(memory_total_bytes, s.min_free_memory_bytes, s.memory_safety_margin)

    def snapshot(self) -> list[p.Reply]:
        """What a new watcher is sent first."""
        devices = self.views.fleet_devices()
        return [p.DeviceSnapshot(devices=devices), p.SystemSnapshot(stats=self.views.stats())]

    async def run(self) -> None:
        """The loop and the monitors, until a stop signal."""
        sched = self.daemon.config.scheduler
        monitors = self.monitors.start(sched.gpu_monitor_interval_s, sched.performance_monitor_interval_s)
        monitors.append(asyncio.create_task(self.checkpoints.run()))
        if self.link is not None:
            monitors.append(asyncio.create_task(self.link.run()))
        if self.retention is not None:
            monitors.append(asyncio.create_task(self.retention.run()))
        try:
            await self.daemon.run_until_stopped()
        finally:
            for task in monitors:
                task.cancel()
            for task in monitors:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def drain(self, timeout_s: float) -> None:
        await self.daemon.drain(timeout_s)
        self.watchers.close()
        self.segment_feed.close()
        with contextlib.suppress(StorageError):  # logged by the flush; the store's close syncs what it can
            await self.durability.durable()  # the last results, and the audio of the jobs they ended removed
