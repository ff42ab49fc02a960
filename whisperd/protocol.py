"""The control protocol, shared by whisperd and whisperctl: tagged msgspec Structs, one decoder each way,
and newline framing. Transport (sockets, fd passing) and dispatch live elsewhere.

Version 1. Every request is one JSON object on one line, tagged by "op"; every reply is one JSON object
on one line, tagged by "reply" and carrying "ok". See docs/protocol.md.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from whisperd.errors import BadRequest, ProtocolError, RequestTooLarge, UnknownOp
from whisperd.jobs import JobState

PROTOCOL_VERSION = 4
Task = Literal["transcribe", "translate"]

# ---- request bounds (docs/protocol.md, "limits"): what one request may ask for, so that no request costs
# far more than its size says; enforced by the one decoder below.

MAX_JOB_ID = 2**63 - 1  # SQLite's INTEGER
MAX_NAME_CHARS = 4096  # PATH_MAX: any path fits
MAX_MODEL_CHARS = 256
MAX_LANGUAGE_CHARS = 16
MAX_FILES_PER_SUBMIT = 1000
MAX_IDS_PER_REQUEST = 10_000
MAX_STATUS_LIMIT = 10_000
# An initial prompt: Whisper reads only its last 223 tokens (half its context), so more is only cost.
MAX_PROMPT_CHARS = 4096
# C0 and C1 controls, DEL and the Unicode line separators: a name is shown in terminals and log lines.
# \Z, not $: $ also matches before a final newline, which would let "name\n" through
_NO_CONTROLS = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*\Z"
_NO_NUL = r"^[^\x00]*\Z"
_LANGUAGE = r"^[a-z][a-z-]*\Z"
# A user name is one field of a line in the token file: no spaces either. \Z, not $: $ lets a final "\n" by.
_USER_NAME = r"^[^\s\x00-\x1f\x7f-\x9f]+\Z"
_ONE_LINE = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]*\Z"
_PATTERN_WORDS = {
    _NO_CONTROLS: "without control characters",
    _NO_NUL: "without NUL bytes",
    _LANGUAGE: "of lowercase letters and '-' (a language code such as \"en\")",
    _USER_NAME: "without spaces or control characters",
    _ONE_LINE: "without control characters",
}

JobId = Annotated[int, msgspec.Meta(ge=1, le=MAX_JOB_ID)]
JobIds = Annotated[list[JobId], msgspec.Meta(max_length=MAX_IDS_PER_REQUEST)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS, pattern=_NO_CONTROLS)]
FilePath = Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS, pattern=_NO_NUL)]
ModelName = Annotated[str, msgspec.Meta(max_length=MAX_MODEL_CHARS, pattern=_NO_CONTROLS)]
Language = Annotated[str, msgspec.Meta(max_length=MAX_LANGUAGE_CHARS, pattern=_LANGUAGE)]
Prompt = Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS, pattern=_NO_NUL)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
MAX_USER_CHARS = 256
MAX_TOKEN_COMMENT_CHARS = 256
MAX_TOKEN_ID_CHARS = 64
UserName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_USER_CHARS, pattern=_USER_NAME)]
TokenComment = Annotated[str, msgspec.Meta(max_length=MAX_TOKEN_COMMENT_CHARS, pattern=_ONE_LINE)]
TokenId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TOKEN_ID_CHARS, pattern=_ONE_LINE)]


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
    # The decoder's figures (OpenAI's verbose_json reports them): absent from transcripts stored before
    # they were kept, None from a decoder that gives none. Token ids are not kept (they would double a
    # transcript's size).
    seek: int = 0  # where the decoder's 30 s window started, in frames of 10 ms
    temperature: float | None = None  # of the decoding pass whose text was kept (fallbacks raise it)
    avg_logprob: float | None = None
    compression_ratio: float | None = None
    no_speech_prob: float | None = None


class Transcript(msgspec.Struct, forbid_unknown_fields=False):
    language: str
    language_probability: float
    duration_s: float
    text: str
    segments: list[Segment]


class JobView(msgspec.Struct, kw_only=True, omit_defaults=True):  # host only where there is one
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
    host: str | None = None  # the host running it, with a shared store (several hosts, one queue)
    # The sampling temperature asked for (None: faster-whisper's fallback schedule). The prompt is not
    # here: every caller sees the queue, and a prompt is the submitter's text (ResultReply carries it).
    temperature: float | None = None


class DeviceView(msgspec.Struct, kw_only=True, omit_defaults=True):
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
    host: str | None = None  # with a shared store: the host it belongs to
    # A GPU's placement threshold: with less available than this, no batch is placed on it (the running
    # configuration's min_free_memory_bytes and memory_safety_margin); None for the CPU
    placement_floor_bytes: int | None = None


class WorkerView(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    device: str
    pid: int | None
    state: str  # starting | idle | busy | stopped
    models: list[str]
    jobs: list[int]
    restarts: int
    host: str | None = None  # with a shared store: the host it runs on


class UserStatsView(msgspec.Struct, kw_only=True):
    """One user's share: every uid with a live job or a job finished since the daemon started."""

    uid: int
    queued_jobs: int  # PENDING + RETRYING
    running_jobs: int  # PROCESSING
    finished_jobs: int  # COMPLETED, FAILED or CANCELLED since start
    spool_bytes: int  # audio the user's live jobs hold in the spool
    audio_seconds: float  # audio of the user's jobs COMPLETED since start


