"""Batched decoding in the real worker loop (whisperd.worker.Worker with whisperd.batching), in-process, with
a fake window decoder: the windows of a batch's jobs go to the decoder together, each job gets its own
segments back, and cancels, out-of-memory errors and failures are handled between calls.

The fake's scripts (the job's audio) extend test_worker's:
  segments=N     N windows of one second, each decoded to one segment " <job>.<window>"
  lang=XX        the language detected for the job
  nospeech       no window at all
  oom-above=K    a call holding more than K windows runs out of memory
  cancel-at=K    the daemon's cancel of this job arrives while its window K (1-based) decodes
  share-at=K:H   the daemon's request to share this job with H helpers (ShareJob) arrives while its window K
                 decodes; share-min=S sets its min_part_s (default 2)
  boom           the decoder fails
Its audio lasts as long as its windows (segments=N: N seconds)."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import msgspec
import pytest

from tests.component.test_worker import FakeTranscriber, ScriptAudio, batch, kinds, of_type
from whisperd import workerproto as wp
from whisperd.protocol import Segment
from whisperd.worker import Worker


class FakeWindowDecoder(FakeTranscriber):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[tuple[int, int]]] = []  # each call's windows, as (job, window)
        self.languages: list[str] = []  # each call's language
        self.cut: list[int] = []  # the jobs whose audio windows() cut

    def decode_audio(self, audio: BinaryIO, spec: wp.JobSpec) -> Sequence[str]:
        return [*super().decode_audio(audio, spec), f"job={spec.job_id}"]

    @staticmethod
    def _count(audio: Any) -> int:
        options = dict(w.split("=", 1) for w in audio if "=" in w)
        return 0 if "nospeech" in audio else int(options.get("segments", 2))

    max_window_s = 1.0  # each one-second window its own

    def audio_duration_s(self, audio: Any) -> float:
        return 2.0 if "nospeech" in audio else float(max(self._count(audio), 1))

    def language(self, model: Any, audio: Any, spec: wp.JobSpec) -> tuple[str, float]:
        self.cut.append(spec.job_id)
        options = dict(w.split("=", 1) for w in audio if "=" in w)
        return spec.language or options.get("lang", "en"), 0.9

    def speech(self, audio: Any, start_s: float, end_s: float) -> list[tuple[float, float]]:
        return [(float(i), float(i + 1)) for i in range(self._count(audio)) if start_s <= i < end_s]

    def quietest_s(self, audio: Any, start_s: float, end_s: float) -> float:
        return (start_s + end_s) / 2

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
            self.languages.append(language)
            if any("boom" in audio for audio, _s, _e in call):
                raise RuntimeError("something broke")
            if any(len(call) > int(s.get("oom-above", len(call))) for s in scripts):
                raise RuntimeError("CUDA failed with error out of memory")
            for offset, (script, (_audio, start, end)) in enumerate(zip(scripts, call, strict=True)):
                job_id, window = int(script["job"]), int(start) + 1
                if int(script.get("cancel-at", 0)) == window:
                    self._cancel(job_id)
                at, _, helpers = script.get("share-at", "0:0").partition(":")
                if int(at) == window:
                    self._share(wp.ShareJob(job_id=job_id, helpers=int(helpers),
                                            min_part_s=float(script.get("share-min", 2))))  # fmt: skip
                yield first + offset, [Segment(id=1, start=start, end=end, text=f" {job_id}.{window}")]

    def _share(self, request: wp.ShareJob) -> None:
        assert self.worker is not None
        self.worker.read_commands([wp.encode(request)])


def job(
    job_id: int,
    script: str = "segments=2",
    chunk_batch: int = 8,
    mode: str = "batched",
    language: str | None = None,
    windows: list[tuple[float, float]] | None = None,
    shard_min_audio_s: float = 0.0,
) -> wp.JobSpec:
    return wp.JobSpec(
        job_id=job_id, audio_path=script, model="tiny.en", model_source="src-tiny", language=language,
        task="transcribe", word_timestamps=False, beam_size=5, vad_filter=False, mode=mode,  # type: ignore[arg-type]
        chunk_batch=chunk_batch, shard_min_audio_s=shard_min_audio_s,
        part=wp.JobPart(start_s=windows[0][0], end_s=windows[-1][1], windows=windows) if windows else None,
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
    # 5 windows: one call of 5 (out of memory), then at most 4 a call, made even: 3 (out of memory), then
    # at most 2: 2, 2 and 1
    assert [len(call) for call in decoder.calls] == [5, 3, 2, 2, 1]
    assert of_type(messages, wp.Failed) == []
    assert texts(messages) == {1: "1.1 1.2 1.3", 2: "2.1 2.2"}, "each window decoded once, in order"


def test_the_calls_a_batch_needs_are_made_even() -> None:
    _, decoder = run(batch(1, job(1, "segments=7", chunk_batch=4), job(2, "segments=4", chunk_batch=4)))
    assert [len(call) for call in decoder.calls] == [4, 4, 3], "11 windows at most 4 a call: 3 calls"
    _, decoder = run(batch(1, job(1, "segments=11", chunk_batch=8)))
    assert [len(call) for call in decoder.calls] == [6, 5], "not 8 and 3"


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


# ---- one long job spread over several workers -----------------------------------------------------------


def ones(first: int, count: int) -> list[tuple[float, float]]:
    """The fake's windows first+1..first+count (1-based), as spans of one second."""
    return [(float(i), float(i + 1)) for i in range(first, first + count)]


