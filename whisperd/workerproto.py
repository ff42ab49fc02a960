"""Messages between the daemon and its worker processes: msgspec JSON lines over the worker's pipes."""

from __future__ import annotations

import struct
from typing import Literal

import msgspec

from whisperd.protocol import Segment, Task, Transcript

Span = tuple[float, float]  # seconds from the start of a job's audio


class JobPart(msgspec.Struct, frozen=True, kw_only=True):
    """A time range of a job's audio decoded by one worker when the job is spread over several."""

    start_s: float
    end_s: float
    windows: list[Span] | None = None  # cut already (by the worker that shared it); None: cut it there


class JobSpec(msgspec.Struct, kw_only=True):
    job_id: int
    audio_path: str
    model: str  # the name users know
    model_source: str  # what faster-whisper loads: a name, a directory, or "bundled:tiny.en"
    language: str | None
    task: Task
    word_timestamps: bool
    beam_size: int
    vad_filter: bool
    mode: Literal["batched", "sequential"] = "sequential"  # how the worker decodes it (transcribe.mode)
    chunk_batch: int = 1  # windows per decoding call in batched mode (the worker's device kind's setting)
    filename: str = ""  # as its user submitted it: what error messages name (never the spool path)
    max_audio_duration_s: float = 0.0  # 0: no limit
    max_result_bytes: int = 0  # the encoded Finished line; 0: no limit
    audio_formats: list[str] = []  # FFmpeg demuxers allowed to parse the audio; empty: the built-in list
    # A part of a job spread over several workers, in the language the worker that shared it found; None:
    # the whole audio.
    part: JobPart | None = None
    # Batched mode: when the audio lasts at least twice this (transcribe.shard_min_audio_s, > 0), the
    # worker reports its length as soon as it is decoded, so the daemon may share the job before its windows
    # are; 0: never shared.
    shard_min_audio_s: float = 0.0
    # The job's decoding options (None: faster-whisper's defaults): Whisper's initial prompt, and one
    # sampling temperature (no fallback to higher ones; None: 0.0, then up to 1.0 where decoding fails).
    prompt: str | None = None
    temperature: float | None = None


# daemon -> worker

# On the worker's audio socket, one message per job of a batch, sent before the batch: (batch id, job id),
# with the job's audio attached as a descriptor (SCM_RIGHTS), or none if the daemon could not open it.
AUDIO_MESSAGE = struct.Struct("<qq")


class RunBatch(msgspec.Struct, tag="run_batch", kw_only=True):
    batch_id: int
    jobs: list[JobSpec]


class CancelJob(msgspec.Struct, tag="cancel_job", kw_only=True):
    job_id: int


class ShareJob(msgspec.Struct, tag="share_job", kw_only=True):
    """Workers idle: give up to `helpers` parts of the job's windows not yet decoded to them (answered by
    Shared, unless the job ends first)."""

    job_id: int
    helpers: int
    min_part_s: float  # transcribe.shard_min_audio_s: no part shorter


ToWorker = RunBatch | CancelJob | ShareJob

# worker -> daemon

# fatal: no retry can fix it (audio that does not decode); retryable: a retry may; oom: CUDA ran out of memory
FailureKind = Literal["fatal", "retryable", "oom"]


def failure_kind(exc: BaseException) -> FailureKind:
    """How an error while transcribing fails its job: out of memory (placed again with more room), or
    worth a retry."""
    return "oom" if "out of memory" in str(exc).lower() else "retryable"


# cancelled: its user cancelled it; batch_stopped: never attempted, through no fault of the job (the batch
# stopped after a batch-mate's out-of-memory error)
StopReason = Literal["cancelled", "batch_stopped"]


class Ready(msgspec.Struct, tag="ready", kw_only=True):
    pid: int
    models: list[str]  # already loaded


class Started(msgspec.Struct, tag="started", kw_only=True):
    job_id: int


class Progress(msgspec.Struct, tag="progress", kw_only=True):
    job_id: int
    progress: float
    audio_duration_s: float
    # The segments decoded since the job's previous Progress, in order, each numbered by its place in the
    # job's transcript (from 1); each is sent once. A part of a spread job sends its own part's.
    segments: list[Segment] = []


class Finished(msgspec.Struct, tag="finished", kw_only=True):
    job_id: int
    transcript: Transcript
    processing_s: float


class Failed(msgspec.Struct, tag="failed", kw_only=True):
    job_id: int
    kind: FailureKind
    error: str


class Stopped(msgspec.Struct, tag="stopped", kw_only=True):
    """The worker let go of a job without a result and without failing it."""

    job_id: int
    reason: StopReason


class Shared(msgspec.Struct, tag="shared", kw_only=True):
    """The answer to ShareJob: the part this worker keeps (what it decoded already included) and the parts
    it gave away, in order (none: too little was left to share). Asked while it still looks for speech, it
    gives away time ranges it has not cut; once its windows are cut, windows."""

    job_id: int
    language: str
    kept: JobPart
    parts: list[JobPart]


class BatchDone(msgspec.Struct, tag="batch_done", kw_only=True):
    batch_id: int
    models: list[str]  # loaded now, after any unloading


JobMessage = Started | Progress | Finished | Failed | Stopped | Shared  # about one job of the running batch
FromWorker = Ready | JobMessage | BatchDone

to_worker_decoder = msgspec.json.Decoder(ToWorker)
from_worker_decoder = msgspec.json.Decoder(FromWorker)


def _numpy_scalars(obj: object) -> object:
    """faster-whisper hands back numpy floats in places (word timestamps): send them as plain floats."""
    if hasattr(obj, "__float__"):
        return float(obj)  # type: ignore[arg-type,unused-ignore]
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


_encoder = msgspec.json.Encoder(enc_hook=_numpy_scalars)


def encode(message: ToWorker | FromWorker) -> bytes:
    return _encoder.encode(message) + b"\n"
