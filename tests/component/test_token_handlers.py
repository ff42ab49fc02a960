"""The control protocol's token requests on the real handlers, registry and token book (no socket): only root
or the daemon's user may make, revoke or list the HTTP API's tokens; what each refusal answers; the token
sent once, over the wire as the decoders read it, and never its hash."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import msgspec
import pytest

from tests.support.inprocess import FakeClock, build
from whisperd import protocol as p
from whisperd.config import Config
from whisperd.errors import WhisperdError
from whisperd.fleet import Fleet
from whisperd.handlers import Caller, Handlers
from whisperd.registry import JobRegistry, RetryPolicy
from whisperd.spool import Spool
from whisperd.sqlite_store import SqliteStore
from whisperd.tokens import TokenBook
from whisperd.views import Views

DAEMON_UID = 4000  # the daemon's own user, not root: both are privileged
ROOT = Caller(pid=1, uid=0, gid=0)
DAEMON_USER = Caller(pid=2, uid=DAEMON_UID, gid=DAEMON_UID)
USER = Caller(pid=3, uid=1000, gid=1000)
USERS = {"alice": 1000, "bob": 1001}


def call(coroutine: object) -> p.Reply:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


class Rig:
    def __init__(self, tmp_path: Path, with_tokens: bool = True) -> None:
        self.path = tmp_path / "http-tokens"
        self.store = SqliteStore(tmp_path / "jobs.sqlite3")
        spool = Spool(tmp_path / "spool")
        policy = RetryPolicy(max_retries=1, backoff_s=10.0, backoff_max_s=60.0)
        registry = JobRegistry(
            self.store, spool, FakeClock(), policy, lambda view: None, lambda job, old, event: None
        )
        self.book = TokenBook(self.path, lookup_uid=USERS.get) if with_tokens else None
        self.handlers = Handlers(
            registry, spool, cast(Fleet, None), cast(Views, None), config=Config, is_draining=lambda: False,
            wake=lambda: None, daemon_uid=DAEMON_UID, tokens=self.book,
        )  # fmt: skip

    def ask(self, request: p.Request, caller: Caller) -> p.Reply:
        return call(self.handlers.handle(request, caller, []))

    def refused(self, request: p.Request, caller: Caller) -> str:
        with pytest.raises(WhisperdError) as info:
            self.ask(request, caller)
        return info.value.code

    def wire(self, line: bytes, caller: Caller) -> bytes:
        """A request line as the control server handles it: decoded, handled, its reply (or error) encoded."""
        try:
            reply = self.ask(p.decode_request(line), caller)
        except WhisperdError as exc:
            reply = p.Error(error=p.ErrorBody(code=exc.code, message=exc.message))
        return p.encode_line(reply)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    made.store.close()


@pytest.mark.parametrize("caller", [ROOT, DAEMON_USER], ids=["root", "daemon-user"])
def test_a_privileged_caller_makes_lists_and_revokes_tokens(rig: Rig, caller: Caller) -> None:
    created = rig.ask(p.TokenCreate(user="alice", comment="notebook"), caller)
    assert isinstance(created, p.TokenCreated)
    assert (created.info.user, created.info.uid, created.info.comment) == ("alice", 1000, "notebook")
    assert rig.book is not None
    identity = rig.book.identify(created.token)
    assert identity is not None and (identity.uid, identity.token_id) == (1000, created.info.id)

    listed = rig.ask(p.TokenList(), caller)
    assert listed == p.Tokens(tokens=[created.info])

    revoked = rig.ask(p.TokenRevoke(id=created.info.id), caller)
    assert revoked == p.TokenRevoked(id=created.info.id, info=created.info)
    assert rig.book.identify(created.token) is None
    assert rig.ask(p.TokenList(), caller) == p.Tokens(tokens=[])


def test_an_unprivileged_caller_may_not_make_list_or_revoke_tokens(rig: Rig) -> None:
    assert rig.refused(p.TokenCreate(user="alice"), USER) == "permission_denied"
    assert rig.refused(p.TokenCreate(user=f"uid-{USER.uid}"), USER) == "permission_denied", "not even its own"
    assert not rig.path.exists(), "nothing written"
    created = rig.ask(p.TokenCreate(user="alice"), ROOT)
    assert isinstance(created, p.TokenCreated)
    assert rig.refused(p.TokenList(), USER) == "permission_denied"
    assert rig.refused(p.TokenRevoke(id=created.info.id), USER) == "permission_denied"
    assert rig.book is not None and rig.book.identify(created.token) is not None, "still valid"


def test_a_user_this_machine_does_not_know_is_a_bad_request(rig: Rig) -> None:
    assert rig.refused(p.TokenCreate(user="ghost"), ROOT) == "bad_request"
    assert not rig.path.exists()


def test_revoking_a_token_that_does_not_exist_is_not_found(rig: Rig) -> None:
    assert rig.refused(p.TokenRevoke(id="0123abcd"), ROOT) == "not_found"


def test_a_daemon_without_a_token_book_says_so_to_privileged_callers_only(tmp_path: Path) -> None:
    rig = Rig(tmp_path, with_tokens=False)
    try:
        assert rig.refused(p.TokenList(), ROOT) == "bad_request"
        assert rig.refused(p.TokenList(), USER) == "permission_denied"
    finally:
        rig.store.close()


def test_over_the_wire_the_token_is_sent_once_and_its_hash_never(rig: Rig) -> None:
    line = rig.wire(b'{"op":"token_create","user":"bob","comment":"ci"}', ROOT)
    created = p.decode_reply(line)
    assert isinstance(created, p.TokenCreated) and created.token.startswith(f"wsd_{created.info.id}_")
    secret = created.token.split("_", 2)[2]
    stored_hash = rig.path.read_text().split()[-3]  # id user sha256:... created comment
    assert stored_hash.startswith("sha256:") and stored_hash[7:] not in line.decode()
    listed = rig.wire(b'{"op":"token_list"}', ROOT)
    assert secret not in listed.decode() and stored_hash[7:] not in listed.decode()
    assert p.decode_reply(listed) == p.Tokens(tokens=[created.info])
    assert msgspec.json.decode(rig.wire(b'{"op":"token_list"}', USER))["error"]["code"] == "permission_denied"


@pytest.mark.parametrize(
    "line",
    [
        b'{"op":"token_create"}',  # no user
        b'{"op":"token_create","user":""}',
        b'{"op":"token_create","user":"al ice"}',
        b'{"op":"token_create","user":"alice\\n"}',
        b'{"op":"token_create","user":"alice","comment":"two\\nlines"}',
        b'{"op":"token_create","user":"alice","comment":"' + b"x" * 300 + b'"}',
        b'{"op":"token_create","user":"alice","uid":0}',  # unknown field
        b'{"op":"token_revoke"}',
        b'{"op":"token_revoke","id":""}',
    ],
)
def test_malformed_token_requests_are_bad_requests_and_change_nothing(rig: Rig, line: bytes) -> None:
    reply = msgspec.json.decode(rig.wire(line, ROOT))
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    assert not rig.path.exists()


def test_the_app_rereads_the_token_file_on_reload_even_without_a_config_file(tmp_path: Path) -> None:
    """SIGHUP re-reads the tokens whatever becomes of the configuration (here: none to reload)."""
    app = build(tmp_path, Config(), config_loader=None)
    try:
        assert app.tokens.path == tmp_path / "http-tokens" and app.tokens.tokens() == []
        created = call(app.handlers.handle(p.TokenCreate(user="root"), ROOT, []))
        assert isinstance(created, p.TokenCreated) and app.tokens.identify(created.token) is not None
        app.tokens.path.write_text("# every token removed by hand\n")
        assert app.tokens.identify(created.token) is not None, "not before the reload"
        app.daemon.reload()
        assert app.tokens.identify(created.token) is None and app.tokens.tokens() == []
    finally:
        app.store.close()
