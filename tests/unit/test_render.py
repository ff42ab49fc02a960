from __future__ import annotations

from typing import Any

import msgspec
import pytest

from whisperctl.render import (
    FORMATS,
    devices_table,
    format_timestamp,
    format_transcript,
    job_event_line,
    job_failed_line,
    jobs_table,
    stats_text,
)
from whisperd.jobs import JobState
from whisperd.protocol import DeviceView, JobView, Segment, StatsView, Transcript, Word, WorkerView

GIB = 1024**3


def _transcript() -> Transcript:
    return Transcript(
        language="en",
        language_probability=0.98,
        duration_s=3700.0,
        text=" Hello there. Tab\there --> now Past the hour.",
        segments=[
            Segment(
                id=0,
                start=0.0,
                end=2.5,
                text=" Hello there.",
                words=[Word(start=0.0, end=0.4, word=" Hello", probability=0.9)],
            ),
            Segment(id=1, start=2.5, end=5.0015, text=" Tab\there --> now"),
            Segment(id=2, start=3661.25, end=3663.0, text=" Past the hour. "),
        ],
    )


def _job(**overrides: Any) -> JobView:
    fields: dict[str, Any] = {
        "id": 7,
        "state": JobState.PROCESSING,
        "progress": 42.0,
        "retries": 0,
        "device": "cpu",
        "worker": "cpu0",
        "model": "small",
        "language": None,
        "task": "transcribe",
        "priority": 0,
        "word_timestamps": False,
        "error": None,
        "filename": "/home/u/audio/talk.wav",
        "owner_uid": 1000,
        "audio_duration_s": None,
        "created_at": 1000.0,
        "updated_at": 1000.0,
        "started_at": None,
        "finished_at": None,
    }
    fields.update(overrides)
    return JobView(**fields)


# ---- timestamps --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "decimal", "expected"),
    [
        (0, ",", "00:00:00,000"),
        (1.0005, ",", "00:00:01,001"),  # half rounds up, not to even
        (1.0004, ".", "00:00:01.000"),
        (59.9996, ".", "00:01:00.000"),  # rounding carries into minutes
        (3661.25, ",", "01:01:01,250"),
        (36000.0, ".", "10:00:00.000"),
        (-0.5, ",", "00:00:00,000"),
    ],
)
def test_format_timestamp(seconds: float, decimal: str, expected: str) -> None:
    assert format_timestamp(seconds, decimal) == expected


# ---- transcripts -------------------------------------------------------------------------------------


def test_txt() -> None:
    assert format_transcript(_transcript(), "txt") == "Hello there.\nTab\there --> now\nPast the hour.\n"


def test_srt() -> None:
    assert format_transcript(_transcript(), "srt") == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n"
        "\n"
        "2\n00:00:02,500 --> 00:00:05,002\nTab\there -> now\n"
        "\n"
        "3\n01:01:01,250 --> 01:01:03,000\nPast the hour.\n"
    )


def test_vtt() -> None:
    assert format_transcript(_transcript(), "vtt") == (
        "WEBVTT\n"
        "\n"
        "00:00:00.000 --> 00:00:02.500\nHello there.\n"
        "\n"
        "00:00:02.500 --> 00:00:05.002\nTab\there -> now\n"
        "\n"
        "01:01:01.250 --> 01:01:03.000\nPast the hour.\n"
    )


def test_tsv() -> None:
    assert format_transcript(_transcript(), "tsv") == (
        "start\tend\ttext\n"
        "0\t2500\tHello there.\n"
        "2500\t5002\tTab here --> now\n"
        "3661250\t3663000\tPast the hour.\n"
    )


