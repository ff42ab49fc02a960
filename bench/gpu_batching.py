"""Batched decoding on a GPU (issue 11): whisperd against bare faster-whisper, its BatchedInferencePipeline
above all, in one run on one GPU.

    bench/gpu_run.sh               # on a GPU machine: the wheels, the model and the corpus staged (see there)
    python3 bench/gpu_batching.py --model DIR --corpus DIR [--quick] [--out DIR]
    .venv/bin/python bench/gpu_batching.py --device cpu --quick --clips 3   # the script end to end, no GPU
    .venv/bin/python bench/gpu_batching.py --pack-corpus DIR   # the corpus as FLAC files and a manifest,
                                                               # for a machine without espeak-ng

The model is a CTranslate2 directory (--model; by default the multilingual Whisper base that
tests/support/models.py joins), float16, beam 5 everywhere, the language detected per file on both sides;
models are loaded before any clock starts. The workload is bench/corpus.py's 12 clips, repeated --repeat
times (4 on a GPU, so that a row lasts seconds), and its ~10-minute recording.

Rows, each with realtime factor, corpus WER (bench/corpus.py), wall time, peak GPU memory (the most NVML saw
used on the machine's GPUs during the row, sampled every 50 ms, model loads included) and peak RSS (bare: its
processes; whisperd: daemon and workers, over the daemon's life so far):
  - bare `WhisperModel.transcribe`, 1 process, one file after another;
  - bare `BatchedInferencePipeline` per file (batch_size 16, its default VAD), 1 process, and 2 (full run);
  - whisperd, [transcribe] mode = "batched", 1 GPU worker (and 2 in a full run), 1, 4 and 8 closed-loop
    clients (bench/batching.py's closed_loop), scheduler.max_batch_size 16;
  - whisperd, mode = "sequential", 1 worker, 4 clients: parity with bare sequential;
  - the 10-minute recording, 1 submitter: bare sequential, bare batched, whisperd batched.
A row that fails is reported as failed and the others still run; optional rows are skipped once the run has
taken --budget-s. The JSON (OUT/gpu-batching-*.json) is rewritten after every row, so a run cut short keeps
what it measured. With --device cpu the whisperd rows use CPU workers instead: a check of the script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.batching import BareSetup, Completions, bare, closed_loop  # noqa: E402
from bench.corpus import Clip, build  # noqa: E402
from bench.throughput import BEAM_SIZE, whisperd_peak_rss_bytes  # noqa: E402
from tests.support.daemon import DaemonProcess  # noqa: E402
from whisperd.config import BUNDLED_MODEL  # noqa: E402

MANIFEST = "corpus.json"
READY_TIMEOUT_S = 180.0  # CUDA start and a model load in each worker
# --sandbox auto: sandboxed workers not ready by then are taken for ones the sandbox stops
SANDBOX_TRY_S = 90.0


# ---- the corpus, made here or read from a manifest ----------------------------------------------------


def pack_corpus(dest: Path, cache: Path) -> None:
    """bench/corpus.py's clips and recording as FLAC (lossless, half the size of WAV) and a manifest."""
    clips, long = build(cache)
    dest.mkdir(parents=True, exist_ok=True)

    def packed(clip: Clip) -> dict[str, Any]:
        name = Path(clip.path).with_suffix(".flac").name
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", clip.path, "-c:a", "flac",
                        "-compression_level", "12", str(dest / name)], check=True)  # fmt: skip
        return {"file": name, "text": clip.text, "duration_s": clip.duration_s}

    manifest = {"clips": [packed(c) for c in clips], "long": packed(long)}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
    print(f"corpus packed in {dest}: {len(clips)} clips and the recording")


def load_corpus(folder: Path | None, cache: Path) -> tuple[list[Clip], Clip]:
    if folder is None:
        return build(cache)  # espeak-ng and sox, cached
    data = json.loads((folder / MANIFEST).read_text())

    def clip(entry: dict[str, Any]) -> Clip:
        return Clip(str(folder / entry["file"]), entry["text"], float(entry["duration_s"]))

    return [clip(c) for c in data["clips"]], clip(data["long"])


