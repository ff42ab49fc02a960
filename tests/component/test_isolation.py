"""The daemon's files are its own: another Unix user who may use the socket (through its group, and even as
a member of the daemon's own group) reads neither the database nor the spool, whatever umask the daemon
inherited and whatever modes an older install left; and one state dir serves one daemon at a time."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.support import users
from tests.support.daemon import DaemonProcess
from whisperd import protocol as p
from whisperd.errors import StateDirError
from whisperd.jobs import JobState
from whisperd.statedir import LOCK_NAME, StateDirLock

IDLE = {"daemon": {"socket_mode": 0o660}, "workers": {"cpu_workers": 0}}  # jobs stay PENDING, spooled
DB_FILES = ("jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm")


@dataclass(frozen=True)
class Stranger:
    """A throwaway Unix user: not root, not the daemon's user."""

    name: str
    uid: int
    gid: int


@pytest.fixture
def stranger() -> Iterator[Stranger]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second Unix user")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("needs useradd and userdel to create a second Unix user")
    name = f"whisperd-test-{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    try:
        entry = pwd.getpwnam(name)
        yield Stranger(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=60)  # its user group goes with it


def as_user(who: Stranger, action: Callable[[], object], groups: list[int] | None = None) -> Any:
    return users.as_user(who.uid, action, gid=who.gid, groups=groups or [])


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory anyone may traverse, so that only the daemon's own modes stand between the stranger and
    its files (pytest's tmp_path lies under a 0700 directory, which would hide them anyway)."""
    path = Path(tempfile.mkdtemp(prefix="wd-iso-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def read(path: Path) -> None:
    with open(path, "rb") as file:
        file.read(1)


def readable_clip(daemon: DaemonProcess, speech: dict[str, Path]) -> Path:
    path = daemon.socket.parent / "fox.wav"
    shutil.copy(speech["fox"], path)
    path.chmod(0o644)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def private_modes(state_dir: Path) -> dict[str, int]:
    """The mode of every file and directory the daemon keeps in its state dir (not the test's config and
    log, which DaemonProcess writes there)."""
    paths = [state_dir, state_dir / "spool", state_dir / LOCK_NAME, *(state_dir / n for n in DB_FILES)]
    paths += sorted((state_dir / "spool").iterdir())
    return {str(path.relative_to(state_dir.parent)): mode(path) for path in paths if path.exists()}


def expected_private(state_dir: Path) -> dict[str, int]:
    return {name: 0o700 if (state_dir.parent / name).is_dir() else 0o600 for name in private_modes(state_dir)}


def test_a_socket_user_reads_neither_the_database_nor_the_spool(
    open_dir: Path, stranger: Stranger, speech: dict[str, Path]
) -> None:
    daemon = DaemonProcess(open_dir / "state", IDLE).start()
    try:
        jobs = daemon.client.submit([str(readable_clip(daemon, speech))] * 2)
        state = daemon.state_dir
        spooled = sorted((state / "spool").iterdir())
        assert len(spooled) == 2 and all((state / name).exists() for name in DB_FILES)
        # a member of the daemon's own group too (the old README's advice): its group opens nothing either
        groups = [os.getgid()]
        for path in [*(state / name for name in DB_FILES), state / LOCK_NAME, *spooled]:
            assert as_user(stranger, partial(read, path), groups) == {"os_error": "EACCES"}, path
        for folder in (state, state / "spool"):
            assert as_user(stranger, partial(os.listdir, folder), groups) == {"os_error": "EACCES"}, folder
        assert private_modes(state) == expected_private(state), "modes alone keep them out, not the path"
        assert [j.state for j in daemon.client.status([j.id for j in jobs])] == [JobState.PENDING] * 2
    finally:
        assert daemon.stop() == 0


def test_a_member_of_the_socket_group_can_submit_but_not_touch_other_jobs(
    open_dir: Path, stranger: Stranger, speech: dict[str, Path]
) -> None:
    """The socket is 0660 and reached through its group alone, as whisperd-clients reaches it."""
    daemon = DaemonProcess(open_dir / "state", IDLE).start()
    try:
        os.chown(daemon.socket, -1, stranger.gid)
        clip = readable_clip(daemon, speech)
        client = daemon.client
        [roots] = client.submit([str(clip)])
        [theirs] = as_user(stranger, lambda: [j.id for j in client.submit([str(clip)])])["ok"]
        assert daemon.job(theirs).owner_uid == stranger.uid

        def cancel_both() -> object:
            reply = client.cancel([roots.id, theirs])
            return [(j.id, j.state) for j in reply.jobs], [(e.job_id, e.code) for e in reply.errors]

        cancelled, refused = as_user(stranger, cancel_both)["ok"]
        assert cancelled == [[theirs, "CANCELLED"]] and refused == [[roots.id, "permission_denied"]]
        assert as_user(stranger, lambda: client.result(roots.id)) == {"error": "permission_denied"}
        by_path = p.Submit(files=[p.SubmitFile(name="x", path=str(clip))])
        assert as_user(stranger, lambda: client.request(by_path, p.Jobs)) == {"error": "permission_denied"}
        assert daemon.job(roots.id).state is JobState.PENDING
        assert as_user(stranger, partial(read, daemon.state_dir / DB_FILES[0])) == {"os_error": "EACCES"}
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_files_are_private_whatever_the_umask(tmp_path: Path, speech: dict[str, Path], umask: int) -> None:
    daemon = DaemonProcess(tmp_path / "state", IDLE)
    socket_dir = daemon.socket.parent / "run"  # a directory the daemon creates for its socket
    daemon.socket = socket_dir / "whisperd.sock"
    daemon.client.path = daemon.socket
    before = os.umask(umask)
    try:
        daemon.start()
    finally:
        os.umask(before)
    try:
        daemon.client.submit([str(speech["fox"])] * 2)
        state = daemon.state_dir
        modes = private_modes(state)
        assert len(modes) == 2 + 1 + 3 + 2, modes  # dirs, lock, database, two spooled files
        assert modes == expected_private(state)
        assert mode(socket_dir) == 0o755, "clients must reach the socket"
        assert mode(daemon.socket) == 0o660
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "kill-9"])
def test_an_older_install_with_wider_modes_is_narrowed(
    tmp_path: Path, speech: dict[str, Path], sig: signal.Signals
) -> None:
    state = tmp_path / "state"
    daemon = DaemonProcess(state, IDLE).start()
    daemon.client.submit([str(speech["fox"])])
    daemon.stop(sig)
    # what UMask=0027 and 0750 directories left behind, and a database a tool made 0644; after a kill -9
    # the -wal and -shm files are left too
    wider = [
        state / "jobs.sqlite3",
        state / LOCK_NAME,
        *(state / n for n in DB_FILES[1:] if (state / n).exists()),
    ]
    assert len(wider) == (4 if sig == signal.SIGKILL else 2)
    for path in [state, state / "spool"]:
        path.chmod(0o750)
    for path in wider:
        path.chmod(0o644)
    for path in (state / "spool").iterdir():
        path.chmod(0o640)
    again = DaemonProcess(state, IDLE)
    again.socket, again.client = daemon.socket, daemon.client
    again.start()
    try:
        [job] = again.client.status()
        assert job.state is JobState.PENDING
        assert private_modes(state) == expected_private(state)
        assert mode(state) == 0o700 and mode(state / "jobs.sqlite3") == 0o600
    finally:
        assert again.stop() == 0


@pytest.mark.parametrize("same_socket", [False, True], ids=["own-socket", "same-socket"])
def test_a_second_daemon_on_the_same_state_dir_refuses_to_start(
    tmp_path: Path, speech: dict[str, Path], same_socket: bool
) -> None:
    first = DaemonProcess(tmp_path / "state", IDLE).start()
    try:
        [job] = first.client.submit([str(speech["fox"])])
        second = DaemonProcess(tmp_path / "state", IDLE)
        if same_socket:
            second.socket = first.socket
        # run to its end: with the same socket, a ping would be answered by the first daemon
        refused = subprocess.run(
            [sys.executable, "-m", "whisperd", "--config", str(second.config_path)],
            env=second.env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert refused.returncode == 1, refused.stderr
        assert first.proc is not None
        assert str(first.state_dir) in refused.stderr and f"pid {first.proc.pid}" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert first.socket.exists(), "the first daemon's socket is left alone"
        assert first.client.ping().protocol == p.PROTOCOL_VERSION
        assert [j.id for j in first.client.status()] == [job.id]
        assert first.client.submit([str(speech["fox"])])[0].state is JobState.PENDING
        assert len(list((first.state_dir / "spool").iterdir())) == 2
    finally:
        assert first.stop() == 0


def test_the_state_dir_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    with StateDirLock(tmp_path) as held:
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        assert mode(held.path) == 0o600
        with pytest.raises(StateDirError, match=f"pid {os.getpid()}") as refused:
            StateDirLock(tmp_path).acquire()  # flock: a second open file conflicts even in one process
        assert str(tmp_path) in refused.value.message
    with StateDirLock(tmp_path):  # released with its holder
        pass