def test_json_round_trips() -> None:
    transcript = _transcript()
    out = format_transcript(transcript, "json")
    assert out.endswith("}\n")
    assert '\n  "language": "en",' in out  # pretty-printed with two-space indent
    assert msgspec.json.decode(out, type=Transcript) == transcript


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_ends_with_newline(fmt: str) -> None:
    assert format_transcript(_transcript(), fmt).endswith("\n")


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [("txt", ""), ("srt", ""), ("vtt", "WEBVTT\n"), ("tsv", "start\tend\ttext\n")],
)
def test_empty_transcript(fmt: str, expected: str) -> None:
    empty = Transcript(language="en", language_probability=1.0, duration_s=0.0, text="", segments=[])
    assert format_transcript(empty, fmt) == expected


@pytest.mark.parametrize("fmt", ["", "SRT", "docx"])
def test_unknown_format_raises(fmt: str) -> None:
    with pytest.raises(ValueError, match="unknown format"):
        format_transcript(_transcript(), fmt)


def test_formats_constant() -> None:
    assert FORMATS == ("txt", "srt", "vtt", "tsv", "json")


# ---- jobs --------------------------------------------------------------------------------------------


def test_jobs_table_empty_is_header_only() -> None:
    assert jobs_table([], now=0.0) == "ID  STATE  PROGRESS  MODEL  DEVICE  AGE  FILE\n"


def test_jobs_table_columns() -> None:
    jobs = [
        _job(),
        _job(
            id=12,
            state=JobState.PENDING,
            progress=0.0,
            device=None,
            worker=None,
            model="large-v3",
            filename="meeting.mp3",
            created_at=1000.0 - 3 * 3600,
        ),
    ]
    assert jobs_table(jobs, now=1005.0) == (
        "ID  STATE       PROGRESS  MODEL     DEVICE  AGE  FILE\n"
        "7   PROCESSING  42%       small     cpu     5s   talk.wav\n"
        "12  PENDING     0%        large-v3  -       3h   meeting.mp3\n"
    )


def test_jobs_table_shows_hosts_with_a_shared_store() -> None:
    jobs = [
        _job(host="gpu-b"),
        _job(id=12, state=JobState.PENDING, progress=0.0, device=None, worker=None, filename="m.mp3"),
    ]
    assert jobs_table(jobs, now=1005.0) == (
        "ID  STATE       PROGRESS  MODEL  HOST   DEVICE  AGE  FILE\n"
        "7   PROCESSING  42%       small  gpu-b  cpu     5s   talk.wav\n"
        "12  PENDING     0%        small  -      -       5s   m.mp3\n"
    )


@pytest.mark.parametrize(
    ("age_s", "expected"),
    [
        (0, "0s"),
        (5.9, "5s"),
        (59, "59s"),
        (60, "1m"),
        (3 * 60 + 59, "3m"),
        (2 * 3600, "2h"),
        (86_399, "23h"),
        (4 * 86_400 + 5, "4d"),
        (-10, "0s"),  # client clock behind the daemon's
    ],
)
def test_jobs_table_age(age_s: float, expected: str) -> None:
    row = jobs_table([_job(created_at=1000.0)], now=1000.0 + age_s).splitlines()[1]
    assert row.split()[5] == expected


@pytest.mark.parametrize(
    ("progress", "expected"), [(0.0, "0%"), (42.7, "42%"), (99.9, "99%"), (100.0, "100%")]
)
def test_jobs_table_progress(progress: float, expected: str) -> None:
    row = jobs_table([_job(progress=progress)], now=1000.0).splitlines()[1]
    assert row.split()[2] == expected


# ---- devices -----------------------------------------------------------------------------------------


