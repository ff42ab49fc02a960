"""The state dir is the daemon's alone: private modes whatever the umask, and one daemon at a time on it.

Socket users must not read each other's transcripts and audio, so the database and the spool are 0600 in
0700 directories: the socket's own mode is the only gate to the daemon. Two daemons on one state dir would
dispatch the same jobs and delete each other's spool files, so the first holds an exclusive lock on
`whisperd.lock` for its whole life, and a second refuses to start before it opens the database or binds a
socket.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from whisperd.errors import StateDirError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
SOCKET_DIR_MODE = 0o755  # clients must reach the socket; its own mode (and group) is the gate
LOCK_NAME = "whisperd.lock"


def narrow_mode(path: Path, mode: int, follow_symlinks: bool = True) -> None:
    """Take away every permission bit of an existing file or directory beyond `mode` (an install from an
    older version left 0750 and 0640); never widen it. A path that does not exist is left alone, and so is
    a symbolic link unless `follow_symlinks`."""
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
        if stat.S_ISLNK(st.st_mode):
            return
        current = stat.S_IMODE(st.st_mode)
        if current & ~mode:
            os.chmod(path, current & mode)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StateDirError(
            f"cannot make {path} private (mode {mode:#o}): {exc.strerror}; it must be the daemon user's"
        ) from exc


def prepare_state_dir(state_dir: Path) -> None:
    """Create the state dir 0700, or narrow an existing one to it."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    except OSError as exc:
        raise StateDirError(f"cannot create the state dir {state_dir}: {exc.strerror}") from exc
    if not state_dir.is_dir():
        raise StateDirError(f"the state dir {state_dir} is not a directory")
    narrow_mode(state_dir, PRIVATE_DIR_MODE)


def prepare_socket_dir(socket_path: Path) -> None:
    """Create the missing directories above the socket traversable (0755) despite the daemon's 0077 umask;
    existing ones are left as they are (a state dir that holds the socket stays private)."""
    missing = [d for d in (socket_path.parent, *socket_path.parent.parents) if not d.exists()]
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=SOCKET_DIR_MODE, exist_ok=True)
            os.chmod(directory, SOCKET_DIR_MODE)
        except OSError as exc:
            raise StateDirError(f"cannot create the socket's directory {directory}: {exc.strerror}") from exc


class StateDirLock:
    """An exclusive flock on `<state_dir>/whisperd.lock`, which also records the holder's pid. The file is
    never removed: were it unlinked, a third daemon could lock a new file while a second holds the old one."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, PRIVATE_FILE_MODE)
        except OSError as exc:
            raise StateDirError(f"cannot open the lock file {self.path}: {exc.strerror}") from exc
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StateDirError(f"the lock file {self.path} is not a regular file")
            narrow_mode(self.path, PRIVATE_FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StateDirError(f"cannot lock {self.path}: {exc.strerror}") from exc
                holder = _read_pid(fd)
                who = f"another whisperd (pid {holder})" if holder else "another whisperd"
                raise StateDirError(
                    f"{who} is already using the state dir {self.state_dir} (it holds {self.path}); "
                    "stop it first, or give this daemon its own daemon.state_dir"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the lock
            self._fd = None

    def __enter__(self) -> StateDirLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
