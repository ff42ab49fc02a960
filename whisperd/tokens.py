"""Who an HTTP request is: bearer tokens mapped to the users of this machine, kept in a text file the admin
manages (http.tokens_file; empty: http-tokens in the state dir, a relative path is taken in it too).

A token reads `wsd_<id>_<secret>`. The id (8 hex digits) is public: it names the token in the file, in
`whisperctl token list` and in the log. The secret (32 random bytes) is shown once, when the token is made,
and only its hash is kept. The file holds one token per line, fields separated by spaces:

    <id> <user> sha256:<64 hex digits> <created, UTC, ISO 8601> [comment: the rest of the line]

with `#` comments and blank lines. whisperd rewrites it atomically (0600) when a token is made or revoked,
keeping every other line as it was; an admin may also edit it and send SIGHUP. A line that does not parse,
or names a user this machine does not know, is skipped with a warning: the others still work. The user is
resolved to a uid when the file is read, so over HTTP a token's uid plays the part of the socket's peer uid
(owner checks, per-user limits).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import pwd
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from whisperd.errors import BadRequest, StorageError, os_storage_error
from whisperd.protocol import printable

log = logging.getLogger("whisperd")

TOKENS_FILE_NAME = "http-tokens"
TOKEN_PREFIX = "wsd"
ID_HEX_DIGITS = 8  # 2^32 ids: public names, not secrets; a clash with a taken one is drawn again
SECRET_BYTES = 32  # 256 bits
FILE_MODE = 0o600
HEADER = f"""\
# whisperd's HTTP API tokens: one a line, fields separated by spaces:
#   <id> <user> sha256:<hash of the secret> <created, UTC> [comment, the rest of the line]
# Made with `whisperctl token create --user NAME` (which prints the token once), removed with
# `whisperctl token revoke ID`. You may delete or edit lines by hand, then send whisperd SIGHUP.
# Only hashes are kept here: a lost token cannot be recovered, only replaced. Keep it mode {FILE_MODE:04o}.
"""

_ID = re.compile(r"[0-9a-f]{8,32}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_USER = re.compile(r"[^\s\x00-\x1f\x7f-\x9f]{1,256}")  # one field of a line
_COMMENT = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]{0,256}")  # the rest of the line


class Identity(msgspec.Struct, frozen=True):
    """The user a request acts as; uid is what the socket's peer uid is to a request there."""

    user: str
    uid: int
    token_id: str


class TokenInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What may be shown of a token: never its secret, nor its hash."""

    id: str
    user: str
    uid: int
    created_at: float  # unix seconds
    comment: str = ""


class _Entry(msgspec.Struct, frozen=True):
    info: TokenInfo
    digest: bytes  # sha256 of the secret


class Skipped(msgspec.Struct, frozen=True):
    line: int  # 1-based
    reason: str


def tokens_path(tokens_file: str, state_dir: Path) -> Path:
    """Where the book is: http.tokens_file, taken in the state dir when relative; empty: http-tokens there."""
    return state_dir / (tokens_file or TOKENS_FILE_NAME)


def uid_of(user: str) -> int | None:
    """The uid of a user name in this machine's user database; None: no such user."""
    try:
        return pwd.getpwnam(user).pw_uid
    except (KeyError, ValueError):  # ValueError: a name holding NUL
        return None


def digest_of(secret: str) -> bytes:
    # A plain sha256 is enough: the secret is 256 random bits, so no guess of it can be checked against a
    # stolen hash in any useful time. A slow password hash (bcrypt, argon2) protects low-entropy passwords;
    # here it would only cost every request milliseconds.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def parse_tokens(
    text: str, lookup_uid: Callable[[str], int | None]
) -> tuple[dict[str, _Entry], list[Skipped]]:
    """The tokens a file's text holds, by id, and the lines skipped with why. Pure but for lookup_uid."""
    entries: dict[str, _Entry] = {}
    first_seen: dict[str, int] = {}
    skipped: list[Skipped] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            entry = _parse_line(line, lookup_uid)
        except _BadLine as bad:
            skipped.append(Skipped(number, bad.reason))
            continue
        token_id = entry.info.id
        if token_id in first_seen:  # ids must name one token: the first line keeps it
            skipped.append(Skipped(number, f"id {token_id} is taken by line {first_seen[token_id]}"))
            continue
        first_seen[token_id] = number
        entries[token_id] = entry
    return entries, skipped


