"""The control server: a Unix stream socket; per connection it reads the peer's credentials (SO_PEERCRED),
receives request lines with any descriptors passed along (SCM_RIGHTS), decodes, dispatches and answers."""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import msgspec

from whisperd import protocol as p
from whisperd.errors import RequestTooLarge, WhisperdError
from whisperd.handlers import Caller, Handlers
from whisperd.watchers import Watchers

log = logging.getLogger("whisperd.server")
_MAX_FDS = 64
_RECV_BYTES = 256 * 1024


def peer_credentials(conn: socket.socket) -> Caller:
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return Caller(pid=pid, uid=uid, gid=gid)


async def _readable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    future = loop.create_future()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await future
    finally:
        loop.remove_reader(fd)


async def recv_with_fds(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> tuple[bytes, list[int]]:
    """asyncio streams drop ancillary data, so read with recvmsg once the socket is readable."""
    while True:
        try:
            data, ancdata, flags, _ = conn.recvmsg(_RECV_BYTES, socket.CMSG_SPACE(_MAX_FDS * 4))
            break
        except BlockingIOError:
            await _readable(loop, conn.fileno())
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    received = list(fds)
    for fd in received:
        os.set_inheritable(fd, False)  # workers must not inherit callers' files
    if flags & socket.MSG_CTRUNC:
        for fd in received:
            os.close(fd)
        raise RequestTooLarge(f"more than {_MAX_FDS} descriptors passed in one request")
    return data, received


def bind_socket(path: Path, mode: int) -> socket.socket:
    """Bind the control socket, refusing to steal it from a daemon that still answers on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: left by a daemon that died
        else:
            raise WhisperdError(f"another whisperd is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)  # never a moment with wider permissions than asked
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    return sock


class ControlServer:
    def __init__(self, handlers: Handlers, watchers: Watchers, snapshot: Callable[[], list[p.Reply]],
                 max_request_bytes: int) -> None:  # fmt: skip
        self._handlers = handlers
        self._watchers = watchers
        self._snapshot = snapshot
        self._max_request_bytes = max_request_bytes
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        sock.listen(128)
        self._sock = sock
        self._accept_task = asyncio.create_task(self._accept_loop(), name="control-accept")

    async def stop_accepting(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._sock is not None:
            self._sock.close()

    async def close(self) -> None:
        await self.stop_accepting()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # out of descriptors, an aborted connection: wait, never stop serving
                log.error("accepting a control connection failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            conn.setblocking(False)
            task = asyncio.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        caller = peer_credentials(conn)
        buffer = p.LineBuffer(self._max_request_bytes)
        pending_fds: list[int] = []
        try:
            while True:
                try:
                    data, fds = await recv_with_fds(loop, conn)
                except RequestTooLarge as exc:
                    await self._send(loop, conn, _error(exc))
                    return
                pending_fds += fds
                if not data:
                    return
                for line in buffer.feed(data):
                    fds_for_request, pending_fds = pending_fds, []
                    try:
                        if isinstance(line, RequestTooLarge):
                            raise line
                        request = p.decode_request(line)
                        if isinstance(request, p.Watch):
                            await self._stream(loop, conn)
                            return
                        reply = await self._handlers.handle(request, caller, fds_for_request)
                    except WhisperdError as exc:
                        reply = _error(exc)
                    except ConnectionError:
                        raise  # the peer left; nothing to answer
                    except Exception as exc:
                        log.exception("request from pid %d failed", caller.pid)
                        reply = p.Error(error=p.ErrorBody(code="internal", message=f"internal error: {exc}"))
                    finally:
                        for fd in fds_for_request:
                            os.close(fd)
                    await self._send(loop, conn, reply)
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            for fd in pending_fds:
                os.close(fd)
            conn.close()

    async def _stream(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        queue = self._watchers.add()
        try:
            for reply in self._snapshot():
                await self._send(loop, conn, reply)
            while line := await queue.get():
                await loop.sock_sendall(conn, line)
        finally:
            self._watchers.remove(queue)

    @staticmethod
    async def _send(loop: asyncio.AbstractEventLoop, conn: socket.socket, reply: msgspec.Struct) -> None:
        await loop.sock_sendall(conn, p.encode_line(reply))


def _error(exc: WhisperdError) -> p.Error:
    return p.Error(error=p.ErrorBody(code=exc.code, message=exc.message))
