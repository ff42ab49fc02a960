"""End to end on one shared daemon: whisperctl, the real socket, SQLite and faster-whisper (tiny.en) on
speech made with espeak-ng."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from whisperd import protocol as p
from whisperd.jobs import JobState

pytestmark = pytest.mark.e2e


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def heard(text: str, expected: set[str], share: float = 0.75) -> bool:
    """tiny.en mishears a word of espeak's now and then; most of the spoken words must come back."""
    return len(expected & words(text)) >= share * len(expected)


def test_submit_wait_prints_the_spoken_words(shared_daemon: DaemonProcess, speech: dict[str, Path]) -> None:
    done = shared_daemon.ctl("submit", str(speech["fox"]), "--wait")
    assert done.returncode == 0, done.stderr
    assert heard(done.stdout, {"quick", "fox", "over", "lazy", "dog"}), done.stdout
    assert "COMPLETED" in done.stderr  # progress lines


def test_several_files_and_every_result_format(shared_daemon: DaemonProcess, speech: dict[str, Path]) -> None:
    submitted = shared_daemon.ctl("submit", str(speech["weather"]), str(speech["report"]))
    assert submitted.returncode == 0, submitted.stderr
    ids = [int(line) for line in submitted.stdout.split()]
    assert len(ids) == 2
    waited = shared_daemon.ctl("wait", *map(str, ids), "--timeout", "120")
    assert waited.returncode == 0, waited.stderr
    srt = shared_daemon.ctl("result", str(ids[0]), "--format", "srt").stdout
    assert srt.startswith("1\n00:00:00,000 --> ") and heard(srt, {"tomorrow", "weather", "sunny", "breeze"})
    assert shared_daemon.ctl("result", str(ids[1]), "--format", "vtt").stdout.startswith("WEBVTT")
    tsv = shared_daemon.ctl("result", str(ids[1]), "--format", "tsv").stdout
    assert tsv.splitlines()[0] == "start\tend\ttext"
    body = json.loads(shared_daemon.ctl("result", str(ids[1]), "--format", "json").stdout)
    assert body["language"] == "en" and body["duration_s"] > 1 and body["segments"]
    assert heard(body["text"], {"please", "send", "report", "team", "before", "friday"})


def test_the_spooled_copy_survives_deleting_the_original(
    shared_daemon: DaemonProcess, speech: dict[str, Path], tmp_path: Path
) -> None:
    copy = tmp_path / "gone.wav"
    shutil.copy(speech["fox"], copy)
    [job] = shared_daemon.client.submit([str(copy)])
    copy.unlink()
    [final] = shared_daemon.wait_terminal([job.id])
    assert final.state is JobState.COMPLETED
    assert heard(shared_daemon.client.result(job.id).transcript.text, {"quick", "fox", "lazy", "dog"})


def test_status_json_carries_the_job_contract(shared_daemon: DaemonProcess, speech: dict[str, Path]) -> None:
    [job] = shared_daemon.client.submit([str(speech["fox"])], word_timestamps=True)
    shared_daemon.wait_terminal([job.id])
    out = shared_daemon.ctl("status", str(job.id), "--json")
    [row] = json.loads(out.stdout)
    for key in ("id", "state", "progress", "retries", "device", "model", "error", "created_at", "updated_at"):
        assert key in row
    assert row["state"] == "COMPLETED" and row["progress"] == 100 and row["device"].startswith("cpu")
    transcript = shared_daemon.client.result(job.id).transcript
    assert transcript.segments[0].words, "word timestamps were asked for"
    table = shared_daemon.ctl("status").stdout.splitlines()
    hosted = ["HOST"] if shared_daemon.job(job.id).host else []  # a host of a shared store names itself
    assert table[0].split() == ["ID", "STATE", "PROGRESS", "MODEL", *hosted, "DEVICE", "AGE", "FILE"]


