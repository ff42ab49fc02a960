"""The HTTP API's token book (whisperd/tokens.py): tokens made, found, revoked and read back from the file an
admin manages; bad lines and unknown users skipped, never fatal; the file private and replaced atomically."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import stat
from pathlib import Path

import pytest

from whisperd import tokens as tokens_module
from whisperd.errors import BadRequest, StorageError
from whisperd.tokens import Identity, Skipped, TokenBook, parse_tokens, tokens_path

USERS = {"alice": 1000, "bob": 1001, "root": 0}
T0 = 1_700_000_000.0
DIGEST = "sha256:" + hashlib.sha256(b"hand-made-secret").hexdigest()


def lookup(user: str) -> int | None:
    return USERS.get(user)


def book(path: Path) -> TokenBook:
    return TokenBook(path, lookup_uid=lookup, clock=lambda: T0)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "http-tokens"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "whisperd"]


# ---- made, found, read back --------------------------------------------------------------------------


def test_a_token_made_is_found_here_and_after_a_fresh_read_of_the_file(path: Path) -> None:
    tokens = book(path)
    token, info = tokens.create("alice", "ci bot")
    prefix, token_id, secret = token.split("_", 2)
    assert prefix == "wsd" and len(token_id) == 8 and int(token_id, 16) >= 0
    assert len(base64.urlsafe_b64decode(secret + "=")) == 32, "256 random bits"
    assert (info.id, info.user, info.uid, info.created_at, info.comment) == (
        token_id,
        "alice",
        1000,
        T0,
        "ci bot",
    )
    assert tokens.identify(token) == Identity(user="alice", uid=1000, token_id=token_id)
    assert book(path).identify(token) == Identity(user="alice", uid=1000, token_id=token_id)
    assert book(path).tokens() == [info]


def test_the_file_keeps_a_hash_only_one_line_per_token(path: Path) -> None:
    tokens = book(path)
    token, info = tokens.create("alice", "first")
    token2, info2 = tokens.create("bob")
    text = path.read_text()
    secret = token.split("_", 2)[2]
    assert secret not in text and token2.split("_", 2)[2] not in text
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines == [
        f"{info.id} alice sha256:{hashlib.sha256(secret.encode()).hexdigest()} 2023-11-14T22:13:20Z first",
        f"{info2.id} bob sha256:{hashlib.sha256(token2.split('_', 2)[2].encode()).hexdigest()} "
        "2023-11-14T22:13:20Z",
    ]
    assert not any(hasattr(i, "digest") or hasattr(i, "hash") for i in tokens.tokens())


def test_the_file_is_private_whatever_the_umask(path: Path) -> None:
    old = os.umask(0)
    try:
        book(path).create("alice")
    finally:
        os.umask(old)
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file left"


@pytest.mark.parametrize(
    "bearer",
    ["", "wsd", "wsd_", "wsd__", "Bearer x", "wsd_00000000_secret", "abc_{id}_{secret}", "wsd_{id}_",
     "wsd_{id}_{secret}x", "wsd_{id}_{other}", "wsd_{id}{secret}", " wsd_{id}_{secret}", "wsd_{ID}_{secret}"],
)  # fmt: skip
def test_anything_but_the_token_itself_identifies_no_one(path: Path, bearer: str) -> None:
    tokens = book(path)
    token, info = tokens.create("alice")
    _, other_info = tokens.create("bob")
    secret = token.split("_", 2)[2]
    other = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    bearer = bearer.format(id=info.id, ID=info.id.upper(), secret=secret, other=other)
    assert tokens.identify(bearer) is None
    assert tokens.identify(f"wsd_{other_info.id}_{secret}") is None, "a secret is its own token's only"


def test_the_secret_is_compared_in_constant_time(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = book(path)
    token, _info = tokens.create("alice")
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        same: bool = real(a, b)
        return same

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module tokens.py calls it through
    assert tokens.identify(token) is not None
    assert tokens.identify(token[:-1] + "x" if token[-1] != "x" else token[:-1] + "y") is None
    assert len(compared) == 2 and all(len(a) == len(b) == 32 for a, b in compared)


# ---- revoked ---------------------------------------------------------------------------------------


def test_a_revoked_token_identifies_no_one_and_the_other_lines_stay_as_they_were(path: Path) -> None:
    tokens = book(path)
    kept, kept_info = tokens.create("alice")
    gone, gone_info = tokens.create("bob")
    with path.open("a") as file:
        file.write("# the admin's own note\n")
    assert tokens.revoke(gone_info.id) is True
    assert tokens.identify(gone) is None and tokens.identify(kept) is not None
    assert book(path).identify(gone) is None, "gone from the file too"
    assert "# the admin's own note" in path.read_text() and gone_info.id not in path.read_text()
    assert [i.id for i in tokens.tokens()] == [kept_info.id]
    assert tokens.revoke(gone_info.id) is False, "nothing left to revoke"
    assert tokens.revoke("deadbeef") is False


def test_revoking_removes_a_line_that_did_not_parse_too(path: Path) -> None:
    path.write_text(f"0123abcd nosuchuser {DIGEST} 2024-01-01T00:00:00Z\n")
    path.chmod(0o600)
    tokens = book(path)
    assert tokens.tokens() == []
    assert tokens.revoke("0123abcd") is True
    assert "0123abcd" not in path.read_text()


def test_revoking_without_a_file_finds_nothing(path: Path) -> None:
    assert book(path).revoke("0123abcd") is False and not path.exists()


# ---- the file as the admin edits it ------------------------------------------------------------------


def test_reload_picks_up_lines_added_and_removed_by_hand(path: Path) -> None:
    tokens = book(path)
    removed, _info = tokens.create("alice")
    text = path.read_text().replace(path.read_text().splitlines()[-1] + "\n", "")
    path.write_text(text + f"0123abcd bob {DIGEST} 2024-01-01T00:00:00Z added by hand\n")
    assert tokens.identify(removed) is not None, "nothing changes before the reload"
    tokens.reload()
    assert tokens.identify(removed) is None
    assert tokens.identify("wsd_0123abcd_hand-made-secret") == Identity("bob", 1001, "0123abcd")
    (info,) = tokens.tokens()
    assert (info.id, info.user, info.uid, info.comment) == ("0123abcd", "bob", 1001, "added by hand")
    assert info.created_at == 1_704_067_200.0


def test_create_keeps_edits_made_since_the_last_read(path: Path) -> None:
    tokens = book(path)
    tokens.create("alice")
    path.write_text(path.read_text() + f"0123abcd bob {DIGEST} 2020-01-01T00:00:00Z\n")
    tokens.create("root")
    listed = [i.user for i in tokens.tokens()]
    assert listed[0] == "bob" and sorted(listed[1:]) == ["alice", "root"]  # oldest first


def test_bad_lines_are_skipped_with_one_warning_each_naming_its_line(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = f"0123abcd alice {DIGEST} 2024-01-01T00:00:00Z fine"
    lines = [
        "# a comment",
        "",
        good,
        "only three fields",  # 4
        f"XYZ alice {DIGEST} 2024-01-01T00:00:00Z",  # 5: id not hex
        "89abcdef alice md5:abc 2024-01-01T00:00:00Z",  # 6: not a sha256
        f"89abcdef alice {DIGEST} yesterday",  # 7: not a time
        f"0123abcd bob {DIGEST} 2024-01-01T00:00:00Z",  # 8: id taken by line 3
        f"89abcdef alice {DIGEST} 2024-01-01T00:00:00Z a \x1b[2J comment",  # 9: control characters
        "   # an indented comment",
    ]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="whisperd"):
        tokens = book(path)
    assert [i.id for i in tokens.tokens()] == ["0123abcd"]
    assert tokens.identify("wsd_0123abcd_hand-made-secret") == Identity("alice", 1000, "0123abcd")
    assert [r.args[1] for r in warnings_of(caplog)] == [4, 5, 6, 7, 8, 9]  # type: ignore[index]
    assert not any(r.exc_info for r in caplog.records), "no traceback"


def test_users_this_machine_does_not_know_are_skipped_with_a_warning(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path.write_text(
        f"0123abcd ghost {DIGEST} 2024-01-01T00:00:00Z\n89abcdef bob {DIGEST} 2024-01-01T00:00:00Z\n"
    )
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="whisperd"):
        tokens = book(path)
    assert [i.user for i in tokens.tokens()] == ["bob"]
    assert tokens.identify("wsd_0123abcd_hand-made-secret") is None
    assert [r.args[1] for r in warnings_of(caplog)] == [1]  # type: ignore[index]


def test_parse_tokens_says_which_lines_it_skipped() -> None:
    text = f"garbage\n0123abcd alice {DIGEST} 2024-01-01T00:00:00+01:00\n\n0123abcd ghost x y\n"
    entries, skipped = parse_tokens(text, lookup)
    assert list(entries) == ["0123abcd"] and entries["0123abcd"].info.created_at == 1_704_063_600.0
    assert [s.line for s in skipped] == [1, 4] and all(isinstance(s, Skipped) for s in skipped)


def test_a_file_others_may_write_is_not_trusted_at_all(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    tokens = book(path)
    token, _info = tokens.create("alice")
    path.chmod(0o620)  # group-writable: anyone in the group could add a token for root
    tokens.reload()
    assert tokens.identify(token) is None and tokens.tokens() == []
    with pytest.raises(StorageError):
        tokens.create("bob")  # nor copied into a new file
    path.chmod(0o600)
    tokens.reload()
    assert tokens.identify(token) is not None


def test_a_missing_or_unreadable_file_is_an_empty_book(path: Path) -> None:
    assert book(path).tokens() == []
    path.mkdir()
    tokens = book(path)  # a directory: logged, not raised
    assert tokens.tokens() == []


# ---- refused -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["ghost", "al ice", "alice\n", "", "a\x00b"])
def test_a_token_for_no_user_of_this_machine_is_refused(path: Path, user: str) -> None:
    with pytest.raises(BadRequest):
        book(path).create(user)
    assert not path.exists()


def test_a_comment_with_a_newline_is_refused(path: Path) -> None:
    with pytest.raises(BadRequest):
        book(path).create("alice", "two\nlines")
    assert not path.exists()


def test_a_file_that_cannot_be_written_is_a_storage_error(tmp_path: Path) -> None:
    tokens = book(tmp_path / "no-such-dir" / "http-tokens")
    with pytest.raises(StorageError):
        tokens.create("alice")


def test_uid_of_reads_the_user_database() -> None:
    assert tokens_module.uid_of("root") == 0
    assert tokens_module.uid_of("no-such-user-of-whisperd-tests") is None


# ---- where ---------------------------------------------------------------------------------------------


def test_the_file_is_in_the_state_dir_unless_configured_elsewhere(tmp_path: Path) -> None:
    assert tokens_path("", tmp_path) == tmp_path / "http-tokens"
    assert tokens_path("tokens.txt", tmp_path) == tmp_path / "tokens.txt"
    assert tokens_path("/etc/whisperd/tokens", tmp_path) == Path("/etc/whisperd/tokens")