def test_devices_table() -> None:
    cpu = DeviceView(
        name="cpu",
        index=None,
        uuid=None,
        healthy=True,
        memory_total_bytes=None,
        memory_used_bytes=None,
        memory_free_bytes=None,
        memory_reserved_bytes=0,
        memory_available_bytes=None,
        utilization_ratio=None,
        temperature_c=None,
        power_w=None,
        workers=1,
        running_batches=0,
    )
    gpu = DeviceView(
        name="cuda:0",
        index=0,
        uuid="GPU-abc",
        healthy=False,
        memory_total_bytes=80 * GIB,
        memory_used_bytes=int(3.2 * GIB),
        memory_free_bytes=int(76.8 * GIB),
        memory_reserved_bytes=4 * GIB,
        memory_available_bytes=int(72.8 * GIB),
        utilization_ratio=0.87,
        temperature_c=61.4,
        power_w=250.2,
        workers=2,
        running_batches=1,
    )
    assert devices_table([cpu, gpu]) == (
        "DEVICE  HEALTHY  UTIL  MEM USED/TOTAL  AVAILABLE  RESERVED  TEMP  POWER  WORKERS  BATCHES\n"
        "cpu     yes      -     -               -          0.0 GiB   -     -      1        0\n"
        "cuda:0  no       87%   3.2/80.0 GiB    72.8 GiB   4.0 GiB   61C   250W   2        1\n"
    )


def test_devices_table_shows_hosts_with_a_shared_store() -> None:
    def cpu(host: str) -> DeviceView:
        return DeviceView(
            name="cpu", index=None, uuid=None, healthy=True, memory_total_bytes=None, memory_used_bytes=None,
            memory_free_bytes=None, memory_reserved_bytes=0, memory_available_bytes=None,
            utilization_ratio=None, temperature_c=None, power_w=None, workers=1, running_batches=0, host=host,
        )  # fmt: skip

    assert devices_table([cpu("a"), cpu("host-b")]) == (
        "HOST    DEVICE  HEALTHY  UTIL  MEM USED/TOTAL  AVAILABLE  RESERVED  TEMP  POWER  WORKERS  BATCHES\n"
        "a       cpu     yes      -     -               -          0.0 GiB   -     -      1        0\n"
        "host-b  cpu     yes      -     -               -          0.0 GiB   -     -      1        0\n"
    )


# ---- stats -------------------------------------------------------------------------------------------


def _stats(**overrides: Any) -> StatsView:
    fields: dict[str, Any] = {
        "states": {"COMPLETED": 10, "PENDING": 3, "PROCESSING": 1},
        "queue_depth": 3,
        "running_jobs": 1,
        "workers": [
            WorkerView(
                id="w0",
                device="cuda:0",
                pid=4242,
                state="busy",
                models=["small", "large-v3"],
                jobs=[7, 8],
                restarts=1,
            ),
            WorkerView(id="w1", device="cpu", pid=None, state="starting", models=[], jobs=[], restarts=0),
        ],
        "uptime_s": 2 * 3600 + 5 * 60 + 3,
        "audio_seconds_total": 3600.0,
        "processing_seconds_total": 300.0,
        "realtime_factor": 12.0,
    }
    fields.update(overrides)
    return StatsView(**fields)


def test_stats_text() -> None:
    text = stats_text(_stats())
    lines = text.splitlines()
    assert lines[0] == "jobs: PENDING 3  PROCESSING 1  RETRYING 0  COMPLETED 10  FAILED 0  CANCELLED 0"
    for state in JobState:
        assert state.value in lines[0]
    assert "queue depth: 3" in text
    assert "running: 1" in text
    assert "uptime: 2h05m03s" in text
    assert "3600.0s" in text
    assert "12.0x" in text
    assert text.endswith(
        "WORKER  DEVICE  PID   STATE     MODELS          JOBS  RESTARTS\n"
        "w0      cuda:0  4242  busy      small,large-v3  7,8   1\n"
        "w1      cpu     -     starting  -               -     0\n"
    )


def test_stats_text_without_realtime_factor_or_workers() -> None:
    text = stats_text(_stats(realtime_factor=None, workers=[], states={}))
    assert "realtime factor: -" in text
    assert "PENDING 0  PROCESSING 0  RETRYING 0  COMPLETED 0  FAILED 0  CANCELLED 0" in text
    assert text.endswith("\nWORKER  DEVICE  PID  STATE  MODELS  JOBS  RESTARTS\n")


