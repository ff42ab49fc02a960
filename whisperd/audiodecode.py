"""Decoding untrusted audio in the worker: PyAV (FFmpeg) with the fewest features, and a duration limit
checked before the samples are kept. A few-KB FLAC of constant blocks decodes to hours of samples (about
230 MB of float32 an hour), so the header is checked first and the decoding stops as soon as the limit is
passed.

FFmpeg is given an open file (it does no I/O of its own), an allow-list of demuxers (no playlists, no concat
lists, no image sequences) and an empty protocol allow-list, so no file it parses can make it open a URL or
another file. av and numpy are imported when first used: the worker sandboxes itself before any library
starts threads (sandbox.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

SAMPLE_RATE = 16_000
# After this many frames that do not decode, the file is taken for corrupt rather than damaged here and there.
_MAX_BAD_PACKETS = 1000


class AudioRefused(Exception):
    """The audio cannot or may not be decoded; the message says why, in the user's terms, without any path."""


def decode(file: BinaryIO, max_duration_s: float, formats: list[str]) -> npt.NDArray[np.float32]:
    """The audio's first audio stream as 16 kHz mono float32. Refuses (AudioRefused) a format not in
    `formats`, a file without audio, references to other files or URLs, and audio longer than
    max_duration_s (0: no limit) - from the header where it states the duration, else while decoding."""
    import av

    container = _open(file, formats)
    with container:
        if not container.streams.audio:
            raise AudioRefused("it holds no audio stream (is it an image or a text file?)")
        stream = container.streams.audio[0]
        header_s = _header_duration_s(container, stream)
        if max_duration_s and header_s is not None and header_s > max_duration_s:
            limit_s = _hours(max_duration_s)
            raise AudioRefused(f"it lasts {_hours(header_s)}, longer than the limit of {limit_s}")
        limit = int(max_duration_s * SAMPLE_RATE) if max_duration_s else None
        samples = _Samples(int(header_s * SAMPLE_RATE) if header_s is not None else limit, limit)
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        bad = 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError:  # a damaged frame here and there: skip it, as FFmpeg does
                bad += 1
                if bad > _MAX_BAD_PACKETS:
                    raise AudioRefused("it is corrupt: too many frames do not decode") from None
                continue
            for frame in frames:
                for out in resampler.resample(frame):
                    samples.add(out.to_ndarray())
        for out in resampler.resample(None):  # what the resampler still holds
            samples.add(out.to_ndarray())
    return samples.array()


def _open(file: BinaryIO, formats: list[str]) -> Any:
    import av
    import av.logging

    options = {"format_whitelist": ",".join(formats), "protocol_whitelist": ""}
    av.logging.set_level(av.logging.ERROR)  # only while opening: the log names the format refused
    try:
        with av.logging.Capture() as logs:
            return av.open(file, "r", container_options=options, metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise AudioRefused(_open_error(exc, logs, formats)) from None
    finally:
        av.logging.set_level(None)


def _open_error(exc: Any, logs: list[tuple[int, str, str]], formats: list[str]) -> str:
    for _level, source, message in logs:
        if "Format not on whitelist" in message:
            return f"its format ({source}) is not one whisperd accepts (accepted: {', '.join(formats)})"
        if "not on whitelist" in message:  # a protocol: a playlist or list naming files or URLs
            return "it refers to other files or URLs (a playlist or a list), which whisperd does not follow"
    reason = getattr(exc, "strerror", None) or type(exc).__name__
    return f"it is not audio whisperd can decode ({reason})"


def _header_duration_s(container: Any, stream: Any) -> float | None:
    """The duration the file states, if it states one: the stream's own, else the container's."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return float(container.duration) / 1_000_000  # AV_TIME_BASE
    return None


def _hours(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class _Samples:
    """Decoded samples in one buffer, refused as soon as they pass the limit. The buffer is sized for what
    the header says, or else for the limit: np.empty only reserves address space, pages become resident as
    samples fill them, so there is no copy (and no doubled peak) unless the header understated the length."""

    def __init__(self, expected: int | None, limit: int | None) -> None:
        import numpy as np

        self._limit = limit
        size = (expected if expected is not None else 60 * SAMPLE_RATE) + SAMPLE_RATE
        self._buffer = np.empty(min(size, limit + SAMPLE_RATE) if limit else size, np.float32)
        self._count = 0

    def add(self, chunk: npt.NDArray[Any]) -> None:
        import numpy as np

        data = chunk.reshape(-1)
        end = self._count + len(data)
        if self._limit is not None and end > self._limit:
            raise AudioRefused(
                f"it lasts longer than the limit of {_hours(self._limit / SAMPLE_RATE)} (its header did not "
                "say so)"
            )
        if end > len(self._buffer):
            size = max(end, 2 * len(self._buffer))
            grown = np.empty(min(size, self._limit + SAMPLE_RATE) if self._limit else size, np.float32)
            grown[: self._count] = self._buffer[: self._count]
            self._buffer = grown
        self._buffer[self._count : end] = data
        self._count = end

    def array(self) -> npt.NDArray[np.float32]:
        return self._buffer[: self._count]