def repeated(clips: list[Clip], times: int, folder: Path) -> list[Clip]:
    """The clips `times` over, each copy a file of its own (bare() keys its results by path)."""
    if times == 1:
        return clips
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in range(times):
        for clip in clips:
            source = Path(clip.path)
            path = folder / f"{source.stem}.r{n}{source.suffix}"
            try:
                os.link(source, path)
            except OSError:  # another file system
                shutil.copyfile(source, path)
            out.append(Clip(str(path), clip.text, clip.duration_s))
    return out


# ---- GPU memory ---------------------------------------------------------------------------------------


class GpuMemory:
    """Memory used on all the GPUs NVML sees, sampled in a thread while a row runs; None without NVML."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self._handles: list[Any] = []
        self.names: list[str] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            names = [pynvml.nvmlDeviceGetName(h) for h in self._handles]
            self.names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
            self._nvml = pynvml
        except Exception:  # no driver here: no figure
            self._handles = []

    def used_bytes(self) -> int | None:
        if not self._handles:
            return None
        return sum(int(self._nvml.nvmlDeviceGetMemoryInfo(h).used) for h in self._handles)

    @contextlib.contextmanager
    def peak(self) -> Iterator[dict[str, int | None]]:
        before = self.used_bytes()
        figures: dict[str, int | None] = {"gpu_memory_before_bytes": before, "gpu_memory_peak_bytes": before}
        if before is None:
            yield figures
            return
        stop, most = threading.Event(), [before]

        def sample() -> None:
            while not stop.wait(0.05):
                most[0] = max(most[0], self.used_bytes() or 0)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield figures
        finally:
            stop.set()
            thread.join()
            figures["gpu_memory_peak_bytes"] = most[0]


# ---- the run ------------------------------------------------------------------------------------------


@dataclass
class Settings:
    device: str
    model: str  # a CTranslate2 directory, or "" for the bundled tiny.en
    compute_type: str
    batch_size: int  # BatchedInferencePipeline's batch_size, and whisperd's chunk batch
    max_batch_size: int  # whisperd's scheduler.max_batch_size
    sandbox: str  # auto | on | off

    @property
    def model_name(self) -> str:
        return Path(self.model).name if self.model else "tiny.en"


class Bench:
    def __init__(self, settings: Settings, budget_s: float, document: dict[str, Any], out: Path) -> None:
        self.s, self.budget_s, self.document, self.out = settings, budget_s, document, out
        self.gpu = GpuMemory()
        self.t0 = time.perf_counter()
        self.rows: list[dict[str, Any]] = document.setdefault("rows", [])
        self.sandboxed: bool | None = None if settings.sandbox == "auto" else settings.sandbox == "on"
        self.broken = ""  # why whisperd did not start: the later setups are not tried

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget_s

    def save(self) -> None:
        self.document["bench_wall_s"] = time.perf_counter() - self.t0
        self.document["ratios"] = ratios(self.rows)
        self.out.write_text(json.dumps(self.document, indent=1))

    def row(self, name: str, measure: Callable[[], dict[str, Any]], optional: bool, **labels: Any) -> None:
        if optional and self.over_budget():
            print(f"  {name}: skipped (past --budget-s)", flush=True)
            self.rows.append({"name": name, **labels, "skipped": "time budget"})
            return
        print(f"  {name} ...", flush=True)
        try:
            with self.gpu.peak() as memory:
                result = measure()
        except Exception as exc:  # one failed row must not cost the others
            result = {"error": f"{type(exc).__name__}: {exc}"[-6000:]}
            print(f"    FAILED: {result['error']}", flush=True)
        else:
            result.update(memory)
            print(f"    {summary(result)}", flush=True)
        self.rows.append({"name": name, **labels, **result})
        self.save()

    # ---- bare faster-whisper

    def bare(self, name: str, clips: list[Clip], kind: str, processes: int, optional: bool = False) -> None:
        setup = BareSetup(self.s.model, self.s.device, self.s.compute_type, self.s.batch_size)
        self.row(name, lambda: bare(clips, kind, processes, setup), optional, side="bare", mode=kind,
                 processes=processes)  # fmt: skip

    # ---- whisperd

    def config(self, mode: str, workers: int, sandbox: bool) -> dict[str, dict[str, Any]]:
        name, s = self.s.model_name, self.s
        transcribe = {"beam_size": BEAM_SIZE, "mode": mode, "default_model": name,
                      "gpu_chunk_batch": s.batch_size, "cpu_chunk_batch": s.batch_size}  # fmt: skip
        worker_keys: dict[str, Any] = {"sandbox": sandbox, "cpu_threads": 1}
        reads = library_dirs()
        if reads:
            worker_keys["sandbox_read_paths"] = reads
        if s.device == "cuda":
            gpu = {"enabled": True, "workers_per_gpu": workers, "compute_type": s.compute_type}
            worker_keys["cpu_workers"] = 0
        else:
            gpu = {"enabled": False}
            worker_keys |= {"cpu_workers": workers, "cpu_compute_type": s.compute_type}
        # The clients are one user: 8 submitting at once need more than the default 4 copies in progress
        daemon = {"max_spools_per_user": 16}
        return {"scheduler": {"max_batch_size": s.max_batch_size}, "gpu": gpu, "workers": worker_keys,
                "transcribe": transcribe, "models": {name: s.model or BUNDLED_MODEL},
                "daemon": daemon}  # fmt: skip

    def start(self, state: Path, mode: str, workers: int) -> DaemonProcess:
        """The daemon, its workers ready with the model loaded. --sandbox auto: the first start tries the
        workers' sandbox, and without it if they do not come up; the runs after keep what worked."""
        if self.sandboxed is None:
            try:
                daemon = self._start(state / "sandboxed", mode, workers, True, SANDBOX_TRY_S)
                self.sandboxed = True
                return daemon
            except Exception as exc:
                print(f"    sandboxed workers did not come up ({str(exc)[-3000:]}); without the sandbox")
                self.document["sandbox_failure"] = str(exc)[-6000:]
                self.sandboxed = False
        return self._start(state, mode, workers, self.sandboxed, READY_TIMEOUT_S)

    def _start(self, state: Path, mode: str, workers: int, sandbox: bool, timeout_s: float) -> DaemonProcess:
        daemon = DaemonProcess(state, self.config(mode, workers, sandbox)).start()
        expected = workers * max(1, len(self.gpu.names)) if self.s.device == "cuda" else workers

        def ready() -> bool:
            ws = daemon.client.stats().workers
            dying = [w.id for w in ws if w.restarts >= 2]  # fail at once, not at the timeout
            if dying:
                raise RuntimeError(f"workers {dying} keep dying\n{daemon.log()[-4000:]}")
            return [w.state for w in ws] == ["idle"] * expected

        try:
            daemon.wait_for(ready, timeout_s=timeout_s, what=f"{expected} workers ready")
            ws = daemon.client.stats().workers
            if any(self.s.model_name not in w.models for w in ws):
                raise RuntimeError(f"a worker came up without the model: {ws}\n{daemon.log()[-4000:]}")
        except BaseException:
            daemon.stop()
            raise
        print(
            f"    whisperd up: {', '.join(f'{w.id} on {w.device}' for w in ws)}, sandbox {sandbox}",
            flush=True,
        )
        return daemon

    def whisperd(
        self, tmp: Path, mode: str, workers: int, plan: list[tuple[str, list[Clip], int, bool]]
    ) -> None:
        """plan: (row name, clips, clients, optional), on one daemon."""
        labels = {"side": "whisperd", "mode": mode, "workers": workers}
        if all(optional for *_, optional in plan) and self.over_budget():
            for name, _, clients, _ in plan:
                self.row(name, dict, True, clients=clients, **labels)
            return
        print(f"  whisperd mode={mode}, {workers} worker(s) ...", flush=True)
        try:
            if self.broken:
                raise RuntimeError(f"not tried: {self.broken[:200]}")
            daemon = self.start(tmp / f"state-{time.monotonic_ns()}", mode, workers)
        except Exception as exc:
            error = f"whisperd did not start: {type(exc).__name__}: {exc}"[-6000:]
            self.broken = self.broken or error
            print(f"    FAILED: {error}", flush=True)
            self.rows += [{"name": n, "clients": c, **labels, "error": error} for n, _, c, _ in plan]
            self.save()
            return
        try:
            done = Completions(daemon)

            def measure(clips: list[Clip], clients: int) -> dict[str, Any]:
                result = closed_loop(daemon, done, clips, clients)
                result["peak_rss_bytes"] = whisperd_peak_rss_bytes(daemon)
                return result

            for name, clips, clients, optional in plan:
                self.row(name, partial(measure, clips, clients), optional, clients=clients, **labels)
        finally:
            daemon.stop()


