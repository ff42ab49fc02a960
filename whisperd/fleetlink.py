"""This host's link to the others through a shared store (several hosts, one queue in PostgreSQL): the
heartbeat that keeps its leases and publishes its workers and devices, the requeue of other hosts' expired
leases, the fleet's figures, the notifications that wake the loop at once (a job queued on another host, a
job of this host cancelled or taken over elsewhere), and the audio of other hosts' jobs fetched before a
batch is sent. Each database call runs in a thread; the loop only reacts."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from typing import BinaryIO, Protocol

import msgspec

from whisperd.errors import StorageError
from whisperd.pg_audio import AudioCache
from whisperd.pg_notify import Listener
from whisperd.pg_queue import FleetFigures, HostRow
from whisperd.protocol import DeviceView, JobView, WorkerView
from whisperd.registry import JobRegistry
from whisperd.store import SharedQueue

log = logging.getLogger("whisperd.store")

SPOOL_SWEEP_BEATS = 12  # a minute at the default heartbeat
SPOOL_SWEEP_AGE_S = 120.0  # older than any submit's copy-to-commit (spool copies end with their fsync)
JOBS_CHANNEL = "whisperd_jobs"  # "look now": a job was queued or requeued somewhere
EVENTS_CHANNEL = "whisperd_events"  # a job's new view, and the host that changed it


class HostSnapshot(msgspec.Struct, kw_only=True):
    """What a host's heartbeat tells the others of it (the hosts table's snapshot column)."""

    workers: list[WorkerView]
    devices: list[DeviceView]


class JobNotice(msgspec.Struct, kw_only=True):
    """A notification on EVENTS_CHANNEL."""

    host: str
    job: JobView


class FleetStore(Protocol):
    """What the link needs of a shared store (pg_store.PgStore)."""

    host_id: str
    conninfo: str

    def heartbeat(self, snapshot: bytes) -> set[int]: ...

    def requeue_expired(self) -> list[int]: ...

    def requeue_strays(self, job_ids: Sequence[int]) -> list[int]: ...

    def figures(self) -> FleetFigures: ...

    def fetch_audio(self, job_id: int, dest: BinaryIO) -> int: ...


class SharedStore(SharedQueue, FleetStore, Protocol):
    """A store many hosts share, as the wiring sees it: the registry's part and the link's."""


_notice_decoder = msgspec.json.Decoder(JobNotice)


def lost_jobs(held_before: set[int], held_after: set[int], held_in_store: set[int]) -> set[int]:
    """Jobs this host held all through a heartbeat that the store no longer gives as its own: taken over by
    another host (their lease expired while this one was stopped or cut off) or ended there. A job taken or
    released during the heartbeat's round trip is none of them."""
    return (held_before & held_after) - held_in_store


def alive_others(hosts: Sequence[HostRow], host_id: str, lease_s: float) -> list[HostSnapshot]:
    """The snapshots of the other hosts whose heartbeat is within a lease, each view marked with its host."""
    alive = []
    for host in hosts:
        if host.id == host_id or host.snapshot is None or host.heartbeat_age_s > lease_s:
            continue
        try:
            snapshot = msgspec.json.decode(host.snapshot, type=HostSnapshot)
        except msgspec.DecodeError:  # written by a release that stores another shape: shown without it
            continue
        for worker in snapshot.workers:
            worker.host = host.id
        for device in snapshot.devices:
            device.host = host.id
        alive.append(snapshot)
    return alive


class FleetLink:
    def __init__(
        self,
        store: FleetStore,
        registry: JobRegistry,
        snapshot: Callable[[], HostSnapshot],
        wake: Callable[[], None],
        audio: AudioCache,
        threads: Executor,
        heartbeat_interval_s: float,
        lease_s: float,
    ) -> None:
        """snapshot: this host's workers and devices now; threads: where the database calls run."""
        self._store = store
        self._registry = registry
        self._snapshot = snapshot
        self._wake = wake
        self.audio = audio
        self._threads = threads
        self._interval_s = heartbeat_interval_s
        self._lease_s = lease_s
        self.host_id = store.host_id
        self.hosts: list[HostRow] = []  # as the last heartbeat read them
        self._others: list[HostSnapshot] = []  # their snapshots, decoded once a heartbeat
        self.reachable = True  # the last heartbeat reached the database
        self.heartbeats = 0
        self._listener = Listener(store.conninfo, (JOBS_CHANNEL, EVENTS_CHANNEL), self._notified)

    async def run(self) -> None:
        """Heartbeats and notifications, until cancelled."""
        listening = asyncio.create_task(self._listener.run())
        try:
            while True:
                await self.beat()
                await asyncio.sleep(self._interval_s)
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)

    async def beat(self) -> None:
        """One heartbeat: leases kept, lost jobs released, expired leases requeued, figures read."""
        loop = asyncio.get_running_loop()
        snapshot = msgspec.json.encode(self._snapshot())
        before = self._registry.held_ids()
        try:
            held = await loop.run_in_executor(self._threads, self._store.heartbeat, snapshot)
            after = self._registry.held_ids()
            if lost := lost_jobs(before, after, held):
                self._registry.release(lost)
                self._wake()
            if strays := held - before - after:  # claimed here, but the claim's answer never came back
                await loop.run_in_executor(self._threads, self._store.requeue_strays, sorted(strays))
                self._wake()
            if await loop.run_in_executor(self._threads, self._store.requeue_expired):
                self._wake()
            figures = await loop.run_in_executor(self._threads, self._store.figures)
        except StorageError as exc:
            if self.reachable:
                log.error(
                    "heartbeat failed: %s; jobs running here go on, results wait in memory", exc.message
                )
            self.reachable = False
            return
        if not self.reachable:
            log.warning("the job database is reachable again")
        self.reachable = True
        self.heartbeats += 1
        self._registry.refresh(figures.counts, figures.user_totals)
        self.hosts = figures.hosts
        self._others = alive_others(figures.hosts, self.host_id, self._lease_s)
        if self.heartbeats % SPOOL_SWEEP_BEATS == 1:
            # This host's spooled audio of jobs that ended on other hosts (they cannot remove it).
            older_than = time.time() - SPOOL_SWEEP_AGE_S  # wall clock, as the files' times
            try:
                await loop.run_in_executor(self._threads, self._registry.remove_orphan_spools, older_than)
            except (OSError, StorageError) as exc:
                log.warning("could not look for spool files of finished jobs: %s", exc)

    def others(self) -> list[HostSnapshot]:
        """The other hosts alive (heartbeat within a lease) with what their last heartbeat said."""
        return self._others

    def _notified(self, channel: str, payload: str) -> None:
        if channel == EVENTS_CHANNEL:
            try:
                notice = _notice_decoder.decode(payload)
            except msgspec.DecodeError:
                return
            # Shown to watchers at once; the loop is woken only if it must stop a worker: waking every host
            # at every change elsewhere made each re-read the queue and race the others for the same jobs.
            if notice.host != self.host_id and self._registry.remote_change(notice.job):
                self._wake()
            return
        self._wake()  # a job queued or requeued somewhere, or the notifications are back: look now

    async def fetch(self, job_ids: Sequence[int]) -> None:
        """The audio of these jobs (accepted by other hosts) into the local cache, in a thread."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._threads, self._fetch_all, list(job_ids))

    def _fetch_all(self, job_ids: Iterable[int]) -> None:
        for job_id in job_ids:
            self.audio.fill(job_id, functools.partial(self._store.fetch_audio, job_id))
