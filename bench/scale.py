"""The control plane at scale (issue 10): a queue of N jobs written straight into the store, a real daemon
started on it, and its figures next to the issue's goals.

    make bench SCALE_JOBS=100000       # or: .venv/bin/python bench/scale.py --jobs 1000000

The store gets N PENDING jobs (a few owners, a few priorities) after 1,000 COMPLETED ones with 25 KB
transcripts; every PENDING job's spool file is a hard link to one short clip of speech (one word), so the
spool costs directory entries, not audio. Then, measured from the client side unless noted:

1. no workers (queue only): restart -> ping answers and -> "ready on" in the log; the daemon's RSS; ping
   latency on one connection (2,000 pings, one every 2.5 ms, so they meet the timed rounds; the daemon CPU
   of one ping); /metrics scrape time (median of 20); `status` as `whisperctl status` sends it (limit=1000),
   the newest 1,000 finished jobs, by state PENDING limit=100 (wall time, and daemon CPU per request from
   /proc/<pid>/stat less its idle rate); `status` by id, requests per second on one connection (one request
   at a time, and 64 in flight: the client's round trip, and the daemon's rate); scheduler rounds (the
   whisperd_scheduler_tick_seconds histogram).
2. one CPU worker: restart again; worker frees -> its next batch PROCESSING (the time between the last
   COMPLETED event of a batch and the next PROCESSING event on the watch stream); a job of priority 10
   submitted behind the queue as root (is it in the next batch dispatched?); ping latency while the worker
   runs; scheduler rounds of that phase (those that fill the worker and the timed ones).

A benchmark, not a test: it asserts nothing about speed. Results go to bench/results/scale-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import finish_run  # noqa: E402
from tests.support.audio import have_tools, speak  # noqa: E402
from tests.support.daemon import DaemonProcess, scrape, to_toml  # noqa: E402
from whisperctl.client import Client, Unreachable  # noqa: E402
from whisperd import protocol as p  # noqa: E402
from whisperd.jobs import JobState  # noqa: E402
from whisperd.sqlite_store import SqliteStore  # noqa: E402

OWNERS = (1001, 1002, 1003, 1004)
PRIORITIES = (-1, 0, 0, 1)  # most work at the default priority
FINISHED_JOBS = 1000
TRANSCRIPT_BYTES = 25_000
LINKS_PER_FILE = 60_000
PING_EVERY_S = 0.0025  # 2,000 pings span 5 s: timed rounds (every 2 s) and, with a worker, a few batches
CLK_TCK = os.sysconf("SC_CLK_TCK")

# figure -> (the goal, unit); None: no goal of its own (shown for context)
GOALS: dict[str, tuple[float | None, str]] = {
    "restart_to_ping_s": (None, "s"),
    "restart_to_ready_s": (5.0, "s"),
    "rss_mib": (400.0, "MiB"),
    "ping_p50_ms": (None, "ms"),
    "ping_p99_ms": (5.0, "ms"),
    "metrics_median_ms": (20.0, "ms"),
    "status_limit_1000_ms": (None, "ms"),
    "status_limit_1000_cpu_ms": (3.0, "ms"),
    "status_finished_1000_ms": (None, "ms"),
    "status_finished_1000_cpu_ms": (3.0, "ms"),
    "status_pending_100_ms": (None, "ms"),
    "status_pending_100_cpu_ms": (None, "ms"),
    "ping_cpu_us": (None, "µs"),
    "status_by_id_cpu_us": (None, "µs"),
    "status_by_id_per_s": (20_000.0, "/s"),
    "status_by_id_pipelined_per_s": (20_000.0, "/s"),
    "tick_idle_mean_ms": (5.0, "ms"),
    "tick_idle_p50_bucket_ms": (5.0, "ms"),
    "tick_idle_p99_bucket_ms": (5.0, "ms"),
    "restart_with_worker_to_ready_s": (5.0, "s"),
    "frees_to_next_batch_p50_ms": (5.0, "ms"),
    "frees_to_next_batch_p99_ms": (20.0, "ms"),
    "priority_job_next_dispatched": (None, ""),
    "priority_job_wait_s": (None, "s"),
    "ping_busy_p50_ms": (None, "ms"),
    "ping_busy_p99_ms": (5.0, "ms"),
    "tick_busy_mean_ms": (5.0, "ms"),
    "tick_busy_p50_bucket_ms": (5.0, "ms"),
    "tick_busy_p99_bucket_ms": (5.0, "ms"),
}
# goals that are floors (more is better); the others are ceilings
FLOORS = {"status_by_id_per_s", "status_by_id_pipelined_per_s"}


# ---- the queue ---------------------------------------------------------------------------------------


def make_clip(folder: Path) -> Path:
    if not have_tools():
        sys.exit("espeak-ng and sox are needed: `make system-deps` installs them")
    return speak("hello", folder / "hello.wav")


def check_disk(folder: Path, jobs: int) -> None:
    """About 0.5 KB a job in the database and its indexes and 0.1 KB of directory entry; twice that free."""
    need = 2 * jobs * 600 + FINISHED_JOBS * TRANSCRIPT_BYTES * 2 + 512 * 1024 * 1024
    free = shutil.disk_usage(folder).free
    if free < need:
        sys.exit(f"{folder}: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed for {jobs} jobs")


def transcript_blob() -> bytes:
    words = ("lorem ipsum dolor sit amet " * (TRANSCRIPT_BYTES // 27 + 1))[:TRANSCRIPT_BYTES]
    segments = [p.Segment(id=i, start=float(i), end=i + 1.0, text=words[i * 500 : i * 500 + 500]) for i in
                range(len(words) // 500)]  # fmt: skip
    return msgspec.json.encode(p.Transcript("en", 0.99, 60.0, words, segments))


def fill(state: Path, clip: Path, jobs: int) -> float:
    """The store (its schema from the store itself) and the spool, in bulk; returns the seconds it took."""
    started = time.monotonic()
    SqliteStore(state / "jobs.sqlite3").close()
    spool = state / "spool"
    spool.mkdir(mode=0o700)

    def source(i: int) -> Path:
        """The clip, on the spool's file system; a copy per LINKS_PER_FILE jobs (ext4 allows 65,000 links)."""
        path = state / f"clip{i // LINKS_PER_FILE}.audio"
        if i % LINKS_PER_FILE == 0:
            shutil.copyfile(clip, path)
            path.chmod(0o600)
        return path

    now = time.time() - 3600
    blob = transcript_blob()
    with sqlite3.connect(state / "jobs.sqlite3") as db:
        db.execute("PRAGMA synchronous=OFF")  # the fill only; the daemon reopens it with its own settings
        db.executemany(
            "INSERT INTO jobs (state, progress, model, task, filename, owner_uid, created_at, updated_at,"
            " queued_at, started_at, finished_at, worker, device, audio_duration_s, transcript)"
            " VALUES ('COMPLETED', 100, 'tiny.en', 'transcribe', ?, ?, ?, ?, ?, ?, ?, 'cpu0', 'cpu', 60, ?)",
            (
                (f"done{i}.wav", OWNERS[i % len(OWNERS)], now, now + 1, now, now, now + 1, blob)
                for i in range(FINISHED_JOBS)
            ),
        )

        def pending() -> Iterator[tuple[object, ...]]:
            for i in range(jobs):
                path = spool / f"bench{i:08d}.audio"
                os.link(source(i), path)
                at = now + 1 + i * 1e-6  # FIFO by id
                owner, priority = OWNERS[i % len(OWNERS)], PRIORITIES[(i // 7) % len(PRIORITIES)]
                yield f"clip{i}.wav", owner, priority, str(path), clip_bytes, at, at, at

        clip_bytes = clip.stat().st_size
        db.executemany(
            "INSERT INTO jobs (state, model, task, filename, owner_uid, priority, spool_path, spool_bytes,"
            " created_at, updated_at, queued_at)"
            " VALUES ('PENDING', 'tiny.en', 'transcribe', ?, ?, ?, ?, ?, ?, ?, ?)",
            pending(),
        )
    return time.monotonic() - started


# ---- the daemon --------------------------------------------------------------------------------------


def config(jobs: int, cpu_workers: int) -> dict[str, dict[str, Any]]:
    return {
        "daemon": {"max_queued_jobs": max(jobs * 2, 10_000), "max_queued_jobs_per_user": max(jobs, 1000)},
        "workers": {"cpu_workers": cpu_workers},
        "retention": {"max_age_s": 0, "max_finished_jobs": 0},  # keep everything
        "storage": {"min_free_bytes": 0},
    }


def start(daemon: DaemonProcess, timeout_s: float) -> dict[str, float]:
    """Start it and time the first answered ping and the "ready on" line (from the process's start)."""
    log_from = daemon.log_path.stat().st_size if daemon.log_path.exists() else 0
    started = time.monotonic()
    daemon.start(wait=False)
    assert daemon.proc is not None
    ping_s = ready_s = None
    client = Client(str(daemon.socket), timeout_s=timeout_s)
    while ping_s is None or ready_s is None:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"whisperd exited with {daemon.proc.returncode}:\n{daemon.log()[-4000:]}")
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"whisperd not ready within {timeout_s}s:\n{daemon.log()[-4000:]}")
        if ready_s is None and "ready on" in daemon.log_path.read_bytes()[log_from:].decode(errors="replace"):
            ready_s = time.monotonic() - started
        if ping_s is None:
            try:
                client.ping()  # the socket is bound before recovery: this waits in its backlog until served
                ping_s = time.monotonic() - started
            except (Unreachable, OSError):  # not bound yet
                time.sleep(0.01)
        else:
            time.sleep(0.01)
    return {"ping_s": ping_s, "ready_s": ready_s}


def proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: every thread of the process


class Line:
    """One connection, one request at a time (or many in flight), as whisperctl's own framing does."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buffer = p.LineBuffer(256 * 1024 * 1024)
        self.lines: list[bytes] = []

    def send(self, request: p.Request) -> None:
        self.sock.sendall(p.encode_line(request))

    def receive(self) -> p.Reply:
        while not self.lines:
            chunk = self.sock.recv(4 * 1024 * 1024)
            if not chunk:
                raise ConnectionError("whisperd closed the connection")
            for line in self.buffer.feed(chunk):
                assert isinstance(line, bytes), line
                self.lines.append(line)
        reply = p.decode_reply(self.lines.pop(0))
        if isinstance(reply, p.Error):
            raise RuntimeError(reply.error.message)
        return reply

    def ask(self, request: p.Request) -> p.Reply:
        self.send(request)
        return self.receive()

    def close(self) -> None:
        self.sock.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latencies_ms(ask: Callable[[], object], count: int, every_s: float = 0.0) -> list[float]:
    """every_s: start one every so often, so that they span the daemon's rounds (which a ping waits for)."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        ask()
        times.append(1000 * (time.perf_counter() - t0))
        time.sleep(max(0.0, every_s - (time.perf_counter() - t0)))
    return times


def idle_cpu_rate(pid: int, seconds: float = 2.0) -> float:
    """The daemon's own CPU per second with no request (its timed rounds): subtracted from request costs."""
    before = cpu_s(pid)
    time.sleep(seconds)
    return (cpu_s(pid) - before) / seconds


