"""The configuration: one Struct tree decoded once from TOML; unknown keys are refused by name."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from whisperd.errors import ConfigError

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Ratio = Annotated[float, msgspec.Meta(ge=0, lt=1)]

GIB = 1024**3
BUNDLED_MODEL = "bundled:tiny.en"
# FFmpeg demuxers for audio and the common audio/video containers (a name matches every alias of a demuxer:
# "mov" is mov,mp4,m4a,3gp,...; "matroska" is matroska,webm).
AUDIO_FORMATS = (
    "aac", "aiff", "amr", "asf", "avi", "caf", "flac", "matroska", "mov", "mp3", "ogg", "w64", "wav", "wv",
)  # fmt: skip


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class DaemonConfig(_Section):
    socket_path: str = (
        ""  # empty: /run/whisperd/whisperd.sock as root, $XDG_RUNTIME_DIR or state dir otherwise
    )
    state_dir: str = ""  # empty: /var/lib/whisperd as root, ~/.local/state/whisperd otherwise
    socket_mode: int = 0o660
    max_request_bytes: PositiveInt = 1024 * 1024
    max_connections_per_uid: PositiveInt = 64  # open control connections of one uid; root has no limit
    send_timeout_s: Positive = 10.0  # a client that reads none of a reply for this long is disconnected
    max_audio_bytes: PositiveInt = 4 * GIB
    # Audio is copied into the spool by a pool of threads of its own (a read that never returns holds one):
    spool_threads: PositiveInt = 16
    max_spools_per_user: PositiveInt = 4  # copies one uid may have in progress at once; more: busy
    spool_timeout_s: Positive = 300.0  # a submit whose audio is not spooled by then is answered with an error
    max_queued_jobs: PositiveInt = 10_000
    # Per uid, so one user cannot fill the queue or the spool; root and the daemon's user are exempt.
    max_queued_jobs_per_user: PositiveInt = 1_000  # PENDING + RETRYING jobs of one uid
    max_spool_bytes_per_user: PositiveInt = 32 * GIB  # spooled audio of one uid's live jobs
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    drain_timeout_s: Positive = 30.0  # on SIGTERM, how long running jobs may finish before they are requeued


class SchedulerConfig(_Section):
    schedule_interval_s: Positive = 2.0  # between rounds when nothing wakes the scheduler sooner
    gpu_monitor_interval_s: Positive = 5.0
    performance_monitor_interval_s: Positive = 30.0
    batch_timeout_s: Positive = 5.0  # longest wait to fill min_batch_size
    min_batch_size: PositiveInt = 1
    max_batch_size: PositiveInt = 3
    memory_safety_margin: Ratio = 0.10  # share of a GPU's total memory left free after a reservation
    min_free_memory_bytes: NonNegativeInt = 1 * GIB
    max_retries: NonNegativeInt = 3
    retry_backoff_s: Positive = 1.0  # doubled at each retry
    retry_backoff_max_s: Positive = 60.0
    # Highest priority an unprivileged user may submit at (root and the daemon's user: up to 1000).
    user_max_priority: Annotated[int, msgspec.Meta(ge=-1000, le=1000)] = 0


class GpuConfig(_Section):
    enabled: bool = True  # false: never touch NVML or CUDA
    exclude: list[Annotated[int, msgspec.Meta(ge=0)]] = []  # NVML indices whisperd leaves alone
    workers_per_gpu: PositiveInt = 1
    compute_type: str = "float16"
    # "cuda" on real GPUs. "cpu" keeps everything per GPU (pinning, memory accounting, placement) but
    # runs each GPU worker's model on the CPU: for rehearsals and tests on machines without CUDA.
    worker_device: Literal["cuda", "cpu"] = "cuda"
    # GPU memory a batch reserves, by model name; models not named here use built-in estimates by size
    # (tiny .. large-v3, for float16 or int8), raised after each out-of-memory error.
    model_memory_bytes: dict[str, Annotated[int, msgspec.Meta(gt=0)]] = {}
    # Batched mode: each window a GPU worker decodes at once reserves this share of the model's figure on top
    # of it (activations and the beams' caches); the windows per call are as many as fit, up to
    # transcribe.gpu_chunk_batch.
    window_memory_ratio: Annotated[float, msgspec.Meta(ge=0)] = 0.25


class WorkersConfig(_Section):
    # -1: automatic: one per core when no GPU worker runs, none when GPUs do; 0: none.
    cpu_workers: Annotated[int, msgspec.Meta(ge=-1)] = -1
    cpu_threads: PositiveInt = 1  # measured: N single-thread workers beat one N-thread worker
    cpu_compute_type: str = "int8"
    restart_backoff_s: Positive = 0.5
    restart_backoff_max_s: Positive = 30.0
    # A cancelled job stops at the next decoding window (about 3 s of CPU for tiny.en on one thread); a
    # worker that has not stopped it after this long is killed and restarted.
    cancel_grace_s: Positive = 5.0
    start_timeout_s: Positive = 120.0
    max_models_per_worker: PositiveInt = 2
    # A job whose worker says nothing for this long (stuck in C code) has its worker killed, and the attempt
    # counts as failed. The longest quiet spells of a healthy job: a model fetched on first use, a 4-hour
    # file decoded and its spectrogram computed before the first segment.
    progress_timeout_s: Positive = 600.0
    # Resident memory of one worker process, checked every second; over it, the worker is killed and the
    # attempt counts as failed. 0: no cap. faster-whisper holds a job's whole spectrogram (about 1.7 GB an
    # hour of audio at its peak), so 16 GiB fits a job of transcribe.max_audio_duration_s with a large model.
    max_memory_bytes: NonNegativeInt = 16 * GIB
    # Largest result line a worker sends; a longer transcript fails its job. Below the daemon's 64 MiB line.
    max_result_bytes: Annotated[int, msgspec.Meta(ge=1024, le=60 * 1024 * 1024)] = 32 * 1024 * 1024
    # The FFmpeg demuxers that may parse submitted audio (no playlists, lists or image sequences).
    audio_formats: Annotated[list[str], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: list(AUDIO_FORMATS)
    )
    # Confine each worker (Linux Landlock and a seccomp filter, where the kernel has them): no writes, no
    # reads beyond Python, the models and system libraries, no control socket, no TCP but model downloads.
    sandbox: bool = True
    sandbox_read_paths: list[str] = []  # more paths workers may read (a CUDA install under /opt, ...)


class MetricsConfig(_Section):
    enabled: bool = True
    # host:port of the Prometheus endpoint (/metrics every 30 s, /metrics/gpu every 5 s); loopback by
    # default. WHISPERD_METRICS_ADDR overrides it.
    listen: str = "127.0.0.1:9464"
    max_connections: PositiveInt = 64  # open HTTP connections at once; more are answered 503 and closed
    idle_timeout_s: Positive = 60.0  # a connection without a request for this long is closed
    bind_retry_interval_s: Positive = 5.0  # while the address is taken (or cannot be bound), retry this often


class HttpConfig(_Section):
    # host:port of the HTTP API (OpenAI-compatible /v1/audio/..., /v1/models, /v1/whisperd/jobs:
    # docs/http.md); empty: off. Loopback unless you say otherwise. WHISPERD_HTTP_ADDR sets it. At
    # metrics.listen's address one server serves both.
    listen: str = ""
    # Bearer tokens (hashed) mapped to users: `whisperctl token create --user NAME` adds one; re-read on
    # SIGHUP. Empty: http-tokens in the state dir (where a relative path is taken too).
    tokens_file: str = ""
    # A request without a token from 127.0.0.1 or ::1 runs as anonymous_user (its limits, its jobs);
    # otherwise such a request is answered 401.
    allow_anonymous_loopback: bool = False
    anonymous_user: str = "nobody"
    max_upload_bytes: PositiveInt = 1 * GIB  # a larger upload is refused (413) while it streams
    upload_timeout_s: Positive = 600.0  # an upload not received in full by then is refused (408)
    max_connections: PositiveInt = 256  # open HTTP connections at once; more are answered 503 and closed
    idle_timeout_s: Positive = 60.0  # a connection without a request for this long is closed
    bind_retry_interval_s: Positive = 5.0  # while the address is taken (or cannot be bound), retry this often


class TranscribeConfig(_Section):
    default_model: str = "tiny.en"
    beam_size: PositiveInt = 5
    vad_filter: bool = False
    # batched: a worker decodes the ≤ 30 s windows (cut at silences) of all the jobs of a batch together, up
    # to *_chunk_batch windows per call; sequential: one job after another, faster-whisper's own transcribe,
    # whose output equals a bare faster-whisper run's (conditioning on previous text, finer segments).
    mode: Literal["batched", "sequential"] = "batched"
    # Windows decoded per call on a CPU worker: 4 was the fastest of 2, 4, 6 and 8 on the 10-minute recording
    # of bench/batching.py (2 CPU workers), and no slower with short clips.
    cpu_chunk_batch: PositiveInt = 4
    gpu_chunk_batch: PositiveInt = 16  # on a GPU worker; halved (down to 1) on a CUDA out-of-memory error
    # Batched mode: while workers idle with nothing queued for them, a running job with at least twice this
    # much audio left is spread over them, each taking at least this much (0: never spread a job).
    shard_min_audio_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    # Longest audio a job may hold; longer audio fails (from its header, or while decoding when the header
    # does not say). 4 hours: a long meeting or lecture, and the worker's memory cap is sized for it.
    max_audio_duration_s: Positive = 4 * 3600.0


class StorageConfig(_Section):
    # Submits are refused (storage_full) while the state dir's file system has less free than this: room
    # kept for the results of work already accepted (256 MiB: a full default queue of 10,000 jobs at about
    # 25 KB of transcript each). 0: no floor; a full disk still refuses a submit cleanly.
    min_free_bytes: NonNegativeInt = 256 * 1024 * 1024
    # How long a write waits for another process's lock on the job database; the loop waits with it.
    busy_timeout_s: Positive = 0.1


class StoreConfig(_Section):
    """Where the jobs live. Empty url: the embedded SQLite database in the state dir (one host). A PostgreSQL
    url ("postgresql://user@db.example/whisperd", or libpq's "host=... dbname=..."): one queue shared by
    every host configured with it (see docs/fleet.md). WHISPERD_STORE_URL overrides it."""

    url: str = ""
    # The database password, never on a command line: read from this file (one line, mode 0600), else
    # libpq's own PGPASSWORD or ~/.pgpass. A password written into url is refused.
    password_file: str = ""
    host_id: str = ""  # this host's name in the fleet; empty: the machine's hostname
    # A host's claim on a job lasts this long past its last heartbeat; then any other host requeues the job.
    lease_s: Positive = 30.0
    heartbeat_interval_s: Positive = 5.0  # also how often the fleet's figures (counts, hosts) are read
    connect_timeout_s: Positive = 5.0
    # Longest a statement may run (a call on the loop waits for it); longer: the database is unreachable.
    statement_timeout_s: Positive = 5.0
    reconnect_backoff_s: Positive = 0.5  # after a failure, this long before the next connection (doubling)
    reconnect_backoff_max_s: Positive = 30.0
    # Other hosts' audio fetched to run their jobs here, kept in the state dir up to this size.
    audio_cache_bytes: PositiveInt = 4 * GIB

    @property
    def shared(self) -> bool:
        return bool(self.url)


class RetentionConfig(_Section):
    # Finished jobs (COMPLETED, FAILED, CANCELLED), their transcripts and history are deleted once older
    # than max_age_s or beyond the newest max_finished_jobs; 0 turns either bound off. Live jobs never.
    max_age_s: Annotated[float, msgspec.Meta(ge=0)] = 30 * 24 * 3600.0
    max_finished_jobs: NonNegativeInt = 100_000
    prune_interval_s: Positive = 600.0


class Config(_Section):
    daemon: DaemonConfig = msgspec.field(default_factory=DaemonConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    workers: WorkersConfig = msgspec.field(default_factory=WorkersConfig)
    gpu: GpuConfig = msgspec.field(default_factory=GpuConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    transcribe: TranscribeConfig = msgspec.field(default_factory=TranscribeConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    retention: RetentionConfig = msgspec.field(default_factory=RetentionConfig)
    store: StoreConfig = msgspec.field(default_factory=StoreConfig)
    # Model name users pass with --model -> faster-whisper model name or a local CTranslate2 directory.
    models: dict[str, str] = msgspec.field(default_factory=lambda: {"tiny.en": BUNDLED_MODEL})

    def __post_init__(self) -> None:
        if self.scheduler.min_batch_size > self.scheduler.max_batch_size:
            raise msgspec.ValidationError("scheduler.min_batch_size must not exceed max_batch_size")
        if self.store.heartbeat_interval_s * 2 > self.store.lease_s:
            raise msgspec.ValidationError("store.lease_s must be at least twice store.heartbeat_interval_s")
        if self.transcribe.default_model not in self.models:
            raise msgspec.ValidationError(
                f"transcribe.default_model {self.transcribe.default_model!r} is not a key of [models]"
            )


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/whisperd")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "whisperd"


def default_socket_path() -> Path:
    if os.geteuid() == 0:
        return Path("/run/whisperd/whisperd.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "whisperd" / "whisperd.sock"
    return default_state_dir() / "whisperd.sock"


def resolve_socket_path(configured: str = "") -> Path:
    """The socket path for daemon and client alike: WHISPERD_SOCKET, then the config, then the default."""
    return Path(os.environ.get("WHISPERD_SOCKET") or configured or default_socket_path())


def resolve_state_dir(configured: str = "") -> Path:
    return Path(os.environ.get("WHISPERD_STATE_DIR") or configured or default_state_dir())


def parse_config(text: str, source: str = "<config>") -> Config:
    import tomllib  # here, not at the top: whisperctl imports this module for the socket path only

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        # msgspec names the offending key, e.g. "Object contains unknown field `x` - at `$.daemon`".
        raise ConfigError(f"{source}: {exc}") from exc


def load_config(path: Path | None) -> Config:
    """Decode the file once; the environment overrides socket and state paths."""
    if path is None:
        config = Config()
    else:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        config = parse_config(text, str(path))
    config.daemon.socket_path = str(resolve_socket_path(config.daemon.socket_path))
    config.daemon.state_dir = str(resolve_state_dir(config.daemon.state_dir))
    config.metrics.listen = os.environ.get("WHISPERD_METRICS_ADDR") or config.metrics.listen
    config.http.listen = os.environ.get("WHISPERD_HTTP_ADDR") or config.http.listen
    config.store.url = os.environ.get("WHISPERD_STORE_URL") or config.store.url
    if config.store.shared:
        check_store_url(config.store.url)
        config.store.host_id = config.store.host_id or socket.gethostname()
    return config


def check_store_url(url: str) -> None:
    """A PostgreSQL url or libpq conninfo without a password: one on a command line or in a world-readable
    config would leak; it belongs in store.password_file, PGPASSWORD or ~/.pgpass."""
    from psycopg import ProgrammingError  # here: only a shared store needs psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except ProgrammingError as exc:  # the text is not a conninfo at all
        raise ConfigError(f"store.url is not a PostgreSQL url or conninfo: {exc}") from exc
    if params.get("password"):
        raise ConfigError(
            "store.url must not hold the password: put it in store.password_file, PGPASSWORD or ~/.pgpass"
        )


# What SIGHUP cannot change in a running daemon: where it listens and keeps state, which processes it
# runs, and the monitor loops' periods. Everything else takes effect at the next scheduling round.
RESTART_ONLY = (
    "daemon.socket_path",
    "store",
    "daemon.state_dir",
    "daemon.socket_mode",
    "daemon.max_request_bytes",
    "daemon.spool_threads",
    "scheduler.gpu_monitor_interval_s",
    "scheduler.performance_monitor_interval_s",
    "workers.cpu_workers",
    "workers.cpu_threads",
    "workers.cpu_compute_type",
    "workers.max_models_per_worker",
    "workers.start_timeout_s",
    "workers.restart_backoff_s",
    "workers.restart_backoff_max_s",
    "workers.sandbox",  # set up as each worker starts
    "workers.sandbox_read_paths",
    "transcribe.default_model",  # the workers preloaded it
    "storage.busy_timeout_s",
    "gpu",
    "metrics",
    "http.listen",
    "http.tokens_file",
    "http.max_connections",
    "http.idle_timeout_s",
    "http.bind_retry_interval_s",
)


def _flatten(sections: dict[str, dict[str, object]]) -> dict[str, object]:
    """{"section.key": value} for every setting."""
    return {
        f"{section}.{key}": value for section, values in sections.items() for key, value in values.items()
    }


def plan_reload(running: Config, loaded: Config) -> tuple[Config, list[str], list[str]]:
    """(the config to run with, keys applied, keys that need a restart and were left as they are)."""
    old, new = _flatten(msgspec.to_builtins(running)), _flatten(msgspec.to_builtins(loaded))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    refused = [k for k in changed if any(k == r or k.startswith(r + ".") for r in RESTART_ONLY)]
    applied = [k for k in changed if k not in refused]
    merged = msgspec.to_builtins(loaded)
    kept = msgspec.to_builtins(running)
    for key in refused:
        section, _, name = key.partition(".")
        if name:
            merged[section][name] = kept[section][name]
        else:
            merged[section] = kept[section]
    try:
        result = msgspec.convert(merged, Config)
    except msgspec.ValidationError as exc:  # e.g. the kept default model dropped from [models]
        raise ConfigError(f"the reloaded configuration does not fit the running one: {exc}") from exc
    result.daemon.socket_path, result.daemon.state_dir = running.daemon.socket_path, running.daemon.state_dir
    return result, applied, refused