class StatsView(msgspec.Struct, kw_only=True):
    states: dict[str, int]
    queue_depth: int  # PENDING + RETRYING
    running_jobs: int
    workers: list[WorkerView]
    uptime_s: float
    audio_seconds_total: float
    processing_seconds_total: float
    realtime_factor: float | None  # audio seconds per processing second since start
    users: list[UserStatsView] = []  # by uid; absent from daemons older than it


class TokenView(msgspec.Struct, kw_only=True):
    """An HTTP API token as it may be shown: never its secret, nor its hash."""

    id: str  # public: names the token (whisperctl token revoke ID)
    user: str  # the user of this machine it acts as
    uid: int
    created_at: float  # unix seconds
    comment: str


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
    name: Name  # what status shows; the caller's path or a label
    fd_index: int | None = None  # index into the descriptors sent with this request (SCM_RIGHTS)
    path: FilePath | None = None  # a path the daemon opens itself: only for root or the daemon's own user


class Submit(_Request, tag="submit", kw_only=True):
    files: Annotated[list[SubmitFile], msgspec.Meta(max_length=MAX_FILES_PER_SUBMIT)]
    model: ModelName | None = None
    language: Language | None = None
    task: Task = "transcribe"
    priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 0  # higher runs first
    word_timestamps: bool = False
    prompt: Prompt | None = None  # Whisper's initial prompt: spellings, names, style; "" or None: none
    temperature: Temperature | None = None  # one temperature, no fallback; None: 0.0, 0.2, .., 1.0 as needed


class Status(_Request, tag="status", kw_only=True):
    ids: JobIds = []
    state: JobState | None = None
    # the newest jobs, when no ids are given
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_STATUS_LIMIT)] = 1000


class Cancel(_Request, tag="cancel", kw_only=True):
    ids: JobIds


class Result(_Request, tag="result", kw_only=True):
    id: JobId


class Gpu(_Request, tag="gpu", kw_only=True):
    pass


class Stats(_Request, tag="stats", kw_only=True):
    pass


class Watch(_Request, tag="watch", kw_only=True):
    pass


class TokenCreate(_Request, tag="token_create", kw_only=True):
    """A bearer token for the HTTP API, acting as `user`: privileged callers only."""

    user: UserName
    comment: TokenComment = ""


class TokenRevoke(_Request, tag="token_revoke", kw_only=True):
    id: TokenId


class TokenList(_Request, tag="token_list", kw_only=True):
    pass


Request = (
    Ping | Submit | Status | Cancel | Result | Gpu | Stats | Watch | TokenCreate | TokenRevoke | TokenList
)


# ---- replies -----------------------------------------------------------------------------------------


class _Reply(msgspec.Struct, tag_field="reply", kw_only=True):
    ok: bool = True


class Pong(_Reply, tag="pong", kw_only=True):
    version: str
    protocol: int = PROTOCOL_VERSION
    models: list[str] = []  # what submit's model may name ([models]); absent from daemons older than it