def library_dirs() -> list[str]:
    """LD_LIBRARY_PATH's folders and where their links lead (a libcublas.so.12 made to point at another):
    what a sandboxed worker must read besides Python and /usr."""
    dirs: list[str] = []
    for folder in filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":")):
        if os.path.isdir(folder):
            dirs.append(os.path.abspath(folder))
            for entry in os.scandir(folder):
                if entry.is_symlink():
                    dirs.append(os.path.dirname(os.path.realpath(entry.path)))
    return sorted(set(dirs))


# ---- the report ---------------------------------------------------------------------------------------


def summary(r: dict[str, Any]) -> str:
    return f"{r['x_realtime']:.1f}x realtime, WER {100 * r['wer']:.1f} %, {r['wall_s']:.1f} s"


def ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["name"]: r for r in rows if "x_realtime" in r}

    def x(name: str) -> float | None:
        return by[name]["x_realtime"] if name in by else None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def wer_points(a: str, b: str) -> float | None:
        return 100 * (by[a]["wer"] - by[b]["wer"]) if a in by and b in by else None

    seq, batched, w4 = (
        "bare sequential, 1 process",
        "bare batched, 1 process",
        "whisperd batched, 1 worker, 4 clients",
    )
    clips = [r for r in by.values() if r.get("side") == "whisperd" and not r["name"].startswith("long")]
    best = max((r for r in clips if r["mode"] == "batched"), key=lambda r: r["x_realtime"], default=None)
    return {
        "whisperd_batched_4_clients_vs_bare_batched": div(x(w4), x(batched)),
        "whisperd_batched_4_clients_vs_bare_sequential": div(x(w4), x(seq)),
        "best_whisperd_batched": best and best["name"],
        "best_whisperd_batched_vs_bare_batched": best and div(best["x_realtime"], x(batched)),
        "whisperd_batched_1_client_vs_bare_sequential": div(
            x("whisperd batched, 1 worker, 1 client"), x(seq)
        ),
        "whisperd_sequential_4_clients_vs_bare_sequential": div(
            x("whisperd sequential, 1 worker, 4 clients"), x(seq)
        ),
        "long_whisperd_batched_vs_bare_batched": div(
            x("long: whisperd batched, 1 worker"), x("long: bare batched")
        ),
        "long_whisperd_batched_vs_bare_sequential": div(
            x("long: whisperd batched, 1 worker"), x("long: bare sequential")
        ),
        "wer_points_whisperd_batched_4_clients_minus_bare_sequential": wer_points(w4, seq),
        "wer_points_whisperd_batched_4_clients_minus_bare_batched": wer_points(w4, batched),
        "wer_points_bare_batched_minus_bare_sequential": wer_points(batched, seq),
    }


