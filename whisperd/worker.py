"""The worker process's loop: reads batches and cancels from the daemon, keeps models loaded, runs each job
and streams its progress and result back. What transcribes is a parameter (a Transcriber): faster-whisper in
service (worker_main.py), a scripted one in tests, so both run this same loop."""

from __future__ import annotations

import argparse
import ctypes
import logging
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence, Sized
from typing import Any, BinaryIO, Protocol

import msgspec

from whisperd import sandbox
from whisperd import workerproto as wp
from whisperd.audiodecode import AudioRefused
from whisperd.batching import AudioInfo, Prepared, WindowDecoder, decode_together, find_windows
from whisperd.protocol import Segment, Transcript, Word
from whisperd.workeraudio import AudioInbox, AudioSource, PathAudio

log = logging.getLogger("whisperd.worker")
_PR_SET_PDEATHSIG = 1


class Transcriber(Protocol):
    def load_model(self, source: str) -> Any:
        """A model ready to transcribe with; source is a name, a directory or 'bundled:...'."""
        ...

    def decode_audio(self, audio: BinaryIO, spec: wp.JobSpec) -> Sized:
        """The audio's samples; raises AudioRefused (or anything else) on a file that does not decode."""
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
    audio_fd: int | None = None  # the socket the daemon sends the jobs' audio descriptors on
    sandbox: bool = False
    sandbox_read: tuple[str, ...] = ()  # model directories and paths the config names
    sandbox_write: tuple[str, ...] = ()  # none in service; tests' scripted workers keep markers
    model_sources: tuple[str, ...] = ()  # what [models] names: directories are read, other names fetched


class JobCancelled(Exception):
    pass


