"""Hostile audio against the real daemon and real faster-whisper: files made to make FFmpeg fetch a URL or
read another file, a file that is no audio at all, and files that decode to hours of samples. Each fails at
once and for good (FAILED, never retried), with an error that names the file as submitted, and nothing else
happens: no connection, no other file read, no worker memory blown. The audio is made here with espeak-ng
(through the speech fixture) and ffmpeg."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.hostile_audio import png_1x1, silent_flac, without_total_samples
from whisperd import protocol as p
from whisperd.jobs import JobState

pytestmark = pytest.mark.e2e

LIMIT_S = 600  # max_audio_duration_s of this daemon: a header-less bomb is decoded this far, then refused


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    if not shutil.which("ffmpeg"):
        pytest.fail("ffmpeg is needed: run `make test`, which installs it")
    proc = DaemonProcess(
        tmp_path_factory.mktemp("hostile-audio"),
        {
            "daemon": {"socket_mode": 0o666},
            "workers": {"cpu_workers": 1},
            "transcribe": {"max_audio_duration_s": float(LIMIT_S)},
        },
    ).start()
    yield proc
    proc.stop()


def run_one(daemon: DaemonProcess, path: Path) -> p.JobView:
    (job,) = daemon.client.submit([str(path)])
    (done,) = daemon.wait_terminal([job.id], timeout_s=120)
    return done


def assert_refused(job: p.JobView, path: Path) -> str:
    """FAILED at the first attempt, for good, saying what is wrong with the file the user named."""
    assert job.state is JobState.FAILED, job
    assert job.retries == 0, "no retry can fix the file"
    assert job.error is not None and job.error.startswith(f"{path}: "), job.error
    assert "spool" not in job.error
    return job.error


def listener() -> socket.socket:
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    return server


def nobody_connected(server: socket.socket) -> bool:
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def test_speech_still_transcribes_through_the_sandboxed_worker(
    daemon: DaemonProcess, speech: dict[str, Path]
) -> None:
    (job,) = daemon.client.submit([str(speech["fox"])], word_timestamps=True)
    (done,) = daemon.wait_terminal([job.id], timeout_s=120)
    assert done.state is JobState.COMPLETED, done.error
    result = daemon.client.result(job.id).transcript
    assert result is not None and "lazy dog" in result.text.lower()
    assert result.segments[0].words, "word timestamps came through"


def test_an_hls_playlist_is_refused_and_fetches_nothing(daemon: DaemonProcess, tmp_path: Path) -> None:
    server = listener()
    port = server.getsockname()[1]
    playlist = tmp_path / "talk.m3u8"
    playlist.write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:{port}/segment.ts\n#EXT-X-ENDLIST\n"
    )
    try:
        assert_refused(run_one(daemon, playlist), playlist)
        assert nobody_connected(server), "the worker fetched the playlist's URL"
    finally:
        server.close()


def test_a_concat_list_cannot_make_the_worker_read_another_file(
    daemon: DaemonProcess, speech: dict[str, Path], tmp_path: Path
) -> None:
    """An ffconcat list naming a file beside it in the spool (another user's audio) is refused, where FFmpeg
    with every demuxer would decode that file and hand its speech to this job."""
    other = daemon.state_dir / "spool" / "someone-elses.audio"
    shutil.copy(speech["weather"], other)
    listing = tmp_path / "list.txt"
    listing.write_text(f"ffconcat version 1.0\nfile {other.name}\n")
    try:
        job = run_one(daemon, listing)
    finally:
        other.unlink(missing_ok=True)
    assert_refused(job, listing)


def test_a_picture_fails_saying_it_is_not_audio(daemon: DaemonProcess, tmp_path: Path) -> None:
    picture = tmp_path / "holiday.png"
    picture.write_bytes(png_1x1())
    error = assert_refused(run_one(daemon, picture), picture)
    assert "tuple index" not in error


def test_a_small_flac_that_claims_hours_is_refused_from_its_header(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    bomb = silent_flac(tmp_path / "ten-hours.flac", hours=10)
    assert bomb.stat().st_size < 1024 * 1024
    before = peak_rss_of_worker(daemon)
    assert_refused(run_one(daemon, bomb), bomb)
    assert peak_rss_of_worker(daemon) - before < 100 * 1024**2, "nothing was decoded"


def test_a_flac_whose_header_does_not_say_is_refused_once_decoding_passes_the_limit(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    bomb = without_total_samples(silent_flac(tmp_path / "unknown-length.flac", hours=10))
    assert_refused(run_one(daemon, bomb), bomb)
    # decoded up to the limit (10 min: 38 MB of float32), never the 2.3 GB of ten hours
    assert peak_rss_of_worker(daemon) < 1024**3


def peak_rss_of_worker(daemon: DaemonProcess) -> int:
    """The worker's peak resident memory (VmHWM), in bytes."""
    (worker,) = daemon.client.stats().workers
    assert worker.pid is not None
    status = Path(f"/proc/{worker.pid}/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kib * 1024
