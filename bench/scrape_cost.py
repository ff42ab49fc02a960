"""Cost of one Prometheus scrape as the store grows: it must stay flat, since gauges are read from counts
kept as jobs move, never by walking the queue.

    .venv/bin/python bench/scrape_cost.py --sizes 1000 10000 100000

For each size the store is filled with that many jobs (one in ten waiting, the rest finished), a daemon
with no workers starts on it, and /metrics and /metrics/gpu are scraped repeatedly over loopback.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.daemon import DaemonProcess, scrape  # noqa: E402
from whisperd.sqlite_store import SqliteStore  # noqa: E402


def fill(state: Path, jobs: int) -> None:
    """Rows as the daemon writes them, in bulk (the schema comes from the store itself)."""
    SqliteStore(state / "jobs.sqlite3").close()
    now = time.time()
    with sqlite3.connect(state / "jobs.sqlite3") as db:
        db.executemany(
            "INSERT INTO jobs (state, model, task, filename, owner_uid, created_at, updated_at, queued_at,"
            " finished_at) VALUES (?, 'tiny.en', 'transcribe', ?, 0, ?, ?, ?, ?)",
            (
                ("PENDING", f"clip{i}.wav", now, now, now + i * 1e-6, None)
                if i % 10 == 0
                else ("COMPLETED", f"clip{i}.wav", now, now, now, now)
                for i in range(jobs)
            ),
        )


def measure(jobs: int, scrapes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="whisperd-scrape-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        fill(state, jobs)
        daemon = DaemonProcess(state, {"workers": {"cpu_workers": 0}, "daemon": {"max_queued_jobs": 10**6}})
        daemon.start(timeout_s=600)
        try:
            result = {"jobs": jobs}
            for path in ("/metrics", "/metrics/gpu"):
                scrape(daemon.metrics_port, path)  # warm
                times = []
                for _ in range(scrapes):
                    t0 = time.perf_counter()
                    scrape(daemon.metrics_port, path)
                    times.append(time.perf_counter() - t0)
                result[f"{path}_median_ms"] = 1000 * statistics.median(times)
            return result
        finally:
            daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    rows = [measure(n, args.scrapes) for n in args.sizes]
    smallest, largest = rows[0], rows[-1]
    report = {
        "rows": rows,
        "ratio_largest_to_smallest": largest["/metrics_median_ms"] / smallest["/metrics_median_ms"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / time.strftime("scrape-cost-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(report, indent=2))
    for row in rows:
        print(
            f"{row['jobs']:>8} jobs: /metrics {row['/metrics_median_ms']:.2f} ms,"
            f" /metrics/gpu {row['/metrics/gpu_median_ms']:.2f} ms (median of {args.scrapes})"
        )
    ratio = report["ratio_largest_to_smallest"]
    print(f"/metrics at {largest['jobs']} jobs / at {smallest['jobs']}: {ratio:.2f}x")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