def test_stats_text_shows_hosts_with_a_shared_store() -> None:
    workers = [
        WorkerView(id="w0", device="cuda:0", pid=10, state="busy", models=["small"], jobs=[7], restarts=0,
                   host="a"),
        WorkerView(id="w0", device="cuda:0", pid=11, state="idle", models=[], jobs=[], restarts=0,
                   host="host-b"),
    ]  # fmt: skip
    assert stats_text(_stats(workers=workers)).endswith(
        "WORKER  HOST    DEVICE  PID  STATE  MODELS  JOBS  RESTARTS\n"
        "w0      a       cuda:0  10   busy   small   7     0\n"
        "w0      host-b  cuda:0  11   idle   -       -     0\n"
    )


# ---- watch lines -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, "job 7 PROCESSING 42% cpu0 talk.wav"),
        (
            {"state": JobState.PENDING, "progress": 0.0, "device": None, "worker": None},
            "job 7 PENDING 0% - talk.wav",
        ),
        (
            {"state": JobState.FAILED, "error": "audio does not decode"},
            "job 7 FAILED 42% cpu0 talk.wav: audio does not decode",
        ),
        ({"host": "gpu-b"}, "job 7 PROCESSING 42% cpu0@gpu-b talk.wav"),  # a shared store
        ({"host": "gpu-b", "worker": None, "device": None}, "job 7 PROCESSING 42% gpu-b talk.wav"),
    ],
)
def test_job_event_line(overrides: dict[str, Any], expected: str) -> None:
    assert job_event_line(_job(**overrides)) == expected


# ---- untrusted text ----------------------------------------------------------------------------------

# What a user may name a file (a job of an older daemon, or any label sent by another client): a terminal
# escape that clears the screen, a forged line, a bidi override that reverses what follows.
HOSTILE_NAME = "/home/u/\x1b[2J\x1b]0;pwned\x07ok\nFAKE 99 COMPLETED\r\u202ewav.exe"
HOSTILE_ERROR = "bad audio\n\x1b[31mjob 8 COMPLETED\x1b[0m"


def _unsafe(text: str) -> list[str]:
    return [c for c in text if c in "\x1b\x07\r\u202e"]


def test_jobs_table_escapes_file_names() -> None:
    table = jobs_table([_job(filename=HOSTILE_NAME), _job(id=8)], now=1000.0)
    assert not _unsafe(table)
    lines = table.splitlines()
    assert len(lines) == 3, "one line per job, whatever its name"
    assert lines[1].endswith("\\x1b[2J\\x1b]0;pwned\\x07ok\\x0aFAKE 99 COMPLETED\\x0d\\u202ewav.exe")


def test_job_event_line_escapes_names_and_errors() -> None:
    line = job_event_line(_job(filename=HOSTILE_NAME, state=JobState.FAILED, error=HOSTILE_ERROR))
    assert not _unsafe(line) and "\n" not in line
    assert line.endswith(": bad audio\\x0a\\x1b[31mjob 8 COMPLETED\\x1b[0m")


def test_job_failed_line_escapes_names_and_errors() -> None:
    line = job_failed_line(_job(filename=HOSTILE_NAME, state=JobState.FAILED, error=HOSTILE_ERROR))
    assert not _unsafe(line) and "\n" not in line
    assert line.startswith("job 7 FAILED: bad audio\\x0a\\x1b[31m")


def test_host_names_are_escaped() -> None:
    assert not _unsafe(jobs_table([_job(host="h\x1b[2J")], now=1000.0))
    assert not _unsafe(job_event_line(_job(host="h\r\u202e")))


def test_stats_text_escapes_what_it_shows() -> None:
    worker = WorkerView(
        id="w\x1b[1m", device="cpu", pid=1, state="idle", models=["m\nx"], jobs=[], restarts=0
    )
    text = stats_text(_stats(workers=[worker]))
    assert not _unsafe(text)
    assert "w\\x1b[1m" in text and "m\\x0ax" in text