class Worker:
    def __init__(
        self, out: BinaryIO, transcriber: Transcriber, max_models: int, audio: AudioSource | None = None
    ) -> None:
        self._out = out
        self._out_lock = threading.Lock()
        self._transcriber = transcriber
        self._audio = audio or PathAudio()
        self._max_models = max_models
        self._models: OrderedDict[str, tuple[str, Any]] = OrderedDict()  # name -> (source, model)
        self._cancelled: set[int] = set()
        self._share_requests: dict[int, wp.ShareJob] = {}  # by job id, until taken between two calls
        self._batches: queue.Queue[wp.RunBatch | None] = queue.Queue()

    def send(self, message: wp.FromWorker) -> None:
        self._send_line(wp.encode(message))

    def _send_line(self, line: bytes) -> None:
        with self._out_lock:
            self._out.write(line)
            self._out.flush()

    def read_commands(self, stream: Iterable[bytes]) -> None:
        """Runs in a thread so that a cancel arrives while a job transcribes."""
        for line in stream:
            command = wp.to_worker_decoder.decode(line)
            if isinstance(command, wp.CancelJob):
                self._cancelled.add(command.job_id)
            elif isinstance(command, wp.ShareJob):
                self._share_requests[command.job_id] = command
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
            decoder = self._transcriber if isinstance(self._transcriber, WindowDecoder) else None
            if decoder is not None and all(spec.mode == "batched" for spec in batch.jobs):
                self.run_batched(batch, decoder)
            else:
                self.run_sequential(batch)
            self._audio.drain()
            self.send(wp.BatchDone(batch_id=batch.batch_id, models=list(self._models)))

    def run_sequential(self, batch: wp.RunBatch) -> None:
        out_of_memory = False
        for spec in batch.jobs:
            if out_of_memory:  # the rest goes back to the daemon, to be placed again with more room
                self._cancelled.discard(spec.job_id)
                self.send(wp.Stopped(job_id=spec.job_id, reason="batch_stopped"))
            else:
                out_of_memory = self.run_job(spec, batch.batch_id) == "oom"

    def run_batched(self, batch: wp.RunBatch, decoder: WindowDecoder) -> None:
        """Every job's audio decoded and cut first, then their windows decoded together (batching.py)."""
        by_model: dict[str, tuple[Any, list[Prepared]]] = {}
        for spec in batch.jobs:
            if spec.job_id in self._cancelled:
                self.send(wp.Stopped(job_id=spec.job_id, reason="cancelled"))
                continue
            self.send(wp.Started(job_id=spec.job_id))
            started = time.monotonic()
            ready = self._prepare(spec, batch.batch_id)
            if not isinstance(ready, tuple):
                continue
            model, audio = ready
            try:
                windows, info, span = find_windows(
                    decoder, model, audio, spec, self._take_share_request, _JobReports(self)
                )
            except Exception as exc:
                _JobReports(self).failed(spec, exc)
                continue
            entry = by_model.setdefault(spec.model, (model, []))
            entry[1].append(Prepared(spec, audio, info, windows, span=span, started=started))
        for model, prepared in by_model.values():
            decode_together(
                decoder, model, prepared, _JobReports(self), self._cancelled.__contains__, finite_segment,
                self._take_share_request,
            )  # fmt: skip
        for spec in batch.jobs:
            self._cancelled.discard(spec.job_id)
            self._share_requests.pop(spec.job_id, None)  # it ended before it could be shared

    def _take_share_request(self, job_id: int) -> wp.ShareJob | None:
        return self._share_requests.pop(job_id, None)

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

    def run_job(self, spec: wp.JobSpec, batch_id: int = 0) -> wp.FailureKind | None:
        """Run one job and report it; returns how it failed, if it did."""
        if spec.job_id in self._cancelled:
            self._cancelled.discard(spec.job_id)
            self.send(wp.Stopped(job_id=spec.job_id, reason="cancelled"))
            return None
        kind = self._attempt(spec, batch_id)
        self._cancelled.discard(spec.job_id)  # a late cancel must not poison the job's next run here
        return kind

    def _fatal(self, spec: wp.JobSpec, what: str) -> wp.FailureKind:
        """Failures name the file as its user submitted it, never the spool path."""
        name = spec.filename or "the audio"
        if spec.audio_path:
            what = what.replace(spec.audio_path, name)
        self.send(wp.Failed(job_id=spec.job_id, kind="fatal", error=f"{name}: {what}"))
        return "fatal"

    def _decode(self, spec: wp.JobSpec, batch_id: int) -> Sized | str:
        """The samples, or what is wrong with the audio."""
        try:
            with self._audio.open(batch_id, spec) as file:
                return self._transcriber.decode_audio(file, spec)
        except AudioRefused as exc:
            return str(exc)
        except OSError as exc:
            return f"the audio cannot be read ({exc.strerror or exc})"
        except Exception as exc:  # the decoder raises many types; none of them a retry can fix
            return f"it is not audio whisperd can decode ({exc or type(exc).__name__})"

    def _prepare(self, spec: wp.JobSpec, batch_id: int) -> tuple[Any, Sized] | wp.FailureKind:
        """The job's model and samples; or, its failure reported, how it failed."""
        audio = self._decode(spec, batch_id)
        if isinstance(audio, str):
            return self._fatal(spec, audio)
        if len(audio) == 0:
            return self._fatal(spec, "it holds no audio samples")
        try:
            return self.model(spec.model, spec.model_source), audio
        except Exception as exc:
            kind: wp.FailureKind = "oom" if wp.failure_kind(exc) == "oom" else "fatal"
            self.send(
                wp.Failed(
                    job_id=spec.job_id, kind=kind, error=f"model {spec.model!r} cannot be loaded: {exc}"
                )
            )
            return kind

    def _attempt(self, spec: wp.JobSpec, batch_id: int) -> wp.FailureKind | None:
        self.send(wp.Started(job_id=spec.job_id))
        started = time.monotonic()
        ready = self._prepare(spec, batch_id)
        if not isinstance(ready, tuple):
            return ready
        model, audio = ready
        try:
            transcript = self._transcribe(model, audio, spec)
        except JobCancelled:
            self.send(wp.Stopped(job_id=spec.job_id, reason="cancelled"))
            return None
        except Exception as exc:
            log.exception("job %d failed", spec.job_id)
            failure = wp.failure_kind(exc)
            self.send(wp.Failed(job_id=spec.job_id, kind=failure, error=str(exc) or type(exc).__name__))
            return failure
        return self.finish(spec, transcript, time.monotonic() - started)

    def finish(self, spec: wp.JobSpec, transcript: Transcript, processing_s: float) -> wp.FailureKind | None:
        line = wp.encode(wp.Finished(job_id=spec.job_id, transcript=transcript, processing_s=processing_s))
        if spec.max_result_bytes and len(line) > spec.max_result_bytes:
            # Over the daemon's line limit it would be lost with the worker; a retry makes the same one.
            size_mib, limit_mib = len(line) / 1024**2, spec.max_result_bytes / 1024**2
            what = f"its transcript takes {size_mib:.1f} MiB, more than the limit of {limit_mib:.1f} MiB"
            return self._fatal(spec, what + " (workers.max_result_bytes)")
        self._send_line(line)
        return None

    def _transcribe(self, model: Any, audio: Any, spec: wp.JobSpec) -> Transcript:
        segments_iter, info = self._transcriber.transcribe(model, audio, spec)
        segments: list[Segment] = []
        duration_s = _finite(info.duration_s, 0.0)
        for raw in segments_iter:  # each step decodes one window; cancel is checked between them
            if spec.job_id in self._cancelled:
                raise JobCancelled
            segment = finite_segment(raw, segments[-1].end if segments else 0.0)
            segment.id = len(segments) + 1  # its place in the transcript, as batched mode numbers them
            segments.append(segment)
            progress = min(99.9, 100.0 * segment.end / duration_s) if duration_s > 0 else 0.0
            progress = max(0.0, progress)
            self.send(wp.Progress(job_id=spec.job_id, progress=progress, audio_duration_s=duration_s,
                                  segments=[segment]))  # fmt: skip
        return Transcript(
            language=info.language,
            language_probability=_finite(info.language_probability, 0.0),
            duration_s=duration_s,
            text="".join(s.text for s in segments).strip(),
            segments=segments,
        )


