"""Batched decoding: the jobs of a batch decoded together, window by window.

Each job's audio is cut at silences into windows of at most 30 s (`cut_windows`, a pure function over the
speech regions a VAD found). The windows of all the jobs that share their decoding options (task, language,
word timestamps, beam) go to the decoder together, up to the job's `chunk_batch` windows per call, so a batch
of short clips fills one call and a long recording fills many. As each window is done its job's progress is
reported; a job whose windows are all done is finished at once, before the others. A cancel is honoured
between calls: the job is stopped and the others go on without its windows. An out-of-memory error halves the
chunk batch and goes on with what was not done yet; at one window per call it fails the jobs left, so that
the daemon places them again with more room."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from whisperd import workerproto as wp
from whisperd.protocol import Segment, Transcript

MAX_WINDOW_S = 30.0  # what Whisper's encoder sees at once

Span = tuple[float, float]  # seconds from the start of a job's audio


def cut_windows(speech: Sequence[Span], duration_s: float, max_window_s: float = MAX_WINDOW_S) -> list[Span]:
    """Windows of at most max_window_s covering the speech regions (sorted, in seconds), each cut between
    two regions: consecutive regions share a window while the window stays within the limit. A region
    longer than the limit (a VAD bounds them; this does not rely on it) is cut into pieces."""
    windows: list[Span] = []
    for start, end in speech:
        start, end = max(0.0, start), min(duration_s, end)
        if end <= start:
            continue
        if windows and end - windows[-1][0] <= max_window_s:
            windows[-1] = (windows[-1][0], end)
            continue
        while end - start > max_window_s:
            windows.append((start, start + max_window_s))
            start += max_window_s
        windows.append((start, end))
    return windows


class AudioInfo(Protocol):
    @property
    def language(self) -> str: ...
    @property
    def language_probability(self) -> float: ...
    @property
    def duration_s(self) -> float: ...


@runtime_checkable
class WindowDecoder(Protocol):
    """What batched decoding needs of a transcriber, beyond what sequential decoding does."""

    def windows(self, model: Any, audio: Any, spec: wp.JobSpec) -> tuple[list[Span], AudioInfo]:
        """The audio's windows (cut at silences), and its language (the spec's, or detected) and length."""
        ...

    def decode_windows(
        self,
        model: Any,
        windows: Sequence[tuple[Any, float, float]],
        spec: wp.JobSpec,
        language: str,
        chunk_batch: int,
    ) -> Iterator[tuple[int, list[Segment]]]:
        """Decode these windows (audio, start_s, end_s) of one or more jobs sharing spec's options, up to
        chunk_batch per call; yields each window's index and all its segments (timed from its job's audio
        start) once its call is done, in order."""
        ...


@dataclass(eq=False)
class Prepared:
    """One job of the batch, decoded and cut, as its windows are decoded."""

    spec: wp.JobSpec
    audio: Any
    info: AudioInfo
    windows: list[Span]
    started: float = field(default_factory=time.monotonic)
    segments: list[Segment] = field(default_factory=list)
    done: int = 0  # windows decoded
    ended: bool = False


class Reporter(Protocol):
    def progress(self, spec: wp.JobSpec, progress: float, duration_s: float) -> None: ...
    def finished(self, spec: wp.JobSpec, transcript: Transcript, processing_s: float) -> None: ...
    def failed(self, spec: wp.JobSpec, exc: Exception) -> None: ...
    def stopped(self, spec: wp.JobSpec) -> None: ...


def decode_together(
    decoder: WindowDecoder,
    model: Any,
    jobs: Sequence[Prepared],
    report: Reporter,
    is_cancelled: Callable[[int], bool],
    clean: Callable[[Segment, float], Segment],
) -> None:
    """Decode the jobs' windows, those that share their options together. clean: a segment as decoded, and
    the end of the one before it, to the segment kept (times made finite)."""
    groups: dict[tuple[object, ...], list[Prepared]] = {}
    for job in jobs:
        s = job.spec
        groups.setdefault((s.task, job.info.language, s.word_timestamps, s.beam_size), []).append(job)
    for group in groups.values():
        _decode_group(decoder, model, group, report, is_cancelled, clean)


def _decode_group(
    decoder: WindowDecoder,
    model: Any,
    jobs: list[Prepared],
    report: Reporter,
    is_cancelled: Callable[[int], bool],
    clean: Callable[[Segment, float], Segment],
) -> None:
    chunk = max(1, jobs[0].spec.chunk_batch)
    spec, language = jobs[0].spec, jobs[0].info.language
    while True:
        for job in jobs:
            if not job.ended and is_cancelled(job.spec.job_id):
                job.ended = True
                report.stopped(job.spec)
            elif not job.ended and job.done == len(job.windows):
                _finish(job, report)
        todo = [(job, k) for job in jobs if not job.ended for k in range(job.done, len(job.windows))]
        if not todo:
            return
        try:
            windows = [(job.audio, *job.windows[k]) for job, k in todo]
            for index, segments in decoder.decode_windows(model, windows, spec, language, chunk):
                _complete(todo[index], segments, report, clean)
                if any(is_cancelled(job.spec.job_id) for job, _k in todo[index + 1 :] if not job.ended):
                    break  # stop decoding that job: the others go on in a fresh call
        except Exception as exc:
            if wp.failure_kind(exc) == "oom" and chunk > 1:
                chunk //= 2  # fewer windows per call, from the first one not done
                continue
            for job in jobs:
                if not job.ended:
                    job.ended = True
                    report.failed(job.spec, exc)
            return


def _complete(
    item: tuple[Prepared, int],
    segments: list[Segment],
    report: Reporter,
    clean: Callable[[Segment, float], Segment],
) -> None:
    """Window k of a job is decoded: the job keeps its segments, reports progress, or finishes if it was
    its last window."""
    job, k = item
    if job.ended:
        return
    for segment in segments:
        kept = clean(segment, job.segments[-1].end if job.segments else 0.0)
        job.segments.append(
            Segment(
                id=len(job.segments) + 1, start=kept.start, end=kept.end, text=kept.text, words=kept.words
            )
        )
    job.done = k + 1
    if job.done == len(job.windows):
        _finish(job, report)
    elif job.info.duration_s > 0:
        progress = min(99.9, max(0.0, 100.0 * job.windows[k][1] / job.info.duration_s))
        report.progress(job.spec, progress, job.info.duration_s)


def _finish(job: Prepared, report: Reporter) -> None:
    job.ended = True
    info = job.info
    transcript = Transcript(
        language=info.language, language_probability=info.language_probability, duration_s=info.duration_s,
        text="".join(s.text for s in job.segments).strip(), segments=job.segments,
    )  # fmt: skip
    report.finished(job.spec, transcript, time.monotonic() - job.started)
