"""What an upload's header says of its length (whisperd.http_upload): the duration a WAV's or FLAC's header
states, and a WAV's byte rate, read from real headers (the `wave` module's, sox's FLAC) and from headers
made by hand; a streamed WAV, which does not state its length, and anything else say nothing."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import wave
from pathlib import Path

import pytest

from whisperd.http_upload import HEAD_BYTES, stated_duration_s, wav_byte_rate


def wav(seconds: float, rate: int = 16000, channels: int = 1, width: int = 2) -> bytes:
    """A whole WAV file as the `wave` module writes it (its header states the data's size)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(b"\x00" * int(seconds * rate) * channels * width)
    return out.getvalue()


def with_data_size(data: bytes, size: int) -> bytes:
    """The WAV with its data chunk's stated size replaced (as a recorder streaming it writes it)."""
    at = data.index(b"data") + 4
    return data[:at] + struct.pack("<I", size) + data[at + 4 :]


def streaminfo(sample_rate: int, total_samples: int, channels: int = 1, bits: int = 16) -> bytes:
    """fLaC and a last-block STREAMINFO, built from the format's bit layout (block and frame sizes, then
    20 bits of sample rate, 3 of channels - 1, 5 of bits - 1, 36 of total samples, then the MD5)."""
    packed = (sample_rate << 44) | ((channels - 1) << 41) | ((bits - 1) << 36) | total_samples
    info = struct.pack(">HH", 4096, 4096) + b"\x00" * 6 + packed.to_bytes(8, "big") + b"\x00" * 16
    assert len(info) == 34
    return b"fLaC" + bytes([0x80, 0, 0, 34]) + info


@pytest.mark.parametrize(
    ("seconds", "rate", "channels", "width"),
    [(2.5, 16000, 1, 2), (1.0, 44100, 2, 2), (3.0, 8000, 1, 1), (0.5, 48000, 2, 3)],
)
def test_a_wav_header_states_its_duration_and_byte_rate(
    seconds: float, rate: int, channels: int, width: int
) -> None:
    data = wav(seconds, rate, channels, width)
    assert wav_byte_rate(data) == rate * channels * width
    duration = stated_duration_s(data[:HEAD_BYTES])
    assert duration == pytest.approx(seconds, abs=1 / rate)


def test_the_head_alone_is_enough_however_long_the_wav() -> None:
    head = wav(600.0)[:HEAD_BYTES]  # ten minutes: only the first 64 KiB are looked at
    assert stated_duration_s(head) == pytest.approx(600.0)
    assert wav_byte_rate(head) == 32000


def test_chunks_before_the_data_are_walked_over() -> None:
    plain = wav(2.0)
    fmt_end = plain.index(b"data")
    odd = b"odd!" + struct.pack("<I", 5) + b"12345" + b"\x00"  # an odd size is padded to even
    listing = b"LIST" + struct.pack("<I", 10) + b"INFOISFT\x00\x00"
    body = plain[12:fmt_end] + odd + listing + plain[fmt_end:]
    data = b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body
    assert stated_duration_s(data) == pytest.approx(2.0)
    assert wav_byte_rate(data) == 32000


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF])
def test_a_streamed_wav_states_no_duration_but_its_byte_rate(size: int) -> None:
    data = with_data_size(wav(1.0), size)
    assert stated_duration_s(data) is None
    assert wav_byte_rate(data) == 32000, "what bounds its size for the duration limit"


def test_a_wav_whose_data_chunk_is_past_the_head_states_no_duration() -> None:
    plain = wav(1.0)
    at = plain.index(b"data")
    filler = b"JUNK" + struct.pack("<I", HEAD_BYTES) + b"\x00" * HEAD_BYTES
    body = plain[12:at] + filler + plain[at:]
    head = (b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body)[:HEAD_BYTES]
    assert stated_duration_s(head) is None
    assert wav_byte_rate(head) == 32000


@pytest.mark.parametrize(("rate", "samples"), [(16000, 40000), (44100, 44100 * 185), (96000, 1)])
def test_a_flac_streaminfo_states_its_duration(rate: int, samples: int) -> None:
    header = streaminfo(rate, samples) + b"\xff\xf8" + os.urandom(100)  # then the frames
    assert stated_duration_s(header) == pytest.approx(samples / rate)
    assert wav_byte_rate(header) is None, "not a WAV"


def test_a_flac_of_unknown_length_states_none() -> None:
    assert stated_duration_s(streaminfo(16000, 0)) is None, "0 samples: the encoder did not know"


def test_a_flac_whose_first_block_is_not_streaminfo_states_none() -> None:
    header = bytearray(streaminfo(16000, 40000))
    header[4] = 0x84  # a VORBIS_COMMENT first: not a valid FLAC, and not read as one
    assert stated_duration_s(bytes(header)) is None


@pytest.mark.skipif(shutil.which("sox") is None, reason="sox makes the real FLAC file")
def test_a_flac_sox_wrote_states_its_duration(tmp_path: Path) -> None:
    path = tmp_path / "tone.flac"
    subprocess.run(
        ["sox", "-n", "-r", "22050", "-c", "2", "-b", "16", str(path), "synth", "3.5", "sine", "440"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    head = path.read_bytes()[:HEAD_BYTES]
    assert stated_duration_s(head) == pytest.approx(3.5, abs=1e-3)
    assert wav_byte_rate(head) is None


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"RIFF",
        b"RIFF\x00\x00\x00\x00WAVE",  # no chunks at all
        b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00",  # a fmt chunk cut short
        b"RIFF\x24\x00\x00\x00AVI LIST",  # RIFF, but not WAVE
        b"fLaC",
        b"fLaC\x80\x00\x00\x22" + b"\x00" * 10,  # STREAMINFO cut short
        b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\xff\xfb" * 100,  # an MP3: no stated length here
        b"OggS" + b"\x00" * 100,
    ],
)
def test_anything_else_states_nothing(junk: bytes) -> None:
    assert stated_duration_s(junk) is None
    assert wav_byte_rate(junk) is None


def test_random_bytes_state_nothing() -> None:
    for size in range(0, 4096, 16):
        data = b"\x00" + os.urandom(size)  # not RIFF, not fLaC
        assert stated_duration_s(data) is None and wav_byte_rate(data) is None


def test_a_wav_with_a_zero_byte_rate_states_nothing() -> None:
    data = bytearray(wav(1.0))
    fmt = data.index(b"fmt ") + 8
    data[fmt + 8 : fmt + 12] = b"\x00\x00\x00\x00"
    assert wav_byte_rate(bytes(data)) is None
    assert stated_duration_s(bytes(data)) is None, "no division by zero"
