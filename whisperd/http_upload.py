"""An HTTP upload (multipart/form-data) streamed into the spool: the file part is written as it arrives, in
threads of its own (never on the loop, never whole in memory), and refused while it streams once it passes
the size limit or the duration its header states passes the duration limit. The other parts are short form
fields, read with a bound each.

The daemon never decodes untrusted audio itself (the sandboxed worker does, and enforces the duration limit
while decoding); here only a WAV's or FLAC's header is read (pure Python, `stated_duration_s`), which is
where a long upload says so before its bytes arrive."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import struct
from concurrent.futures import Executor, Future
from typing import NamedTuple

from aiohttp import BodyPartReader, MultipartReader, web

from whisperd.errors import AudioTooLarge, BadRequest, InvalidAudio, StorageFull
from whisperd.spool import Spool

MAX_FIELD_BYTES = 64 * 1024  # a form field (a prompt is at most a few KB)
MAX_PARTS = 64  # fields and files of one request
HEAD_BYTES = 64 * 1024  # what is read before the header is looked at
WRITE_BYTES = 1024 * 1024  # what is gathered before one write in a thread


class Uploaded(NamedTuple):
    path: str  # in the spool; the caller's to queue or discard
    size_bytes: int
    filename: str


class UploadLimits(NamedTuple):
    max_bytes: int
    max_duration_s: float  # 0: none


class Form(NamedTuple):
    fields: dict[str, list[str]]  # name -> values in order (timestamp_granularities[] repeats)
    file: Uploaded | None


def stated_duration_s(head: bytes) -> float | None:
    """The duration a WAV or FLAC header states, if it states one; None for other formats or a header
    that does not say (a streamed WAV's data size is often 0 or 0xFFFFFFFF)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return _wav_duration_s(head)
    if head[:4] == b"fLaC" and len(head) >= 8 + 18 and head[4] & 0x7F == 0:  # STREAMINFO comes first
        info = head[8 : 8 + 18]
        sample_rate = int.from_bytes(info[10:13], "big") >> 4
        total = int.from_bytes(info[13:18], "big") & ((1 << 36) - 1)
        return total / sample_rate if sample_rate and total else None
    return None


def wav_byte_rate(head: bytes) -> int | None:
    """A WAV's bytes per second (its fmt chunk), which bounds its size for a duration; None if not WAV."""
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    fmt = _wav_chunk(head, b"fmt ")
    if fmt is None or len(head) < fmt[0] + 12:
        return None
    (rate,) = struct.unpack_from("<I", head, fmt[0] + 8)
    return rate or None


def _wav_chunk(head: bytes, name: bytes) -> tuple[int, int] | None:
    """(offset of the chunk's data, its stated size) of the first chunk of that name in the head."""
    at = 12
    while at + 8 <= len(head):
        chunk, size = head[at : at + 4], struct.unpack_from("<I", head, at + 4)[0]
        if chunk == name:
            return at + 8, size
        at += 8 + size + (size & 1)
    return None


def _wav_duration_s(head: bytes) -> float | None:
    rate, data = wav_byte_rate(head), _wav_chunk(head, b"data")
    if rate is None or data is None or data[1] in (0, 0xFFFFFFFF):
        return None
    return data[1] / rate


async def read_form(
    request: web.Request,
    spool: Spool,
    executor: Executor,
    limits: UploadLimits,
    file_field: str = "file",
) -> Form:
    """The form fields and the one file of a multipart request, the file spooled. Raises BadRequest for a
    malformed form, AudioTooLarge past the limits, StorageFull for a full disk; on any error (the client
    gone included) nothing stays in the spool."""
    if request.content_type != "multipart/form-data":
        raise BadRequest("send the audio as multipart/form-data, with the file in a part named 'file'")
    declared = request.content_length
    if declared is not None and declared > limits.max_bytes + MAX_PARTS * MAX_FIELD_BYTES:
        raise AudioTooLarge(f"the upload of {declared} bytes is larger than the limit of {limits.max_bytes}")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise BadRequest(f"the multipart body cannot be read: {exc}") from None
    fields: dict[str, list[str]] = {}
    uploaded: Uploaded | None = None
    try:
        for _ in range(MAX_PARTS + 1):
            part = await _next_part(reader)
            if part is None:
                return Form(fields, uploaded)
            if part.name == file_field:
                if uploaded is not None:
                    raise BadRequest(f"one file per request: a second part named {file_field!r} was sent")
                uploaded = await _spool_part(part, spool, executor, limits)
            elif part.name:
                fields.setdefault(part.name, []).append(await _field(part))
            else:
                raise BadRequest("a form part without a name")
        raise BadRequest(f"more than {MAX_PARTS} parts in one form")
    except BaseException:
        if uploaded is not None:
            spool.discard(uploaded.path)
        raise


async def _next_part(reader: MultipartReader) -> BodyPartReader | None:
    try:
        part = await reader.next()
    except ValueError as exc:  # aiohttp's word for a malformed part (a bad boundary, bad headers)
        raise BadRequest(f"the multipart body is malformed: {exc}") from None
    if part is not None and not isinstance(part, BodyPartReader):
        raise BadRequest("nested multipart bodies are not accepted")
    return part


async def _field(part: BodyPartReader) -> str:
    data = bytearray()
    while chunk := await part.read_chunk(16 * 1024):
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise BadRequest(f"the form field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise BadRequest(f"the form field {part.name!r} is not UTF-8 text") from None


async def _spool_part(
    part: BodyPartReader, spool: Spool, executor: Executor, limits: UploadLimits
) -> Uploaded:
    filename = part.filename or "upload"
    creating = executor.submit(spool.create)
    try:
        fd, path = await asyncio.wrap_future(creating)
    except OSError as exc:
        raise _storage_error(exc, spool) from None
    except asyncio.CancelledError:  # the client left while the file was made: unmade once it is
        creating.add_done_callback(functools.partial(_unmake, spool))
        raise
    size, pending, max_bytes, checked = 0, bytearray(), limits.max_bytes, False
    writing: Future[None] | None = None  # the latest write into fd, in a thread
    try:
        try:
            while chunk := await part.read_chunk(256 * 1024):
                size += len(chunk)
                pending += chunk
                if not checked and size >= HEAD_BYTES:  # the head is still all in `pending`
                    max_bytes = min(max_bytes, _bound_by_duration(bytes(pending[:HEAD_BYTES]), limits))
                    checked = True
                if size > max_bytes:
                    raise AudioTooLarge(_too_large(max_bytes, limits))
                if len(pending) >= WRITE_BYTES:
                    data, pending = bytes(pending), bytearray()
                    writing = executor.submit(_write_all, fd, data)
                    await asyncio.wrap_future(writing)
            if not checked and _bound_by_duration(bytes(pending), limits) < size:
                raise AudioTooLarge(_too_large(0, limits))
            writing = executor.submit(_finish, fd, bytes(pending))
            await asyncio.wrap_future(writing)
        finally:
            await _close_after(fd, writing, executor)
    except OSError as exc:
        spool.discard(path)
        raise _storage_error(exc, spool) from None
    except BaseException:
        spool.discard(path)
        raise
    if size == 0:
        spool.discard(path)
        raise InvalidAudio(f"{filename}: the uploaded file is empty")
    return Uploaded(path, size, filename)


def _bound_by_duration(head: bytes, limits: UploadLimits) -> int:
    """The most bytes the upload may have given its header and the duration limit: a WAV longer than the
    limit is refused at once (it says so), a WAV of unstated length once its bytes pass the limit's."""
    if not limits.max_duration_s:
        return limits.max_bytes
    stated = stated_duration_s(head)
    if stated is not None and stated > limits.max_duration_s:
        raise AudioTooLarge(
            f"the audio lasts {stated:.0f} s, longer than the limit of {limits.max_duration_s:.0f} s "
            "(transcribe.max_audio_duration_s)"
        )
    rate = wav_byte_rate(head)
    if rate is None:
        return limits.max_bytes
    return min(limits.max_bytes, int(rate * limits.max_duration_s) + HEAD_BYTES)


def _too_large(max_bytes: int, limits: UploadLimits) -> str:
    if max_bytes < limits.max_bytes:
        return (
            f"the audio is longer than the limit of {limits.max_duration_s:.0f} s "
            "(transcribe.max_audio_duration_s)"
        )
    return f"the upload is larger than the limit of {limits.max_bytes} bytes"


async def _close_after(fd: int, writing: Future[None] | None, executor: Executor) -> None:
    """Close the spool file once no thread writes into it. A request cancelled (its client gone) while a
    write runs leaves that write running: a descriptor closed under it could be given to another file
    meanwhile, and the rest of the write would land there."""
    if writing is not None and not writing.done():
        writing.add_done_callback(lambda _: os.close(fd))  # in the writing thread, once it returns
    else:
        await asyncio.get_running_loop().run_in_executor(executor, os.close, fd)


def _unmake(spool: Spool, creating: Future[tuple[int, str]]) -> None:
    if not creating.cancelled() and creating.exception() is None:
        fd, path = creating.result()
        os.close(fd)
        spool.discard(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _finish(fd: int, data: bytes) -> None:
    _write_all(fd, data)
    os.fsync(fd)


def _storage_error(exc: OSError, spool: Spool) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left in {spool.directory} to spool the upload")
    return StorageFull(f"cannot spool the upload: {exc.strerror}")
