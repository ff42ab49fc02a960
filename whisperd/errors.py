"""One error tree. Each error carries the protocol error code it answers with, defined here alone."""

from __future__ import annotations

import errno


class WhisperdError(Exception):
    """Base of every error whisperd raises on purpose; `code` is what the protocol reports."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(WhisperdError):
    code = "bad_config"


class StateDirError(WhisperdError):
    """Never on the wire: the state dir is locked by another daemon, or cannot be made private."""

    code = "state_dir"


class BadRequest(WhisperdError):
    code = "bad_request"


class RequestTooLarge(BadRequest):
    code = "request_too_large"


class UnknownOp(BadRequest):
    code = "unknown_op"


class NotFound(WhisperdError):
    code = "not_found"


class PermissionDenied(WhisperdError):
    code = "permission_denied"


class UnknownModel(WhisperdError):
    code = "unknown_model"


class InvalidAudio(WhisperdError):
    code = "invalid_audio"


class AudioTooLarge(InvalidAudio):
    """An upload over the size or duration limit, refused while it streams (HTTP 413)."""

    code = "audio_too_large"


class Unauthorized(WhisperdError):
    """An HTTP request without a valid bearer token (the socket's callers are known by their uid)."""

    code = "unauthorized"


class JobFailed(WhisperdError):
    """A job an HTTP request waited for ended FAILED or CANCELLED: its error, as the request's answer."""

    code = "job_failed"


class QueueFull(WhisperdError):
    code = "queue_full"


class Busy(WhisperdError):
    """Too much of the caller's work is already in progress (e.g. audio being spooled), or every thread that
    would take it is busy: nothing was done, and a retry a little later may work."""

    code = "busy"


class TooManyConnections(WhisperdError):
    """The caller's uid already holds daemon.max_connections_per_uid control connections."""

    code = "too_many_connections"


class StorageError(WhisperdError):
    """The job store refused a read or a write (an I/O error); nothing was changed, and a retry may work."""

    code = "storage_error"


class StorageFull(StorageError):
    """No space left for the spool or the job store (or a free-space floor reached)."""

    code = "storage_full"


class StorageBusy(StorageError):
    """Another process holds the job store's write lock past the short busy timeout."""

    code = "storage_busy"


class StorageUnavailable(StorageError):
    """The shared job database cannot be reached (down, cut off, too slow): nothing was changed; whisperd
    reconnects with backoff, and a retry once it is back works."""

    code = "storage_unavailable"


class Superseded(StorageError):
    """Another host changed these jobs since this one read them (it took over a lease that expired, or a
    cancel from another host came first): this host's change is refused, and its copy of them is stale."""

    code = "conflict"

    def __init__(self, message: str, job_ids: frozenset[int]) -> None:
        super().__init__(message)
        self.job_ids = job_ids


class NotReady(WhisperdError):
    """The job exists but has no result yet (or never will)."""

    code = "not_ready"


class ShuttingDown(WhisperdError):
    code = "shutting_down"


class IllegalTransition(WhisperdError):
    code = "illegal_transition"


class ProtocolError(WhisperdError):
    """The peer broke the framing or sent something undecodable; raised on the client side too."""

    code = "protocol_error"


def os_storage_error(exc: OSError, doing: str) -> StorageError:
    """What a failed fsync or write of the state dir means to the caller: a full disk or quota is
    StorageFull, anything else (EIO, ...) a StorageError; both are worth a retry later."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left to {doing}: {exc.strerror}")
    return StorageError(f"cannot {doing}: {exc.strerror or exc}")
