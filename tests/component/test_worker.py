"""The real worker loop (whisperd.worker.Worker) in-process, with a fake Transcriber defined here: commands go
in through read_commands, run() goes through them in the same thread, and the protocol lines it writes are
decoded and checked message by message.

The fake's audio path is its script, a few words:
  segments=N         N one-second segments (default 2)
  empty              audio without samples
  undecodable        audio that does not decode
  oom                a CUDA out-of-memory error while transcribing
  boom               some other error while transcribing
  cancel-at=K        the daemon's cancel of this job arrives while segment K (1-based) decodes
  cancel-after-last  the cancel arrives after the last segment was decoded, before the result is sent
  refused            the decoder refuses the audio (AudioRefused), as for one over the duration limit
  nan                segments whose times and probabilities are NaN or infinite"""

from __future__ import annotations

import io
import math
import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import msgspec
import pytest

from whisperd import workerproto as wp
from whisperd.audiodecode import AudioRefused
from whisperd.batching import AudioInfo
from whisperd.protocol import Segment, Word
from whisperd.worker import Worker
from whisperd.workeraudio import AudioInbox

T = TypeVar("T")


class FakeTranscriber:
    def __init__(self) -> None:
        self.loads: list[str] = []
        self.fail_loads: dict[str, Exception] = {}
        self.worker: Worker | None = None  # to deliver a cancel while a job transcribes

    def load_model(self, source: str) -> Any:
        self.loads.append(source)
        if source in self.fail_loads:
            raise self.fail_loads[source]
        return f"model:{source}"

    def decode_audio(self, audio: BinaryIO, spec: wp.JobSpec) -> Sequence[str]:
        words = audio.read().decode().split()
        if "undecodable" in words:  # as PyAV says it, naming the path it was given
            raise ValueError(f"Invalid data found when processing input: '{spec.audio_path}'")
        if "refused" in words:
            raise AudioRefused("it lasts 10:00:00, longer than the limit of 4:00:00")
        return [] if "empty" in words else words

    def transcribe(self, model: Any, audio: Any, spec: wp.JobSpec) -> tuple[Iterable[Segment], AudioInfo]:
        words = list(audio)
        if "oom" in words:
            raise RuntimeError("CUDA failed with error out of memory (at /src/allocator.cc:42)")
        if "boom" in words:
            raise RuntimeError("something broke")
        options = dict(w.split("=", 1) for w in words if "=" in w)
        if "nan" in words:
            nan, inf = float("nan"), float("inf")
            word = Word(start=nan, end=inf, word=" x", probability=nan)
            first = Segment(id=1, start=nan, end=inf, text=" x", words=[word])
            return iter([first, Segment(id=2, start=1.0, end=nan, text=" y")]), AudioInfo("en", nan, inf)
        count = int(options.get("segments", 2))
        cancel_at = int(options["cancel-at"]) if "cancel-at" in options else None
        cancel_after_last = "cancel-after-last" in words
        return self._segments(spec.job_id, count, cancel_at, cancel_after_last), AudioInfo("en", 0.9, count)

    def _segments(
        self, job_id: int, count: int, cancel_at: int | None, cancel_after_last: bool
    ) -> Iterator[Segment]:
        for i in range(1, count + 1):
            if i == cancel_at:
                self._cancel(job_id)
            yield Segment(id=i, start=float(i - 1), end=float(i), text=f" {job_id}.{i}")
        if cancel_after_last:
            self._cancel(job_id)

    def _cancel(self, job_id: int) -> None:
        assert self.worker is not None
        self.worker.read_commands([wp.encode(wp.CancelJob(job_id=job_id))])


def job(
    job_id: int, script: str = "segments=2", model: str = "tiny.en", source: str = "src-tiny"
) -> wp.JobSpec:
    return wp.JobSpec(
        job_id=job_id, audio_path=script, model=model, model_source=source, language=None,
        task="transcribe", word_timestamps=False, beam_size=5, vad_filter=False,
    )  # fmt: skip


def batch(batch_id: int, *jobs: wp.JobSpec) -> wp.RunBatch:
    return wp.RunBatch(batch_id=batch_id, jobs=list(jobs))


class ScriptAudio:
    """The job's audio_path is its script: served as the audio file's content."""

    def open(self, batch_id: int, spec: wp.JobSpec) -> BinaryIO:
        return io.BytesIO(spec.audio_path.encode())

    def drain(self) -> None:
        pass