def jp(first: int, count: int, end: float | None = None) -> wp.JobPart:
    """A part of the job: its windows first+1..first+count, from its first window to end (or its last)."""
    return wp.JobPart(start_s=float(first), end_s=float(first + count) if end is None else end,
                      windows=ones(first, count))  # fmt: skip


def decoded(decoder: FakeWindowDecoder, job_id: int) -> list[int]:
    return [window for call in decoder.calls for j, window in call if j == job_id]


def test_a_job_asked_to_share_keeps_half_of_what_is_left_gives_the_rest_and_decodes_only_its_own() -> None:
    messages, decoder = run(batch(1, job(1, "segments=10 share-at=1:1", chunk_batch=2)))
    assert of_type(messages, wp.Shared) == [
        wp.Shared(job_id=1, language="en", kept=jp(0, 6), parts=[jp(6, 4)])
    ], "the 2 windows decoded, half of the 8 left kept, the other half given"
    assert decoder.calls == [[(1, 1), (1, 2)], [(1, 3), (1, 4)], [(1, 5), (1, 6)]]
    assert texts(messages) == {1: "1.1 1.2 1.3 1.4 1.5 1.6"}
    assert kinds(messages).index(("Shared", 1)) < kinds(messages).index(("Finished", 1))
    progress = [m.progress for m in of_type(messages, wp.Progress)]
    assert progress == [10.0, 20.0, 30.0, 40.0, 50.0], "positions in the job's audio, up to its last kept"


def test_a_request_taken_before_the_first_call_shares_every_window() -> None:
    """The daemon may ask as soon as it knows the audio's length, before the windows are cut."""
    messages, decoder = run(
        wp.ShareJob(job_id=1, helpers=2, min_part_s=3.0), batch(1, job(1, "segments=9", chunk_batch=4))
    )
    assert of_type(messages, wp.Shared) == [
        wp.Shared(job_id=1, language="en", kept=jp(0, 3), parts=[jp(3, 3), jp(6, 3)])
    ]
    assert decoder.calls == [[(1, 1), (1, 2), (1, 3)]]


def test_a_request_with_too_little_left_gives_nothing_and_the_job_decodes_everything() -> None:
    messages, decoder = run(batch(1, job(1, "segments=10 share-at=1:1 share-min=5", chunk_batch=2)))
    assert of_type(messages, wp.Shared) == [wp.Shared(job_id=1, language="en", kept=jp(0, 10), parts=[])]
    assert decoded(decoder, 1) == list(range(1, 11))
    assert texts(messages) == {1: " ".join(f"1.{k}" for k in range(1, 11))}


def test_sharing_one_job_leaves_its_batch_mates_windows_alone() -> None:
    messages, decoder = run(
        batch(
            1,
            job(1, "segments=6 share-at=1:1 share-min=1", chunk_batch=4),
            job(2, "segments=2", chunk_batch=4),
        )
    )
    assert of_type(messages, wp.Shared) == [
        wp.Shared(job_id=1, language="en", kept=jp(0, 5), parts=[jp(5, 1)])
    ]
    assert decoder.calls == [[(1, 1), (1, 2), (1, 3), (1, 4)], [(1, 5), (2, 1), (2, 2)]]
    assert texts(messages) == {1: "1.1 1.2 1.3 1.4 1.5", 2: "2.1 2.2"}


def test_a_request_for_a_job_that_finished_first_is_never_answered_nor_kept_for_the_next_batch() -> None:
    messages, decoder = run(
        batch(1, job(1, "segments=2 share-at=2:1", chunk_batch=2)),
        batch(2, job(1, "segments=10", chunk_batch=2)),  # the same job here again (a part of it, a retry)
    )
    assert of_type(messages, wp.Shared) == []
    assert [k for k in kinds(messages) if k[0] in ("Finished", "BatchDone")] == [
        ("Finished", 1), ("BatchDone", 1), ("Finished", 1), ("BatchDone", 2),
    ]  # fmt: skip
    assert len(decoded(decoder, 1)) == 12, "the second run decodes all its 10 windows"


