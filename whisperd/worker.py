"""The worker process's loop: reads batches and cancels from the daemon, keeps models loaded, runs each job
and streams its progress and result back. What transcribes is a parameter (a Transcriber): faster-whisper in
service (worker_main.py), a scripted one in tests, so both run this same loop."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sized
from typing import Any, BinaryIO, Protocol

import msgspec

from whisperd import workerproto as wp
from whisperd.protocol import Segment, Transcript

log = logging.getLogger("whisperd.worker")
_PR_SET_PDEATHSIG = 1


class AudioInfo(msgspec.Struct, frozen=True):
    language: str
    language_probability: float
    duration_s: float


class Transcriber(Protocol):
    def load_model(self, source: str) -> Any:
        """A model ready to transcribe with; source is a name, a directory or 'bundled:...'."""
        ...

    def decode_audio(self, path: str) -> Sized:
        """The audio's samples; raises on a file that does not decode."""
        ...

    def transcribe(self, model: Any, audio: Any, spec: wp.JobSpec) -> tuple[Iterable[Segment], AudioInfo]:
        """Segments as they are decoded (lazily: the worker checks for a cancel between them)."""
        ...


class WorkerArgs(msgspec.Struct, frozen=True, kw_only=True):
    device: str
    compute_type: str
    cpu_threads: int
    max_models: int
    preload: str | None  # NAME=SOURCE


class JobCancelled(Exception):
    pass


def classify(exc: BaseException) -> wp.FailureKind:
    return "oom" if "out of memory" in str(exc).lower() else "retryable"


