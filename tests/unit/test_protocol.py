"""The control protocol: the wire format as docs/protocol.md documents it, the request and reply codecs'
refusals, and the newline framing."""

from __future__ import annotations

import json
import re
import typing
import unicodedata
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from whisperd import protocol as p
from whisperd.errors import BadRequest, ProtocolError, RequestTooLarge, UnknownOp
from whisperd.jobs import JobState

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
# the eleven ops of the doc
OPS = ["ping", "submit", "status", "cancel", "result", "gpu", "stats", "watch",
       "token_create", "token_revoke", "token_list"]  # fmt: skip

Json = dict[str, Any]


def wire(message: Json) -> bytes:
    """A message as the doc writes it: compact JSON, keys in the order given."""
    return json.dumps(message, separators=(",", ":")).encode()


def documented_lines() -> list[bytes]:
    """Every line of every ```json example block in docs/protocol.md."""
    blocks = re.findall(r"^```json\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    return [line.encode() for block in blocks for line in block.splitlines() if line.strip()]


# ---- golden requests: the doc's examples, the Structs they decode to ----------------------------------

PROMPT = "Ana, Bob; the Q3 budget."
# The defaults the doc's tables give for the optional request fields; the encoder writes every field.
SUBMIT_DEFAULTS: Json = {"model": None, "language": None, "task": "transcribe", "priority": 0,
                         "word_timestamps": False, "prompt": None, "temperature": None}  # fmt: skip
FILE_DEFAULTS: Json = {"fd_index": None, "path": None}
STATUS_DEFAULTS: Json = {"ids": [], "state": None, "limit": 1000}

GOLDEN_REQUESTS: list[tuple[str, Json, p.Request]] = [
    ("ping", {"op": "ping"}, p.Ping()),
    (
        "submit-fd",
        {
            "op": "submit",
            "files": [{"name": "/home/ana/talk.wav", "fd_index": 0}],
            "model": "tiny.en",
            "priority": -5,
        },
        p.Submit(files=[p.SubmitFile(name="/home/ana/talk.wav", fd_index=0)], model="tiny.en", priority=-5),
    ),
    (
        "submit-path",
        {
            "op": "submit",
            "files": [{"name": "talk.wav", "path": "/srv/audio/talk.wav"}],
            "language": "de",
            "task": "translate",
        },
        p.Submit(
            files=[p.SubmitFile(name="talk.wav", path="/srv/audio/talk.wav")], language="de", task="translate"
        ),
    ),
    (
        "submit-options",
        {
            "op": "submit",
            "files": [{"name": "standup.wav", "fd_index": 0}],
            "prompt": PROMPT,
            "temperature": 0.0,
        },
        p.Submit(files=[p.SubmitFile(name="standup.wav", fd_index=0)], prompt=PROMPT, temperature=0.0),
    ),
    ("status", {"op": "status"}, p.Status()),
    ("status-ids", {"op": "status", "ids": [42, 43]}, p.Status(ids=[42, 43])),
    (
        "status-state",
        {"op": "status", "state": "PENDING", "limit": 50},
        p.Status(state=JobState.PENDING, limit=50),
    ),
    ("cancel", {"op": "cancel", "ids": [42, 43]}, p.Cancel(ids=[42, 43])),
    ("result", {"op": "result", "id": 42}, p.Result(id=42)),
    ("gpu", {"op": "gpu"}, p.Gpu()),
    ("stats", {"op": "stats"}, p.Stats()),
    ("watch", {"op": "watch"}, p.Watch()),
    (
        "token_create",
        {"op": "token_create", "user": "ana", "comment": "Open WebUI"},
        p.TokenCreate(user="ana", comment="Open WebUI"),
    ),
    ("token_revoke", {"op": "token_revoke", "id": "3f9a1c2e"}, p.TokenRevoke(id="3f9a1c2e")),
    ("token_list", {"op": "token_list"}, p.TokenList()),
]


def with_documented_defaults(request: Json) -> Json:
    """The request with every optional field the doc lists filled in with its default."""
    if request["op"] == "submit":
        files = [{**FILE_DEFAULTS, **f} for f in request["files"]]
        return {**SUBMIT_DEFAULTS, **request, "files": files}
    if request["op"] == "status":
        return {**STATUS_DEFAULTS, **request}
    if request["op"] == "token_create":
        return {"comment": "", **request}
    return request


# ---- golden replies ----------------------------------------------------------------------------------

JOB: Json = {
    "id": 42, "state": "PENDING", "progress": 0.0, "retries": 0, "device": None, "worker": None,
    "model": "tiny.en", "language": None, "task": "transcribe", "priority": 0, "word_timestamps": False,
    "error": None, "filename": "/home/ana/talk.wav", "owner_uid": 1000, "audio_duration_s": None,
    "created_at": 1718000000.25, "updated_at": 1718000000.25, "started_at": None, "finished_at": None,
}  # fmt: skip
JOB_VIEW = p.JobView(
    id=42, state=JobState.PENDING, progress=0.0, retries=0, device=None, worker=None, model="tiny.en",
    language=None, task="transcribe", priority=0, word_timestamps=False, error=None,
    filename="/home/ana/talk.wav", owner_uid=1000, audio_duration_s=None, created_at=1718000000.25,
    updated_at=1718000000.25, started_at=None, finished_at=None,
)  # fmt: skip

CANCELLED: Json = {**JOB, "state": "CANCELLED", "updated_at": 1718000003.5, "finished_at": 1718000003.5}
CANCELLED_VIEW = msgspec.structs.replace(
    JOB_VIEW, state=JobState.CANCELLED, updated_at=1718000003.5, finished_at=1718000003.5
)
RAN: Json = {"device": "cpu", "worker": "cpu0", "audio_duration_s": 12.5, "updated_at": 1718000009.5,
             "started_at": 1718000001.0}  # fmt: skip
COMPLETED: Json = {**JOB, **RAN, "state": "COMPLETED", "progress": 100.0, "finished_at": 1718000009.5}
COMPLETED_VIEW = msgspec.structs.replace(
    JOB_VIEW, state=JobState.COMPLETED, progress=100.0, device="cpu", worker="cpu0", audio_duration_s=12.5,
    updated_at=1718000009.5, started_at=1718000001.0, finished_at=1718000009.5,
)  # fmt: skip
RUNNING: Json = {**JOB, **RAN, "id": 43, "state": "PROCESSING", "progress": 37.5}
RUNNING_VIEW = msgspec.structs.replace(
    JOB_VIEW, id=43, state=JobState.PROCESSING, progress=37.5, device="cpu", worker="cpu0",
    audio_duration_s=12.5, updated_at=1718000009.5, started_at=1718000001.0,
)  # fmt: skip

TRANSCRIPT: Json = {
    "language": "en", "language_probability": 0.98, "duration_s": 12.5, "text": "Hello there.",
    "segments": [{"id": 1, "start": 0.0, "end": 1.8, "text": " Hello there.", "words": None, "seek": 0,
                  "temperature": 0.0, "avg_logprob": -0.25, "compression_ratio": 0.9,
                  "no_speech_prob": 0.02}],
}  # fmt: skip
TRANSCRIPT_VIEW = p.Transcript(
    language="en", language_probability=0.98, duration_s=12.5, text="Hello there.",
    segments=[p.Segment(id=1, start=0.0, end=1.8, text=" Hello there.", words=None, seek=0, temperature=0.0,
                        avg_logprob=-0.25, compression_ratio=0.9, no_speech_prob=0.02)],
)  # fmt: skip

CPU: Json = {
    "name": "cpu", "index": None, "uuid": None, "healthy": True, "memory_total_bytes": None,
    "memory_used_bytes": None, "memory_free_bytes": None, "memory_reserved_bytes": 0,
    "memory_available_bytes": None, "utilization_ratio": None, "temperature_c": None, "power_w": None,
    "workers": 16, "running_batches": 1,
}  # fmt: skip
CPU_VIEW = p.DeviceView(
    name="cpu", index=None, uuid=None, healthy=True, memory_total_bytes=None, memory_used_bytes=None,
    memory_free_bytes=None, memory_reserved_bytes=0, memory_available_bytes=None, utilization_ratio=None,
    temperature_c=None, power_w=None, workers=16, running_batches=1,
)  # fmt: skip
GPU: Json = {
    "name": "cuda:0", "index": 0, "uuid": "GPU-5e2a7c1d-0000-0000-0000-000000000000", "healthy": True,
    "memory_total_bytes": 150754820096, "memory_used_bytes": 2147483648, "memory_free_bytes": 148607336448,
    "memory_reserved_bytes": 0, "memory_available_bytes": 148607336448, "utilization_ratio": 0.0,
    "temperature_c": 31.0, "power_w": 74.5, "workers": 0, "running_batches": 0,
    "placement_floor_bytes": 15075482010,
}  # fmt: skip
GPU_VIEW = p.DeviceView(
    name="cuda:0", index=0, uuid="GPU-5e2a7c1d-0000-0000-0000-000000000000", healthy=True,
    memory_total_bytes=150754820096, memory_used_bytes=2147483648, memory_free_bytes=148607336448,
    memory_reserved_bytes=0, memory_available_bytes=148607336448, utilization_ratio=0.0, temperature_c=31.0,
    power_w=74.5, workers=0, running_batches=0, placement_floor_bytes=15075482010,
)  # fmt: skip

STATS: Json = {
    "states": {"PENDING": 2, "PROCESSING": 1, "RETRYING": 0, "COMPLETED": 40, "FAILED": 0, "CANCELLED": 0},
    "queue_depth": 2, "running_jobs": 1,
    "workers": [{"id": "cpu0", "device": "cpu", "pid": 4242, "state": "busy", "models": ["tiny.en"],
                 "jobs": [43], "restarts": 0}],
    "uptime_s": 3600.5, "audio_seconds_total": 1800.0, "processing_seconds_total": 120.0,
    "realtime_factor": 15.0,
    "users": [{"uid": 1000, "queued_jobs": 2, "running_jobs": 1, "finished_jobs": 40, "spool_bytes": 5242880,
               "audio_seconds": 1800.0}],
}  # fmt: skip
STATS_VIEW = p.StatsView(
    states={"PENDING": 2, "PROCESSING": 1, "RETRYING": 0, "COMPLETED": 40, "FAILED": 0, "CANCELLED": 0},
    queue_depth=2, running_jobs=1,
    workers=[p.WorkerView(id="cpu0", device="cpu", pid=4242, state="busy", models=["tiny.en"], jobs=[43],
                          restarts=0)],
    uptime_s=3600.5, audio_seconds_total=1800.0, processing_seconds_total=120.0, realtime_factor=15.0,
    users=[p.UserStatsView(uid=1000, queued_jobs=2, running_jobs=1, finished_jobs=40, spool_bytes=5242880,
                           audio_seconds=1800.0)],
)  # fmt: skip

UNKNOWN_MODEL = "unknown model 'large'; this daemon serves: tiny.en"
TOKEN: Json = {"id": "3f9a1c2e", "user": "ana", "uid": 1000, "created_at": 1718000000.0,
               "comment": "Open WebUI"}  # fmt: skip
TOKEN_VIEW = p.TokenView(id="3f9a1c2e", user="ana", uid=1000, created_at=1718000000.0, comment="Open WebUI")
SECRET_TOKEN = "wsd_3f9a1c2e_5M0Ixg2PqKkK6N1YyqSg1ZxE8W4Jr9m2HcVtQb7aLdU"

GOLDEN_REPLIES: list[tuple[str, Json, p.Reply]] = [
    (
        "pong",
        {"reply": "pong", "ok": True, "version": "0.1.0", "protocol": 4, "models": ["tiny.en"]},
        p.Pong(version="0.1.0", models=["tiny.en"]),  # as the daemon builds them: defaults are on the wire
    ),
    ("jobs", {"reply": "jobs", "ok": True, "jobs": [JOB], "errors": []}, p.Jobs(jobs=[JOB_VIEW])),
    (
        "jobs-cancel",
        {
            "reply": "jobs",
            "ok": True,
            "jobs": [CANCELLED],
            "errors": [{"code": "not_found", "message": "no job 99", "job_id": 99}],
        },
        p.Jobs(jobs=[CANCELLED_VIEW], errors=[p.ErrorBody(code="not_found", message="no job 99", job_id=99)]),
    ),
    (
        "result",
        {
            "reply": "result",
            "ok": True,
            "job": {**COMPLETED, "temperature": 0.0},
            "transcript": TRANSCRIPT,
            "prompt": PROMPT,
        },
        p.ResultReply(
            job=msgspec.structs.replace(COMPLETED_VIEW, temperature=0.0),
            transcript=TRANSCRIPT_VIEW,
            prompt=PROMPT,
        ),
    ),
    (
        "devices",
        {"reply": "devices", "ok": True, "devices": [CPU, GPU]},
        p.Devices(devices=[CPU_VIEW, GPU_VIEW]),
    ),
    ("stats", {"reply": "stats", "ok": True, "stats": STATS}, p.StatsReply(stats=STATS_VIEW)),
    ("job_event", {"reply": "job_event", "ok": True, "job": RUNNING}, p.JobEventReply(job=RUNNING_VIEW)),
    (
        "device_snapshot",
        {"reply": "device_snapshot", "ok": True, "devices": [CPU]},
        p.DeviceSnapshot(devices=[CPU_VIEW]),
    ),
    (
        "system_snapshot",
        {"reply": "system_snapshot", "ok": True, "stats": STATS},
        p.SystemSnapshot(stats=STATS_VIEW),
    ),
    (
        "token_created",
        {"reply": "token_created", "ok": True, "token": SECRET_TOKEN, "info": TOKEN},
        p.TokenCreated(token=SECRET_TOKEN, info=TOKEN_VIEW),
    ),
    (
        "token_revoked",
        {"reply": "token_revoked", "ok": True, "id": "3f9a1c2e", "info": TOKEN},
        p.TokenRevoked(id="3f9a1c2e", info=TOKEN_VIEW),
    ),
    ("tokens", {"reply": "tokens", "ok": True, "tokens": [TOKEN]}, p.Tokens(tokens=[TOKEN_VIEW])),
    (
        "error",
        {
            "reply": "error",
            "ok": False,
            "error": {"code": "unknown_model", "message": UNKNOWN_MODEL, "job_id": None},
        },
        p.Error(error=p.ErrorBody(code="unknown_model", message=UNKNOWN_MODEL)),
    ),
]

REQUEST_IDS = [name for name, _, _ in GOLDEN_REQUESTS]
REPLY_IDS = [name for name, _, _ in GOLDEN_REPLIES]


def test_goldens_are_exactly_the_documented_examples() -> None:
    goldens = [wire(m) for _, m, _ in GOLDEN_REQUESTS] + [wire(m) for _, m, _ in GOLDEN_REPLIES]
    assert documented_lines() == goldens


def test_goldens_cover_every_request_and_reply_type() -> None:
    assert {type(r) for _, _, r in GOLDEN_REQUESTS} == set(typing.get_args(p.Request))
    assert {type(r) for _, _, r in GOLDEN_REPLIES} == set(typing.get_args(p.Reply))
    assert {m["op"] for _, m, _ in GOLDEN_REQUESTS} == set(OPS)


@pytest.mark.parametrize(("message", "expected"), [(m, r) for _, m, r in GOLDEN_REQUESTS], ids=REQUEST_IDS)
def test_documented_request_decodes(message: Json, expected: p.Request) -> None:
    decoded = p.decode_request(wire(message))
    assert type(decoded) is type(expected)
    assert decoded == expected


@pytest.mark.parametrize(("message", "expected"), [(m, r) for _, m, r in GOLDEN_REQUESTS], ids=REQUEST_IDS)
def test_documented_request_with_its_defaults_spelled_out_decodes_the_same(
    message: Json, expected: p.Request
) -> None:
    assert p.decode_request(wire(with_documented_defaults(message))) == expected


@pytest.mark.parametrize(("message", "request_"), [(m, r) for _, m, r in GOLDEN_REQUESTS], ids=REQUEST_IDS)
def test_request_encodes_to_the_documented_fields(message: Json, request_: p.Request) -> None:
    # the encoder writes every field, so compare with the doc's line plus the doc's defaults
    line = p.encode_line(request_)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == with_documented_defaults(message)


@pytest.mark.parametrize(("message", "expected"), [(m, r) for _, m, r in GOLDEN_REPLIES], ids=REPLY_IDS)
def test_documented_reply_decodes(message: Json, expected: p.Reply) -> None:
    decoded = p.decode_reply(wire(message))
    assert type(decoded) is type(expected)
    assert decoded == expected


@pytest.mark.parametrize(("message", "reply"), [(m, r) for _, m, r in GOLDEN_REPLIES], ids=REPLY_IDS)
def test_reply_encodes_to_the_documented_bytes(message: Json, reply: p.Reply) -> None:
    # "The daemon always sends every field of a reply, null included": the documented line, byte for byte
    assert p.encode_line(reply) == wire(message) + b"\n"


def with_unknown_fields(value: Any) -> Any:
    """The value with an extra field in every object, at every depth (stats.states is a map, not an
    object: its keys are data)."""
    if isinstance(value, dict):
        fields = {k: v if k == "states" else with_unknown_fields(v) for k, v in value.items()}
        return {**fields, "added_later": [1, {"x": None}]}
    if isinstance(value, list):
        return [with_unknown_fields(v) for v in value]
    return value


WORD = {"start": 0.0, "end": 0.5, "word": " Hello", "probability": 0.9}
WITH_WORDS = {**TRANSCRIPT, "segments": [{**TRANSCRIPT["segments"][0], "words": [WORD]}]}
WITH_WORDS_VIEW = msgspec.structs.replace(
    TRANSCRIPT_VIEW,
    segments=[
        msgspec.structs.replace(
            TRANSCRIPT_VIEW.segments[0], words=[p.Word(start=0.0, end=0.5, word=" Hello", probability=0.9)]
        )
    ],
)
FORWARD_COMPATIBLE = [
    *[(m, r) for _, m, r in GOLDEN_REPLIES],
    (
        {"reply": "result", "ok": True, "job": COMPLETED, "transcript": WITH_WORDS},
        p.ResultReply(job=COMPLETED_VIEW, transcript=WITH_WORDS_VIEW),
    ),
]


@pytest.mark.parametrize(("message", "expected"), FORWARD_COMPATIBLE, ids=[*REPLY_IDS, "result-words"])
def test_reply_decoding_ignores_fields_it_does_not_know(message: Json, expected: p.Reply) -> None:
    # docs, versioning: "Clients must ignore reply fields they do not know (whisperctl's decoders do)"
    assert p.decode_reply(wire(with_unknown_fields(message))) == expected


# ---- decoding refusals -------------------------------------------------------------------------------


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


# ---- properties --------------------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)

# field names of the requests, so that generated objects often come close to valid ones
FIELD_NAMES = ["files", "name", "fd_index", "path", "model", "language", "task", "priority",
               "word_timestamps", "ids", "state", "limit", "id", "op"]  # fmt: skip
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from([*OPS, *JobState, "transcribe", "translate"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), json_values, max_size=6)


def decodes_or_refuses(line: bytes) -> p.Request | None:
    """decode_request either gives a Request or raises a BadRequest (UnknownOp is one); nothing else."""
    try:
        decoded = p.decode_request(line)
    except BadRequest as exc:
        assert exc.code in ("bad_request", "unknown_op")
        return None
    assert isinstance(decoded, typing.get_args(p.Request))
    return decoded


@PROPERTY_SETTINGS
@given(st.binary(max_size=200))
def test_decode_request_on_arbitrary_bytes_only_refuses(data: bytes) -> None:
    decodes_or_refuses(data)


@PROPERTY_SETTINGS
@given(json_values)
def test_decode_request_on_arbitrary_json_only_refuses(value: object) -> None:
    decodes_or_refuses(json.dumps(value).encode())


@PROPERTY_SETTINGS
@given(json_objects, st.sampled_from([None, *OPS]))
def test_decode_request_on_arbitrary_objects_only_refuses(obj: Json, op: str | None) -> None:
    if op is None:
        obj.pop("op", None)
    else:
        obj["op"] = op
    decoded = decodes_or_refuses(json.dumps(obj).encode())
    if decoded is not None:
        assert msgspec.json.decode(p.encode_line(decoded))["op"] == obj["op"]
    if op is None or not isinstance(obj.get("op"), str):
        assert decoded is None


TOO_LARGE = "<too large>"
line_bytes = st.lists(
    st.sampled_from([b"a", b"{}", b" ", b"\t", b"xyz", b"\n", b"\n\n", b"\xff"]), max_size=40
)


def model_lines(stream: bytes, max_line: int) -> list[bytes | str]:
    """The lines of the whole stream split at once: blank ones dropped, over-long ones (the unterminated
    tail included) reported once each."""
    *complete, tail = stream.split(b"\n")
    items: list[bytes | str] = [
        TOO_LARGE if len(line) > max_line else line
        for line in complete
        if len(line) > max_line or line.strip()
    ]
    return [*items, TOO_LARGE] if len(tail) > max_line else items


def fed(buffer: p.LineBuffer, chunks: list[bytes]) -> list[bytes | str]:
    items: list[bytes | str] = []
    for chunk in chunks:
        for item in buffer.feed(chunk):
            if isinstance(item, RequestTooLarge):
                assert item.code == "request_too_large"
                items.append(TOO_LARGE)
            else:
                items.append(item)
    return items


@PROPERTY_SETTINGS
@given(line_bytes.map(b"".join), st.integers(min_value=1, max_value=12), st.data())
def test_line_buffer_chunking_does_not_change_the_lines(
    stream: bytes, max_line: int, data: st.DataObject
) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(min_value=0, max_value=len(stream))), label="cuts"))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole = fed(p.LineBuffer(max_line), [stream])
    assert whole == model_lines(stream, max_line)
    assert fed(p.LineBuffer(max_line), chunks) == whole


