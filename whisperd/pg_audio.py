"""A job's audio in PostgreSQL, so that any host can run a job another host accepted: stored by the
submitting host in chunks (`job_audio`, 1 MiB each: a row never grows past what a connection buffers
comfortably), read back by the host that runs it into a local cache of files.

Good for what whisperd accepts by default (a few hundred megabytes a file at most: four hours of 16 kHz
WAV are about 460 MB): the rows are written once and read once or twice, and deleted with their job. A
fleet that takes much larger files, or very many at once, wants a shared file system for them instead.

Each function is one transaction on a psycopg connection in autocommit mode, synchronous: the store runs
them off the event loop."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from whisperd.errors import StorageError

CHUNK_BYTES = 1024 * 1024


class AudioMissing(StorageError):
    """The job has no audio in the database (deleted with its job, or never stored)."""


def store(conn: Any, job_id: int, source: BinaryIO, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Copy the audio from source into the job's rows (replacing any); returns its size in bytes."""
    total = 0
    with conn.transaction():
        conn.execute("DELETE FROM job_audio WHERE job_id = %s", (job_id,))
        with conn.cursor().copy("COPY job_audio (job_id, seq, data) FROM STDIN") as copy:
            seq = 0
            while chunk := source.read(chunk_bytes):
                copy.write_row((job_id, seq, chunk))
                total += len(chunk)
                seq += 1
        conn.execute("UPDATE jobs SET audio_bytes = %s WHERE id = %s", (total, job_id))
    return total


def fetch(conn: Any, job_id: int, dest: BinaryIO) -> int:
    """Write the job's audio to dest, a chunk at a time (never the whole file in memory); its size."""
    total = seen = 0
    with conn.transaction(), conn.cursor(name=f"audio_{job_id}") as rows:
        rows.itersize = 4
        rows.execute("SELECT data FROM job_audio WHERE job_id = %s ORDER BY seq", (job_id,))
        for (data,) in rows:
            dest.write(data)
            total += len(data)
            seen += 1
    if seen == 0:
        raise AudioMissing(f"job {job_id} has no audio in the job database")
    return total


class AudioCache:
    """The audio of the jobs this host runs, as local files fetched once; the oldest go beyond a size."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, conn: Any, job_id: int) -> Path:
        """The job's audio as a local file, fetched on this connection if it is not here yet."""
        return self.fill(job_id, lambda out: fetch(conn, job_id, out))

    def where(self, job_id: int) -> Path:
        """Where the job's audio is (or will be, once filled)."""
        return self.folder / str(job_id)

    def fill(self, job_id: int, fetch_into: Callable[[BinaryIO], int]) -> Path:
        """The job's audio as a local file, fetched by fetch_into(file) if it is not here yet (written
        aside, then renamed: a fetch cut off never leaves a partial file under the job's name). Blocking."""
        target = self.where(job_id)
        if target.exists():
            os.utime(target)  # recently used: kept over older ones
            return target
        fd, partial = tempfile.mkstemp(dir=self.folder, prefix=".fetch-")
        try:
            with os.fdopen(fd, "wb") as out:
                fetch_into(out)
            os.replace(partial, target)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        self.trim(keep=target)
        return target

    def discard(self, job_id: int) -> None:
        (self.folder / str(job_id)).unlink(missing_ok=True)

    def trim(self, keep: Path | None = None) -> int:
        """Remove the least recently used files until the cache is within max_bytes; returns how many."""
        stats: dict[Path, os.stat_result] = {}
        for path in self.folder.iterdir():
            if path.name.startswith(".") or path == keep:
                continue
            try:
                stats[path] = path.stat()
            except FileNotFoundError:  # gone since the listing: discarded, or trimmed by another fetch
                continue
        used = sum(s.st_size for s in stats.values()) + (keep.stat().st_size if keep else 0)
        removed = 0
        for path in sorted(stats, key=lambda p: stats[p].st_mtime):
            if used <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            used -= stats[path].st_size
            removed += 1
        return removed