class _JobReports:
    """What batched decoding reports of each job, as the worker's messages."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def progress(
        self, spec: wp.JobSpec, progress: float, duration_s: float, segments: Sequence[Segment] = ()
    ) -> None:
        self._worker.send(
            wp.Progress(job_id=spec.job_id, progress=progress, audio_duration_s=duration_s,
                        segments=list(segments))
        )  # fmt: skip

    def finished(self, spec: wp.JobSpec, transcript: Transcript, processing_s: float) -> None:
        self._worker.finish(spec, transcript, processing_s)

    def failed(self, spec: wp.JobSpec, exc: Exception) -> None:
        log.error("job %d failed: %s", spec.job_id, exc)
        self._worker.send(
            wp.Failed(job_id=spec.job_id, kind=wp.failure_kind(exc), error=str(exc) or type(exc).__name__)
        )

    def stopped(self, spec: wp.JobSpec) -> None:
        self._worker.send(wp.Stopped(job_id=spec.job_id, reason="cancelled"))

    def shared(self, spec: wp.JobSpec, language: str, kept: wp.JobPart, parts: list[wp.JobPart]) -> None:
        self._worker.send(wp.Shared(job_id=spec.job_id, language=language, kept=kept, parts=parts))


def _finite(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


def _figure(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def finite_segment(segment: Segment, previous_end: float) -> Segment:
    """JSON has no NaN or infinity (msgspec writes null, which the daemon cannot read back as a float): a
    time that is not finite takes the one before it, a probability 0, a decoder's figure None."""
    start = _finite(segment.start, previous_end)
    end = _finite(segment.end, start)
    words = None
    if segment.words is not None:
        words, last = [], start
        for w in segment.words:
            w_start = _finite(w.start, last)
            last = _finite(w.end, w_start)
            words.append(Word(start=w_start, end=last, word=w.word, probability=_finite(w.probability, 0.0)))
    return msgspec.structs.replace(
        segment, start=start, end=end, words=words, temperature=_figure(segment.temperature),
        avg_logprob=_figure(segment.avg_logprob), compression_ratio=_figure(segment.compression_ratio),
        no_speech_prob=_figure(segment.no_speech_prob),
    )  # fmt: skip


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
    parser.add_argument("--audio-fd", type=int, help="socket on which the daemon sends the audio descriptors")
    parser.add_argument("--sandbox", action="store_true", help="confine the worker (sandbox.py)")
    parser.add_argument("--sandbox-read", action="append", default=[], metavar="PATH")
    parser.add_argument("--sandbox-write", action="append", default=[], metavar="PATH")
    parser.add_argument("--model-source", action="append", default=[], metavar="SOURCE")
    a = parser.parse_args(argv)
    return WorkerArgs(device=a.device, compute_type=a.compute_type, cpu_threads=a.cpu_threads,
                      max_models=a.max_models, preload=a.preload, audio_fd=a.audio_fd, sandbox=a.sandbox,
                      sandbox_read=tuple(a.sandbox_read), sandbox_write=tuple(a.sandbox_write),
                      model_sources=tuple(a.model_source))  # fmt: skip


def confine(args: WorkerArgs) -> None:
    """Sandbox the worker while it has one thread (see sandbox.py): model directories readable, the
    Hugging Face cache writable and HTTPS open only if some model is fetched by name."""
    sources = [s for s in args.model_sources if not s.startswith("bundled:")]
    model_dirs = [s for s in sources if os.path.isdir(s)]
    downloads = len(model_dirs) < len(sources)
    rules = sandbox.worker_rules(
        model_dirs, args.sandbox_read, args.sandbox_write, downloads, cuda=args.device == "cuda"
    )
    if threading.active_count() > 1 or len(os.listdir("/proc/self/task")) > 1:
        log.warning("sandboxing a worker that already runs several threads: only this one is confined")
    log.info("worker sandbox: %s", "; ".join(sandbox.confine(rules)))


def run_worker(argv: list[str] | None, make_transcriber: Callable[[WorkerArgs], Transcriber]) -> None:
    """The worker process: protocol on the original stdout, everything a library prints to stderr."""
    args = parse_args(argv)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the daemon, which stops us itself
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, format="worker[%(process)d] %(levelname)s %(message)s")
    if args.sandbox:
        confine(args)
    audio: AudioSource | None = None
    if args.audio_fd is not None:
        audio = AudioInbox(socket.socket(fileno=args.audio_fd))
    worker = Worker(protocol_out, make_transcriber(args), args.max_models, audio)
    if args.preload:
        name, _, source = args.preload.partition("=")
        worker.preload(name, source)
    threading.Thread(target=worker.read_commands, args=(sys.stdin.buffer,), daemon=True).start()
    worker.run()