def test_a_part_decodes_exactly_its_windows_in_the_spec_s_language_without_cutting_the_audio() -> None:
    part = job(
        1, "segments=10 lang=fr", chunk_batch=8, language="de", windows=[(3.0, 4.0), (4.0, 5.0), (7.0, 8.0)],
        shard_min_audio_s=2.0,
    )  # fmt: skip
    messages, decoder = run(batch(1, part))
    assert decoder.cut == [], "no VAD: its windows were cut by the worker that shared them"
    assert decoder.calls == [[(1, 4), (1, 5), (1, 8)]]
    assert decoder.languages == ["de"]
    (finished,) = of_type(messages, wp.Finished)
    assert finished.transcript.language == "de"
    assert [(s.start, s.end) for s in finished.transcript.segments] == [(3.0, 4.0), (4.0, 5.0), (7.0, 8.0)]
    progress = of_type(messages, wp.Progress)
    assert [(m.progress, m.audio_duration_s) for m in progress] == [(40.0, 10.0), (50.0, 10.0)], (
        "where it got to in the job's whole audio; no early length report for a part"
    )


def test_a_part_may_be_shared_in_turn() -> None:
    part = job(1, "segments=10 share-at=5:1", chunk_batch=1, language="de", windows=ones(4, 6))
    messages, decoder = run(batch(1, part))
    assert of_type(messages, wp.Shared) == [
        wp.Shared(job_id=1, language="de", kept=jp(4, 3), parts=[jp(7, 3)])
    ]
    assert decoded(decoder, 1) == [5, 6, 7]


@pytest.mark.parametrize(
    ("script", "shard_min_audio_s", "reported"),
    [
        pytest.param("segments=10", 5.0, True, id="long enough to share"),
        pytest.param("segments=9", 5.0, False, id="less than twice shard_min_audio_s"),
        pytest.param("segments=60", 0.0, False, id="sharing off"),
    ],
)
def test_a_job_long_enough_to_share_reports_its_length_before_any_window_is_decoded(
    script: str, shard_min_audio_s: float, reported: bool
) -> None:
    messages, decoder = run(batch(1, job(1, script, chunk_batch=4, shard_min_audio_s=shard_min_audio_s)))
    progress = [(m.progress, m.audio_duration_s) for m in of_type(messages, wp.Progress)]
    duration_s = float(decoder.audio_duration_s(script.split()))
    early = [(0.0, duration_s)] if reported else []
    assert progress[: len(early)] == early
    assert all(p > 0 for p, _ in progress[len(early) :]), "the rest, as windows finish"
    assert kinds(messages)[1:3] == [("Started", 1), ("Progress", 1)]
    assert texts(messages)[1].startswith("1.1")


def test_a_request_taken_while_speech_is_looked_for_gives_away_time_ranges_not_yet_searched() -> None:
    """A long recording: speech is looked for a minute at a time; a request between two minutes splits what
    is left by time, the helpers to look for speech in their ranges themselves."""
    messages, decoder = run(
        wp.ShareJob(job_id=1, helpers=1, min_part_s=30.0), batch(1, job(1, "segments=150", chunk_batch=50))
    )
    assert of_type(messages, wp.Shared) == [
        wp.Shared(
            job_id=1, language="en", kept=wp.JobPart(start_s=0.0, end_s=75.0),
            parts=[wp.JobPart(start_s=75.0, end_s=150.0)],
        )
    ], "searched up to 60 s when asked: half of the 150 s kept, the rest given"  # fmt: skip
    assert decoded(decoder, 1) == list(range(1, 76)), "it looks for speech up to its range's end only"


def test_a_part_given_as_a_time_range_is_cut_there_in_the_spec_s_language() -> None:
    part = wp.JobPart(start_s=75.0, end_s=150.0)
    spec = msgspec.structs.replace(job(1, "segments=150 lang=fr", chunk_batch=50, language="de"), part=part)
    messages, decoder = run(batch(1, spec))
    assert decoder.cut == [1] and decoder.languages == ["de", "de"]
    assert decoded(decoder, 1) == list(range(76, 151))
    (finished,) = of_type(messages, wp.Finished)
    assert finished.transcript.segments[0].start == 75.0 and finished.transcript.duration_s == 150.0
