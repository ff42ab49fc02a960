"""The worker's audio decoding (whisperd.audiodecode) on real files through real PyAV/FFmpeg: what decodes,
the duration limit from the header and while decoding, and the two allow-lists that keep FFmpeg from opening
anything but the file it was handed. Files are made with ffmpeg and espeak-ng here."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.support import audio
from tests.support.hostile_audio import png_1x1, silent_flac, without_total_samples
from whisperd.audiodecode import SAMPLE_RATE, AudioRefused, decode
from whisperd.config import AUDIO_FORMATS

FORMATS = list(AUDIO_FORMATS)

pytestmark = pytest.mark.skipif(not shutil.which("ffmpeg"), reason="ffmpeg makes the test files")


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not audio.have_tools():
        pytest.fail("espeak-ng and sox are needed: run `make test`, which installs them")
    return audio.speak(audio.SENTENCES["fox"], tmp_path_factory.mktemp("speech") / "fox.wav")


def decode_file(path: Path, max_duration_s: float = 0, formats: list[str] = FORMATS) -> np.ndarray:
    with open(path, "rb") as file:
        return decode(file, max_duration_s, formats)


def convert(source: Path, target: Path, *options: str) -> Path:
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-i", str(source), *options, str(target)], check=True
    )
    return target


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".mp3", ".ogg", ".m4a", ".mkv"])
def test_common_formats_decode_to_16k_mono_float32_of_the_right_length(
    speech: Path, tmp_path: Path, suffix: str
) -> None:
    stereo_44k = convert(speech, tmp_path / f"fox{suffix}", "-ac", "2", "-ar", "44100")
    samples = decode_file(stereo_44k, max_duration_s=60)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) / SAMPLE_RATE - audio.duration_s(speech)) < 0.1
    assert 0.01 < float(np.abs(samples).max()) <= 1.0


def test_audio_over_the_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    bomb = silent_flac(tmp_path / "ten-hours.flac", hours=10)
    with pytest.raises(AudioRefused, match="10:00:00"):
        decode_file(bomb, max_duration_s=4 * 3600)


def test_audio_whose_header_does_not_say_is_refused_once_decoding_passes_the_limit(tmp_path: Path) -> None:
    bomb = without_total_samples(silent_flac(tmp_path / "one-hour.flac", hours=1))
    with pytest.raises(AudioRefused, match="did not say"):
        decode_file(bomb, max_duration_s=60)
    assert len(decode_file(bomb, max_duration_s=2 * 3600)) == 3600 * SAMPLE_RATE, "under the limit: all of it"


def test_a_header_that_understates_the_length_does_not_cut_the_audio(speech: Path, tmp_path: Path) -> None:
    flac = without_total_samples(convert(speech, tmp_path / "fox.flac"))
    assert len(decode_file(flac)) == len(decode_file(speech))


def test_formats_off_the_list_are_refused_by_name(tmp_path: Path, speech: Path) -> None:
    picture = tmp_path / "holiday.png"
    picture.write_bytes(png_1x1())
    with pytest.raises(AudioRefused, match="png"):
        decode_file(picture)
    listing = tmp_path / "list.txt"
    listing.write_text(f"ffconcat version 1.0\nfile {speech}\n")
    with pytest.raises(AudioRefused, match="concat"):
        decode_file(listing)
    with pytest.raises(AudioRefused, match="wav"):
        decode_file(speech, formats=["flac"])


def test_no_format_may_open_another_file_or_a_url(tmp_path: Path, speech: Path) -> None:
    """Even with playlists and lists allowed, the empty protocol list stops their references."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    playlist = tmp_path / "talk.m3u8"  # named so: FFmpeg takes HLS from an .m3u8 name only
    playlist.write_text(
        "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n"
        f"http://127.0.0.1:{server.getsockname()[1]}/segment.ts\n#EXT-X-ENDLIST\n"
    )
    listing = tmp_path / "list.txt"
    listing.write_text(f"ffconcat version 1.0\nfile {speech.name}\n")
    shutil.copy(speech, tmp_path / speech.name)
    try:
        with pytest.raises(AudioRefused, match="refers to other files"):
            decode_file(playlist, formats=["hls", *FORMATS])
        with pytest.raises(AudioRefused, match="refers to other files"):
            decode_file(listing, formats=["concat", *FORMATS])
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    finally:
        server.close()


def test_text_is_not_audio(tmp_path: Path) -> None:
    for name in ("notes.txt", "notes"):  # FFmpeg takes a .txt for ANSI art (its tty demuxer), off the list
        text = tmp_path / name
        text.write_text("hello " * 1000)
        with pytest.raises(AudioRefused):
            decode_file(text)


def test_a_video_without_sound_has_no_audio_stream(tmp_path: Path) -> None:
    video = tmp_path / "silent-film.mp4"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=5", "-t", "1",
         "-c:v", "mpeg4", str(video)],
        check=True,
    )  # fmt: skip
    with pytest.raises(AudioRefused, match="no audio stream"):
        decode_file(video)
