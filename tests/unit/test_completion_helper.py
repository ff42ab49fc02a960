"""`whisperctl __complete KIND`: which jobs each kind lists (newest first, at most MAX_IDS), whose jobs a
user is offered to cancel or read, and silence on every failure. The client is a fake holding jobs."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest

from whisperctl import completion
from whisperd import protocol as p
from whisperd.errors import WhisperdError
from whisperd.jobs import JobState

ME, OTHER = 1000, 1001


def view(job_id: int, state: JobState, owner: int = ME) -> p.JobView:
    return p.JobView(
        id=job_id, state=state, progress=0.0, retries=0, device=None, worker=None, model="tiny.en",
        language=None, task="transcribe", priority=0, word_timestamps=False, error=None, filename="a.wav",
        owner_uid=owner, audio_duration_s=None, created_at=0.0, updated_at=0.0, started_at=None,
        finished_at=None,
    )  # fmt: skip


JOBS = [
    view(1, JobState.COMPLETED),
    view(2, JobState.COMPLETED, OTHER),
    view(3, JobState.PENDING, OTHER),
    view(4, JobState.PROCESSING),
    view(5, JobState.CANCELLED),
    view(6, JobState.RETRYING),
    view(7, JobState.FAILED),
]


class FakeClient:
    sockets: list[str | None] = []
    broken: WhisperdError | OSError | None = None

    def __init__(self, socket_path: str | None = None, timeout_s: float | None = 600.0) -> None:
        FakeClient.sockets.append(socket_path)
        assert timeout_s is not None and timeout_s <= 5, "a completion never waits long"

    def status(self, ids: Sequence[int] = (), state: str | None = None, limit: int = 1000) -> list[p.JobView]:
        if self.broken is not None:
            raise self.broken
        found = [j for j in reversed(JOBS) if state is None or j.state.value == state]  # newest first
        return found[:limit]

    def ping(self) -> p.Pong:
        if self.broken is not None:
            raise self.broken
        return p.Pong(version="test", models=["base", "tiny.en"])


def ask(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str, uid: int = ME
) -> list[str]:
    monkeypatch.setattr(completion, "Client", FakeClient)
    monkeypatch.setattr(os, "getuid", lambda: uid)
    status = completion.answer(list(argv))
    out = capsys.readouterr()
    assert out.err == ""
    assert status == 0 or out.out == "", "silent on failure"
    return out.out.splitlines() if status == 0 else ["exit 1"]


def test_each_kind_lists_its_jobs_newest_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ask(monkeypatch, capsys, "__complete", "jobs") == ["7", "6", "5", "4", "3", "2", "1"]
    assert ask(monkeypatch, capsys, "__complete", "live-jobs") == ["6", "4", "3"]
    assert ask(monkeypatch, capsys, "__complete", "my-live-jobs") == ["6", "4"], "not another user's job"
    assert ask(monkeypatch, capsys, "__complete", "my-results") == ["1"]
    assert ask(monkeypatch, capsys, "__complete", "my-results", uid=0) == ["2", "1"], "root reads any"
    assert ask(monkeypatch, capsys, "__complete", "models") == ["base", "tiny.en"]


def test_the_socket_on_the_line_is_used(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    FakeClient.sockets = []
    ask(monkeypatch, capsys, "--socket", "/tmp/a.sock", "__complete", "jobs")
    ask(monkeypatch, capsys, "--socket=/tmp/b.sock", "__complete", "jobs")
    ask(monkeypatch, capsys, "__complete", "jobs")
    assert FakeClient.sockets == ["/tmp/a.sock", "/tmp/b.sock", None]


@pytest.mark.parametrize("error", [WhisperdError("down"), ConnectionResetError(), TimeoutError()])
def test_any_failure_is_silent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: WhisperdError | OSError
) -> None:
    monkeypatch.setattr(FakeClient, "broken", error)
    assert ask(monkeypatch, capsys, "__complete", "live-jobs") == ["exit 1"]
    assert ask(monkeypatch, capsys, "__complete", "models") == ["exit 1"]


def test_unknown_or_missing_kinds_are_silent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ask(monkeypatch, capsys, "__complete") == ["exit 1"]
    assert ask(monkeypatch, capsys, "__complete", "nothing") == ["exit 1"]
    assert ask(monkeypatch, capsys, "__complete", "jobs", "extra") == ["exit 1"]


def test_a_pong_from_a_daemon_older_than_models_decodes_with_none() -> None:
    pong = p.decode_reply(b'{"reply":"pong","ok":true,"version":"0.1.0","protocol":3}')
    assert isinstance(pong, p.Pong) and pong.models == []
