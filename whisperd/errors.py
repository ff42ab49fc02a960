"""One error tree. Each error carries the protocol error code it answers with, defined here alone."""

from __future__ import annotations


class WhisperdError(Exception):
    """Base of every error whisperd raises on purpose; `code` is what the protocol reports."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(WhisperdError):
    code = "bad_config"


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


class QueueFull(WhisperdError):
    code = "queue_full"


class StorageFull(WhisperdError):
    code = "storage_full"


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
