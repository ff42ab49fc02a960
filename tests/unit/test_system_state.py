"""The guard that keeps tests off the machine's own whisperd state: snapshots, their comparison, and the
daemon harness's refusal to run with the system's state dir or socket."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.system_state import changed, check_isolated, is_system_path, snapshot


def make_tree(root: Path) -> Path:
    (root / "spool").mkdir(parents=True)
    (root / "jobs.sqlite3").write_bytes(b"db")
    (root / "spool" / "1.audio").write_bytes(b"audio")
    return root


def test_snapshot_records_every_file_and_folder_and_the_root(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "state")
    shot = snapshot([root])
    assert set(shot) == {root, root / "spool", root / "jobs.sqlite3", root / "spool" / "1.audio"}
    assert shot[root / "spool" / "1.audio"][1] == 5


def test_a_missing_root_is_empty(tmp_path: Path) -> None:
    assert snapshot([tmp_path / "absent"]) == {}
    root = make_tree(tmp_path / "state")
    assert snapshot([tmp_path / "absent", root]) == snapshot([root])


def test_an_untouched_tree_has_no_changes(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "state")
    before = snapshot([root, tmp_path / "absent"])
    (tmp_path / "elsewhere").write_text("not under a root")
    assert changed(before, snapshot([root, tmp_path / "absent"])) == []


def test_an_added_file_is_reported_with_its_folder(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "state")
    os.utime(root / "spool", ns=(1, 1))  # so that the folder's mtime surely changes below
    before = snapshot([root])
    (root / "spool" / "2.audio").write_bytes(b"more")
    assert changed(before, snapshot([root])) == [root / "spool", root / "spool" / "2.audio"]


def test_a_modified_file_is_reported(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "state")
    before = snapshot([root])
    (root / "jobs.sqlite3").write_bytes(b"db, grown")
    assert changed(before, snapshot([root])) == [root / "jobs.sqlite3"]


def test_a_file_rewritten_with_the_same_size_is_reported(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "state")
    os.utime(root / "jobs.sqlite3", ns=(1, 1))
    before = snapshot([root])
    (root / "jobs.sqlite3").write_bytes(b"DB")
    assert changed(before, snapshot([root])) == [root / "jobs.sqlite3"]


def test_a_removed_file_is_reported(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "state")
    os.utime(root / "spool", ns=(1, 1))
    before = snapshot([root])
    (root / "spool" / "1.audio").unlink()
    assert changed(before, snapshot([root])) == [root / "spool", root / "spool" / "1.audio"]


def test_a_created_root_is_reported(tmp_path: Path) -> None:
    before = snapshot([tmp_path / "run"])
    (tmp_path / "run").mkdir()
    assert changed(before, snapshot([tmp_path / "run"])) == [tmp_path / "run"]


def test_a_removed_root_is_reported_with_everything_in_it(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "state")
    before = snapshot([root])
    shutil.rmtree(root)
    assert changed(before, snapshot([root])) == sorted(before)


@pytest.mark.parametrize(
    ("path", "system"),
    [
        ("/var/lib/whisperd", True),
        ("/var/lib/whisperd/", True),
        ("/var/lib/whisperd/spool/1.audio", True),
        ("/var/lib/other/../whisperd/x", True),
        ("/run/whisperd/whisperd.sock", True),
        ("/var/lib/whisperd-test", False),
        ("/run/whisperd.sock", False),
        ("/tmp/wd-x/whisperd.sock", False),
    ],
)
def test_is_system_path(path: str, system: bool) -> None:
    assert is_system_path(path) is system


ISOLATED = {"WHISPERD_STATE_DIR": "/tmp/state", "WHISPERD_SOCKET": "/tmp/wd-x/whisperd.sock"}


@pytest.mark.parametrize(
    "env",
    [
        {"WHISPERD_SOCKET": "/tmp/wd-x/whisperd.sock"},
        {"WHISPERD_STATE_DIR": "/tmp/state"},
        {**ISOLATED, "WHISPERD_STATE_DIR": ""},
        {**ISOLATED, "WHISPERD_STATE_DIR": "/var/lib/whisperd"},
        {**ISOLATED, "WHISPERD_SOCKET": "/run/whisperd/whisperd.sock"},
        {**ISOLATED, "WHISPERD_SOCKET": "/var/lib/whisperd/whisperd.sock"},
    ],
    ids=[
        "no-state-dir",
        "no-socket",
        "empty-state-dir",
        "system-state-dir",
        "system-socket",
        "socket-in-state",
    ],
)
def test_check_isolated_refuses(env: dict[str, str]) -> None:
    with pytest.raises(RuntimeError, match="refusing"):
        check_isolated(env)


def test_check_isolated_accepts_private_paths() -> None:
    check_isolated(ISOLATED)


@pytest.mark.parametrize(
    "env",
    [{"WHISPERD_STATE_DIR": "/var/lib/whisperd"}, {"WHISPERD_SOCKET": "/run/whisperd/whisperd.sock"}],
    ids=["state-dir", "socket"],
)
def test_daemon_process_refuses_to_start_on_system_state(tmp_path: Path, env: dict[str, str]) -> None:
    daemon = DaemonProcess(tmp_path / "state", env=env)
    daemon.socket.parent.rmdir()  # the short socket folder it made; nothing may need it
    with pytest.raises(RuntimeError, match="refusing"):
        daemon.start()
    assert daemon.proc is None
    assert daemon not in DaemonProcess.started