def request_cost(pid: int, line: Line, request: p.Request, count: int, idle_rate: float) -> dict[str, float]:
    """Median wall time per request, and the daemon's CPU per request less its idle rate."""
    line.ask(request)  # warm
    cpu0, wall0 = cpu_s(pid), time.monotonic()
    times = latencies_ms(lambda: line.ask(request), count)
    cpu, wall = cpu_s(pid) - cpu0, time.monotonic() - wall0
    return {"ms": statistics.median(times), "cpu_ms": 1000 * max(0.0, cpu - idle_rate * wall) / count}


def by_id_rate(line: Line, ids: list[int], seconds: float, in_flight: int) -> float:
    rng = random.Random(1)
    done, started = 0, time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        batch = [p.Status(ids=[rng.choice(ids)]) for _ in range(in_flight)]
        line.sock.sendall(b"".join(p.encode_line(r) for r in batch))
        for _ in batch:
            line.receive()
        done += len(batch)
    return done / (time.perf_counter() - started)


# ---- the tick histogram ------------------------------------------------------------------------------


def tick_histogram(port: int) -> tuple[list[tuple[float, float]], float, float]:
    """whisperd_scheduler_tick_seconds: (upper bound, cumulative count) per bucket, its sum, its count."""
    buckets, total, count = [], 0.0, 0.0
    for row in scrape(port, "/metrics").splitlines():
        if row.startswith("whisperd_scheduler_tick_seconds_bucket"):
            le = row.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(row.rsplit(" ", 1)[1])))
        elif row.startswith("whisperd_scheduler_tick_seconds_sum"):
            total = float(row.rsplit(" ", 1)[1])
        elif row.startswith("whisperd_scheduler_tick_seconds_count"):
            count = float(row.rsplit(" ", 1)[1])
    return buckets, total, count