class Jobs(_Reply, tag="jobs", kw_only=True):
    """Answers submit, status and cancel; errors lists per-job failures of a cancel."""

    jobs: list[JobView]
    errors: list[ErrorBody] = []


class ResultReply(_Reply, tag="result", kw_only=True):
    job: JobView
    transcript: Transcript
    prompt: str | None = None  # the job's initial prompt: only its owner (or a privileged caller) sees it


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


class TokenCreated(_Reply, tag="token_created", kw_only=True):
    token: str  # the only time it is sent: the daemon keeps its hash alone
    info: TokenView


class TokenRevoked(_Reply, tag="token_revoked", kw_only=True):
    id: str
    info: TokenView | None  # None: its line in the file was not a valid token (it is gone all the same)


class Tokens(_Reply, tag="tokens", kw_only=True):
    tokens: list[TokenView]


class Error(_Reply, tag="error", kw_only=True):
    ok: bool = False
    error: ErrorBody


Reply = (
    Pong | Jobs | ResultReply | Devices | StatsReply | JobEventReply | DeviceSnapshot | SystemSnapshot
    | TokenCreated | TokenRevoked | Tokens | Error
)  # fmt: skip

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
            raise UnknownOp(f"unknown or missing op: {exc}") from None
        raise BadRequest(f"invalid request: {_in_words(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    except RecursionError:  # msgspec skips an unknown field before the tag by recursing into it
        raise BadRequest("malformed JSON: nested too deeply") from None


def _in_words(message: str) -> str:
    """msgspec names a broken pattern by its regex; say what it means instead."""
    for pattern, words in _PATTERN_WORDS.items():
        message = message.replace(f"matching regex {pattern!r}", words)
    return message


def decode_reply(line: bytes) -> Reply:
    try:
        return reply_decoder.decode(line)
    except msgspec.MsgspecError as exc:
        raise ProtocolError(f"undecodable reply from whisperd: {exc}") from exc


class LineBuffer:
    """Splits a byte stream into lines of at most max_line_bytes. An over-long line comes out, in its place
    in the stream, as a RequestTooLarge error (once), and the rest of it is skipped up to its newline.
    Each byte is searched for a newline once, however the stream is cut (a sender of one byte at a time
    costs no more than one sending it whole)."""

    def __init__(self, max_line_bytes: int) -> None:
        self._max = max_line_bytes
        self._buf = bytearray()
        self._searched = 0  # bytes at the start of _buf known to hold no newline
        self._discarding = False

    def feed(self, data: bytes) -> list[bytes | RequestTooLarge]:
        self._buf += data
        items: list[bytes | RequestTooLarge] = []
        while (newline := self._find_newline(self._searched)) >= 0:
            line = bytes(self._buf[:newline])
            del self._buf[: newline + 1]
            self._searched = 0
            if self._discarding:
                self._discarding = False
            elif len(line) > self._max:
                items.append(self._too_large())
            elif line.strip():
                items.append(line)
        self._searched = len(self._buf)
        if len(self._buf) > self._max:
            self._clear()
            if not self._discarding:
                self._discarding = True
                items.append(self._too_large())
        elif self._discarding:
            self._clear()
        return items

    def _find_newline(self, start: int) -> int:
        return self._buf.find(b"\n", start)

    def _clear(self) -> None:
        self._buf.clear()
        self._searched = 0

    def _too_large(self) -> RequestTooLarge:
        return RequestTooLarge(f"request exceeds {self._max} bytes")


# ---- showing untrusted text ---------------------------------------------------------------------------

# Controls (Cc: terminal escapes), format characters (Cf: bidi overrides, invisible ones; Unicode 14), line
# and paragraph separators and lone surrogates (undecodable file names): shown escaped, so that a name or a
# message cannot rewrite a terminal or forge a log line.
_UNPRINTABLE = re.compile(
    r"[\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f"
    r"\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff\U000110bd\U000110cd"
    r"\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: str) -> str:
    """text with every control, format or separator character escaped as \\xNN or \\uNNNN."""
    return _UNPRINTABLE.sub(_escape, text)