class _BadLine(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _parse_line(line: str, lookup_uid: Callable[[str], int | None]) -> _Entry:
    fields = line.split(None, 4)
    if len(fields) < 4:
        raise _BadLine("expected <id> <user> sha256:<hash> <created> [comment]")
    token_id, user, hashed, created = fields[:4]
    comment = fields[4].strip() if len(fields) == 5 else ""
    if not _ID.fullmatch(token_id):
        raise _BadLine(f"the id {printable(token_id)!r} is not 8 to 32 lowercase hex digits")
    if not (found := _DIGEST.fullmatch(hashed)):
        raise _BadLine("the hash is not sha256: and 64 lowercase hex digits")
    try:
        when = datetime.fromisoformat(created)
    except ValueError:
        raise _BadLine(f"the time {printable(created)!r} is not ISO 8601 (2025-01-31T12:00:00Z)") from None
    if not _USER.fullmatch(user) or not _COMMENT.fullmatch(comment):
        raise _BadLine("the user or the comment holds control characters, or is too long")
    uid = lookup_uid(user)
    if uid is None:
        raise _BadLine(f"no user {printable(user)!r} on this machine")
    created_at = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    info = TokenInfo(id=token_id, user=user, uid=uid, created_at=created_at, comment=comment)
    return _Entry(info, bytes.fromhex(found.group(1)))


def _line_id(line: str) -> str | None:
    """The first field of a token line (None: a comment or a blank line), whether the rest parses or not."""
    fields = line.split(None, 1)
    return None if not fields or fields[0].startswith("#") else fields[0]


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TokenBook:
    """The tokens of one file. identify() runs on the loop and reads the book without a lock: the book is
    replaced whole, never changed in place. reload(), create() and revoke() read or write the file (and may
    ask the user database, which can be a network service), so the daemon runs them in threads; the lock
    keeps them one at a time."""

    def __init__(
        self,
        path: Path,
        lookup_uid: Callable[[str], int | None] = uid_of,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._lookup_uid = lookup_uid
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self.reload()

    # ---- reading -------------------------------------------------------------------------------------

    def identify(self, bearer: str) -> Identity | None:
        """The identity a token stands for; None for anything else. One dict lookup by the token's public
        id, then a constant-time comparison of the secret's hash."""
        prefix, _, rest = bearer.partition("_")
        token_id, _, secret = rest.partition("_")
        entry = self._entries.get(token_id) if prefix == TOKEN_PREFIX and secret else None
        if entry is None:
            return None
        if not hmac.compare_digest(digest_of(secret), entry.digest):
            return None
        return Identity(user=entry.info.user, uid=entry.info.uid, token_id=token_id)

    def tokens(self) -> list[TokenInfo]:
        """Every valid token, oldest first."""
        return sorted((e.info for e in self._entries.values()), key=lambda i: (i.created_at, i.id))

    def get(self, token_id: str) -> TokenInfo | None:
        entry = self._entries.get(token_id)
        return entry.info if entry is not None else None

    def reload(self) -> None:
        """Read the file again. Never raises: a file that cannot be trusted or read leaves no token valid
        (an error logged), a bad line is skipped (a warning each)."""
        with self._lock:
            try:
                text = self._read()
            except StorageError as exc:
                log.error("HTTP tokens: %s; no token is valid until it is fixed (then SIGHUP)", exc.message)
                self._entries = {}
                return
            self._install(text or "")

    # ---- changing ------------------------------------------------------------------------------------

    def create(self, user: str, comment: str = "") -> tuple[str, TokenInfo]:
        """A new token for a user of this machine: (the token, shown once; what is kept of it). Edits made
        to the file since the last read are kept and take effect too. Raises BadRequest for a user this
        machine does not know, StorageError if the file cannot be written."""
        if not _USER.fullmatch(user):
            raise BadRequest(f"{printable(user)!r} is not a user name (no spaces or control characters)")
        comment = comment.strip()
        if not _COMMENT.fullmatch(comment):
            raise BadRequest("a token's comment is at most 256 characters, without control characters")
        uid = self._lookup_uid(user)
        if uid is None:
            raise BadRequest(f"no user {printable(user)!r} on this machine: a token acts as a local user")
        with self._lock:
            text = self._read() or HEADER
            taken = {_line_id(line) for line in text.splitlines()}
            token_id = secrets.token_hex(ID_HEX_DIGITS // 2)
            while token_id in taken:
                token_id = secrets.token_hex(ID_HEX_DIGITS // 2)
            secret = secrets.token_urlsafe(SECRET_BYTES)
            created_at = float(int(self._clock()))  # the file keeps whole seconds
            line = f"{token_id} {user} sha256:{digest_of(secret).hex()} {_utc(created_at)} {comment}".rstrip()
            text = (text if text.endswith("\n") else text + "\n") + line + "\n"
            self._write(text)
            self._install(text)
        info = TokenInfo(id=token_id, user=user, uid=uid, created_at=created_at, comment=comment)
        return f"{TOKEN_PREFIX}_{token_id}_{secret}", info

    def revoke(self, token_id: str) -> bool:
        """Remove the token's line (a line with that id that did not parse goes too); False: no such line."""
        with self._lock:
            text = self._read()
            if text is None:
                return False
            lines = text.splitlines(keepends=True)
            kept = [line for line in lines if _line_id(line) != token_id]
            if len(kept) == len(lines):
                return False
            text = "".join(kept)
            self._write(text)
            self._install(text)
            return True

    # ---- the file ------------------------------------------------------------------------------------

    def _install(self, text: str) -> None:
        entries, skipped = parse_tokens(text, self._lookup_uid)
        for bad in skipped:
            log.warning("HTTP tokens: %s line %d skipped: %s", self.path, bad.line, bad.reason)
        self._entries = entries

    def _read(self) -> str | None:
        """The file's text; None: there is none. Refused (StorageError) when someone other than root or the
        daemon's user could have written it: any line in it could make a token for any user."""
        try:
            with open(self.path, "rb") as file:
                st = os.fstat(file.fileno())
                if not stat.S_ISREG(st.st_mode):
                    raise StorageError(f"{self.path} is not a regular file")
                if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
                    raise StorageError(
                        f"{self.path} may be written by others (owner uid {st.st_uid}, mode "
                        f"{stat.S_IMODE(st.st_mode):o}): it must belong to root or whisperd's user, mode 0600"
                    )
                data = file.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        return data.decode("utf-8", "replace")  # a bad byte spoils its own line only

    def _write(self, text: str) -> None:
        """Replace the file atomically: a new file (0600, ours) written and fsynced, renamed over the old,
        the directory fsynced. A reader sees the old file or the new one, never a part."""
        directory = self.path.parent
        try:
            fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=directory)
        except OSError as exc:
            raise os_storage_error(exc, f"write {self.path}") from None
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), FILE_MODE)
                file.write(text.encode("utf-8"))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise os_storage_error(exc, f"write {self.path}") from None
        with contextlib.suppress(OSError):  # the rename is done; only its durability is at stake
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
