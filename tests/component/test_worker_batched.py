"""Batched decoding in the real worker loop (whisperd.worker.Worker with whisperd.batching), in-process, with
a fake window decoder: the windows of a batch's jobs go to the decoder together, each job gets its own
segments back, and cancels, out-of-memory errors and failures are handled between calls.

The fake's scripts (the job's audio) extend test_worker's:
  segments=N     N windows of one second, each decoded to one segment " <job>.<window>"
  lang=XX        the language detected for the job
  nospeech       no window at all
  oom-above=K    a call holding more than K windows runs out of memory
  cancel-at=K    the daemon's cancel of this job arrives while its window K (1-based) decodes
  boom           the decoder fails"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

from tests.component.test_worker import FakeTranscriber, ScriptAudio, batch, kinds, of_type
from whisperd import workerproto as wp
from whisperd.protocol import Segment
from whisperd.worker import AudioInfo, Worker


class FakeWindowDecoder(FakeTranscriber):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[tuple[int, int]]] = []  # each call's windows, as (job, window)

    def decode_audio(self, audio: BinaryIO, spec: wp.JobSpec) -> Sequence[str]:
        return [*super().decode_audio(audio, spec), f"job={spec.job_id}"]

    def windows(
        self, model: Any, audio: Any, spec: wp.JobSpec
    ) -> tuple[list[tuple[float, float]], AudioInfo]:
        options = dict(w.split("=", 1) for w in audio if "=" in w)
        count = 0 if "nospeech" in audio else int(options.get("segments", 2))
        info = AudioInfo(options.get("lang", "en"), 0.9, float(max(count, 1)))
        return [(float(i), float(i + 1)) for i in range(count)], info

    def decode_windows(
        self,
        model: Any,
        windows: Sequence[tuple[Any, float, float]],
        spec: wp.JobSpec,
        language: str,
        chunk_batch: int,
    ) -> Iterator[tuple[int, list[Segment]]]:
        for first in range(0, len(windows), chunk_batch):
            call = windows[first : first + chunk_batch]
            scripts = [dict(w.split("=", 1) for w in audio if "=" in w) for audio, _s, _e in call]
            self.calls.append(
                [(int(s["job"]), int(start) + 1) for s, (_a, start, _e) in zip(scripts, call, strict=True)]
            )
            if any("boom" in audio for audio, _s, _e in call):
                raise RuntimeError("something broke")
            if any(len(call) > int(s.get("oom-above", len(call))) for s in scripts):
                raise RuntimeError("CUDA failed with error out of memory")
            for offset, (script, (_audio, start, end)) in enumerate(zip(scripts, call, strict=True)):
                job_id, window = int(script["job"]), int(start) + 1
                if int(script.get("cancel-at", 0)) == window:
                    self._cancel(job_id)
                yield first + offset, [Segment(id=1, start=start, end=end, text=f" {job_id}.{window}")]


def job(job_id: int, script: str = "segments=2", chunk_batch: int = 8, mode: str = "batched") -> wp.JobSpec:
    return wp.JobSpec(
        job_id=job_id, audio_path=script, model="tiny.en", model_source="src-tiny", language=None,
        task="transcribe", word_timestamps=False, beam_size=5, vad_filter=False, mode=mode,  # type: ignore[arg-type]
        chunk_batch=chunk_batch,
    )  # fmt: skip


def run(*commands: wp.ToWorker) -> tuple[list[wp.FromWorker], FakeWindowDecoder]:
    decoder = FakeWindowDecoder()
    out = io.BytesIO()
    worker = Worker(out, decoder, 2, ScriptAudio())
    decoder.worker = worker
    worker.read_commands([wp.encode(c) for c in commands])
    worker.run()
    return [wp.from_worker_decoder.decode(line) for line in out.getvalue().splitlines()], decoder


def texts(messages: Sequence[wp.FromWorker]) -> dict[int, str]:
    return {m.job_id: m.transcript.text for m in of_type(messages, wp.Finished)}


def test_the_windows_of_a_batch_s_jobs_are_decoded_in_one_call_and_each_job_gets_its_own() -> None:
    messages, decoder = run(batch(7, job(1, "segments=2"), job(2, "segments=3")))
    assert decoder.calls == [[(1, 1), (1, 2), (2, 1), (2, 2), (2, 3)]], "one call for the whole batch"
    assert texts(messages) == {1: "1.1 1.2", 2: "2.1 2.2 2.3"}
    second = of_type(messages, wp.Finished)[1].transcript
    assert [(s.id, s.start, s.end) for s in second.segments] == [(1, 0.0, 1.0), (2, 1.0, 2.0), (3, 2.0, 3.0)]
    assert kinds(messages)[:3] == [("Ready", None), ("Started", 1), ("Started", 2)]
    assert kinds(messages)[-1] == ("BatchDone", 7)
    progress = [round(m.progress, 1) for m in of_type(messages, wp.Progress) if m.job_id == 2]
    assert progress == [33.3, 66.7], "as its windows finish; the result itself says 100"


def test_a_call_holds_at_most_chunk_batch_windows_and_short_jobs_finish_first() -> None:
    messages, decoder = run(
        batch(1, job(1, "segments=1", chunk_batch=2), job(2, "segments=4", chunk_batch=2))
    )
    assert [len(call) for call in decoder.calls] == [2, 2, 1]
    finished = [k for k in kinds(messages) if k[0] == "Finished"]
    assert finished == [("Finished", 1), ("Finished", 2)]
    assert kinds(messages).index(("Finished", 1)) < kinds(messages).index(("Progress", 2)) + 3


def test_jobs_of_different_languages_are_never_decoded_in_one_call() -> None:
    messages, decoder = run(
        batch(1, job(1, "segments=2 lang=de"), job(2, "segments=1 lang=en"), job(3, "lang=de"))
    )
    assert decoder.calls == [[(1, 1), (1, 2), (3, 1), (3, 2)], [(2, 1)]]
    languages = {m.job_id: m.transcript.language for m in of_type(messages, wp.Finished)}
    assert languages == {1: "de", 2: "en", 3: "de"}


def test_a_cancel_between_calls_stops_that_job_and_the_others_go_on_without_its_windows() -> None:
    messages, decoder = run(
        batch(1, job(1, "segments=4 cancel-at=1", chunk_batch=1), job(2, "segments=2", chunk_batch=1))
    )
    assert of_type(messages, wp.Stopped) == [wp.Stopped(job_id=1, reason="cancelled")]
    assert texts(messages) == {2: "2.1 2.2"}
    decoded = [window for call in decoder.calls for window in call]
    assert (1, 3) not in decoded and (1, 4) not in decoded, "the cancelled job's later windows never run"


def test_out_of_memory_halves_the_windows_per_call_and_the_batch_goes_on() -> None:
    messages, decoder = run(batch(1, job(1, "segments=3 oom-above=2"), job(2, "segments=2")))
    assert [len(call) for call in decoder.calls] == [5, 4, 2, 2, 1]
    assert of_type(messages, wp.Failed) == []
    assert texts(messages) == {1: "1.1 1.2 1.3", 2: "2.1 2.2"}, "each window decoded once, in order"


def test_out_of_memory_at_one_window_a_call_fails_the_jobs_left_as_oom() -> None:
    messages, _ = run(
        batch(1, job(1, "segments=1", chunk_batch=1), job(2, "segments=2 oom-above=0", chunk_batch=1))
    )
    assert texts(messages) == {1: "1.1"}
    assert [(m.job_id, m.kind) for m in of_type(messages, wp.Failed)] == [(2, "oom")]


def test_a_decoder_failure_fails_the_unfinished_jobs_retryably_and_the_next_batch_runs() -> None:
    messages, _ = run(batch(1, job(1, "segments=1 boom")), batch(2, job(2, "segments=1")))
    assert [(m.job_id, m.kind) for m in of_type(messages, wp.Failed)] == [(1, "retryable")]
    assert texts(messages) == {2: "2.1"}
    assert [k for k in kinds(messages) if k[0] == "BatchDone"] == [("BatchDone", 1), ("BatchDone", 2)]


def test_audio_without_speech_finishes_with_an_empty_transcript() -> None:
    messages, decoder = run(batch(1, job(1, "nospeech"), job(2, "segments=1")))
    assert texts(messages) == {1: "", 2: "2.1"}
    assert decoder.calls == [[(2, 1)]]


def test_audio_that_does_not_decode_fails_alone_and_its_batch_mates_are_decoded() -> None:
    messages, _ = run(batch(1, job(1, "undecodable"), job(2, "segments=1")))
    assert [(m.job_id, m.kind) for m in of_type(messages, wp.Failed)] == [(1, "fatal")]
    assert texts(messages) == {2: "2.1"}


def test_a_batch_with_a_sequential_job_runs_one_job_after_another() -> None:
    messages, decoder = run(batch(1, job(1, "segments=1"), job(2, "segments=1", mode="sequential")))
    assert decoder.calls == [], "sequential: transcribe per job"
    assert texts(messages) == {1: "1.1", 2: "2.1"}