class Worker:
    def __init__(self, out: BinaryIO, transcriber: Transcriber, max_models: int) -> None:
        self._out = out
        self._out_lock = threading.Lock()
        self._transcriber = transcriber
        self._max_models = max_models
        self._models: OrderedDict[str, tuple[str, Any]] = OrderedDict()  # name -> (source, model)
        self._cancelled: set[int] = set()
        self._batches: queue.Queue[wp.RunBatch | None] = queue.Queue()

    def send(self, message: wp.FromWorker) -> None:
        with self._out_lock:
            self._out.write(wp.encode(message))
            self._out.flush()

    def read_commands(self, stream: Iterable[bytes]) -> None:
        """Runs in a thread so that a cancel arrives while a job transcribes."""
        for line in stream:
            command = wp.to_worker_decoder.decode(line)
            if isinstance(command, wp.CancelJob):
                self._cancelled.add(command.job_id)
            else:
                self._batches.put(command)
        self._batches.put(None)  # the daemon closed our stdin: finish and exit

    def preload(self, name: str, source: str) -> None:
        """Load the default model before saying Ready, so the first job does not pay for it."""
        try:
            self.model(name, source)
        except Exception as exc:  # its jobs will fail with the reason; the worker still serves others
            log.error("cannot preload model %s (%s): %s", name, source, exc)

    def run(self) -> None:
        self.send(wp.Ready(pid=os.getpid(), models=list(self._models)))
        while (batch := self._batches.get()) is not None:
            out_of_memory = False
            for spec in batch.jobs:
                if out_of_memory:  # the rest goes back to the daemon, to be placed again with more room
                    self._cancelled.discard(spec.job_id)
                    self.send(wp.Stopped(job_id=spec.job_id, reason="batch_stopped"))
                else:
                    out_of_memory = self.run_job(spec) == "oom"
            self.send(wp.BatchDone(batch_id=batch.batch_id, models=list(self._models)))

    def model(self, name: str, source: str) -> Any:
        """A loaded model by its users' name, loading it (and dropping the least recently used) if needed.
        A name whose source changed (a reload pointed it elsewhere) is loaded afresh."""
        loaded = self._models.get(name)
        if loaded is not None and loaded[0] == source:
            self._models.move_to_end(name)
            return loaded[1]
        self._models.pop(name, None)
        while len(self._models) >= self._max_models:
            self._models.popitem(last=False)
        model = self._transcriber.load_model(source)
        self._models[name] = (source, model)
        return model

    def run_job(self, spec: wp.JobSpec) -> wp.FailureKind | None:
        """Run one job and report it; returns how it failed, if it did."""
        if spec.job_id in self._cancelled:
            self._cancelled.discard(spec.job_id)
            self.send(wp.Stopped(job_id=spec.job_id, reason="cancelled"))
            return None
        kind = self._attempt(spec)
        self._cancelled.discard(spec.job_id)  # a late cancel must not poison the job's next run here
        return kind

    def _attempt(self, spec: wp.JobSpec) -> wp.FailureKind | None:
        self.send(wp.Started(job_id=spec.job_id))
        started = time.monotonic()
        try:
            audio = self._transcriber.decode_audio(spec.audio_path)
        except Exception as exc:  # the decoder raises many types; none of them a retry can fix
            self.send(wp.Failed(job_id=spec.job_id, kind="fatal", error=f"audio does not decode: {exc}"))
            return "fatal"
        if len(audio) == 0:
            self.send(wp.Failed(job_id=spec.job_id, kind="fatal", error="the audio holds no samples"))
            return "fatal"
        try:
            model = self.model(spec.model, spec.model_source)
        except Exception as exc:
            kind: wp.FailureKind = "oom" if classify(exc) == "oom" else "fatal"
            error = f"model {spec.model!r} cannot be loaded: {exc}"
            self.send(wp.Failed(job_id=spec.job_id, kind=kind, error=error))
            return kind
        try:
            transcript = self._transcribe(model, audio, spec)
        except JobCancelled:
            self.send(wp.Stopped(job_id=spec.job_id, reason="cancelled"))
            return None
        except Exception as exc:
            log.exception("job %d failed", spec.job_id)
            failure = classify(exc)
            self.send(wp.Failed(job_id=spec.job_id, kind=failure, error=str(exc) or type(exc).__name__))
            return failure
        processing_s = time.monotonic() - started
        self.send(wp.Finished(job_id=spec.job_id, transcript=transcript, processing_s=processing_s))
        return None

    def _transcribe(self, model: Any, audio: Any, spec: wp.JobSpec) -> Transcript:
        segments_iter, info = self._transcriber.transcribe(model, audio, spec)
        segments: list[Segment] = []
        for segment in segments_iter:  # each step decodes one window; cancel is checked between them
            if spec.job_id in self._cancelled:
                raise JobCancelled
            segments.append(segment)
            duration_s = info.duration_s
            progress = min(99.9, 100.0 * segment.end / duration_s) if duration_s > 0 else 0.0
            self.send(wp.Progress(job_id=spec.job_id, progress=progress, audio_duration_s=duration_s))
        return Transcript(
            language=info.language,
            language_probability=info.language_probability,
            duration_s=info.duration_s,
            text="".join(s.text for s in segments).strip(),
            segments=segments,
        )


def die_with_parent() -> None:
    """A worker must never outlive its daemon: a restarted daemon would run the same job twice."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # then the closed stdin still ends us when the daemon goes


def parse_args(argv: list[str] | None) -> WorkerArgs:
    parser = argparse.ArgumentParser(prog="whisperd-worker")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--max-models", type=int, default=2)
    parser.add_argument("--preload", metavar="NAME=SOURCE", help="load this model before reporting ready")
    a = parser.parse_args(argv)
    return WorkerArgs(device=a.device, compute_type=a.compute_type, cpu_threads=a.cpu_threads,
                      max_models=a.max_models, preload=a.preload)  # fmt: skip


def run_worker(argv: list[str] | None, make_transcriber: Callable[[WorkerArgs], Transcriber]) -> None:
    """The worker process: protocol on the original stdout, everything a library prints to stderr."""
    args = parse_args(argv)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the daemon, which stops us itself
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, format="worker[%(process)d] %(levelname)s %(message)s")
    worker = Worker(protocol_out, make_transcriber(args), args.max_models)
    if args.preload:
        name, _, source = args.preload.partition("=")
        worker.preload(name, source)
    threading.Thread(target=worker.read_commands, args=(sys.stdin.buffer,), daemon=True).start()
    worker.run()