def tick_figures(
    before: tuple[list[tuple[float, float]], float, float],
    after: tuple[list[tuple[float, float]], float, float],
) -> dict[str, float]:
    """Rounds between two scrapes: their mean, and the upper bound of the bucket that holds the p50 (p99)
    round: the histogram tells no more (most rounds fall in its first bucket, 0.5 ms)."""
    count = after[2] - before[2]
    if count <= 0:
        return {"rounds": 0}
    cumulative = [(le, a - b) for (le, a), (_, b) in zip(after[0], before[0], strict=True)]

    def quantile(q: float) -> float:
        return next(le for le, cum in cumulative if cum >= q * count)

    return {
        "rounds": count,
        "mean_ms": 1000 * (after[1] - before[1]) / count,
        "p50_bucket_ms": 1000 * quantile(0.5),
        "p99_bucket_ms": 1000 * quantile(0.99),
    }


# ---- the watch stream --------------------------------------------------------------------------------


class Watcher(threading.Thread):
    """Job events as they arrive, stamped on arrival: (time, job id, state, whether it is the dispatch)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.line = Line(path)
        self.line.send(p.Watch())
        self.events: list[tuple[float, int, JobState, bool]] = []
        self.changed = threading.Condition()

    def run(self) -> None:
        try:
            while True:
                reply = self.line.receive()
                if isinstance(reply, p.JobEventReply):
                    with self.changed:
                        job = reply.job
                        # a dispatch stamps started_at and updated_at alike; progress moves updated_at on
                        dispatch = job.state is JobState.PROCESSING and job.started_at == job.updated_at
                        self.events.append((time.perf_counter(), job.id, job.state, dispatch))
                        self.changed.notify_all()
        except (OSError, ConnectionError, RuntimeError):
            return

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout_s)

    def close(self) -> None:
        self.line.sock.shutdown(socket.SHUT_RDWR)
        self.line.close()


def dispatches(
    events: list[tuple[float, int, JobState, bool]],
) -> list[tuple[float, list[int], float | None]]:
    """Batches as the stream shows them: (when dispatched, job ids, when the worker was last freed before)."""
    batches: list[tuple[float, list[int], float | None]] = []
    last_completed: float | None = None
    in_batch = False
    for at, job_id, state, dispatch in events:
        if dispatch:
            if in_batch:
                batches[-1][1].append(job_id)
            else:
                batches.append((at, [job_id], last_completed))
                in_batch = True
        elif state.terminal:
            last_completed, in_batch = at, False
    return batches


# ---- the run -----------------------------------------------------------------------------------------


def queue_only(daemon: DaemonProcess, jobs: int, pings: int, by_id_s: float) -> dict[str, float]:
    out: dict[str, float] = {}
    timed = start(daemon, timeout_s=1800)
    out["restart_to_ping_s"], out["restart_to_ready_s"] = timed["ping_s"], timed["ready_s"]
    assert daemon.proc is not None
    pid = daemon.proc.pid
    time.sleep(1.0)
    out["rss_mib"] = proc_status(pid, "VmRSS") / 2**20
    out["peak_rss_mib"] = proc_status(pid, "VmHWM") / 2**20
    ticks_before = tick_histogram(daemon.metrics_port)
    line = Line(daemon.socket)
    try:
        times = latencies_ms(lambda: line.ask(p.Ping()), pings, PING_EVERY_S)
        out["ping_p50_ms"], out["ping_p99_ms"] = percentile(times, 0.5), percentile(times, 0.99)
        out["ping_max_ms"] = max(times)
        scrape(daemon.metrics_port, "/metrics")
        scrapes = latencies_ms(lambda: scrape(daemon.metrics_port, "/metrics"), 20)
        out["metrics_median_ms"] = statistics.median(scrapes)
        idle = idle_cpu_rate(pid)
        out["idle_cpu_per_s_ms"] = 1000 * idle
        for name, request, count in (
            ("status_limit_1000", p.Status(limit=1000), 100),  # what `whisperctl status` sends
            ("status_finished_1000", p.Status(state=JobState.COMPLETED, limit=1000), 100),
            ("status_pending_100", p.Status(state=JobState.PENDING, limit=100), 200),
        ):
            cost = request_cost(pid, line, request, count, idle)
            out[f"{name}_ms"], out[f"{name}_cpu_ms"] = cost["ms"], cost["cpu_ms"]
        live = list(range(FINISHED_JOBS + 1, FINISHED_JOBS + jobs + 1))
        one: tuple[tuple[str, p.Request], ...] = (
            ("ping", p.Ping()),
            ("status_by_id", p.Status(ids=[live[len(live) // 2]])),
        )
        for name, small in one:
            out[f"{name}_cpu_us"] = 1000 * request_cost(pid, line, small, 3000, idle)["cpu_ms"]
        out["status_by_id_per_s"] = by_id_rate(line, live, by_id_s, 1)
        out["status_by_id_pipelined_per_s"] = by_id_rate(line, live, by_id_s, 64)
        out["status_by_finished_id_per_s"] = by_id_rate(line, list(range(1, FINISHED_JOBS + 1)), by_id_s, 1)
    finally:
        line.close()
    ticks = tick_figures(ticks_before, tick_histogram(daemon.metrics_port))
    out.update({f"tick_idle_{key}": value for key, value in ticks.items()})
    return out


def with_worker(
    daemon: DaemonProcess, clip: Path, batches: int, pings: int, raw: dict[str, Any]
) -> dict[str, float]:
    out: dict[str, float] = {}
    timed = start(daemon, timeout_s=1800)
    out["restart_with_worker_to_ping_s"] = timed["ping_s"]
    out["restart_with_worker_to_ready_s"] = timed["ready_s"]
    watcher = Watcher(daemon.socket)
    watcher.start()
    ticks_before = tick_histogram(daemon.metrics_port)  # the rounds that fill the worker, and the others
    try:
        # a batch counts once the worker has been freed before it (the first one waits for its start)
        def enough() -> bool:
            return sum(1 for b in dispatches(watcher.events) if b[2] is not None) >= batches

        if not watcher.wait(enough, timeout_s=60 + 20 * batches):
            print(f"only {len(dispatches(watcher.events))} batches within the time allowed", file=sys.stderr)
        gaps = [1000 * (at - freed) for at, _ids, freed in dispatches(watcher.events) if freed is not None]
        if gaps:
            out["frees_to_next_batch_p50_ms"] = percentile(gaps, 0.5)
            out["frees_to_next_batch_p99_ms"] = percentile(gaps, 0.99)
            out["frees_to_next_batch_max_ms"] = max(gaps)
            out["frees_to_next_batch_samples"] = len(gaps)
            raw["frees_to_next_batch_ms"] = gaps
        # A job of priority 10 (root may) behind the whole queue: the batch dispatched next should hold it.
        [job] = Client(str(daemon.socket)).submit([str(clip)], priority=10)
        acknowledged = time.perf_counter()

        def placed() -> bool:
            return any(job.id in ids for _at, ids, _f in dispatches(watcher.events))

        watcher.wait(placed, timeout_s=300)
        after = [(at, ids) for at, ids, _f in dispatches(watcher.events) if at > acknowledged]
        out["priority_job_next_dispatched"] = float(bool(after) and job.id in after[0][1])
        if placed():
            at = next(at for at, ids, _f in dispatches(watcher.events) if job.id in ids)
            out["priority_job_wait_s"] = at - acknowledged
        line = Line(daemon.socket)
        try:  # the worker still busy with the queue
            times = latencies_ms(lambda: line.ask(p.Ping()), pings, PING_EVERY_S)
        finally:
            line.close()
        out["ping_busy_p50_ms"], out["ping_busy_p99_ms"] = percentile(times, 0.5), percentile(times, 0.99)
        out["ping_busy_max_ms"] = max(times)
        ticks = tick_figures(ticks_before, tick_histogram(daemon.metrics_port))
        out.update({f"tick_busy_{key}": value for key, value in ticks.items()})
    finally:
        watcher.close()
    return out


def run(
    jobs: int, batches: int, pings: int, by_id_s: float, workdir: Path | None, keep: bool
) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="whisperd-scale-", dir=workdir))
    daemon: DaemonProcess | None = None
    try:
        check_disk(base, jobs)
        clip = make_clip(base)
        state = base / "state"
        state.mkdir(mode=0o700)
        fill_s = fill(state, clip, jobs)
        print(f"filled {jobs} queued jobs (+{FINISHED_JOBS} finished) in {fill_s:.1f} s", file=sys.stderr)
        figures: dict[str, float] = {"fill_s": fill_s}
        daemon = DaemonProcess(state, config(jobs, cpu_workers=0))
        figures.update(queue_only(daemon, jobs, pings, by_id_s))
        daemon.stop(signal.SIGTERM, timeout_s=600)
        daemon.config_path.write_text(to_toml(config(jobs, cpu_workers=1)))
        raw: dict[str, Any] = {}
        figures.update(with_worker(daemon, clip, batches, pings, raw))
        return {
            "jobs": jobs,
            "finished_jobs": FINISHED_JOBS,
            "cores": os.cpu_count(),
            "figures": figures,
            "raw": raw,
        }
    finally:
        finish_run(daemon, base, keep)


def table(report: dict[str, Any]) -> str:
    rows = [f"| figure ({report['jobs']:,} queued) | measured | goal |", "|---|---|---|"]
    for key, value in report["figures"].items():
        goal, unit = GOALS.get(key, (None, ""))
        if key == "priority_job_next_dispatched":
            rows.append(f"| {key} | {'yes' if value else 'NO'} | yes |")
            continue
        shown = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
        target = "" if goal is None else f"{'>=' if key in FLOORS else '<='} {goal:,g} {unit}"
        rows.append(f"| {key} | {shown} {unit} | {target} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=1_000_000, help="queued jobs (default: 1,000,000)")
    parser.add_argument("--batches", type=int, default=50, help="worker batches to time (default: 50)")
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--by-id-seconds", type=float, default=3.0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the state goes (default: $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the state dir and the daemon's log")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    report = run(args.jobs, args.batches, args.pings, args.by_id_seconds, args.workdir, args.keep)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / time.strftime(f"scale-{args.jobs}-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
