"""Helpers the benches share: how much of a shared machine's CPU other processes took during a measurement,
and the end of a run that started its own daemon."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

from tests.support.daemon import DaemonProcess

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | str = "self") -> float:
    """User + system CPU seconds of a process (all its threads); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime, stime


def machine_busy_s() -> float:
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) * TICK_S


class OthersShare:
    """Share of the machine's CPU taken, during a row, by processes other than this bench, the pids given
    and the CPU seconds the row's own children report: other people's work on a shared machine."""

    def __init__(self, pids: list[int]) -> None:
        self._pids = pids
        self._busy_s, self._own_s = machine_busy_s(), self._own()

    def _own(self) -> float:
        return cpu_s() + sum(cpu_s(pid) for pid in self._pids)

    def end(self, wall_s: float, children_cpu_s: float = 0.0) -> float:
        busy_s = machine_busy_s() - self._busy_s
        own_s = self._own() - self._own_s + children_cpu_s
        return max(0.0, busy_s - own_s) / ((os.cpu_count() or 1) * wall_s)


def finish_run(daemon: DaemonProcess | None, base: Path, keep: bool) -> None:
    """Stop the run's daemon if it still runs, remove its socket dir, and the run's folder unless kept."""
    if daemon is not None and daemon.proc is not None and daemon.proc.poll() is None:
        daemon.stop(signal.SIGTERM, timeout_s=600)
    if daemon is not None:
        shutil.rmtree(daemon.socket.parent, ignore_errors=True)
    if keep:
        print(f"kept {base} (the daemon's log: {base}/state/whisperd.log)", file=sys.stderr)
    else:
        shutil.rmtree(base, ignore_errors=True)
