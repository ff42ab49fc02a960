"""Batched decoding: the jobs of a batch decoded together, window by window.

Each job's audio is cut at silences into windows of at most 30 s (`cut_windows`, a pure function over the
speech regions a VAD found). The windows of all the jobs that share their decoding options (task, language,
word timestamps, beam, prompt, temperature) go to the decoder together, up to the job's `chunk_batch` windows
per call, so a batch of short clips fills one call and a long recording fills many. As each window is done its
job's progress is reported; a job whose windows are all done is finished at once, before the others. A cancel
is honoured between calls: the job is stopped and the others go on without its windows. An out-of-memory error
halves the chunk batch and goes on with what was not done yet; at one window per call it fails the jobs left,
so that the daemon places them again with more room. Asked to share a job (workers idle), the worker splits
the job's windows not yet decoded into contiguous parts of about equal length (`split_windows`), keeps the
first and reports the others, which the daemon hands to the idle workers."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import msgspec

from whisperd import workerproto as wp
from whisperd.protocol import Segment, Transcript
from whisperd.sharing import split_span, split_windows

MAX_WINDOW_S = 30.0  # what Whisper's encoder sees at once
VAD_PIECE_S = 60.0  # audio the VAD reads at once
CUT_SEARCH_S = 2.0  # a time range shared is cut at the quietest moment this close to an even split

Span = wp.Span


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
        while end - start > max_window_s + 1e-6:  # not a window of a rounding error's length
            windows.append((start, start + max_window_s))
            start += max_window_s
        windows.append((start, end))
    return windows


class AudioInfo(msgspec.Struct, frozen=True):
    """What decoding learnt of a job's audio: its language (the spec's, or detected) and its length."""

    language: str
    language_probability: float
    duration_s: float


@runtime_checkable
class WindowDecoder(Protocol):
    """What batched decoding needs of a transcriber, beyond what sequential decoding does."""

    @property
    def max_window_s(self) -> float:
        """The longest window the model decodes at once (Whisper: 30 s)."""
        ...

    def audio_duration_s(self, audio: Any) -> float:
        """How long the decoded audio lasts."""
        ...

    def language(self, model: Any, audio: Any, spec: wp.JobSpec) -> tuple[str, float]:
        """The job's language and its probability: the spec's, or detected on its own audio."""
        ...

    def speech(self, audio: Any, start_s: float, end_s: float) -> list[Span]:
        """Where there is speech between start_s and end_s (a voice activity detector), in seconds from the
        audio's start, in order."""
        ...

    def quietest_s(self, audio: Any, start_s: float, end_s: float) -> float:
        """The quietest moment between start_s and end_s: where a cut is least likely to split a word."""
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
    span: Span = (0.0, 0.0)  # the time range it decodes: the whole audio, or its part
    started: float = field(default_factory=time.monotonic)
    segments: list[Segment] = field(default_factory=list)
    done: int = 0  # windows decoded
    ended: bool = False


class Reporter(Protocol):
    def progress(
        self, spec: wp.JobSpec, progress: float, duration_s: float, segments: Sequence[Segment] = ()
    ) -> None:
        """segments: those decoded since the job's previous report, numbered by their place in its
        transcript."""
        ...

    def finished(self, spec: wp.JobSpec, transcript: Transcript, processing_s: float) -> None: ...
    def failed(self, spec: wp.JobSpec, exc: Exception) -> None: ...
    def stopped(self, spec: wp.JobSpec) -> None: ...
    def shared(self, spec: wp.JobSpec, language: str, kept: wp.JobPart, parts: list[wp.JobPart]) -> None: ...


def find_windows(
    decoder: WindowDecoder,
    model: Any,
    audio: Any,
    spec: wp.JobSpec,
    share_request: Callable[[int], wp.ShareJob | None],
    report: Reporter,
) -> tuple[list[Span], AudioInfo, Span]:
    """The job's windows, its language and length, and the time range it decodes (its part's, or the whole
    audio). Speech is looked for VAD_PIECE_S at a time (the VAD's memory stays flat); between two pieces a
    request to share the job splits what is left by time (`split_span`), so the helpers look for speech in
    their ranges at once, instead of waiting for this worker to have searched the whole recording."""
    duration_s = decoder.audio_duration_s(audio)
    part = spec.part
    start_s, end_s = (part.start_s, min(part.end_s, duration_s)) if part is not None else (0.0, duration_s)
    if part is not None and part.windows is not None:  # cut already, by the worker that shared it
        return list(part.windows), AudioInfo(spec.language or "en", 1.0, duration_s), (start_s, end_s)
    if part is None and spec.shard_min_audio_s > 0 and duration_s >= 2 * spec.shard_min_audio_s:
        report.progress(spec, 0.0, duration_s)  # its length: the daemon may ask to share it now
    language, probability = decoder.language(model, audio, spec)
    if end_s - start_s <= decoder.max_window_s:  # one window: nothing to cut
        return [(start_s, end_s)], AudioInfo(language, probability, duration_s), (start_s, end_s)
    regions: list[Span] = []
    at_s = start_s
    while at_s < end_s:
        piece_end_s = min(at_s + VAD_PIECE_S, end_s)
        regions.extend(decoder.speech(audio, at_s, piece_end_s))
        at_s = piece_end_s
        if at_s < end_s and (request := share_request(spec.job_id)) is not None:
            spans = split_span(start_s, at_s, end_s, request.helpers, request.min_part_s)
            cuts = [  # each moved to the quietest moment near it (never back into what was searched)
                decoder.quietest_s(audio, max(at_s, cut_s - CUT_SEARCH_S), min(end_s, cut_s + CUT_SEARCH_S))
                for _start, cut_s in spans[:-1]
            ]
            bounds = [start_s, *cuts, end_s]
            end_s = bounds[1]
            given = [wp.JobPart(start_s=a, end_s=b) for a, b in itertools.pairwise(bounds[1:])]
            report.shared(spec, language, wp.JobPart(start_s=start_s, end_s=end_s), given)
    windows = cut_windows(regions, end_s, decoder.max_window_s)
    return windows, AudioInfo(language, probability, duration_s), (start_s, end_s)


