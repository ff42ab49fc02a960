"""whisperd's Python API (docs/client.md): a blocking client for the control socket, typed methods over one
request(); submit passes the audio as open descriptors (SCM_RIGHTS), so the daemon reads only what the
caller could read. Every failure is a WhisperdError whose `code` says what happened: the daemon's error
codes (docs/protocol.md) as RemoteError, and unreachable, dropped and no_reply from the client itself."""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from whisperd import protocol as p
from whisperd.config import resolve_socket_path
from whisperd.errors import BadRequest, ProtocolError, WhisperdError
from whisperd.jobs import JobState

R = TypeVar("R", bound=p.Reply)


class Unreachable(WhisperdError):
    """No daemon on the socket (not running, no socket) or no permission to connect: nothing was sent."""

    code = "unreachable"


class Dropped(WhisperdError):
    """The daemon closed the connection before its reply: the request may or may not have taken effect."""

    code = "dropped"


class NoReply(WhisperdError):
    """The daemon did not answer within the client's timeout."""

    code = "no_reply"


class RemoteError(WhisperdError):
    """An error reply; `code` is the daemon's."""

    def __init__(self, body: p.ErrorBody) -> None:
        super().__init__(body.message)
        self.code = body.code


class Connection:
    """One connection to the socket, for Client's use: send requests, receive replies one by one."""

    def __init__(self, path: Path, timeout_s: float | None) -> None:
        """Connects at once; raises Unreachable. timeout_s bounds each send and each wait for a reply."""
        self.path, self.timeout_s = path, timeout_s
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        try:
            self._sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise Unreachable(f"whisperd is not running on {path} ({exc.strerror})") from None
        except PermissionError:
            self._sock.close()
            raise Unreachable(f"no permission to reach {path} (are you in the whisperd group?)") from None
        self._buffer = p.LineBuffer(256 * 1024 * 1024)
        self._lines: list[bytes | WhisperdError] = []

    def close(self) -> None:
        """Close the connection (a watch connection: the daemon stops sending)."""
        self._sock.close()

    def send(self, request: p.Request, fds: Sequence[int] = ()) -> None:
        """Send one request, with the descriptors fds attached; raises NoReply when it cannot be sent in
        time."""
        data = p.encode_line(request)
        try:
            if fds:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                sent = self._sock.sendmsg([data], ancillary)
                data = data[sent:]
            self._sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed on us, maybe with a reason first (too many connections): receive() reads it
        except TimeoutError:
            raise NoReply(
                f"whisperd on {self.path} did not take the request within {self.timeout_s} s"
            ) from None

    def receive(self) -> p.Reply:
        """The next reply. Raises RemoteError for an error reply, Dropped when the daemon closed the
        connection, NoReply past the timeout, ProtocolError for a reply it cannot read."""
        while not self._lines:
            try:
                chunk = self._sock.recv(1024 * 1024)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                raise NoReply(f"whisperd on {self.path} did not reply within {self.timeout_s} s") from None
            if not chunk:
                raise Dropped(
                    f"whisperd on {self.path} closed the connection before replying "
                    "(it stopped or restarted, or dropped this client)"
                )
            self._lines.extend(self._buffer.feed(chunk))
        line = self._lines.pop(0)
        if isinstance(line, WhisperdError):
            raise ProtocolError(f"reply too large: {line.message}")
        reply = p.decode_reply(line)
        if isinstance(reply, p.Error):
            raise RemoteError(reply.error)
        return reply


