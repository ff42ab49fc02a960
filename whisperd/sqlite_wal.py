"""The SQLite store's write-ahead log: made durable and kept short, off the event loop.

The store's connection commits with synchronous=NORMAL and never checkpoints by itself (wal_autocheckpoint=0):
a commit only writes its frames into the -wal file, tens of microseconds on the loop, and is not durable yet.
It is once the -wal file has been fsynced after it (`sync_wal`, in the durability barrier's thread), or once a
checkpoint has copied it into the database file (SQLite syncs the WAL before a checkpoint and the database
after it).

Checkpoints run PASSIVE in a thread, on a connection of their own (`Checkpointer`): they never wait for the
loop's writes nor make them wait. But the WAL only starts over from its beginning when a commit finds every
frame copied, which never happens while commits keep arriving during each checkpoint: under a steady stream
of submits it would grow without end (measured: 900 commits/s and a checkpoint a second, 40 MB in 5 s, and
on). So once the WAL passes its limit, `restart` copies on the store's own connection, between two commits,
the few frames the thread's latest checkpoint could not: the next commit then starts the WAL over, and
journal_size_limit truncates the file back to the limit. That costs the loop the copy of those frames and
two fsyncs (about 1 ms measured), once per limit's worth of WAL, and only while commits never pause."""

from __future__ import annotations

import os
import sqlite3
import struct
import sys
import threading
from pathlib import Path

WAL_LIMIT_BYTES = 64 * 1024 * 1024  # past this the WAL is made to start over, and truncated back to it
# A checkpoint waits until the WAL holds this much not yet copied: each one that completes makes the next
# commit start the WAL over, and SQLite syncs the new WAL header then, on the loop (a small fdatasync).
CHECKPOINT_MIN_BYTES = 4 * 1024 * 1024
_FRAME_HEADER_BYTES = 24
_WAL_INDEX_VERSION = 3007000


def wal_path(db_path: Path) -> Path:
    return Path(f"{db_path}-wal")


def sync_wal(db_path: Path) -> None:
    """fdatasync the WAL file: every commit written into it before the call is durable when this returns.
    Blocking: run it in a thread. Through a descriptor of its own, opened each time, so that it is always
    the file SQLite writes now."""
    try:
        fd = os.open(wal_path(db_path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # no WAL: the last connection to close copied every commit into the database and synced it
    try:
        os.fdatasync(fd)  # the data and the size that reads need, as SQLite syncs it itself
    finally:
        os.close(fd)


def limit_wal(db: sqlite3.Connection, limit_bytes: int) -> None:
    """When the WAL starts over, its file is truncated back to limit_bytes (it keeps its size otherwise)."""
    db.execute(f"PRAGMA journal_size_limit={int(limit_bytes)}").fetchall()


def restart(db: sqlite3.Connection, limit_bytes: int) -> None:
    """On the connection that writes, between two commits: copy what is left of the WAL, so that the next
    commit starts it over. PASSIVE, so it never waits for a lock; fetchall, so that no statement is left
    open to hold a read lock that keeps the WAL from starting over."""
    limit_wal(db, limit_bytes)
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


class Checkpointer:
    """PASSIVE checkpoints on a connection of its own, from one thread at a time (a lock keeps run and close
    apart). The connection is opened at the first run, in that thread."""

    def __init__(
        self, db_path: Path, limit_bytes: int = WAL_LIMIT_BYTES, min_bytes: int = CHECKPOINT_MIN_BYTES
    ) -> None:
        self._path = db_path
        self.limit_bytes = limit_bytes
        self.min_bytes = min_bytes
        self._db: sqlite3.Connection | None = None
        self._frame_bytes = 0
        self._lock = threading.Lock()
        self._closed = False

    def run(self) -> bool:
        """One checkpoint; True when the WAL still holds more than the limit, so that only restart() on the
        writing connection lets it start over. Raises sqlite3.Error."""
        with self._lock:
            if self._closed or not self._worth_it():
                return False
            if self._db is None:
                db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA synchronous=NORMAL")  # the WAL synced before the copy, the database after
                [(page_bytes,)] = db.execute("PRAGMA page_size").fetchall()
                self._db, self._frame_bytes = db, page_bytes + _FRAME_HEADER_BYTES
            [(_busy, frames, _copied)] = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        return int(frames) * self._frame_bytes > self.limit_bytes

    def _worth_it(self) -> bool:
        """Something to copy, and either enough of it or a WAL past its limit (which must start over)."""
        index = self._wal_index()
        if index is None:
            return True
        frames, copied, frame_bytes = index
        if frames <= copied:
            return False  # all copied: the next commit starts the WAL over by itself
        return (frames - copied) * frame_bytes >= self.min_bytes or frames * frame_bytes > self.limit_bytes

    def pending_bytes(self) -> int:
        """What the WAL holds that no checkpoint copied yet (unknown: sys.maxsize)."""
        index = self._wal_index()
        if index is None:
            return sys.maxsize
        frames, copied, frame_bytes = index
        return max(0, frames - copied) * frame_bytes

    def _wal_index(self) -> tuple[int, int, int] | None:
        """(frames in the WAL, frames copied, bytes a frame), from the wal-index header in the -shm file (its
        documented layout, https://www.sqlite.org/walformat.html: native byte order, szPage at 14, mxFrame
        at 16, nBackfill at 96); None if unreadable."""
        try:
            with open(f"{self._path}-shm", "rb", buffering=0) as shm:
                head = shm.read(100)
        except OSError:
            return None
        if len(head) < 100 or struct.unpack_from("=I", head, 0)[0] != _WAL_INDEX_VERSION:
            return None
        page: int = struct.unpack_from("=H", head, 14)[0]
        frames: int = struct.unpack_from("=I", head, 16)[0]
        copied: int = struct.unpack_from("=I", head, 96)[0]
        page_bytes = 65536 if page == 1 else page  # how a 64 KiB page size is written in 16 bits
        return frames, copied, page_bytes + _FRAME_HEADER_BYTES

    def close(self) -> None:
        """After a run in progress ends; none runs after."""
        with self._lock:
            self._closed = True
            if self._db is not None:
                self._db.close()
                self._db = None
