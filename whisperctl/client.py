"""A blocking client for whisperd's control socket: typed methods over one request(); submit passes the
audio as open descriptors (SCM_RIGHTS), so the daemon reads only what the caller could read."""

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
    def __init__(self, path: Path, timeout_s: float | None) -> None:
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
        self._sock.close()

    def send(self, request: p.Request, fds: Sequence[int] = ()) -> None:
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
    def __init__(self, socket_path: str | None = None, timeout_s: float | None = 600.0) -> None:
        # --socket beats WHISPERD_SOCKET, which beats the default
        self.path = Path(socket_path) if socket_path else resolve_socket_path()
        self.timeout_s = timeout_s

    def request(self, request: p.Request, expect: type[R], fds: Sequence[int] = ()) -> R:
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
        return self.request(p.Ping(), p.Pong)

    def submit(self, paths: Sequence[str], **options: object) -> list[p.JobView]:
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
            request = p.Submit(files=files, **options)  # type: ignore[arg-type]
            return self.request(request, p.Jobs, fds).jobs
        finally:
            for fd in fds:
                os.close(fd)

    def status(self, ids: Sequence[int] = (), state: str | None = None, limit: int = 1000) -> list[p.JobView]:
        request = p.Status(ids=list(ids), state=JobState(state) if state else None, limit=limit)
        return self.request(request, p.Jobs).jobs

    def cancel(self, ids: Sequence[int]) -> p.Jobs:
        return self.request(p.Cancel(ids=list(ids)), p.Jobs)

    def result(self, job_id: int) -> p.ResultReply:
        return self.request(p.Result(id=job_id), p.ResultReply)

    def gpu(self) -> list[p.DeviceView]:
        return self.request(p.Gpu(), p.Devices).devices

    def stats(self) -> p.StatsView:
        return self.request(p.Stats(), p.StatsReply).stats

    @contextlib.contextmanager
    def watch(self) -> Iterator[Iterator[p.Reply]]:
        """A stream of job events and device/system snapshots, until the caller leaves the context."""
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