class Client:
    """whisperd's control socket, one short connection per call (watch() keeps its own open). Safe to keep
    for a process's life and to share between threads: it holds no connection between calls.

    Every method raises a WhisperdError subclass on failure, with a `code`: RemoteError carries the daemon's
    (`unknown_model`, `queue_full`, `not_found`, `permission_denied`, ...: docs/protocol.md), BadRequest
    (`bad_request`) a file submit could not open, and Unreachable, Dropped and NoReply the client's own."""

    def __init__(self, socket_path: str | None = None, timeout_s: float | None = 600.0) -> None:
        """socket_path: the daemon's socket (None: $WHISPERD_SOCKET, else the default whisperd uses for this
        user: /run/whisperd/whisperd.sock for root). timeout_s: the longest wait for a reply (None: no
        limit); past it the call raises NoReply. Nothing connects until the first call."""
        # --socket beats WHISPERD_SOCKET, which beats the default
        self.path = Path(socket_path) if socket_path else resolve_socket_path()
        self.timeout_s = timeout_s

    def request(self, request: p.Request, expect: type[R], fds: Sequence[int] = ()) -> R:
        """Send any protocol request (whisperd.protocol) on a connection of its own and return its reply,
        which must be of type expect (else ProtocolError). The typed methods below are built on it."""
        conn = Connection(self.path, self.timeout_s)
        try:
            conn.send(request, fds)
            reply = conn.receive()
        finally:
            conn.close()
        if not isinstance(reply, expect):
            raise ProtocolError(f"expected a {expect.__name__} reply, got {type(reply).__name__}")
        return reply

    def ping(self) -> p.Pong:
        """The daemon's version, its protocol version (compare with whisperd.protocol.PROTOCOL_VERSION) and
        the model names submit accepts."""
        return self.request(p.Ping(), p.Pong)

    def submit(
        self,
        paths: Sequence[str],
        *,
        model: str | None = None,
        language: str | None = None,
        task: p.Task = "transcribe",
        priority: int = 0,
        word_timestamps: bool = False,
        prompt: str | None = None,
        temperature: float | None = None,
    ) -> list[p.JobView]:
        """Queue one job per file, in one request: all of them or none. The files are opened here, with the
        caller's permissions, and passed open; the daemon keeps a copy, so they may change or go once this
        returns. Returns the jobs (PENDING), in the order of paths.

        model: a name of the daemon's [models] (ping().models; None: its default). language: a code such
        as "en" (None: detected). task: "transcribe" or "translate" (into English). priority: higher runs
        first, -1000..1000; above 0 only for root and the daemon's user unless configured. word_timestamps:
        times for each word in the transcript. prompt: Whisper's initial prompt (names, spellings, style).
        temperature: one sampling temperature, 0..1 (None: faster-whisper's fallback schedule).
        Raises BadRequest for a file that cannot be opened, RemoteError (unknown_model, queue_full,
        permission_denied, storage_full, ...) when the daemon refuses."""
        fds: list[int] = []
        try:
            for path in paths:
                try:
                    fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
                except FileNotFoundError:
                    raise BadRequest(f"no such file: {path}") from None
                except OSError as exc:
                    raise BadRequest(f"cannot open {path}: {exc.strerror}") from None
                if os.path.isdir(path):
                    raise BadRequest(f"{path} is a directory, not an audio file")
            files = [p.SubmitFile(name=_label(path), fd_index=i) for i, path in enumerate(paths)]
            request = p.Submit(
                files=files, model=model, language=language, task=task, priority=priority,
                word_timestamps=word_timestamps, prompt=prompt, temperature=temperature,
            )  # fmt: skip
            return self.request(request, p.Jobs, fds).jobs
        finally:
            for fd in fds:
                os.close(fd)

    def status(self, ids: Sequence[int] = (), state: str | None = None, limit: int = 1000) -> list[p.JobView]:
        """Jobs by id (RemoteError not_found for an unknown one), or without ids the newest `limit` jobs,
        newest first; state: only jobs in that state ("PENDING", ... or a JobState's value). Every user
        sees every job."""
        request = p.Status(ids=list(ids), state=JobState(state) if state else None, limit=limit)
        return self.request(request, p.Jobs).jobs

    def cancel(self, ids: Sequence[int]) -> p.Jobs:
        """Cancel jobs in any live state (PENDING, PROCESSING, RETRYING): `.jobs` are the ones cancelled,
        now CANCELLED; `.errors` one ErrorBody per id that was not (its `job_id`, and a code: not_found,
        permission_denied for another user's job, bad_request for one already finished)."""
        return self.request(p.Cancel(ids=list(ids)), p.Jobs)

    def result(self, job_id: int) -> p.ResultReply:
        """A COMPLETED job's transcript (`.transcript`: text, language, duration_s, segments with times and,
        if asked, words) and the job (`.job`). Only for the submitter, root or the daemon's user
        (permission_denied); RemoteError not_found for an unknown job, bad_request for one not COMPLETED.
        whisperctl.render.format_transcript(transcript, "srt") writes it as srt, vtt, txt, tsv or json."""
        return self.request(p.Result(id=job_id), p.ResultReply)

    def gpu(self) -> list[p.DeviceView]:
        """The devices (every GPU, and the CPU when CPU workers run) as last read: memory, utilisation,
        temperature, whisperd's reservations and running batches."""
        return self.request(p.Gpu(), p.Devices).devices

    def stats(self) -> p.StatsView:
        """The queue by state, the workers, totals since start (audio seconds, realtime factor) and each
        user's share."""
        return self.request(p.Stats(), p.StatsReply).stats

    def token_create(self, user: str, comment: str = "") -> p.TokenCreated:
        """A bearer token for the HTTP API acting as `user` (privileged callers only): `.token` is the one
        copy of it there will ever be, `.info` what `token_list` shows of it."""
        return self.request(p.TokenCreate(user=user, comment=comment), p.TokenCreated)

    def token_revoke(self, token_id: str) -> p.TokenRevoked:
        """Revoke a token by its id (privileged callers only); RemoteError not_found if there is none."""
        return self.request(p.TokenRevoke(id=token_id), p.TokenRevoked)

    def token_list(self) -> list[p.TokenView]:
        """Every valid token, oldest first (privileged callers only); never a secret or a hash."""
        return self.request(p.TokenList(), p.Tokens).tokens

    @contextlib.contextmanager
    def watch(self) -> Iterator[Iterator[p.Reply]]:
        """A stream of events on a connection of its own, kept open until the caller leaves the context:
        p.JobEventReply at every change of any job (state, progress), p.DeviceSnapshot and
        p.SystemSnapshot first and then periodically. The iterator blocks for the next event (no timeout)
        and raises Dropped if the daemon goes away. To follow jobs without missing a change, enter the
        context first, then read their state with status(), then apply events (docs/client.md)."""
        conn = Connection(self.path, None)
        try:
            conn.send(p.Watch())

            def events() -> Iterator[p.Reply]:
                while True:
                    yield conn.receive()

            yield events()
        finally:
            conn.close()


def _label(path: str) -> str:
    """The name the daemon shows for a file: its absolute path, with control characters (which the daemon
    refuses) and undecodable bytes escaped; at most p.MAX_NAME_CHARS, the end kept (it names the file)."""
    name = p.printable(str(Path(path).absolute()))
    return name if len(name) <= p.MAX_NAME_CHARS else "..." + name[3 - p.MAX_NAME_CHARS :]