def run(
    *commands: wp.ToWorker, transcriber: FakeTranscriber | None = None, max_models: int = 2
) -> list[wp.FromWorker]:
    """Feed the commands (then the end of stdin), run the loop to its end, return what it sent."""
    transcriber = transcriber or FakeTranscriber()
    out = io.BytesIO()
    worker = Worker(out, transcriber, max_models, ScriptAudio())
    transcriber.worker = worker
    worker.read_commands([wp.encode(c) for c in commands])
    worker.run()
    return [wp.from_worker_decoder.decode(line) for line in out.getvalue().splitlines()]


def kinds(messages: Sequence[wp.FromWorker]) -> list[tuple[str, int | None]]:
    """Each message's type and the job (or batch) it is about."""
    out: list[tuple[str, int | None]] = []
    for m in messages:
        if isinstance(m, wp.Ready):
            out.append(("Ready", None))
        elif isinstance(m, wp.BatchDone):
            out.append(("BatchDone", m.batch_id))
        else:
            out.append((type(m).__name__, m.job_id))
    return out


def of_type(messages: Sequence[wp.FromWorker], kind: type[T]) -> list[T]:
    return [m for m in messages if isinstance(m, kind)]


# ---- message order ---------------------------------------------------------------------------------------


def test_two_job_batch_reports_in_order() -> None:
    messages = run(batch(7, job(1, "segments=2"), job(2, "segments=3")))
    assert kinds(messages) == [
        ("Ready", None),
        ("Started", 1), ("Progress", 1), ("Progress", 1), ("Finished", 1),
        ("Started", 2), ("Progress", 2), ("Progress", 2), ("Progress", 2), ("Finished", 2),
        ("BatchDone", 7),
    ]  # fmt: skip
    ready = messages[0]
    assert isinstance(ready, wp.Ready) and ready.models == []
    progress = [round(m.progress, 1) for m in of_type(messages, wp.Progress) if m.job_id == 2]
    assert progress == [33.3, 66.7, 99.9], "progress is capped below 100 until the result is sent"
    assert all(m.audio_duration_s == 3.0 for m in of_type(messages, wp.Progress) if m.job_id == 2)
    first, second = of_type(messages, wp.Finished)
    assert first.transcript.text == "1.1 1.2"
    assert [s.id for s in second.transcript.segments] == [1, 2, 3]
    assert second.transcript.language == "en" and second.transcript.duration_s == 3.0
    done = messages[-1]
    assert isinstance(done, wp.BatchDone) and done.models == ["tiny.en"]


def test_batches_run_one_after_another_and_the_loop_ends_with_stdin() -> None:
    messages = run(batch(1, job(1, "segments=1")), batch(2, job(2, "segments=1")))
    assert kinds(messages) == [
        ("Ready", None),
        ("Started", 1), ("Progress", 1), ("Finished", 1), ("BatchDone", 1),
        ("Started", 2), ("Progress", 2), ("Finished", 2), ("BatchDone", 2),
    ]  # fmt: skip


def test_a_preloaded_model_is_reported_ready_and_not_loaded_again() -> None:
    transcriber = FakeTranscriber()
    out = io.BytesIO()
    worker = Worker(out, transcriber, 2, ScriptAudio())
    worker.preload("tiny.en", "src-tiny")
    worker.read_commands([wp.encode(batch(1, job(1)))])
    worker.run()
    messages = [wp.from_worker_decoder.decode(line) for line in out.getvalue().splitlines()]
    ready = messages[0]
    assert isinstance(ready, wp.Ready) and ready.models == ["tiny.en"]
    assert transcriber.loads == ["src-tiny"]
    assert kinds(messages)[-2] == ("Finished", 1)


def test_a_preload_that_fails_leaves_the_worker_serving() -> None:
    transcriber = FakeTranscriber()
    transcriber.fail_loads["src-broken"] = OSError("no such model")
    out = io.BytesIO()
    worker = Worker(out, transcriber, 2, ScriptAudio())
    worker.preload("tiny.en", "src-broken")
    worker.read_commands([wp.encode(batch(1, job(1, source="src-tiny")))])
    worker.run()
    messages = [wp.from_worker_decoder.decode(line) for line in out.getvalue().splitlines()]
    ready = messages[0]
    assert isinstance(ready, wp.Ready) and ready.models == []
    assert ("Finished", 1) in kinds(messages)


