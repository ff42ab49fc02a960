"""Segments as they are decoded, in-process: the real wiring, the daemon's own loop, worker processes running
the real worker loop with a scripted transcriber (tests/support/fake_worker.py). A subscriber of
App.segment_feed reads a running job's segments in order, before the job completes, and the whole transcript
in the end; each Progress a worker sends carries only the segments decoded since the one before."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.support.inprocess import FakeClock, build, fake_worker_spawner, run_looping, submit, until
from whisperd import protocol as p
from whisperd import workerproto as wp
from whisperd.app import App
from whisperd.audiodecode import SAMPLE_RATE
from whisperd.config import Config, TranscribeConfig, WorkersConfig
from whisperd.handlers import Caller
from whisperd.jobs import JobState
from whisperd.protocol import Segment
from whisperd.segmentfeed import SegmentSubscription
from whisperd.worker import finite_segment


class Progresses:
    """Every Progress the workers sent, per job, in order, and which workers ran each job."""

    def __init__(self, app: App) -> None:
        self.by_job: dict[int, list[wp.Progress]] = {}
        self.workers: dict[int, set[str]] = {}
        job_message = app.outcomes.job_message

        def recording(worker_id: str, device: str, message: wp.JobMessage) -> None:
            if isinstance(message, wp.Progress):
                self.by_job.setdefault(message.job_id, []).append(message)
            elif isinstance(message, wp.Started):
                self.workers.setdefault(message.job_id, set()).add(worker_id)
            job_message(worker_id, device, message)

        app.outcomes.job_message = recording  # type: ignore[method-assign]

    def places(self, job_id: int) -> list[int]:
        return [s.id for progress in self.by_job.get(job_id, []) for s in progress.segments]


def scenario(
    tmp_path: Path, cfg: Config, body: Callable[[App, Progresses], Awaitable[None]], batched: bool = False
) -> None:
    spawner = fake_worker_spawner(tmp_path / "fw", batched=batched)
    app = build(tmp_path, cfg, clock=FakeClock(), spawner=spawner)
    progresses = Progresses(app)

    run_looping(app, lambda: body(app, progresses))


def config(workers: int = 1, **transcribe: object) -> Config:
    return Config(
        workers=WorkersConfig(cpu_workers=workers, start_timeout_s=20),
        transcribe=TranscribeConfig(**transcribe),  # type: ignore[arg-type]
    )


def release(tmp_path: Path, name: str) -> None:
    """Let a worker holding on `hold=NAME` go on."""
    (tmp_path / "fw" / name).touch()


async def read_all(sub: SegmentSubscription) -> list[Segment]:
    segments: list[Segment] = []
    while batch := await sub.get():
        segments += batch
    return segments


def state(app: App, job_id: int) -> JobState:
    return app.registry.get(job_id).state


async def completed(app: App, job_id: int) -> list[Segment]:
    await until(lambda: state(app, job_id) is JobState.COMPLETED, 30)
    transcript = app.registry.transcript(job_id)
    assert transcript is not None
    return transcript.segments


def test_a_subscriber_reads_a_running_jobs_segments_in_order(tmp_path: Path) -> None:
    async def body(app: App, progresses: Progresses) -> None:
        [job] = submit(app, tmp_path, "segments=5 hold=go")
        with app.segment_feed.subscribe(job.id) as sub:
            first = await sub.get()
            assert [s.id for s in first] == [1]
            assert state(app, job.id) is JobState.PROCESSING, "read while the job runs"
            release(tmp_path, "go")
            rest = await read_all(sub)
            assert sub.complete and not sub.overflowed
        segments = await completed(app, job.id)
        assert first + rest == segments, "the whole transcript, in order, each segment once"
        assert progresses.places(job.id) == [1, 2, 3, 4, 5], "each Progress carries only the new one"
        assert all(len(progress.segments) <= 1 for progress in progresses.by_job[job.id])
        assert app.segment_feed.subscriptions == 0

    scenario(tmp_path, config(mode="sequential"), body)


def test_batched_mode_sends_each_windows_segments_once(tmp_path: Path) -> None:
    async def body(app: App, progresses: Progresses) -> None:
        [job] = submit(app, tmp_path, "windows=5 hold=go")
        with app.segment_feed.subscribe(job.id) as sub:
            first = await sub.get()
            assert [s.text for s in first] == [" w0"]
            assert state(app, job.id) is JobState.PROCESSING
            release(tmp_path, "go")
            rest = await read_all(sub)
        segments = await completed(app, job.id)
        assert first + rest == segments
        assert [s.text for s in segments] == [f" w{k}" for k in range(5)]
        # The last window's segment comes with the transcript, which ends the job: never in a Progress.
        assert progresses.places(job.id) == [1, 2, 3, 4]

    scenario(tmp_path, config(cpu_chunk_batch=2), body, batched=True)


def test_a_subscriber_of_a_spread_job_reads_its_stitched_transcript(tmp_path: Path) -> None:
    async def body(app: App, progresses: Progresses) -> None:
        [job] = submit(app, tmp_path, "windows=12 window_s=0.1")
        with app.segment_feed.subscribe(job.id) as sub:
            segments = await read_all(sub)
            assert sub.complete
        assert segments == await completed(app, job.id)
        assert [s.id for s in segments] == list(range(1, 13))
        assert len(progresses.workers[job.id]) == 3, "spread over the three workers"

    cfg = config(workers=3, shard_min_audio_s=20.0, cpu_chunk_batch=2)
    scenario(tmp_path, cfg, body, batched=True)


def test_cancelling_a_job_ends_its_subscribers(tmp_path: Path) -> None:
    async def body(app: App, progresses: Progresses) -> None:
        [job] = submit(app, tmp_path, "segments=3 hold=never")
        with app.segment_feed.subscribe(job.id) as sub:
            assert [s.id for s in await sub.get()] == [1]
            caller = Caller(pid=os.getpid(), uid=os.geteuid(), gid=os.getegid())
            reply = await app.handlers.cancel(p.Cancel(ids=[job.id]), caller, [])
            assert isinstance(reply, p.Jobs)
            assert await sub.get() == []
            assert sub.ended and not sub.complete
        assert state(app, job.id) is JobState.CANCELLED
        release(tmp_path, "never")  # the worker lets go of it

    scenario(tmp_path, config(mode="sequential"), body)


def test_a_job_no_one_follows_keeps_nothing(tmp_path: Path) -> None:
    async def body(app: App, progresses: Progresses) -> None:
        [job] = submit(app, tmp_path, "segments=3")
        await completed(app, job.id)
        assert progresses.places(job.id) == [1, 2, 3]
        assert app.segment_feed.subscriptions == 0

    scenario(tmp_path, config(mode="sequential"), body)


# ---- the decoder's figures, from faster-whisper to the transcript ------------------------------------


def fw_segment(sid: int, seek: int, start: float, end: float, text: str, **figures: Any) -> Any:
    """A segment as faster-whisper hands it over (its own dataclass)."""
    from faster_whisper.transcribe import Segment as FasterWhisperSegment

    values: dict[str, Any] = {"temperature": 0.2, "avg_logprob": -0.3, "compression_ratio": 1.5,
                              "no_speech_prob": 0.01, **figures}  # fmt: skip
    return FasterWhisperSegment(id=sid, seek=seek, start=start, end=end, text=text, tokens=[50364, 1000],
                                words=None, **values)  # fmt: skip


def fw_worker() -> Any:
    from whisperd.worker import WorkerArgs
    from whisperd.worker_main import FasterWhisper

    return FasterWhisper(
        WorkerArgs(device="cpu", compute_type="int8", cpu_threads=1, max_models=1, preload=None)
    )


def spec() -> wp.JobSpec:
    return wp.JobSpec(job_id=1, audio_path="", model="tiny.en", model_source="tiny.en", language="en",
                      task="transcribe", word_timestamps=False, beam_size=1, vad_filter=False)  # fmt: skip


def test_sequential_mode_keeps_the_decoders_figures() -> None:
    class Model:
        def transcribe(self, audio: object, **options: object) -> tuple[list[Any], SimpleNamespace]:
            decoded = [
                fw_segment(1, 0, 0.0, 2.0, " Hi."),
                fw_segment(2, 3000, 30.0, 31.0, " Bye.", temperature=None),
            ]
            return decoded, SimpleNamespace(language="en", language_probability=1.0, duration=31.0)

    segments, _info = fw_worker().transcribe(Model(), np.zeros(16), spec())
    first, second = list(segments)
    assert (first.seek, first.temperature, first.avg_logprob) == (0, 0.2, -0.3)
    assert (first.compression_ratio, first.no_speech_prob) == (1.5, 0.01)
    assert (second.seek, second.temperature) == (3000, None)


def test_batched_mode_times_each_segment_and_its_seek_from_its_jobs_audio(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import faster_whisper

    class Pipeline:
        def __init__(self, model: object) -> None:
            pass

        def transcribe(self, audio: object, **options: object) -> tuple[list[Any], None]:
            # two windows end to end: the second clip starts 2 s (200 frames) into the array
            return [
                fw_segment(1, 0, 0.0, 2.0, " a"),
                fw_segment(1, 200, 2.0, 3.0, " b", avg_logprob=-1.2),
            ], None

    monkeypatch.setattr(faster_whisper, "BatchedInferencePipeline", Pipeline)
    audio = np.zeros(SAMPLE_RATE * 100, dtype=np.float32)
    windows = [(audio, 10.0, 12.0), (audio, 50.0, 51.0)]  # in the job's audio: 10 s and 50 s in
    model = SimpleNamespace(frames_per_second=100)
    decoded = list(fw_worker().decode_windows(model, windows, spec(), "en", chunk_batch=2))
    assert [index for index, _segments in decoded] == [0, 1]
    [a], [b] = (segments for _index, segments in decoded)
    assert (a.start, a.end, a.seek) == (10.0, 12.0, 1000)
    assert (b.start, b.end, b.seek, b.avg_logprob) == (50.0, 51.0, 5000, -1.2)


def test_figures_that_are_not_finite_become_null() -> None:
    nan, inf = float("nan"), float("inf")
    raw = Segment(id=4, start=1.0, end=2.0, text=" x", seek=100, temperature=inf, avg_logprob=nan,
                  compression_ratio=-inf, no_speech_prob=0.5)  # fmt: skip
    clean = finite_segment(raw, 0.0)
    assert (clean.temperature, clean.avg_logprob, clean.compression_ratio) == (None, None, None)
    assert (clean.id, clean.seek, clean.no_speech_prob) == (4, 100, 0.5)
    line = wp.encode(wp.Progress(job_id=1, progress=1.0, audio_duration_s=2.0, segments=[clean]))
    decoded = wp.from_worker_decoder.decode(line)
    assert isinstance(decoded, wp.Progress) and decoded.segments == [clean], "JSON holds it, and back"