def decode_together(
    decoder: WindowDecoder,
    model: Any,
    jobs: Sequence[Prepared],
    report: Reporter,
    is_cancelled: Callable[[int], bool],
    clean: Callable[[Segment, float], Segment],
    share_request: Callable[[int], wp.ShareJob | None] = lambda _job_id: None,
) -> None:
    """Decode the jobs' windows, those that share their options together. clean: a segment as decoded, and
    the end of the one before it, to the segment kept (times made finite). share_request: the daemon's
    request to share a job, taken (so answered once)."""
    groups: dict[tuple[object, ...], list[Prepared]] = {}
    for job in jobs:
        s = job.spec
        key = (s.task, job.info.language, s.word_timestamps, s.beam_size, s.prompt, s.temperature)
        groups.setdefault(key, []).append(job)
    for group in groups.values():
        _decode_group(decoder, model, group, report, is_cancelled, clean, share_request)


def _decode_group(
    decoder: WindowDecoder,
    model: Any,
    jobs: list[Prepared],
    report: Reporter,
    is_cancelled: Callable[[int], bool],
    clean: Callable[[Segment, float], Segment],
    share_request: Callable[[int], wp.ShareJob | None],
) -> None:
    chunk = max(1, jobs[0].spec.chunk_batch)
    spec, language = jobs[0].spec, jobs[0].info.language
    while True:  # one decoding call a round: cancels and shares are taken between calls
        for job in jobs:
            if not job.ended and is_cancelled(job.spec.job_id):
                job.ended = True
                report.stopped(job.spec)
            elif not job.ended and job.done == len(job.windows):
                _finish(job, report)
            elif not job.ended and (request := share_request(job.spec.job_id)) is not None:
                _share(job, request, report)
        left = [(job, k) for job in jobs if not job.ended for k in range(job.done, len(job.windows))]
        if not left:
            return
        # The calls needed, made even: 11 windows at 8 a call go as 6 + 5, not 8 + 3 (a small call is
        # the least efficient one).
        todo = left[: math.ceil(len(left) / math.ceil(len(left) / chunk))]
        try:
            windows = [(job.audio, *job.windows[k]) for job, k in todo]
            for index, segments in decoder.decode_windows(model, windows, spec, language, chunk):
                _complete(todo[index], segments, report, clean)
        except Exception as exc:
            if wp.failure_kind(exc) == "oom" and chunk > 1:
                chunk //= 2  # fewer windows per call, from the first one not done
                continue
            for job in jobs:
                if not job.ended:
                    job.ended = True
                    report.failed(job.spec, exc)
            return


def _share(job: Prepared, request: wp.ShareJob, report: Reporter) -> None:
    """Keep the first part of the windows not decoded yet, give the others away (cut between windows)."""
    parts = split_windows(job.windows[job.done :], request.helpers, request.min_part_s)
    given = parts[1:]
    start_s, end_s = job.span
    if given:
        job.windows = job.windows[: job.done] + parts[0]
    starts = [windows[0][0] for windows in given]
    ends = [*starts[1:], end_s][: len(given)]
    job.span = (start_s, starts[0] if given else end_s)
    kept = wp.JobPart(start_s=start_s, end_s=job.span[1], windows=list(job.windows))
    report.shared(
        job.spec, job.info.language, kept,
        [wp.JobPart(start_s=a, end_s=b, windows=w) for a, b, w in zip(starts, ends, given, strict=True)],
    )  # fmt: skip


def _complete(
    item: tuple[Prepared, int],
    segments: list[Segment],
    report: Reporter,
    clean: Callable[[Segment, float], Segment],
) -> None:
    """Window k of a job is decoded: the job keeps its segments, reports progress with them, or finishes if
    it was its last window (its last segments go with its transcript)."""
    job, k = item
    if job.ended:
        return
    first = len(job.segments)
    for segment in segments:
        kept = clean(segment, job.segments[-1].end if job.segments else 0.0)
        job.segments.append(msgspec.structs.replace(kept, id=len(job.segments) + 1))  # its place, from 1
    job.done = k + 1
    if job.done == len(job.windows):
        _finish(job, report)
    elif job.info.duration_s > 0:
        progress = min(99.9, max(0.0, 100.0 * job.windows[k][1] / job.info.duration_s))
        report.progress(job.spec, progress, job.info.duration_s, job.segments[first:])


def _finish(job: Prepared, report: Reporter) -> None:
    job.ended = True
    info = job.info
    transcript = Transcript(
        language=info.language, language_probability=info.language_probability, duration_s=info.duration_s,
        text="".join(s.text for s in job.segments).strip(), segments=job.segments,
    )  # fmt: skip
    report.finished(job.spec, transcript, time.monotonic() - job.started)