def print_report(document: dict[str, Any]) -> None:
    gib, mib = 1 / 2**30, 1 / 2**20
    print(f"\n{document['model']} {document['compute_type']} on {document['device']} "
          f"({', '.join(document['gpus']) or 'no GPU'}), beam {BEAM_SIZE}, batch {document['batch_size']}; "
          f"clips: {document['clips']} x {document['repeat']} ({document['clips_audio_s']:.0f} s of audio), "
          f"recording {document['long_audio_s']:.0f} s\n")  # fmt: skip
    print("| row | x realtime | WER | wall s | p50 latency s | peak GPU memory | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for r in document["rows"]:
        if "x_realtime" not in r:
            print(f"| {r['name']} | {'failed' if r.get('error') else 'skipped'} | | | | | |")
            continue
        gpu = r.get("gpu_memory_peak_bytes")
        p50 = f"{r['latency_p50_s']:.2f}" if "latency_p50_s" in r else ""
        memory = f"{gib * gpu:.1f} GiB" if gpu is not None else ""
        cells = [f"{r['x_realtime']:.1f}x", f"{100 * r['wer']:.1f} %", f"{r['wall_s']:.1f}", p50, memory,
                 f"{mib * r['peak_rss_bytes']:.0f} MiB"]  # fmt: skip
        print(f"| {r['name']} | {' | '.join(cells)} |")
    print()
    for key, value in document["ratios"].items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"  {key:<62} {shown}")
    errors: dict[str, list[str]] = {}
    for r in document["rows"]:
        if r.get("error"):
            errors.setdefault(r["error"], []).append(r["name"])
    for error, names in errors.items():
        print(f"\nFAILED {'; '.join(names)}: {error[-1500:]}")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for module in ("ctranslate2", "faster_whisper", "av", "numpy", "onnxruntime"):
        with contextlib.suppress(Exception):
            found[module] = str(__import__(module).__version__)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--model", help="CTranslate2 model directory (default: cpu tiny.en, cuda Whisper base)"
    )
    parser.add_argument("--compute-type", help="default: float16 on cuda, int8 on cpu")
    parser.add_argument("--batch-size", type=int, default=16, help="bare batch_size and whisperd chunk batch")
    parser.add_argument("--max-batch-size", type=int, default=16, help="whisperd scheduler.max_batch_size")
    parser.add_argument("--repeat", type=int, help="times the clips are submitted (default: cuda 4, cpu 1)")
    parser.add_argument("--clips", type=int, help="only the first N clips")
    parser.add_argument("--quick", action="store_true", help="fewer rows (no 2-worker, 8-client, 2-process)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="optional rows are skipped past this")
    parser.add_argument("--sandbox", choices=["auto", "on", "off"], default="auto", help="whisperd's workers")
    parser.add_argument(
        "--corpus", type=Path, help=f"a folder with {MANIFEST} (default: made with espeak-ng)"
    )
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / ".cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--pack-corpus", type=Path, metavar="DIR", help="write the corpus there and exit")
    args = parser.parse_args()
    if args.pack_corpus:
        pack_corpus(args.pack_corpus, args.cache)
        return
    cuda = args.device == "cuda"
    model = args.model or ""
    if cuda and not model:
        from tests.support.models import multilingual_base

        model = str(multilingual_base(args.cache))
    settings = Settings(args.device, model, args.compute_type or ("float16" if cuda else "int8"),
                        args.batch_size, args.max_batch_size, args.sandbox)  # fmt: skip
    repeat = args.repeat or (4 if cuda else 1)
    clips, long = load_corpus(args.corpus, args.cache)
    clips = clips[: args.clips] if args.clips else clips
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / time.strftime("gpu-batching-%Y%m%d-%H%M%S.json")
    document: dict[str, Any] = {
        **asdict(settings), "model": settings.model_name, "beam_size": BEAM_SIZE, "repeat": repeat,
        "clips": len(clips), "clips_audio_s": repeat * sum(c.duration_s for c in clips),
        "long_audio_s": long.duration_s, "quick": args.quick, "versions": versions(),
    }  # fmt: skip
    bench = Bench(settings, args.budget_s, document, out)
    document["gpus"] = bench.gpu.names
    print(f"{settings.model_name} {settings.compute_type} on {settings.device} {bench.gpu.names}; "
          f"{len(clips)} clips x {repeat}, {document['clips_audio_s']:.0f} s; "
          f"recording {long.duration_s:.0f} s; {document['versions']}", flush=True)  # fmt: skip
    full = not args.quick
    with tempfile.TemporaryDirectory(prefix="whisperd-gpu-bench-") as tmp:
        work = repeated(clips, repeat, Path(tmp) / "clips")
        bench.bare("bare batched, 1 process", work, "batched", 1)
        bench.bare("bare sequential, 1 process", work, "sequential", 1)
        bench.whisperd(Path(tmp), "batched", 1, [
            ("whisperd batched, 1 worker, 4 clients", work, 4, False),
            ("whisperd batched, 1 worker, 1 client", work, 1, False),
            *([("whisperd batched, 1 worker, 8 clients", work, 8, True)] if full else []),
            ("long: whisperd batched, 1 worker", [long], 1, False),
        ])  # fmt: skip
        bench.bare("long: bare sequential", [long], "sequential", 1)
        bench.bare("long: bare batched", [long], "batched", 1)
        bench.whisperd(
            Path(tmp), "sequential", 1, [("whisperd sequential, 1 worker, 4 clients", work, 4, False)]
        )
        if full:
            bench.whisperd(Path(tmp), "batched", 2, [
                ("whisperd batched, 2 workers, 4 clients", work, 4, True),
                ("whisperd batched, 2 workers, 8 clients", work, 8, True),
                ("long: whisperd batched, 2 workers", [long], 1, True),
            ])  # fmt: skip
            bench.bare("bare batched, 2 processes", work, "batched", 2, optional=True)
    bench.save()
    print_report(document)
    print(f"\nbench took {document['bench_wall_s']:.0f} s; written to {out}")


if __name__ == "__main__":
    main()
