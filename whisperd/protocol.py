"""The control protocol, shared by whisperd and whisperctl: tagged msgspec Structs, one decoder each way,
and newline framing. Transport (sockets, fd passing) and dispatch live elsewhere.

Version 1. Every request is one JSON object on one line, tagged by "op"; every reply is one JSON object
on one line, tagged by "reply" and carrying "ok". See docs/protocol.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from whisperd.errors import BadRequest, ProtocolError, RequestTooLarge, UnknownOp
from whisperd.jobs import JobState

PROTOCOL_VERSION = 1
Task = Literal["transcribe", "translate"]


# ---- shared payloads ---------------------------------------------------------------------------------


class Word(msgspec.Struct, forbid_unknown_fields=False):
    start: float
    end: float
    word: str
    probability: float


class Segment(msgspec.Struct, forbid_unknown_fields=False):
    id: int
    start: float
    end: float
    text: str
    words: list[Word] | None = None


class Transcript(msgspec.Struct, forbid_unknown_fields=False):
    language: str
    language_probability: float
    duration_s: float
    text: str
    segments: list[Segment]


class JobView(msgspec.Struct, kw_only=True):
    id: int
    state: JobState
    progress: float  # 0..100
    retries: int
    device: str | None  # cpu or cuda:N, once dispatched
    worker: str | None
    model: str
    language: str | None
    task: Task
    priority: int
    word_timestamps: bool
    error: str | None
    filename: str
    owner_uid: int
    audio_duration_s: float | None
    created_at: float  # unix seconds
    updated_at: float
    started_at: float | None
    finished_at: float | None


class DeviceView(msgspec.Struct, kw_only=True):
    name: str  # "cpu" or "cuda:N"
    index: int | None
    uuid: str | None
    healthy: bool
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    memory_free_bytes: int | None
    memory_reserved_bytes: int
    memory_available_bytes: int | None
    utilization_ratio: float | None
    temperature_c: float | None
    power_w: float | None
    workers: int
    running_batches: int


class WorkerView(msgspec.Struct, kw_only=True):
    id: str
    device: str
    pid: int | None
    state: str  # starting | idle | busy | stopped
    models: list[str]
    jobs: list[int]
    restarts: int


class StatsView(msgspec.Struct, kw_only=True):
    states: dict[str, int]
    queue_depth: int  # PENDING + RETRYING
    running_jobs: int
    workers: list[WorkerView]
    uptime_s: float
    audio_seconds_total: float
    processing_seconds_total: float
    realtime_factor: float | None  # audio seconds per processing second since start


class ErrorBody(msgspec.Struct):
    code: str
    message: str
    job_id: int | None = None


# ---- requests ----------------------------------------------------------------------------------------


class _Request(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, kw_only=True):
    pass


class Ping(_Request, tag="ping", kw_only=True):
    pass


class SubmitFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str  # what status shows; the caller's path or a label
    fd_index: int | None = None  # index into the descriptors sent with this request (SCM_RIGHTS)
    path: str | None = None  # a path the daemon opens itself: only for root or the daemon's own user


class Submit(_Request, tag="submit", kw_only=True):
    files: list[SubmitFile]
    model: str | None = None
    language: str | None = None
    task: Task = "transcribe"
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 0  # higher runs first
    word_timestamps: bool = False


class Status(_Request, tag="status", kw_only=True):
    ids: list[int] = []
    state: JobState | None = None
    limit: Annotated[int, msgspec.Meta(ge=1)] = 1000  # the newest jobs, when no ids are given


class Cancel(_Request, tag="cancel", kw_only=True):
    ids: list[int]


class Result(_Request, tag="result", kw_only=True):
    id: int


class Gpu(_Request, tag="gpu", kw_only=True):
    pass


class Stats(_Request, tag="stats", kw_only=True):
    pass


class Watch(_Request, tag="watch", kw_only=True):
    pass


Request = Ping | Submit | Status | Cancel | Result | Gpu | Stats | Watch


# ---- replies -----------------------------------------------------------------------------------------


class _Reply(msgspec.Struct, tag_field="reply", kw_only=True):
    ok: bool = True


class Pong(_Reply, tag="pong", kw_only=True):
    version: str
    protocol: int = PROTOCOL_VERSION


class Jobs(_Reply, tag="jobs", kw_only=True):
    """Answers submit, status and cancel; errors lists per-job failures of a cancel."""

    jobs: list[JobView]
    errors: list[ErrorBody] = []


class ResultReply(_Reply, tag="result", kw_only=True):
    job: JobView
    transcript: Transcript


class Devices(_Reply, tag="devices", kw_only=True):
    devices: list[DeviceView]


class StatsReply(_Reply, tag="stats", kw_only=True):
    stats: StatsView


class JobEventReply(_Reply, tag="job_event", kw_only=True):
    job: JobView


class DeviceSnapshot(_Reply, tag="device_snapshot", kw_only=True):
    devices: list[DeviceView]


class SystemSnapshot(_Reply, tag="system_snapshot", kw_only=True):
    stats: StatsView


class Error(_Reply, tag="error", kw_only=True):
    ok: bool = False
    error: ErrorBody


Reply = (
    Pong | Jobs | ResultReply | Devices | StatsReply | JobEventReply | DeviceSnapshot | SystemSnapshot | Error
)

request_decoder = msgspec.json.Decoder(Request)
reply_decoder = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()


def encode_line(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message) + b"\n"


def decode_request(line: bytes) -> Request:
    try:
        return request_decoder.decode(line)
    except msgspec.ValidationError as exc:
        if "$.op" in str(exc) or "missing required field `op`" in str(exc):
            raise UnknownOp(f"unknown or missing op: {exc}") from exc
        raise BadRequest(f"invalid request: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc


def decode_reply(line: bytes) -> Reply:
    try:
        return reply_decoder.decode(line)
    except msgspec.MsgspecError as exc:
        raise ProtocolError(f"undecodable reply from whisperd: {exc}") from exc


class LineBuffer:
    """Splits a byte stream into lines of at most max_line_bytes. An over-long line comes out, in its place
    in the stream, as a RequestTooLarge error (once), and the rest of it is skipped up to its newline."""

    def __init__(self, max_line_bytes: int) -> None:
        self._max = max_line_bytes
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | RequestTooLarge]:
        self._buf += data
        items: list[bytes | RequestTooLarge] = []
        while (newline := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:newline])
            del self._buf[: newline + 1]
            if self._discarding:
                self._discarding = False
            elif len(line) > self._max:
                items.append(self._too_large())
            elif line.strip():
                items.append(line)
        if len(self._buf) > self._max:
            self._buf.clear()
            if not self._discarding:
                self._discarding = True
                items.append(self._too_large())
        elif self._discarding:
            self._buf.clear()
        return items

    def _too_large(self) -> RequestTooLarge:
        return RequestTooLarge(f"request exceeds {self._max} bytes")