# ---- cancels ---------------------------------------------------------------------------------------------


def test_a_job_cancelled_before_its_turn_is_stopped_without_starting() -> None:
    messages = run(batch(1, job(1), job(2)), wp.CancelJob(job_id=2))
    assert kinds(messages) == [
        ("Ready", None),
        ("Started", 1), ("Progress", 1), ("Progress", 1), ("Finished", 1),
        ("Stopped", 2),
        ("BatchDone", 1),
    ]  # fmt: skip
    (stopped,) = of_type(messages, wp.Stopped)
    assert stopped.reason == "cancelled"


def test_a_cancel_arriving_mid_transcription_stops_the_job_at_the_next_segment() -> None:
    messages = run(batch(1, job(1, "segments=5 cancel-at=3"), job(2, "segments=1")))
    assert kinds(messages) == [
        ("Ready", None),
        ("Started", 1), ("Progress", 1), ("Progress", 1), ("Stopped", 1),
        ("Started", 2), ("Progress", 2), ("Finished", 2),
        ("BatchDone", 1),
    ]  # fmt: skip
    stopped = of_type(messages, wp.Stopped)[0]
    assert stopped.reason == "cancelled"
    assert [m.job_id for m in of_type(messages, wp.Finished)] == [2], "the cancelled job sends no result"


def test_a_cancel_too_late_to_stop_the_job_does_not_poison_its_next_run() -> None:
    """A cancel that lands after the last segment: the job finishes, and a later run of the same job (a
    retry placed on this worker again) is not stopped by the stale cancel."""
    messages = run(batch(1, job(1, "segments=1 cancel-after-last")), batch(2, job(1, "segments=1")))
    assert kinds(messages) == [
        ("Ready", None),
        ("Started", 1), ("Progress", 1), ("Finished", 1), ("BatchDone", 1),
        ("Started", 1), ("Progress", 1), ("Finished", 1), ("BatchDone", 2),
    ]  # fmt: skip


# ---- failures --------------------------------------------------------------------------------------------


def test_out_of_memory_fails_the_job_and_hands_back_the_rest_of_the_batch() -> None:
    messages = run(
        batch(3, job(1, "segments=1"), job(2, "oom"), job(3), job(4)), batch(4, job(5, "segments=1"))
    )
    assert kinds(messages) == [
        ("Ready", None),
        ("Started", 1), ("Progress", 1), ("Finished", 1),
        ("Started", 2), ("Failed", 2),
        ("Stopped", 3), ("Stopped", 4),
        ("BatchDone", 3),
        ("Started", 5), ("Progress", 5), ("Finished", 5), ("BatchDone", 4),
    ]  # fmt: skip
    (failed,) = of_type(messages, wp.Failed)
    assert failed.kind == "oom"
    assert "out of memory" in failed.error
    assert [s.reason for s in of_type(messages, wp.Stopped)] == ["batch_stopped", "batch_stopped"]


def test_a_batch_mate_cancelled_after_an_out_of_memory_error_is_handed_back_once() -> None:
    messages = run(batch(1, job(1, "oom"), job(2)), wp.CancelJob(job_id=2))
    assert kinds(messages) == [
        ("Ready", None),
        ("Started", 1),
        ("Failed", 1),
        ("Stopped", 2),
        ("BatchDone", 1),
    ]
    assert [s.reason for s in of_type(messages, wp.Stopped)] == ["batch_stopped"]


def test_a_model_that_runs_out_of_memory_while_loading_fails_as_oom() -> None:
    transcriber = FakeTranscriber()
    transcriber.fail_loads["src-big"] = RuntimeError("CUDA failed with error out of memory")
    messages = run(batch(1, job(1, source="src-big"), job(2, source="src-big")), transcriber=transcriber)
    assert kinds(messages) == [
        ("Ready", None),
        ("Started", 1),
        ("Failed", 1),
        ("Stopped", 2),
        ("BatchDone", 1),
    ]
    assert of_type(messages, wp.Failed)[0].kind == "oom"


