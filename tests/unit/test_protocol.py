"""The control protocol: request and reply codecs and the newline framing."""

from __future__ import annotations

import json
import typing

import msgspec
import pytest

from whisperd import protocol as p
from whisperd.errors import BadRequest, ProtocolError, RequestTooLarge, UnknownOp
from whisperd.jobs import JobState

REQUESTS: list[tuple[str, p.Request]] = [
    ("ping", p.Ping()),
    ("submit-minimal", p.Submit(files=[p.SubmitFile(name="a.wav", fd_index=0)])),
    (
        "submit-full",
        p.Submit(
            files=[p.SubmitFile(name="a.wav", fd_index=0), p.SubmitFile(name="b\nc.wav", path="/srv/b.wav")],
            model="tiny.en",
            language="de",
            task="translate",
            priority=5,
            word_timestamps=True,
        ),
    ),
    ("status-default", p.Status()),
    ("status-filtered", p.Status(ids=[1, 2], state=JobState.RETRYING, limit=10)),
    ("cancel", p.Cancel(ids=[3, 4])),
    ("result", p.Result(id=7)),
    ("gpu", p.Gpu()),
    ("stats", p.Stats()),
    ("watch", p.Watch()),
]


def test_request_table_covers_every_request_type() -> None:
    assert {type(r) for _, r in REQUESTS} == set(typing.get_args(p.Request))


@pytest.mark.parametrize("request_", [r for _, r in REQUESTS], ids=[i for i, _ in REQUESTS])
def test_request_round_trips(request_: p.Request) -> None:
    line = p.encode_line(request_)
    decoded = p.decode_request(line)
    assert type(decoded) is type(request_)
    assert decoded == request_


@pytest.mark.parametrize("request_", [r for _, r in REQUESTS], ids=[i for i, _ in REQUESTS])
def test_encode_line_is_one_line(request_: p.Request) -> None:
    line = p.encode_line(request_)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"op":"ping"}', p.Ping()),
        (b'  {"op": "ping"}  ', p.Ping()),
        (b'{"op":"result","id":12}', p.Result(id=12)),
        (b'{"op":"status","state":"PENDING"}', p.Status(state=JobState.PENDING)),
        (
            b'{"op":"submit","files":[{"name":"x.mp3","fd_index":0}]}',
            p.Submit(files=[p.SubmitFile(name="x.mp3", fd_index=0)]),
        ),
    ],
    ids=["ping", "ping-whitespace", "result", "status-state", "submit"],
)
def test_decode_request(line: bytes, expected: p.Request) -> None:
    assert p.decode_request(line) == expected


@pytest.mark.parametrize(
    ("line", "error", "fragments"),
    [
        (b'{"op":"bogus"}', UnknownOp, ["bogus"]),
        (b'{"op":5}', UnknownOp, []),
        (b"{}", UnknownOp, ["op"]),
        (b'{"id":1}', UnknownOp, ["op"]),
        (b'{"op":"ping","bogus":1}', BadRequest, ["bogus"]),
        (b'{"op":"result","id":1,"extra":true}', BadRequest, ["extra"]),
        (b'{"op":"submit","files":[{"name":"a","nope":1}]}', BadRequest, ["nope"]),
        (b'{"op":"result"}', BadRequest, ["id"]),
        (b'{"op":"result","id":"x"}', BadRequest, ["id"]),
        (b'{"op":"submit","files":[],"task":"sing"}', BadRequest, ["task"]),
        (b'{"op":"ping"', BadRequest, ["malformed"]),
        (b"{nope", BadRequest, ["malformed"]),
        (b"", BadRequest, ["malformed"]),
        (b"[]", BadRequest, []),
    ],
    ids=[
        "unknown-op",
        "op-not-a-string",
        "missing-op",
        "missing-op-other-field",
        "unknown-field",
        "unknown-field-result",
        "unknown-nested-field",
        "missing-field",
        "wrong-type",
        "bad-literal",
        "truncated-json",
        "malformed-json",
        "empty",
        "not-an-object",
    ],
)
def test_decode_request_refuses(line: bytes, error: type[BadRequest], fragments: list[str]) -> None:
    with pytest.raises(BadRequest) as info:
        p.decode_request(line)
    assert type(info.value) is error
    for fragment in fragments:
        assert fragment in info.value.message


def test_unknown_op_code() -> None:
    with pytest.raises(UnknownOp) as info:
        p.decode_request(b'{"op":"bogus"}')
    assert info.value.code == "unknown_op"


# ---- replies -----------------------------------------------------------------------------------------


def test_error_reply_encoding() -> None:
    line = p.encode_line(p.Error(error=p.ErrorBody(code="not_found", message="no job 3", job_id=3)))
    assert json.loads(line) == {
        "reply": "error",
        "ok": False,
        "error": {"code": "not_found", "message": "no job 3", "job_id": 3},
    }


def test_pong_encoding() -> None:
    assert json.loads(p.encode_line(p.Pong(version="0.1.0"))) == {
        "reply": "pong",
        "ok": True,
        "version": "0.1.0",
        "protocol": p.PROTOCOL_VERSION,
    }


