"""The one place whisperd talks to NVML: what each GPU is, and how loaded and healthy it is right now.

A missing or broken NVML is not an error (the daemon then runs CPU workers only), and one sick GPU
never hides the others: its reading comes back healthy=False with the NVML error attached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import pynvml

log = logging.getLogger("whisperd.gpu")


class GpuReading(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU as NVML saw it at one moment; a field is None when it could not be read."""

    index: int
    uuid: str | None
    name: str | None
    healthy: bool
    error: str | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    memory_free_bytes: int | None
    utilization_ratio: float | None  # 0..1
    memory_utilization_ratio: float | None  # 0..1
    temperature_c: float | None
    power_w: float | None


class GpuProbe(Protocol):
    def start(self) -> bool: ...

    @property
    def driver_version(self) -> str | None: ...

    def read(self) -> list[GpuReading]: ...

    def close(self) -> None: ...


class NvmlProbe:
    """Reads every GPU through NVML. Never raises on a per-GPU failure: that GPU comes back healthy=False."""

    def __init__(self, exclude: frozenset[int] = frozenset()) -> None:
        self._exclude = exclude
        self._started = False
        self._told_absent = False
        self._driver_version: str | None = None

    def start(self) -> bool:
        """Initialise NVML; False when the library is missing or will not initialise."""
        if self._started:
            return True
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            if not self._told_absent:
                self._told_absent = True
                log.info("no NVML: running on CPU workers only (%s)", exc)
            return False
        self._started = True
        try:
            self._driver_version = str(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError as exc:
            log.warning("NVML driver version unreadable: %s", exc)
        return True

    @property
    def driver_version(self) -> str | None:
        return self._driver_version

    def read(self) -> list[GpuReading]:
        """One reading per GPU not excluded; [] when NVML is not started or cannot count GPUs."""
        if not self._started:
            return []
        try:
            count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            log.warning("NVML could not count GPUs: %s", exc)
            return []
        return [_read_gpu(index) for index in range(count) if index not in self._exclude]

    def close(self) -> None:
        if not self._started:
            return
        self._started = False
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.warning("NVML shutdown failed: %s", exc)


def _read_gpu(index: int) -> GpuReading:
    """Read every field it can; the first NVML failure marks the GPU unhealthy.

    "Not supported" (say, power on some boards) is an answer, not a failure: the field stays None.
    """
    errors: list[str] = []

    def call(fn: Callable[..., Any], *args: object) -> Any:
        try:
            return fn(*args)
        except pynvml.NVMLError_NotSupported:
            return None
        except pynvml.NVMLError as exc:
            errors.append(str(exc))
            return None

    handle = call(pynvml.nvmlDeviceGetHandleByIndex, index)
    if handle is None:
        return _reading(index, error=errors[0] if errors else "no handle")
    uuid = call(pynvml.nvmlDeviceGetUUID, handle)
    name = call(pynvml.nvmlDeviceGetName, handle)
    memory = call(pynvml.nvmlDeviceGetMemoryInfo, handle)
    util = call(pynvml.nvmlDeviceGetUtilizationRates, handle)
    temp = call(pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU)
    power_mw = call(pynvml.nvmlDeviceGetPowerUsage, handle)
    return _reading(
        index,
        error=errors[0] if errors else None,
        uuid=None if uuid is None else str(uuid),
        name=None if name is None else str(name),
        memory_total_bytes=None if memory is None else int(memory.total),
        memory_used_bytes=None if memory is None else int(memory.used),
        memory_free_bytes=None if memory is None else int(memory.free),
        utilization_ratio=None if util is None else int(util.gpu) / 100.0,
        memory_utilization_ratio=None if util is None else int(util.memory) / 100.0,
        temperature_c=None if temp is None else float(temp),
        power_w=None if power_mw is None else int(power_mw) / 1000.0,
    )


def _reading(index: int, *, error: str | None, **fields: Any) -> GpuReading:
    values: dict[str, Any] = dict.fromkeys(GpuReading.__struct_fields__)
    values.update(fields, index=index, healthy=error is None, error=error)
    return GpuReading(**values)