def test_undecodable_audio_fails_at_once_without_retries(
    shared_daemon: DaemonProcess, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(os.urandom(4096))
    [job] = shared_daemon.client.submit([str(junk)])
    [final] = shared_daemon.wait_terminal([job.id])
    assert final.state is JobState.FAILED
    assert final.retries == 0
    assert final.error is not None and final.error.startswith(str(junk)), "it names what the user sent"
    assert "spool" not in final.error
    out = shared_daemon.ctl("result", str(job.id))
    assert out.returncode == 2 and "FAILED" in out.stderr


@pytest.mark.parametrize(
    ("kind", "message"), [("empty", "empty"), ("missing", "no such file"), ("directory", "directory")]
)
def test_bad_files_are_refused_with_a_clear_message(
    shared_daemon: DaemonProcess, tmp_path: Path, kind: str, message: str
) -> None:
    path = tmp_path if kind == "directory" else tmp_path / f"{kind}.wav"
    if kind == "empty":
        path.write_bytes(b"")
    before = len(shared_daemon.client.status())
    out = shared_daemon.ctl("submit", str(path))
    assert out.returncode == 2
    assert message in out.stderr.lower()
    assert len(shared_daemon.client.status()) == before, "nothing was queued"


def test_unknown_model_is_refused(shared_daemon: DaemonProcess, speech: dict[str, Path]) -> None:
    out = shared_daemon.ctl("submit", str(speech["fox"]), "--model", "no-such-model")
    assert out.returncode == 2 and "unknown model 'no-such-model'" in out.stderr and "tiny.en" in out.stderr


def test_cancel_while_processing_stops_the_job_and_frees_the_worker(
    shared_daemon: DaemonProcess, speech: dict[str, Path]
) -> None:
    [job] = shared_daemon.client.submit([str(speech["long"])], priority=10)
    shared_daemon.wait_state(job.id, JobState.PROCESSING)
    time.sleep(1.0)  # decoding under way: batched mode reports progress only as its calls end
    restarts = {w.id: w.restarts for w in shared_daemon.client.stats().workers}
    cancelled_at = time.monotonic()
    out = shared_daemon.ctl("cancel", str(job.id))
    assert out.returncode == 0, out.stderr
    final = shared_daemon.job(job.id)
    assert final.state is JobState.CANCELLED and final.error is None and final.progress < 100
    # The worker drops the job within a segment or the grace period, long before the three minutes of
    # speech could have been transcribed (tens of seconds here).
    shared_daemon.wait_for(
        lambda: all(not w.jobs for w in shared_daemon.client.stats().workers), 10, "workers idle after cancel"
    )
    assert time.monotonic() - cancelled_at < 8
    after = {w.id: w.restarts for w in shared_daemon.client.stats().workers}
    assert after == restarts, "the worker stopped the job itself: nobody had to kill it"
    again = shared_daemon.ctl("cancel", str(job.id))
    assert again.returncode == 2 and "already CANCELLED" in again.stderr


def test_a_worker_killed_mid_job_is_restarted_and_the_job_retried(
    shared_daemon: DaemonProcess, speech: dict[str, Path]
) -> None:
    [job] = shared_daemon.client.submit([str(speech["medium"])], priority=10)
    shared_daemon.wait_state(job.id, JobState.PROCESSING)
    [worker] = [w for w in shared_daemon.client.stats().workers if job.id in w.jobs]
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGKILL)
    final = shared_daemon.wait_terminal([job.id], timeout_s=300)[0]
    assert final.state is JobState.COMPLETED
    assert final.retries == 1
    assert heard(
        shared_daemon.client.result(job.id).transcript.text, {"budget", "office", "engineers", "summer"}
    )
    restarted = {w.id: w for w in shared_daemon.client.stats().workers}[worker.id]
    assert restarted.restarts >= 1 and restarted.pid != worker.pid


def test_watch_streams_snapshots_then_job_events(
    shared_daemon: DaemonProcess, speech: dict[str, Path]
) -> None:
    with shared_daemon.client.watch() as events:
        first, second = next(events), next(events)
        assert isinstance(first, p.DeviceSnapshot) and isinstance(second, p.SystemSnapshot)
        [job] = shared_daemon.client.submit([str(speech["fox"])])
        seen = []
        for event in events:
            if isinstance(event, p.JobEventReply) and event.job.id == job.id:
                seen.append(event.job.state)
                if event.job.state.terminal:
                    break
    assert seen[0] is JobState.PENDING and JobState.PROCESSING in seen and seen[-1] is JobState.COMPLETED


def test_stats_and_gpu_json(shared_daemon: DaemonProcess) -> None:
    stats = json.loads(shared_daemon.ctl("stats", "--json").stdout)
    assert set(stats["states"]) == {s.value for s in JobState}
    assert len(stats["workers"]) == 2
    devices = json.loads(shared_daemon.ctl("gpu", "--json").stdout)
    assert [d["name"] for d in devices] == ["cpu"]
    pong = shared_daemon.ctl("ping")
    assert pong.returncode == 0 and f"protocol {p.PROTOCOL_VERSION}" in pong.stdout


def test_a_prompt_and_a_temperature_reach_the_model_and_are_shown(
    shared_daemon: DaemonProcess, speech: dict[str, Path]
) -> None:
    prompt = "QUICK BROWN FOX, LAZY DOG."  # tiny.en follows its capitals: a sign that it read the prompt
    submitted = shared_daemon.ctl(
        "submit", str(speech["fox"]), "--prompt", prompt, "--temperature", "0", "--json"
    )
    assert submitted.returncode == 0, submitted.stderr
    [job] = json.loads(submitted.stdout)
    assert job["temperature"] == 0.0 and "prompt" not in job, "the queue shows the temperature, no prompt"
    [final] = shared_daemon.wait_terminal([job["id"]])
    assert final.state is JobState.COMPLETED and final.temperature == 0.0
    [row] = json.loads(shared_daemon.ctl("status", str(job["id"]), "--json").stdout)
    assert row["temperature"] == 0.0 and "prompt" not in row
    result = shared_daemon.client.result(job["id"])
    assert result.prompt == prompt and result.job.temperature == 0.0
    assert "QUICK BROWN FOX" in result.transcript.text, result.transcript.text
    refused = shared_daemon.ctl("submit", str(speech["fox"]), "--prompt", "x" * 4097)
    assert refused.returncode == 2 and "4096" in refused.stderr
