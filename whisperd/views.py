"""What clients, monitors and metrics are shown of the daemon as a whole: each figure assembled here once,
from the parts that own it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from whisperd.fleet import Fleet
from whisperd.fleetlink import HostSnapshot
from whisperd.gpupool import DevicePool
from whisperd.jobs import JobState
from whisperd.protocol import DeviceView, StatsView, UserStatsView, WorkerView
from whisperd.registry import JobRegistry
from whisperd.telemetry import Telemetry


def jobs_by_device(workers: Sequence[WorkerView]) -> dict[str, list[int]]:
    """The jobs each device's workers hold now (every device with a worker appears)."""
    jobs: dict[str, list[int]] = {}
    for worker in workers:
        jobs.setdefault(worker.device, []).extend(worker.jobs)
    return jobs


class Views:
    def __init__(
        self,
        registry: JobRegistry,
        fleet: Fleet,
        pool: DevicePool,
        telemetry: Telemetry,
        clock: Callable[[], float],
        others: Callable[[], Sequence[HostSnapshot]] | None = None,
        host_id: str | None = None,
        placement_floor: Callable[[int], int] | None = None,
    ) -> None:
        """others: with a shared store, the other hosts alive and what their last heartbeat said of their
        workers and devices; host_id: this host's name then (each view is marked with its host);
        placement_floor: a GPU's placement threshold for its total memory, as the running config sets it."""
        self._placement_floor = placement_floor
        self._others = others
        self._host_id = host_id
        self._registry = registry
        self._fleet = fleet
        self._pool = pool
        self._telemetry = telemetry
        self._clock = clock
        self.started_at = clock()

    def workers(self) -> list[WorkerView]:
        """This host's workers."""
        views = self._fleet.views()
        for view in views:
            view.host = self._host_id
        return views

    def devices(self) -> list[DeviceView]:
        """This host's devices."""
        views = self._pool.views(Counter(w.device for w in self._fleet.views()))
        for view in views:
            view.host = self._host_id
            if self._placement_floor is not None and view.index is not None and view.memory_total_bytes:
                view.placement_floor_bytes = self._placement_floor(view.memory_total_bytes)
        return views

    def fleet_workers(self) -> list[WorkerView]:
        """Every host's workers (this one's first): what clients are shown."""
        return self.workers() + [w for snap in self._remote() for w in snap.workers]

    def fleet_devices(self) -> list[DeviceView]:
        return self.devices() + [d for snap in self._remote() for d in snap.devices]

    def _remote(self) -> Sequence[HostSnapshot]:
        return self._others() if self._others is not None else ()

    def stats(self) -> StatsView:
        counts = self._registry.counts()
        return StatsView(
            states=counts,
            queue_depth=counts[JobState.PENDING] + counts[JobState.RETRYING],
            running_jobs=counts[JobState.PROCESSING],
            workers=self.fleet_workers(),
            uptime_s=self._clock() - self.started_at,
            audio_seconds_total=self._telemetry.audio_seconds_total,
            processing_seconds_total=self._telemetry.processing_seconds_total,
            realtime_factor=self._telemetry.realtime_factor(),
            users=self.users(),
        )

    def users(self) -> list[UserStatsView]:
        """Each user's share, by uid (names are the client's to resolve: the daemon's view of the user
        database may differ from the caller's)."""
        return [
            UserStatsView(
                uid=uid,
                queued_jobs=f.waiting_jobs,
                running_jobs=f.running_jobs,
                finished_jobs=f.finished_jobs,
                spool_bytes=f.spool_bytes,
                audio_seconds=f.audio_seconds,
            )
            for uid, f in self._registry.users().items()
        ]
