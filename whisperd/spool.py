"""The spool: a private copy of each submitted audio file, fsynced before the submit is acknowledged, so a job
never depends on the caller's file staying where it was."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid
from collections.abc import Container
from pathlib import Path

from whisperd.errors import InvalidAudio, StorageFull
from whisperd.statedir import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, narrow_mode

_COPY_CHUNK_BYTES = 1024 * 1024


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # Users' audio: the daemon's alone (0700, files 0600) whatever the umask; an older install's wider
        # modes are narrowed here, once, at start.
        self.directory.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        older_install = stat.S_IMODE(os.stat(self.directory).st_mode) & ~PRIVATE_DIR_MODE
        narrow_mode(self.directory, PRIVATE_DIR_MODE)
        if older_install:  # files made since under a private dir are 0600: a start costs no walk of them
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    narrow_mode(Path(entry.path), PRIVATE_FILE_MODE, follow_symlinks=False)

    def copy_from_fd(self, fd: int, max_bytes: int) -> tuple[str, int]:
        """Copy an open file into the spool and fsync its data; blocking, so the daemon runs it in a thread.
        Its name is made durable by sync_directory(), once for every copy made meanwhile (the durability
        barrier runs it before a submit is acknowledged). Only regular files: a pipe or a device could block
        or fill the spool forever."""
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise InvalidAudio(f"cannot read the audio: {exc.strerror}") from exc
        if stat.S_ISDIR(mode):
            raise InvalidAudio("that is a directory, not an audio file")
        if not stat.S_ISREG(mode):
            raise InvalidAudio("the audio must be a regular file, not a pipe, socket or device")
        target: Path | None = None
        size = 0
        try:
            out_fd, path = self.create()
            target = Path(path)
            with open(out_fd, "wb") as out:
                while chunk := os.read(fd, _COPY_CHUNK_BYTES):
                    size += len(chunk)
                    if size > max_bytes:
                        raise InvalidAudio(f"audio is larger than the limit of {max_bytes} bytes")
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if size == 0:
                raise InvalidAudio("the audio file is empty")
        except OSError as exc:
            if target is not None:
                target.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"no space left in {self.directory} to spool the audio") from exc
            if exc.errno == errno.EISDIR:
                raise InvalidAudio("that is a directory, not an audio file") from exc
            raise InvalidAudio(f"cannot read the audio: {exc.strerror}") from exc
        except BaseException:
            if target is not None:
                target.unlink(missing_ok=True)
            raise
        return str(target), size

    def create(self) -> tuple[int, str]:
        """A new spool file, open for writing (0600, a fresh name): the descriptor and the path. Its writer
        fsyncs it, and discards it on failure."""
        target = self.directory / f"{uuid.uuid4().hex}.audio"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(target, flags, PRIVATE_FILE_MODE), str(target)

    def sync_directory(self) -> None:
        """fsync the spool directory: the name of every file spooled so far survives a power cut (each copy
        fsynced its data). Blocking: the durability barrier runs it in its thread. Raises OSError."""
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self, path: str | None) -> None:
        if path:
            Path(path).unlink(missing_ok=True)

    def remove_orphans(self, names_in_use: Container[str], before: float | None = None) -> int:
        """Spool files of submits that crashed before their commit, or of jobs already finished: those not in
        use and, given `before` (a wall-clock time), last written before it, so that a file a submit spools
        while this runs is never taken for one. Blocking: run it in a thread."""
        removed = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name in names_in_use:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if before is None or entry.stat(follow_symlinks=False).st_mtime < before:
                        os.unlink(entry.path)
                        removed += 1
        return removed
