"""Prometheus metrics on two sets of collectors, for the two scrape cadences: GPU figures (`/metrics/gpu`,
every 5 s) and queue and system figures (`/metrics`, every 30 s). Gauges here are read at scrape time from
the parts that own them, in constant time however long the queue; counters and histograms are fed as things
happen, through telemetry.Telemetry alone. No job id appears in any label.

With a shared store (several hosts, one queue) the queue's series (whisperd_jobs, the oldest waiting job)
are the fleet's, the same on every host: Prometheus rules take their max without(instance); the workers',
devices' and counters' series are this host's own and add up (docs/fleet.md)."""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from whisperd import __version__
from whisperd.gpupool import DevicePool
from whisperd.gpuprobe import GpuProbe
from whisperd.registry import JobRegistry
from whisperd.telemetry import Telemetry
from whisperd.views import Views, jobs_by_device


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


class SystemCollector(Collector):
    """Queue, workers and scheduler figures."""

    def __init__(
        self,
        registry: JobRegistry,
        views: Views,
        telemetry: Telemetry,
        clock: Callable[[], float],
        is_draining: Callable[[], bool],
    ) -> None:
        self._registry = registry
        self._views = views
        self._telemetry = telemetry
        self._clock = clock
        self._is_draining = is_draining

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("whisperd_jobs", "Jobs in the store by state", labels=["state"])
        for state, count in self._registry.counts().items():
            jobs.add_metric([state], count)
        yield jobs
        yield from self._worker_families()
        rtf = self._telemetry.realtime_factor()
        yield GaugeMetricFamily(
            "whisperd_realtime_factor", "Audio seconds per worker second since start (0: none yet)",
            value=rtf if rtf is not None else 0.0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "whisperd_scheduler_last_tick_timestamp_seconds", "When the scheduler last ran (unix time)",
            value=self._telemetry.last_tick_at,
        )  # fmt: skip
        oldest = self._registry.oldest_waiting_since()
        yield GaugeMetricFamily(
            "whisperd_oldest_waiting_job_age_seconds",
            "How long the longest-waiting job has waited (0: none)",
            value=max(0.0, self._clock() - oldest) if oldest is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "whisperd_start_time_seconds", "When the daemon started (unix time)", value=self._views.started_at
        )
        yield GaugeMetricFamily(
            "whisperd_draining", "1 while the daemon drains for shutdown", value=int(self._is_draining())
        )
        info = InfoMetricFamily("whisperd_build", "Versions of whisperd and what it runs on")
        info.add_metric([], {
            "version": __version__, "python": platform.python_version(),
            "faster_whisper": _version("faster-whisper"), "ctranslate2": _version("ctranslate2"),
        })  # fmt: skip
        yield info

    def _worker_families(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "whisperd_jobs_in_flight", "Jobs held by workers, by device", labels=["device"]
        )
        workers = GaugeMetricFamily(
            "whisperd_workers", "Worker processes by device and state", labels=["device", "state"]
        )
        restarts = CounterMetricFamily(
            "whisperd_worker_restarts", "Worker restarts since the daemon started", labels=["device"]
        )
        workers_now = self._views.workers()
        by_state: dict[tuple[str, str], int] = {}
        restarts_by_device: dict[str, int] = {}
        for w in workers_now:
            by_state[(w.device, w.state)] = by_state.get((w.device, w.state), 0) + 1
            restarts_by_device[w.device] = restarts_by_device.get(w.device, 0) + w.restarts
        for device, jobs in jobs_by_device(workers_now).items():
            in_flight.add_metric([device], len(jobs))
        for (device, state), count in by_state.items():
            workers.add_metric([device, state], count)
        for device, count in restarts_by_device.items():
            restarts.add_metric([device], count)
        yield from (in_flight, workers, restarts)


class HostBeat(Protocol):
    """A host of the fleet as a heartbeat read it (pg_store.HostRow)."""

    @property
    def id(self) -> str: ...

    @property
    def heartbeat_age_s(self) -> float: ...  # on the database's clock


class FleetHealth(Protocol):
    """What the fleet's series read of this host's link to the shared store (fleetlink.FleetLink)."""

    @property
    def hosts(self) -> Sequence[HostBeat]: ...  # every host in the store, as the last heartbeat read them

    @property
    def reachable(self) -> bool: ...  # the last heartbeat reached the database


