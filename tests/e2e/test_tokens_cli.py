"""`whisperctl token create/list/revoke` against the real daemon: root makes, lists and revokes the HTTP API's
tokens, another user is refused; the file the admin edits is read again on SIGHUP."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pwd
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.users import as_user
from whisperctl import cli
from whisperctl.client import Client

pytestmark = pytest.mark.e2e

STRANGER = "nobody"  # the user the tokens act as, and the unprivileged caller
HAND_SECRET = "made-by-hand-for-the-e2e-test"


@pytest.fixture
def stranger_uid() -> int:
    if os.geteuid() != 0:
        pytest.skip("needs root: the daemon's user must differ from the unprivileged caller")
    try:
        return pwd.getpwnam(STRANGER).pw_uid
    except KeyError:
        pytest.skip(f"no user {STRANGER} on this machine")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    started = DaemonProcess(
        tmp_path / "state", {"daemon": {"socket_mode": 0o666}, "workers": {"cpu_workers": 0}}
    ).start()
    yield started
    started.stop()
    assert "Traceback" not in started.log()


def token_ids(daemon: DaemonProcess) -> list[str]:
    listed = daemon.ctl("token", "list", "--json")
    assert listed.returncode == cli.EXIT_OK, listed.stderr
    return [t["id"] for t in json.loads(listed.stdout)]


def test_root_makes_lists_and_revokes_tokens_and_others_are_refused(
    daemon: DaemonProcess, stranger_uid: int
) -> None:
    made = daemon.ctl("token", "create", "--user", STRANGER, "--comment", "e2e bot")
    assert made.returncode == cli.EXIT_OK, made.stderr
    token = made.stdout.strip()
    assert made.stdout.count("\n") == 1 and token.startswith("wsd_") and token not in made.stderr
    assert made.stderr, "a word on stderr that it will not be shown again"
    token_id, secret = token.split("_", 2)[1:]

    listed = daemon.ctl("token", "list", "--json")
    assert listed.returncode == cli.EXIT_OK
    (info,) = json.loads(listed.stdout)
    assert (info["id"], info["user"], info["uid"], info["comment"]) == (
        token_id,
        STRANGER,
        stranger_uid,
        "e2e bot",
    )
    table = daemon.ctl("token", "list")
    assert table.returncode == cli.EXIT_OK and token_id in table.stdout and secret not in table.stdout

    book = daemon.state_dir / "http-tokens"
    assert stat.S_IMODE(book.stat().st_mode) == 0o600 and book.stat().st_uid == os.geteuid()
    assert secret not in book.read_text() and hashlib.sha256(secret.encode()).hexdigest() in book.read_text()

    # Another user, whatever it asks: refused, through the command and through the library alike.
    sock = str(daemon.socket)
    for argv in (["token", "list"], ["token", "create", "--user", STRANGER], ["token", "revoke", token_id]):
        assert as_user(stranger_uid, functools.partial(cli.main, ["--socket", sock, *argv])) == {
            "ok": cli.EXIT_ERROR
        }
    assert as_user(stranger_uid, lambda: Client(sock).token_list()) == {"error": "permission_denied"}
    assert token_ids(daemon) == [token_id], "nothing changed"

    unknown = daemon.ctl("token", "create", "--user", "no-such-user-of-whisperd-e2e")
    assert unknown.returncode == cli.EXIT_ERROR and not unknown.stdout

    revoked = daemon.ctl("token", "revoke", token_id)
    assert revoked.returncode == cli.EXIT_OK, revoked.stderr
    assert token_ids(daemon) == []
    assert token_id not in book.read_text()
    again = daemon.ctl("token", "revoke", token_id)
    assert again.returncode == cli.EXIT_ERROR


def test_sighup_reads_the_file_the_admin_edited(daemon: DaemonProcess, stranger_uid: int) -> None:
    made = daemon.ctl("token", "create", "--user", STRANGER)
    assert made.returncode == cli.EXIT_OK, made.stderr
    removed_id = made.stdout.strip().split("_")[1]
    kept = daemon.ctl("token", "create", "--user", "root")
    kept_id = kept.stdout.strip().split("_")[1]
    assert sorted(token_ids(daemon)) == sorted([removed_id, kept_id])

    book = daemon.state_dir / "http-tokens"
    lines = [line for line in book.read_text().splitlines() if not line.startswith(removed_id)]
    digest = hashlib.sha256(HAND_SECRET.encode()).hexdigest()
    lines += [
        f"0123abcd {STRANGER} sha256:{digest} 2024-01-01T00:00:00Z added by hand",
        "this line is not a token",
        f"89abcdef no-such-user-of-whisperd-e2e sha256:{digest} 2024-01-01T00:00:00Z",
    ]
    book.write_text("\n".join(lines) + "\n")  # in place: the mode stays 0600
    assert sorted(token_ids(daemon)) == sorted([removed_id, kept_id]), "nothing read before SIGHUP"

    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for(
        lambda: sorted(token_ids(daemon)) == sorted(["0123abcd", kept_id]), timeout_s=30, what="tokens reread"
    )
    assert daemon.proc.poll() is None, "bad lines are skipped, never fatal"
    listed = json.loads(daemon.ctl("token", "list", "--json").stdout)
    assert {t["id"]: t["uid"] for t in listed} == {"0123abcd": stranger_uid, kept_id: 0}