def test_a_model_that_cannot_be_loaded_fails_its_job_fatally_and_the_batch_goes_on() -> None:
    transcriber = FakeTranscriber()
    transcriber.fail_loads["no-such-dir"] = OSError("no such directory")
    messages = run(
        batch(1, job(1, source="no-such-dir"), job(2, model="base", source="src-base")),
        transcriber=transcriber,
    )
    assert kinds(messages) == [
        ("Ready", None),
        ("Started", 1), ("Failed", 1),
        ("Started", 2), ("Progress", 2), ("Progress", 2), ("Finished", 2),
        ("BatchDone", 1),
    ]  # fmt: skip
    failed = of_type(messages, wp.Failed)[0]
    assert failed.kind == "fatal"
    assert "tiny.en" in failed.error
    done = messages[-1]
    assert isinstance(done, wp.BatchDone) and done.models == ["base"], "the failed load left nothing loaded"


@pytest.mark.parametrize("script", ["undecodable", "empty"])
def test_audio_that_does_not_decode_or_holds_nothing_fails_fatally(script: str) -> None:
    transcriber = FakeTranscriber()
    messages = run(batch(1, job(1, script), job(2, "segments=1")), transcriber=transcriber)
    assert kinds(messages) == [
        ("Ready", None),
        ("Started", 1), ("Failed", 1),
        ("Started", 2), ("Progress", 2), ("Finished", 2),
        ("BatchDone", 1),
    ]  # fmt: skip
    assert of_type(messages, wp.Failed)[0].kind == "fatal"
    assert transcriber.loads == ["src-tiny"], "the model is loaded for the job that decodes only"


def test_another_error_while_transcribing_is_retryable_and_the_batch_goes_on() -> None:
    messages = run(batch(1, job(1, "boom"), job(2, "segments=1")))
    assert kinds(messages) == [
        ("Ready", None),
        ("Started", 1), ("Failed", 1),
        ("Started", 2), ("Progress", 2), ("Finished", 2),
        ("BatchDone", 1),
    ]  # fmt: skip
    failed = of_type(messages, wp.Failed)[0]
    assert failed.kind == "retryable" and failed.error == "something broke"


# ---- loaded models ---------------------------------------------------------------------------------------


def test_a_model_whose_source_changed_between_batches_is_loaded_afresh() -> None:
    """A reload points a model name at another source: the next batch must not run on the old weights."""
    transcriber = FakeTranscriber()
    messages = run(
        batch(1, job(1, model="custom", source="a")),
        batch(2, job(2, model="custom", source="b")),
        batch(3, job(3, model="custom", source="b")),
        transcriber=transcriber,
    )
    assert transcriber.loads == ["a", "b"]
    assert [m.models for m in of_type(messages, wp.BatchDone)] == [["custom"]] * 3


def test_the_same_name_and_source_is_loaded_once() -> None:
    transcriber = FakeTranscriber()
    run(batch(1, job(1), job(2)), batch(2, job(3)), transcriber=transcriber)
    assert transcriber.loads == ["src-tiny"]


def test_max_models_evicts_the_least_recently_used() -> None:
    transcriber = FakeTranscriber()
    messages = run(
        batch(1, job(1, model="a", source="src-a")),
        batch(2, job(2, model="b", source="src-b")),
        batch(3, job(3, model="a", source="src-a")),  # a is now the most recently used
        batch(4, job(4, model="c", source="src-c")),  # evicts b, not a
        batch(5, job(5, model="a", source="src-a")),
        batch(6, job(6, model="b", source="src-b")),  # loaded again, evicting c
        transcriber=transcriber,
    )
    assert transcriber.loads == ["src-a", "src-b", "src-c", "src-b"]
    assert [m.models for m in of_type(messages, wp.BatchDone)] == [
        ["a"], ["a", "b"], ["b", "a"], ["a", "c"], ["c", "a"], ["a", "b"],
    ]  # fmt: skip


def test_one_model_at_a_time_when_max_models_is_one() -> None:
    transcriber = FakeTranscriber()
    run(
        batch(
            1,
            job(1, model="a", source="src-a"),
            job(2, model="b", source="src-b"),
            job(3, model="a", source="src-a"),
        ),
        transcriber=transcriber,
        max_models=1,
    )
    assert transcriber.loads == ["src-a", "src-b", "src-a"]


# ---- what the user is told, and what the daemon can read ---------------------------------------------------


def named(job_id: int, script: str, filename: str = "talk.mp3", **limits: Any) -> wp.JobSpec:
    spec = job(job_id, script)
    return msgspec.structs.replace(spec, filename=filename, **limits)