class FleetCollector(Collector):
    """With a shared store (several hosts, one queue): every host's heartbeat and this host's reach of the
    database. Every host exports the same ages (one row each in the store): alerts take the max by host."""

    def __init__(self, link: FleetHealth, lease_s: float) -> None:
        self._link = link
        self._lease_s = lease_s

    def collect(self) -> Iterator[Metric]:
        hosts = self._link.hosts
        ages = GaugeMetricFamily(
            "whisperd_fleet_host_heartbeat_age_seconds",
            "Seconds since each host's last heartbeat, on the database's clock, as this host last read them",
            labels=["host"],
        )
        for host in hosts:
            ages.add_metric([host.id], host.heartbeat_age_s)
        yield ages
        yield GaugeMetricFamily(
            "whisperd_fleet_hosts", "Hosts whose last heartbeat is within the lease (store.lease_s)",
            value=sum(1 for host in hosts if host.heartbeat_age_s <= self._lease_s),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "whisperd_store_reachable", "1 while this host's last heartbeat reached the shared database",
            value=int(self._link.reachable),
        )  # fmt: skip


class GpuCollector(Collector):
    """Per-GPU figures from the latest NVML reading and whisperd's reservations."""

    def __init__(
        self, views: Views, pool: DevicePool, probe: GpuProbe, floor: Callable[[int], int] | None = None
    ) -> None:
        """floor: the available memory a GPU of that total needs for any batch (scheduling's rule under the
        running configuration; None: no such series)."""
        self._views = views
        self._pool = pool
        self._probe = probe
        self._floor = floor

    def collect(self) -> Iterator[Metric]:
        labels = ["gpu", "uuid"]
        families = {
            "up": GaugeMetricFamily("whisperd_gpu_up", "1 while NVML answers for the GPU", labels=labels),
            "util": GaugeMetricFamily(
                "whisperd_gpu_utilization_ratio", "GPU busy ratio, 0..1", labels=labels
            ),
            "total": GaugeMetricFamily("whisperd_gpu_memory_total_bytes", "GPU memory", labels=labels),
            "used": GaugeMetricFamily("whisperd_gpu_memory_used_bytes", "GPU memory in use", labels=labels),
            "free": GaugeMetricFamily("whisperd_gpu_memory_free_bytes", "GPU memory free", labels=labels),
            "reserved": GaugeMetricFamily(
                "whisperd_gpu_memory_reserved_bytes",
                "GPU memory whisperd reserved for running batches",
                labels=labels,
            ),
            "available": GaugeMetricFamily(
                "whisperd_gpu_memory_available_bytes",
                "Free memory less whisperd's reservations the driver does not show yet (what placement uses)",
                labels=labels,
            ),
            "temp": GaugeMetricFamily("whisperd_gpu_temperature_celsius", "GPU temperature", labels=labels),
            "power": GaugeMetricFamily("whisperd_gpu_power_watts", "GPU power draw", labels=labels),
            "batches": GaugeMetricFamily("whisperd_gpu_running_batches", "Batches running", labels=labels),
            "floor": GaugeMetricFamily(
                "whisperd_gpu_memory_placement_threshold_bytes",
                "Available memory a GPU needs before whisperd places any batch on it: the larger of "
                "scheduler.min_free_memory_bytes and scheduler.memory_safety_margin of its total",
                labels=labels,
            ),
        }
        info = InfoMetricFamily("whisperd_gpu", "The GPU and its driver", labels=labels)
        for view in self._views.devices():
            if view.index is None:
                continue  # the CPU
            key = [str(view.index), view.uuid or ""]
            families["up"].add_metric(key, int(view.healthy))
            families["reserved"].add_metric(key, view.memory_reserved_bytes)
            families["batches"].add_metric(key, view.running_batches)
            if self._floor is not None and view.memory_total_bytes is not None:
                families["floor"].add_metric(key, self._floor(view.memory_total_bytes))
            for name, value in (
                ("util", view.utilization_ratio), ("total", view.memory_total_bytes),
                ("used", view.memory_used_bytes), ("free", view.memory_free_bytes),
                ("available", view.memory_available_bytes), ("temp", view.temperature_c),
                ("power", view.power_w),
            ):  # fmt: skip
                if value is not None:
                    families[name].add_metric(key, value)
            reading = self._pool.reading(view.name)
            info.add_metric(key, {"name": (reading.name if reading else None) or "", "driver_version":
                                  self._probe.driver_version or ""})  # fmt: skip
        yield info
        yield from families.values()


def gpu_collectors(
    views: Views, pool: DevicePool, probe: GpuProbe, floor: Callable[[int], int] | None = None
) -> CollectorRegistry:
    """What `/metrics/gpu` serves."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(GpuCollector(views, pool, probe, floor))
    return collectors
