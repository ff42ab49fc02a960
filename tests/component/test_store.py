"""The store on a real SQLite file: atomic submits, transitions with their history, spool hygiene."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from whisperd.errors import InvalidAudio
from whisperd.jobs import JobState
from whisperd.store import NewJob, Store


def new_job(spool: str, priority: int = 0) -> NewJob:
    return NewJob(
        spool_path=spool, filename="a.wav", owner_uid=1000, model="tiny.en", language=None,
        task="transcribe", priority=priority, word_timestamps=False,
    )  # fmt: skip


def spool(store: Store, tmp_path: Path, data: bytes = b"RIFF....") -> str:
    source = tmp_path / f"src{len(list(tmp_path.iterdir()))}"
    source.write_bytes(data)
    fd = os.open(source, os.O_RDONLY)
    try:
        return store.spool_from_fd(fd, 1 << 20)[0]
    finally:
        os.close(fd)


def test_a_failed_submit_leaves_no_open_transaction(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    path = spool(store, tmp_path)
    with pytest.raises(OverflowError):
        store.insert_jobs([new_job(path), new_job(path, priority=2**64)], now=1.0)
    assert store.live_jobs() == [], "all or nothing"
    [job] = store.insert_jobs([new_job(path)], now=2.0)  # the store still works
    job.state, job.worker = JobState.PROCESSING, "cpu0"
    store.save_transition(job, JobState.PENDING, "dispatch")
    assert [h[1:4] for h in store.history(job.id)] == [
        (None, "PENDING", "submit"),
        ("PENDING", "PROCESSING", "dispatch"),
    ]
    store.close()
    reopened = Store(tmp_path / "state")
    assert [j.state for j in reopened.live_jobs()] == [JobState.PROCESSING]
    reopened.close()


def test_spool_refuses_empty_and_oversized_audio_and_cleans_up(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    with pytest.raises(InvalidAudio, match="empty"):
        spool(store, tmp_path, b"")
    source = tmp_path / "big"
    source.write_bytes(b"x" * 2048)
    fd = os.open(source, os.O_RDONLY)
    with pytest.raises(InvalidAudio, match="larger than the limit"):
        store.spool_from_fd(fd, 1024)
    os.close(fd)
    assert list(store.spool_dir.iterdir()) == []


def test_orphan_spool_files_go_and_live_ones_stay(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    kept = spool(store, tmp_path)
    orphan = spool(store, tmp_path)
    store.insert_jobs([new_job(kept)], now=1.0)
    assert store.remove_orphan_spool_files() == 1
    assert [p.name for p in store.spool_dir.iterdir()] == [Path(kept).name]
    assert not Path(orphan).exists()
