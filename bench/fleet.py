"""A fleet of whisperd hosts on one PostgreSQL queue (issue 12), against a throwaway cluster started here.

    make bench      # or: .venv/bin/python bench/fleet.py --jobs 5000 --latency-runs 100 --clips 24

1. Claims per second, workers simulated (bench/fleet_claims.py): N jobs (a few bytes of audio each, stored in
   the database as a submit stores them) are queued first; then 1 host, and on a fresh database 8 hosts,
   each a process running the daemon's real wiring on a PgStore with scripted workers that answer at once:
   the fleet's control plane (claims with SKIP LOCKED, audio fetched from the database, results committed,
   every event notified to every host), not transcription. Every host is ready (workers up) before a "go"
   reaches all of them; the rate is taken from the dispatch events in job_events, over the middle 80% of
   them. Also: database transactions and statements per job, and where the CPU went.
2. Cross-host submit -> PROCESSING with idle workers: 3 real daemons (tests/support/fleet.py); host a has no
   worker, b and c one idle faster-whisper CPU worker each. One short clip at a time is submitted on a and
   waited for; the latency is from just before the submit call to the dispatch event's time in job_events
   (the claiming host's clock: the same machine's).
3. Real transcription: the same clips on 1 daemon x 1 CPU worker, then on 3 daemons x 1 CPU worker each
   (all submitted on the first host); wall time from the submit to the last job finished, and how the jobs,
   audio and busy time spread over the hosts. On a machine with fewer cores than workers, the ratio is bound
   by the cores, not by the fleet.

A benchmark, not a test: it asserts nothing about speed. Skipped (exit 0, with the reason) where PostgreSQL's
server is not installed. Results go to bench/results/fleet-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fleet_claims import LEASE_S, claims, enable_statement_statistics, rows  # noqa: E402
from tests.support.audio import SENTENCES, have_tools, speak  # noqa: E402
from tests.support.daemon import DaemonProcess  # noqa: E402
from tests.support.fleet import host_config  # noqa: E402
from tests.support.postgres import Cluster, why_not  # noqa: E402
from whisperd import protocol as p  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---- 2 and 3: real daemons, real workers -----------------------------------------------------------------


def fleet_hosts(root: Path, url: str, workers: dict[str, int]) -> list[DaemonProcess]:
    hosts = [
        DaemonProcess(
            root / name,
            host_config(
                url,
                name,
                lease_s=LEASE_S,
                workers={"cpu_workers": count},
                store={"heartbeat_interval_s": 5.0},  # the product's default
            ),
        )
        for name, count in workers.items()
    ]
    for host in hosts:
        host.start(own_group=True)
    return hosts


def stop_all(hosts: list[DaemonProcess]) -> None:
    for host in hosts:  # their state dirs go with the bench's folder
        if host.proc is not None and host.proc.poll() is None:
            host.stop(timeout_s=120)
        shutil.rmtree(host.socket.parent, ignore_errors=True)


def latency(cluster: Cluster, runs: int, root: Path, clip: Path) -> dict[str, Any]:
    url = cluster.create_database("latency")
    hosts = fleet_hosts(root / "latency", url, {"a": 0, "b": 1, "c": 1})
    a = hosts[0]
    submitted: list[tuple[int, float]] = []
    try:
        a.wait_for(lambda: {w.host for w in a.client.stats().workers if w.state == "idle"} == {"b", "c"},
                   timeout_s=60, what="b's and c's workers idle, seen from a")  # fmt: skip
        with a.client.watch() as events:
            for i in range(runs + 5):  # the first 5 warm up the connections and the models' first run
                t0 = time.time()
                [job] = a.client.submit([str(clip)])
                for event in events:
                    if (
                        isinstance(event, p.JobEventReply)
                        and event.job.id == job.id
                        and event.job.state.terminal
                    ):
                        break
                if i >= 5:
                    submitted.append((job.id, t0))
    finally:
        stop_all(hosts)
    dispatch = {
        job_id: (host, at)
        for job_id, host, at in rows(
            url, "SELECT job_id, host, at FROM job_events WHERE event = 'dispatch' ORDER BY id DESC"
        )
    }  # ORDER BY id DESC: a job's first dispatch is the one kept
    latencies = [1000 * (dispatch[job_id][1] - t0) for job_id, t0 in submitted]
    return {
        "runs": len(latencies),
        "p50_ms": statistics.median(latencies),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies),
        "ran_on": dict(Counter(dispatch[job_id][0] for job_id, _t0 in submitted)),
    }


def sees_workers(daemon: DaemonProcess, count: int) -> bool:
    return len(daemon.client.stats().workers) == count


def transcription(url: str, root: Path, names: str, clips: list[Path]) -> dict[str, Any]:
    hosts = fleet_hosts(root, url, dict.fromkeys(names, 1))
    try:
        for daemon in hosts:  # every host sees the others' workers: all are up and heartbeating
            daemon.wait_for(partial(sees_workers, daemon, len(names)), 60, "every host's worker")
        t0 = time.time()
        ids = [job.id for job in hosts[0].client.submit([str(c) for c in clips])]
        done = hosts[0].wait_terminal(ids, timeout_s=1800)
    finally:
        stop_all(hosts)
    failed = [j.error for j in done if j.state.value != "COMPLETED"]
    if failed:
        raise RuntimeError(f"jobs failed: {failed}")
    [(last, audio_s)] = rows(url, "SELECT max(finished_at), sum(audio_duration_s) FROM jobs")
    spread: dict[str, dict[str, float]] = defaultdict(lambda: {"jobs": 0, "audio_s": 0.0, "busy_s": 0.0})
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    started: dict[int, float] = {}
    events = (
        "SELECT e.job_id, e.event, e.host, e.at, j.audio_duration_s FROM job_events e "
        "JOIN jobs j ON j.id = e.job_id WHERE e.event IN ('dispatch', 'complete') ORDER BY e.id"
    )
    for job_id, event, name, at, duration in rows(url, events):
        if event == "dispatch":
            started[job_id] = at
        else:
            spread[name]["jobs"] += 1
            spread[name]["audio_s"] += duration or 0.0
            spans[name].append((started.pop(job_id), at))
    for name, intervals in spans.items():  # the jobs of a batch overlap: the time any of them ran
        end = 0.0
        for start, stop in sorted(intervals):
            spread[name]["busy_s"] += max(0.0, stop - max(start, end))
            end = max(end, stop)
    wall_s = last - t0
    return {"hosts": len(names), "wall_s": wall_s, "audio_s": audio_s, "x_realtime": audio_s / wall_s,
            "per_host": dict(sorted(spread.items()))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=5000, help="queued jobs for the claims rate")
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the run's folder (the hosts' logs)")
    args = parser.parse_args()
    if (reason := why_not()) is not None:
        print(f"fleet bench skipped: {reason}")
        return
    if not have_tools():
        print("fleet bench skipped: its speech clips need espeak-ng and sox (`make bench` installs them)")
        return
    from bench.throughput import make_clips

    base = Path(tempfile.mkdtemp(prefix="whisperd-bench-fleet-"))
    cluster = Cluster().start()
    report: dict[str, Any] = {"machine": {"cores": os.cpu_count()}, "lease_s": LEASE_S}
    try:
        statements = enable_statement_statistics(cluster)
        one = claims(cluster, 1, args.jobs, base, statements)
        eight = claims(cluster, 8, args.jobs, base, statements)
        report["claims"] = {"one_host": one, "eight_hosts": eight,
                            "ratio_8_to_1": eight["claims_per_s"] / one["claims_per_s"]}  # fmt: skip
        short = speak(SENTENCES["fox"], base / "fox.wav")
        report["cross_host_latency"] = latency(cluster, args.latency_runs, base, short)
        clips = make_clips(base, args.clips)
        solo = transcription(cluster.create_database("solo"), base / "solo", "s", clips)
        trio = transcription(cluster.create_database("trio"), base / "trio", "abc", clips)
        report["transcription"] = {"one_host": solo, "three_hosts": trio,
                                   "ratio_3_to_1": solo["wall_s"] / trio["wall_s"]}  # fmt: skip
    finally:
        cluster.stop()
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / time.strftime("fleet-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(report, indent=2))
    print_report(report)
    print(f"written to {path}")


def print_report(report: dict[str, Any]) -> None:
    c = report["claims"]
    for key in ("one_host", "eight_hosts"):
        r = c[key]
        spread = r["dispatches_per_host"].values()
        cpu, shares = r["cpu_ms_per_job"], r["cpu_share_of_machine"]
        ours = shares["daemons"] + shares["workers"] + shares["postgres"]
        print(
            f"claims, {r['hosts']} host(s) x {r['workers_per_host']} scripted workers: "
            f"{r['claims_per_s']:6.0f}/s (overall {r['claims_per_s_overall']:.0f}/s, "
            f"{r['jobs']} jobs in {r['drain_s']:.1f} s, {min(spread)}-{max(spread)} per host)"
        )
        print(
            f"  per job: {r['transactions_per_job']:.1f} transactions; CPU {cpu['daemons']:.1f} ms daemons, "
            f"{cpu['workers']:.1f} ms workers, {cpu['postgres']:.1f} ms PostgreSQL; "
            f"{100 * ours:.0f}% of the machine, others {100 * shares['others']:.0f}% "
            f"(load before {r['load_average_before']:.1f})"
        )
        for calls, ms, text in r["statements_per_job"][:4]:  # the most database time per job
            print(f"  {calls:5.2f} x {ms / calls:5.3f} ms  {text[:76]}")
    print(f"claims per second ratio 8 hosts / 1 host: {c['ratio_8_to_1']:.2f}")
    lat = report["cross_host_latency"]
    print(
        f"cross-host submit -> PROCESSING (idle workers on other hosts): p50 {lat['p50_ms']:.1f} ms, "
        f"p99 {lat['p99_ms']:.1f} ms ({lat['runs']} runs, ran on {lat['ran_on']})"
    )
    t = report["transcription"]
    for key in ("one_host", "three_hosts"):
        r = t[key]
        print(
            f"transcription, {r['hosts']} host(s) x 1 CPU worker: {r['wall_s']:.1f} s for "
            f"{r['audio_s']:.0f} s of audio, {r['x_realtime']:.1f}x realtime"
        )
        for host, s in r["per_host"].items() if r["hosts"] > 1 else ():
            print(
                f"  host {host}: {s['jobs']:3d} jobs, {s['audio_s']:6.1f} s audio, busy {s['busy_s']:.1f} s"
            )
    cores = report["machine"]["cores"]
    print(f"throughput ratio 3 hosts / 1 host: {t['ratio_3_to_1']:.2f} (on {cores} cores)")


if __name__ == "__main__":
    main()