# ---- bounds (docs/protocol.md, "limits") --------------------------------------------------------------


def _submit(**fields: Any) -> bytes:
    files = fields.pop("files", [{"name": "a.wav", "fd_index": 0}])
    return wire({"op": "submit", "files": files, **fields})


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (_submit(files=[{"name": "x" * 4097, "fd_index": 0}]), "4096"),
        (_submit(files=[{"name": "a\nINFO forged line", "fd_index": 0}]), "control characters"),
        (_submit(files=[{"name": "\x1b[2Jcleared", "fd_index": 0}]), "control characters"),
        (_submit(files=[{"name": "a\u0085b", "fd_index": 0}]), "control characters"),
        (_submit(files=[{"name": "a", "path": "/x\x00y"}]), "NUL"),
        (_submit(files=[{"name": "a", "path": "/" + "x" * 4096}]), "4096"),
        (_submit(files=[{"name": "a", "fd_index": 0}] * 1001), "1000"),
        (_submit(language="x" * 17), "16"),
        (_submit(language="EN"), "language code"),
        (_submit(language="e n"), "language code"),
        (_submit(model="m" * 257), "256"),
        (_submit(prompt="p" * 4097), "4096"),
        (_submit(prompt="a\x00b"), "NUL"),
        (_submit(prompt=7), "str"),
        (_submit(temperature=1.01), "<= 1.0"),
        (_submit(temperature=-0.1), ">= 0.0"),
        (_submit(temperature="0.5"), "float"),
        (wire({"op": "status", "limit": 10_001}), "10000"),
        (wire({"op": "status", "ids": list(range(1, 10_002))}), "10000"),
        (wire({"op": "cancel", "ids": list(range(1, 10_002))}), "10000"),
        (wire({"op": "status", "ids": [2**63]}), "9223372036854775807"),
        (wire({"op": "cancel", "ids": [2**64]}), "9223372036854775807"),
        (wire({"op": "result", "id": 2**63}), "9223372036854775807"),
        (wire({"op": "result", "id": 0}), ">= 1"),
        (wire({"op": "status", "ids": [-1]}), ">= 1"),
    ],
    ids=[
        "name-length", "name-newline", "name-escape", "name-c1", "path-nul", "path-length", "files",
        "language-length", "language-case", "language-space", "model-length", "prompt-length", "prompt-nul",
        "prompt-type", "temperature-high", "temperature-negative", "temperature-type", "status-limit",
        "status-ids", "cancel-ids", "status-id-2**63", "cancel-id-2**64", "result-id-2**63", "result-id-0",
        "status-id-neg",
    ],
)  # fmt: skip
def test_bounds_are_refused_naming_the_limit(line: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        p.decode_request(line)
    assert info.value.code == "bad_request"
    assert fragment in info.value.message


@pytest.mark.parametrize(
    "line",
    [
        _submit(files=[{"name": "é" * 4096, "fd_index": 0}] * 1000, language="zh-hant", model="m" * 256),
        _submit(prompt="é\n" * 2048, temperature=1),
        _submit(prompt="", temperature=0),
        wire({"op": "status", "ids": [2**63 - 1] * 10_000, "limit": 10_000}),
        wire({"op": "cancel", "ids": list(range(1, 10_001))}),
    ],
    ids=["submit-at-limits", "prompt-at-limits", "prompt-empty", "status-at-limits", "cancel-at-limits"],
)
def test_requests_at_the_limits_decode(line: bytes) -> None:
    assert isinstance(p.decode_request(line), p.Submit | p.Status | p.Cancel)


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("where", ["before-op", "after-op", "in-ids"])
def test_deep_nesting_is_a_bad_request(depth: int, where: str) -> None:
    nested = b"[" * depth + b"]" * depth
    line = {
        "before-op": b'{"x":' + nested + b',"op":"ping"}',
        "after-op": b'{"op":"ping","x":' + nested + b"}",
        "in-ids": b'{"op":"status","ids":' + nested + b"}",
    }[where]
    with pytest.raises(BadRequest) as info:
        p.decode_request(line)
    assert info.value.code == "bad_request"


@PROPERTY_SETTINGS
@given(st.integers(min_value=1, max_value=200), st.sampled_from([b"[", b'{"a":', b'{"op":"ping","x":[']))
def test_decode_request_on_deeply_nested_json_only_refuses(depth_hundreds: int, opener: bytes) -> None:
    decodes_or_refuses(b'{"x":' + opener * (depth_hundreds * 100))


# ---- framing cost -------------------------------------------------------------------------------------


class CountingLineBuffer(p.LineBuffer):
    """Counts the bytes each newline search looks at."""

    searched = 0

    def _find_newline(self, start: int) -> int:
        found = super()._find_newline(start)
        self.searched += (found + 1 if found >= 0 else len(self._buf)) - start
        return found


def test_a_byte_at_a_time_sender_costs_each_byte_one_search() -> None:
    line = b'{"op":"status","ids":[' + b"1," * 500_000 + b"1]}"  # about 1 MB
    buffer = CountingLineBuffer(2 * len(line))
    items: list[bytes | RequestTooLarge] = []
    for i in range(len(line)):
        items += buffer.feed(line[i : i + 1])
    items += buffer.feed(b"\n")
    assert items == [line]
    # searched once each (before: about len(line)**2 / 2, half a terabyte of scanning)
    assert len(line) <= buffer.searched <= len(line) + 1


def test_a_byte_at_a_time_over_long_line_costs_each_byte_one_search() -> None:
    buffer = CountingLineBuffer(1000)
    items: list[bytes | RequestTooLarge] = []
    for _ in range(5000):
        items += buffer.feed(b"x")
    items += buffer.feed(b"\nok\n")
    assert [type(i) for i in items] == [RequestTooLarge, bytes] and items[1] == b"ok"
    assert 5000 <= buffer.searched <= 5000 + 4


# ---- showing untrusted text --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain é 漢字 😀", "plain é 漢字 😀"),
        ("a\nb\r\tc", "a\\x0ab\\x0d\\x09c"),
        ("\x1b[2J\x07", "\\x1b[2J\\x07"),
        ("\x9b31m\x7f", "\\x9b31m\\x7f"),
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),
        ("line\u2028sep", "line\\u2028sep"),
        ("bad\udcffbyte", "bad\\udcffbyte"),
    ],
    ids=["printable", "newlines", "escape", "c1-del", "bidi", "line-separator", "surrogate"],
)
def test_printable_escapes_what_could_rewrite_a_terminal_or_a_log(text: str, shown: str) -> None:
    assert p.printable(text) == shown


@PROPERTY_SETTINGS
@given(st.text())
def test_printable_leaves_nothing_a_terminal_acts_on(text: str) -> None:
    # controls, format characters (bidi), line and paragraph separators, lone surrogates
    acted_on = {"Cc", "Cf", "Zl", "Zp", "Cs"}
    assert not [c for c in p.printable(text) if unicodedata.category(c) in acted_on]


@pytest.mark.parametrize("name", ["talk.wav\n", "talk.wav\r\n", "\nwav", "a\u2028b"])
def test_a_name_ending_or_holding_a_line_break_is_refused(name: str) -> None:
    line = msgspec.json.encode({"op": "submit", "files": [{"name": name, "fd_index": 0}]})
    with pytest.raises(BadRequest):
        p.decode_request(line)


def test_a_language_code_with_a_final_newline_is_refused() -> None:
    line = msgspec.json.encode({"op": "submit", "files": [{"name": "a", "fd_index": 0}], "language": "en\n"})
    with pytest.raises(BadRequest):
        p.decode_request(line)