@pytest.mark.parametrize(
    "reply",
    [
        p.Pong(version="0.1.0"),
        p.Error(error=p.ErrorBody(code="queue_full", message="full")),
        p.Jobs(jobs=[], errors=[p.ErrorBody(code="not_found", message="x", job_id=1)]),
        p.Devices(devices=[]),
    ],
    ids=["pong", "error", "jobs", "devices"],
)
def test_reply_round_trips(reply: p.Reply) -> None:
    line = p.encode_line(reply)
    assert line.count(b"\n") == 1
    assert p.decode_reply(line) == reply


@pytest.mark.parametrize(
    "line",
    [b"garbage", b"", b'{"reply":"nope","ok":true}', b'{"ok":true}', b'{"reply":"pong"}', b"[1,2]"],
    ids=["garbage", "empty", "unknown-reply", "untagged", "pong-missing-version", "array"],
)
def test_decode_reply_refuses(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        p.decode_reply(line)


# ---- framing -----------------------------------------------------------------------------------------

STREAM = b'{"op":"ping"}\n\n   \n{"op":"gpu"}\nabc\n\n{"op":"stats"}\npartial'
STREAM_LINES = [b'{"op":"ping"}', b'{"op":"gpu"}', b"abc", b'{"op":"stats"}']


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 2, 7, len(STREAM)], ids=["1", "2", "7", "whole"])
def test_line_buffer_splits_across_chunks(size: int) -> None:
    buffer = p.LineBuffer(64)
    lines: list[bytes] = []
    for chunk in _chunks(STREAM, size):
        lines += buffer.feed(chunk)
    assert lines == STREAM_LINES
    assert buffer.feed(b"\n") == [b"partial"]


def test_line_buffer_line_of_exactly_the_limit() -> None:
    buffer = p.LineBuffer(8)
    assert buffer.feed(b"x" * 8) == []
    assert buffer.feed(b"\n") == [b"x" * 8]


def _split(items: list[bytes | RequestTooLarge]) -> tuple[list[bytes], list[RequestTooLarge]]:
    return [i for i in items if isinstance(i, bytes)], [i for i in items if isinstance(i, RequestTooLarge)]


@pytest.mark.parametrize(
    ("chunks", "error_at"),
    [
        ([b"x" * 9 + b"\n"], 0),
        ([b"xxxx", b"xxxxx\n"], 1),
        ([b"x" * 9], 0),
        ([b"xxxxx", b"xxxxx"], 1),
        ([b"xxxx", b"xxxx", b"x"], 2),
    ],
    ids=["newline-same-chunk", "newline-later-chunk", "no-newline-one-chunk", "accumulated", "accumulated-3"],
)
def test_line_buffer_too_large(chunks: list[bytes], error_at: int) -> None:
    buffer = p.LineBuffer(8)
    for chunk in chunks[:error_at]:
        assert buffer.feed(chunk) == []
    [error] = buffer.feed(chunks[error_at])
    assert isinstance(error, RequestTooLarge)
    assert error.code == "request_too_large"
    assert "8" in error.message


@pytest.mark.parametrize(
    ("chunks", "after"),
    [
        ([b"x" * 9 + b"\n"], [[b"good\n"]]),
        ([b"x" * 9], [[b"xxx"], [b"xx\ngood\n"]]),
        ([b"x" * 9], [[b"x" * 20], [b"\ngood\n"]]),
        ([b"xxxxx", b"xxxxx"], [[b"more"], [b"x\ngo", b"od\n"]]),
    ],
    ids=[
        "same-chunk-then-good",
        "discard-rest-of-line",
        "discard-beyond-limit-no-second-error",
        "accumulated-then-good",
    ],
)
def test_line_buffer_recovers_after_too_large(chunks: list[bytes], after: list[list[bytes]]) -> None:
    buffer = p.LineBuffer(8)
    items: list[bytes | RequestTooLarge] = []
    for chunk in chunks:
        items += buffer.feed(chunk)
    for group in after:
        for chunk in group:
            items += buffer.feed(chunk)
    lines, errors = _split(items)
    assert len(errors) == 1
    assert lines == [b"good"]
    assert buffer.feed(b"next\n") == [b"next"]


@pytest.mark.parametrize(
    "chunk",
    [b"good\n" + b"x" * 9 + b"\n", b"good\n" + b"x" * 9],
    ids=["newline-same-chunk", "no-newline"],
)
def test_line_buffer_keeps_good_lines_around_a_long_one_in_order(chunk: bytes) -> None:
    buffer = p.LineBuffer(8)
    items = buffer.feed(chunk) + buffer.feed(b"\nafter\n")
    assert items[0] == b"good"
    assert isinstance(items[1], RequestTooLarge)
    assert items[2:] == [b"after"]


def test_encode_line_escapes_newlines_in_strings() -> None:
    line = p.encode_line(p.Error(error=p.ErrorBody(code="x", message="one\ntwo\r\n")))
    assert line.count(b"\n") == 1
    reply = p.decode_reply(line)
    assert isinstance(reply, p.Error)
    assert reply.error.message == "one\ntwo\r\n"


def test_struct_equality_sanity() -> None:
    # round-trip tests compare Structs with ==; make sure that is field-wise here
    assert p.Result(id=1) != p.Result(id=2)
    assert msgspec.structs.asdict(p.Status()) == {"ids": [], "state": None, "limit": 1000}