def test_a_failure_names_the_submitted_file_and_never_the_spool_path() -> None:
    spool = "/var/lib/whisperd/spool/0f3c.audio"
    messages = run(batch(1, named(1, f"{spool} undecodable"), named(2, f"{spool} refused", "a b.wav")))
    first, second = of_type(messages, wp.Failed)
    assert (first.kind, second.kind) == ("fatal", "fatal")
    assert first.error.startswith("talk.mp3: ") and second.error.startswith("a b.wav: ")
    assert "spool" not in first.error and "spool" not in second.error


def test_a_transcript_over_the_result_limit_fails_its_job_fatally_and_the_batch_goes_on() -> None:
    big = named(1, "segments=40", max_result_bytes=1024)
    messages = run(batch(1, big, named(2, "segments=40", max_result_bytes=1024 * 1024)))
    assert kinds(messages) == [
        ("Ready", None),
        ("Started", 1), *[("Progress", 1)] * 40, ("Failed", 1),
        ("Started", 2), *[("Progress", 2)] * 40, ("Finished", 2),
        ("BatchDone", 1),
    ]  # fmt: skip
    (failed,) = of_type(messages, wp.Failed)
    assert failed.kind == "fatal" and failed.error.startswith("talk.mp3: ")


def test_times_and_probabilities_that_are_not_finite_are_sent_as_finite_numbers() -> None:
    """JSON has no NaN: msgspec writes null, which the daemon could not decode as a float."""
    messages = run(batch(1, job(1, "nan")))  # run() decodes every line as the daemon does
    (finished,) = of_type(messages, wp.Finished)
    t = finished.transcript
    floats = [t.language_probability, t.duration_s]
    for segment in t.segments:
        floats += [segment.start, segment.end]
        floats += [x for w in segment.words or [] for x in (w.start, w.end, w.probability)]
    assert all(math.isfinite(x) for x in floats)
    assert all(math.isfinite(m.progress) for m in of_type(messages, wp.Progress))
    assert [(s.start, s.end) for s in t.segments] == [(0.0, 0.0), (1.0, 1.0)]


# ---- audio as descriptors ----------------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_inbox_hands_out_each_jobs_descriptor_and_closes_those_never_opened(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    before = open_fds()
    for job_id, content in ((1, b"one"), (2, None), (3, b"three"), (4, b"four")):
        message = wp.AUDIO_MESSAGE.pack(7, job_id)
        if content is None:  # the daemon could not open it
            ours.send(message)
            continue
        path = tmp_path / f"audio-{job_id}"
        path.write_bytes(content)
        fd = os.open(path, os.O_RDONLY)
        socket.send_fds(ours, [message], [fd])
        os.close(fd)
    inbox = AudioInbox(theirs)
    with inbox.open(7, job(1)) as audio:
        assert audio.read() == b"one"
    with pytest.raises(FileNotFoundError):
        inbox.open(7, job(2))
    with inbox.open(7, job(4)) as audio:  # job 3 was skipped (cancelled): its descriptor is closed
        assert audio.read() == b"four"
    with pytest.raises(FileNotFoundError):
        inbox.open(7, job(5))  # nothing was passed for it
    inbox.drain()
    assert open_fds() == before, "every descriptor passed was closed"
    ours.close()
    theirs.close()


def test_jobs_of_a_batch_get_their_own_audio_and_the_unopened_rest_is_let_go(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    specs = [job(1, "segments=1"), job(2, "segments=1"), job(3, "segments=1")]
    for spec, script in zip(specs, ("segments=1", "segments=2", "segments=3"), strict=True):
        path = tmp_path / f"audio-{spec.job_id}"
        path.write_text(script)
        fd = os.open(path, os.O_RDONLY)
        socket.send_fds(ours, [wp.AUDIO_MESSAGE.pack(1, spec.job_id)], [fd])
        os.close(fd)
    out = io.BytesIO()
    worker = Worker(out, FakeTranscriber(), 2, AudioInbox(theirs))
    worker.read_commands([wp.encode(batch(1, *specs)), wp.encode(wp.CancelJob(job_id=3))])
    worker.run()
    messages = [wp.from_worker_decoder.decode(line) for line in out.getvalue().splitlines()]
    finished = {m.job_id: len(m.transcript.segments) for m in of_type(messages, wp.Finished)}
    assert finished == {1: 1, 2: 2}, "each job read its own file, not its audio_path"
    assert of_type(messages, wp.Stopped)[0].job_id == 3
    with pytest.raises(BlockingIOError):
        theirs.recv(64)  # the cancelled job's descriptor was taken off the socket (and closed)
    ours.close()
    theirs.close()
