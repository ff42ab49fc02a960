"""What every HTTP route shares: errors in OpenAI's shape with the protocol's codes, the caller's identity
from a bearer token (or anonymous on loopback, where the admin allows it), the form fields of a request
turned into the control protocol's Submit (validated by the same decoder bounds), and server-sent events."""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from aiohttp import web

from whisperd import protocol as p
from whisperd.config import Config
from whisperd.errors import BadRequest, Unauthorized, WhisperdError
from whisperd.handlers import Caller
from whisperd.tokens import TokenBook, uid_of

log = logging.getLogger("whisperd.http")

# The protocol's error codes as HTTP statuses; what is not here is 400 (a client's mistake) or, for
# "internal", 500.
STATUS_OF_CODE = {
    "unauthorized": 401,
    "permission_denied": 403,
    "not_found": 404,
    "not_ready": 409,
    "conflict": 409,
    "audio_too_large": 413,
    "request_too_large": 413,
    "upload_timeout": 408,
    "job_failed": 422,
    "queue_full": 429,
    "busy": 429,
    "too_many_connections": 429,
    "internal": 500,
    "shutting_down": 503,
    "storage_error": 503,
    "storage_busy": 503,
    "storage_unavailable": 503,
    "storage_full": 507,
}
_TYPE_OF_STATUS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   429: "rate_limit_error"}  # fmt: skip

# Model names OpenAI clients send by default: the daemon's default model answers them, unless [models]
# names them itself.
OPENAI_MODEL_ALIASES = ("whisper-1",)


class UploadTimeout(BadRequest):
    code = "upload_timeout"


class CodedError(WhisperdError):
    """An error the handlers reported as a code and a message (a cancel's per-job errors)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def error_response(code: str, message: str, status: int | None = None) -> web.Response:
    """OpenAI's error body ({"error": {message, type, param, code}}) with the protocol's code."""
    status = status or STATUS_OF_CODE.get(code, 400)
    kind = _TYPE_OF_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    headers = {"WWW-Authenticate": 'Bearer realm="whisperd"'} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error as OpenAI's body: ours with their code, aiohttp's own (404 path, 405 method, 413) by
    their status, anything else as internal, logged with its traceback (a bug of ours, never the caller's)."""
    try:
        return await handler(request)
    except WhisperdError as exc:
        return error_response(exc.code, exc.message)
    except ConnectionResetError:  # the client left while answered (aiohttp's ClientConnectionResetError)
        log.debug("HTTP %s %s: the client went away", request.method, request.path)
        return web.Response(status=499)  # no one reads it; aiohttp ends the connection without a word
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "bad_request", 413: "request_too_large"}.get(exc.status, "bad_request")
        return error_response(code, exc.reason, exc.status)
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        return error_response("internal", "whisperd failed to answer this request; its log says why")


def is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote.split("%")[0]).is_loopback
    except ValueError:
        return False


# the anonymous user's uid, looked up once a name: the user database may be a network service (LDAP)
_uid_of = functools.lru_cache(maxsize=64)(uid_of)


def identify(request: web.Request, tokens: TokenBook | None, config: Config) -> Caller:
    """The caller a request acts as: its bearer token's user; without a token, the anonymous user where the
    admin allows it and the request comes from loopback; else Unauthorized."""
    header = request.headers.get("Authorization", "").strip()
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if header and scheme.lower() != "bearer":
        raise Unauthorized("send the token as 'Authorization: Bearer <token>'")
    if token:
        identity = tokens.identify(token) if tokens is not None else None
        if identity is None:
            raise Unauthorized("the token is not valid here (revoked, mistyped, or made for another daemon)")
        return Caller(pid=0, uid=identity.uid, gid=identity.uid)
    http = config.http
    if http.allow_anonymous_loopback and is_loopback(request.remote):
        uid = _uid_of(http.anonymous_user)
        if uid is None:
            raise Unauthorized(f"anonymous access is allowed, but its user {http.anonymous_user!r} does not "
                               "exist on this machine (http.anonymous_user)")  # fmt: skip
        return Caller(pid=0, uid=uid, gid=uid)
    raise Unauthorized(
        "a bearer token is needed (Authorization: Bearer <token>); an admin creates one with "
        "`whisperctl token create --user NAME`"
    )


def one(fields: Mapping[str, list[str]], name: str) -> str | None:
    values = fields.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"the form field {name!r} was sent {len(values)} times")
    return values[0]


def as_float(fields: Mapping[str, list[str]], name: str) -> float | None:
    value = one(fields, name)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise BadRequest(f"{name} must be a number, not {value[:40]!r}") from None


def as_bool(fields: Mapping[str, list[str]], name: str) -> bool:
    value = (one(fields, name) or "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise BadRequest(f"{name} must be true or false, not {value[:40]!r}")
    return value in ("true", "1")


def as_int(fields: Mapping[str, list[str]], name: str, default: int) -> int:
    value = one(fields, name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{name} must be a whole number, not {value[:40]!r}") from None


def check_known(fields: Mapping[str, list[str]], known: frozenset[str]) -> None:
    unknown = sorted(set(fields) - known)
    if unknown:
        raise BadRequest(f"unknown form field(s): {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")


def model_name(requested: str | None, config: Config) -> str | None:
    """The [models] name a request asks for; OpenAI's default names mean the daemon's default model."""
    if requested in OPENAI_MODEL_ALIASES and requested not in config.models:
        return config.transcribe.default_model
    return requested or None


def submit_request(filename: str, options: dict[str, Any]) -> p.Submit:
    """The protocol's Submit for one uploaded file, through the protocol's own bounds (a language code's
    pattern, the priority's range, a prompt's length), so HTTP and the socket refuse the same things."""
    name = p.printable(filename)[-p.MAX_NAME_CHARS :] or "upload"  # shown in status and logs: no controls
    try:
        return msgspec.convert({"op": "submit", "files": [{"name": name}], **options}, p.Submit)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request: {exc}") from None


KEEPALIVE_S = 15.0  # a comment line this often on a waiting event stream: proxies drop silent streams
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: object, event: str | None = None) -> bytes:
    """One server-sent event: its data one line of JSON."""
    payload = json.dumps(msgspec.to_builtins(data), separators=(",", ":"), ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()
