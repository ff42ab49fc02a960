"""Durable submits per second (issue 10), and the longest the daemon's loop stalled meanwhile.

    make bench                     # or: .venv/bin/python bench/submits.py --seconds 5

A real daemon with no workers, its state dir on disk (not tmpfs: fsyncs must cost what they cost; the bench
refuses a tmpfs unless --allow-tmpfs), takes submits of one short clip of speech, each passed as a descriptor
through whisperctl's client, from 1 and 8 concurrent submitters (processes), one file per request and 64
files per request. A submit counts once it is acknowledged, which is only once its jobs are durable.
Meanwhile another connection pings every 2 ms: its worst latency bounds how long the loop stalled.

Goals (issue 10): >= 1,000 jobs/s with 8 submitters of one small file, >= 2,000 jobs/s with 64-file requests,
the loop never blocked for more than 5 ms. A benchmark, not a test: it asserts nothing about speed. Results
go to bench/results/submits-*.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import finish_run  # noqa: E402
from tests.support.audio import SENTENCES, have_tools, speak  # noqa: E402
from tests.support.daemon import DaemonProcess  # noqa: E402
from whisperctl.client import Client  # noqa: E402
from whisperd import protocol as p  # noqa: E402
from whisperd.errors import WhisperdError  # noqa: E402

PING_EVERY_S = 0.002
# (name, concurrent submitters, files per request)
PHASES = (
    ("1x1", 1, 1),
    ("8x1", 8, 1),
    ("1x64", 1, 64),
    ("8x64", 8, 64),
)


def file_system(path: Path) -> str:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def config() -> dict[str, dict[str, Any]]:
    return {
        "daemon": {
            "max_queued_jobs": 10_000_000,
            "max_queued_jobs_per_user": 10_000_000,
            "max_spools_per_user": 64,  # every submitter is root: one uid for all of them
        },
        "workers": {"cpu_workers": 0},
        "gpu": {"enabled": False},
        "retention": {"max_age_s": 0, "max_finished_jobs": 0},
        "storage": {"min_free_bytes": 0},
    }


def submitter(socket_path: str, clip: str, files: int, start_at: float, stop_at: float, out: Any) -> None:
    """Submits until stop_at; reports (jobs acknowledged, request latencies in ms, errors by code)."""
    client = Client(socket_path, timeout_s=120)
    paths = [clip] * files
    jobs = 0
    latencies: list[float] = []
    errors: dict[str, int] = {}
    time.sleep(max(0.0, start_at - time.monotonic()))
    while (t0 := time.monotonic()) < stop_at:
        try:
            jobs += len(client.submit(paths))
            latencies.append(1000 * (time.monotonic() - t0))
        except WhisperdError as exc:
            errors[exc.code] = errors.get(exc.code, 0) + 1
            time.sleep(0.01)
    out.put((jobs, latencies, errors))


class Pinger(threading.Thread):
    """Pings on a connection of its own, one every PING_EVERY_S, until stopped."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buffer = p.LineBuffer(1024 * 1024)
        self.latencies_ms: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        request = p.encode_line(p.Ping())
        while not self.stopping.is_set():
            t0 = time.perf_counter()
            self.sock.sendall(request)
            while not self._lines():
                pass
            elapsed = time.perf_counter() - t0
            self.latencies_ms.append(1000 * elapsed)
            time.sleep(max(0.0, PING_EVERY_S - elapsed))
        self.sock.close()

    def _lines(self) -> list[object]:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("whisperd closed the connection")
        return list(self.buffer.feed(chunk))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def cpu_s(pid: int) -> float:
    """The process's CPU time, every thread of it (utime + stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def phase(daemon: DaemonProcess, clip: Path, submitters: int, files: int, seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.monotonic() + 0.5  # every submitter started before the clock does
    stop_at = start_at + seconds
    procs = [
        ctx.Process(target=submitter, args=(str(daemon.socket), str(clip), files, start_at, stop_at, out))
        for _ in range(submitters)
    ]
    for proc in procs:
        proc.start()
    pinger = Pinger(daemon.socket)
    pinger.start()
    assert daemon.proc is not None
    time.sleep(max(0.0, start_at - time.monotonic()))
    cpu_before = cpu_s(daemon.proc.pid)
    results = [out.get(timeout=seconds + 300) for _ in procs]
    daemon_cpu_s = cpu_s(daemon.proc.pid) - cpu_before
    wall_s = max(time.monotonic(), stop_at) - start_at  # the last request may end after stop_at
    pinger.stopping.set()
    pinger.join(30)
    for proc in procs:
        proc.join(30)
    jobs = sum(r[0] for r in results)
    latencies = [ms for r in results for ms in r[1]]
    errors: dict[str, int] = {}
    for r in results:
        for code, count in r[2].items():
            errors[code] = errors.get(code, 0) + count
    pings = pinger.latencies_ms
    return {
        "submitters": submitters,
        "files_per_request": files,
        "jobs": jobs,
        "wall_s": wall_s,
        "jobs_per_s": jobs / wall_s,
        "daemon_cpu_ms_per_job": 1000 * daemon_cpu_s / max(1, jobs),  # all its threads, pings included
        "request_p50_ms": percentile(latencies, 0.5),
        "request_p99_ms": percentile(latencies, 0.99),
        "errors": errors,
        "pings": len(pings),
        "ping_p50_ms": percentile(pings, 0.5),
        "ping_p99_ms": percentile(pings, 0.99),
        "ping_max_ms": max(pings) if pings else float("nan"),
    }


def run(
    seconds: float, workdir: Path | None, allow_tmpfs: bool, keep: bool, phases: list[str]
) -> dict[str, Any]:
    if not have_tools():
        sys.exit("espeak-ng and sox are needed (make system-deps)")
    base = Path(tempfile.mkdtemp(prefix="whisperd-submits-", dir=workdir))
    daemon: DaemonProcess | None = None
    try:
        fs = file_system(base)
        if fs == "tmpfs" and not allow_tmpfs:
            sys.exit(f"{base} is on tmpfs: fsyncs cost nothing there; give --workdir on a disk")
        clip = speak(SENTENCES["fox"], base / "fox.wav")
        state = base / "state"
        daemon = DaemonProcess(state, config()).start()
        figures = {}
        for name, submitters, files in PHASES:
            if phases and name not in phases:
                continue
            figures[name] = phase(daemon, clip, submitters, files, seconds)
            print(f"{name}: {figures[name]['jobs_per_s']:.0f} jobs/s, ping max "
                  f"{figures[name]['ping_max_ms']:.1f} ms", file=sys.stderr)  # fmt: skip
        return {
            "cores": os.cpu_count(),
            "file_system": fs,
            "clip_bytes": clip.stat().st_size,
            "seconds_per_phase": seconds,
            "figures": figures,
        }
    finally:
        finish_run(daemon, base, keep)


def table(report: dict[str, Any]) -> str:
    rows = [
        "| submitters x files | jobs/s | daemon CPU ms/job | request p50 / p99 ms | ping p50 / p99 / max ms "
        "| errors |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in report["figures"].items():
        rows.append(
            f"| {name} | {f['jobs_per_s']:,.0f} | {f['daemon_cpu_ms_per_job']:.2f} | "
            f"{f['request_p50_ms']:.1f} / {f['request_p99_ms']:.1f} | "
            f"{f['ping_p50_ms']:.2f} / {f['ping_p99_ms']:.2f} / {f['ping_max_ms']:.1f} | "
            f"{f['errors'] or ''} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="each phase's length (default: 5)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the state goes (default: $TMPDIR)")
    parser.add_argument("--allow-tmpfs", action="store_true")
    parser.add_argument("--phase", action="append", default=[], help="only this phase (1x1, 8x1, 1x64, 8x64)")
    parser.add_argument("--keep", action="store_true", help="keep the state dir and the daemon's log")
    parser.add_argument("--label", default="", help="added to the result file's name (e.g. before)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    report = run(args.seconds, args.workdir, args.allow_tmpfs, args.keep, args.phase)
    report["label"] = args.label
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.label}" if args.label else ""
    path = args.out / time.strftime(f"submits-%Y%m%d-%H%M%S{suffix}.json")
    path.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
