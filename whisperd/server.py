"""The control server: a Unix stream socket; per connection it reads the peer's credentials (SO_PEERCRED),
receives request lines with any descriptors passed along (SCM_RIGHTS), decodes, dispatches and answers.

What one client may hold is bounded: connections per uid, descriptors waiting for their request line, the
time a reply may stay unread. Nothing a client sends makes the daemon log a traceback."""

from __future__ import annotations

import array
import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Set
from pathlib import Path

import msgspec

from whisperd import protocol as p
from whisperd.config import DaemonConfig
from whisperd.errors import PermissionDenied, RequestTooLarge, TooManyConnections, WhisperdError
from whisperd.handlers import Caller, Handlers
from whisperd.watchers import Watchers, WatchQueue

log = logging.getLogger("whisperd.server")
_MAX_FDS = 64  # passed with one request, and held on a connection before its request line is complete
_RECV_BYTES = 256 * 1024
_LOG_INTERVAL_S = 60.0  # a client can cause these lines at will: one of each kind a minute
_MAX_INTERNAL_MESSAGE_CHARS = 500


def lineage(pid: int, max_depth: int = 64) -> list[int]:
    """The process and its ancestors, from procfs (no disk: it does not block); stops where one is gone."""
    found: list[int] = []
    while pid > 1 and len(found) < max_depth:
        found.append(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                # pid (comm) state ppid ...: comm may hold spaces and parentheses, so read after the last ')'
                pid = int(stat.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return found


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


class _Throttle:
    """One event per interval for each key: keeps the log lines clients can trigger few."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._last: dict[object, float] = {}

    def allow(self, key: object) -> bool:
        now = time.monotonic()  # a rate, not a time of day: the injected clock is for job times
        if now - self._last.get(key, -math.inf) < self._interval_s:
            return False
        if len(self._last) >= 1024:  # keyed by uid: never let the table itself grow without bound
            self._last.clear()
        self._last[key] = now
        return True


def _close_all(fds: list[int]) -> None:
    while fds:
        os.close(fds.pop())


class ControlServer:
    def __init__(
        self,
        handlers: Handlers,
        watchers: Watchers,
        snapshot: Callable[[], list[p.Reply]],
        max_request_bytes: int,
        limits: Callable[[], DaemonConfig] = DaemonConfig,
        worker_pids: Callable[[], Set[int]] = frozenset,
    ) -> None:
        """limits: the running [daemon] settings, read afresh per connection and per send (a reload may
        change max_connections_per_uid and send_timeout_s). worker_pids: the daemon's worker processes,
        which (and whose children) are refused: they run as the daemon's user, and a worker's sandbox
        cannot always keep it off Unix sockets (a CUDA driver needs one)."""
        self._handlers = handlers
        self._watchers = watchers
        self._snapshot = snapshot
        self._max_request_bytes = max_request_bytes
        self._limits = limits
        self._worker_pids = worker_pids
        self._sock: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._per_uid: Counter[int] = Counter()
        self._throttle = _Throttle(_LOG_INTERVAL_S)

    def connections_of(self, uid: int) -> int:
        return self._per_uid[uid]

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
                if self._throttle.allow("accept"):
                    log.error("accepting a control connection failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            try:
                conn.setblocking(False)
                caller = peer_credentials(conn)
            except OSError:  # the peer is gone already
                conn.close()
                continue
            workers = self._worker_pids()
            if workers and not workers.isdisjoint(lineage(caller.pid)):
                self._refuse_worker(conn, caller)
                continue
            limit = self._limits().max_connections_per_uid
            if caller.uid != 0 and self._per_uid[caller.uid] >= limit:  # root: an admin always gets in
                self._refuse(conn, caller, limit)
                continue
            self._per_uid[caller.uid] += 1
            task = asyncio.create_task(self._serve(conn, caller))
            self._connections.add(task)
            task.add_done_callback(functools.partial(self._ended, caller.uid))

    def _ended(self, uid: int, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        self._per_uid[uid] -= 1
        if self._per_uid[uid] <= 0:
            del self._per_uid[uid]

    def _refuse(self, conn: socket.socket, caller: Caller, limit: int) -> None:
        """Answer without reading the request, and close: a short line always fits a new socket's buffer."""
        error = TooManyConnections(
            f"uid {caller.uid} already has {limit} connections open to whisperd "
            "(daemon.max_connections_per_uid); close some and try again"
        )
        with contextlib.suppress(OSError):
            conn.send(p.encode_line(_error(error)))
        conn.close()
        if self._throttle.allow(("refused", caller.uid)):
            log.warning("refused connections of uid %d: it holds %d already", caller.uid, limit)

    def _refuse_worker(self, conn: socket.socket, caller: Caller) -> None:
        error = PermissionDenied("whisperd's worker processes may not use its control socket")
        with contextlib.suppress(OSError):
            conn.send(p.encode_line(_error(error)))
        conn.close()
        if self._throttle.allow(("worker", caller.pid)):
            log.warning("refused a control connection from pid %d, a worker process or its child", caller.pid)

    async def _serve(self, conn: socket.socket, caller: Caller) -> None:
        loop = asyncio.get_running_loop()
        buffer = p.LineBuffer(self._max_request_bytes)
        pending_fds: list[int] = []
        try:
            while True:
                try:
                    data, fds = await recv_with_fds(loop, conn)
                except RequestTooLarge as exc:
                    await self._send(loop, conn, caller, _error(exc))
                    return
                pending_fds += fds
                if len(pending_fds) > _MAX_FDS:  # descriptors piling up with no request line to end them
                    _close_all(pending_fds)
                    too_many = RequestTooLarge(f"more than {_MAX_FDS} descriptors passed for one request")
                    await self._send(loop, conn, caller, _error(too_many))
                    return
                if not data:
                    return
                for line in buffer.feed(data):
                    fds_for_request, pending_fds = pending_fds, []
                    try:
                        reply = await self._answer(line, caller, fds_for_request)
                    finally:
                        _close_all(fds_for_request)
                    if reply is None:  # watch
                        await self._stream(loop, conn, caller)
                        return
                    await self._send(loop, conn, caller, reply)
        except OSError:
            pass  # the peer left or would not read: nothing to answer (a timeout was logged in _send)
        finally:
            _close_all(pending_fds)
            conn.close()

    async def _answer(self, line: bytes | RequestTooLarge, caller: Caller, fds: list[int]) -> p.Reply | None:
        """The reply to one request line; None for a watch, which turns the connection into a stream."""
        try:
            if isinstance(line, RequestTooLarge):
                raise line
            request = p.decode_request(line)
            if isinstance(request, p.Watch):
                return None
            return await self._handlers.handle(request, caller, fds)
        except WhisperdError as exc:
            return _error(exc)
        except ConnectionError:
            raise  # the peer left; nothing to answer
        except Exception as exc:
            self._log_internal(caller, exc)
            message = p.printable(f"internal error: {exc}")[:_MAX_INTERNAL_MESSAGE_CHARS]
            return p.Error(error=p.ErrorBody(code="internal", message=message))

    def _log_internal(self, caller: Caller, exc: Exception) -> None:
        """A daemon bug, so a traceback helps; but a client may repeat the request at will."""
        if self._throttle.allow("internal"):
            log.error("request from pid %d (uid %d) failed", caller.pid, caller.uid, exc_info=exc)
        else:
            log.error("request from pid %d (uid %d) failed: %s (tracebacks: one a minute)", caller.pid,
                      caller.uid, p.printable(repr(exc))[:_MAX_INTERNAL_MESSAGE_CHARS])  # fmt: skip

    async def _stream(self, loop: asyncio.AbstractEventLoop, conn: socket.socket, caller: Caller) -> None:
        """Events until the client leaves or falls behind; what it sends meanwhile is read and dropped, so
        its descriptors are closed at once and its leaving is noticed without waiting for an event."""
        queue = self._watchers.add()
        sender = asyncio.create_task(self._send_events(loop, conn, caller, queue))
        reader = asyncio.create_task(_discard_input(loop, conn))
        try:
            await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._watchers.remove(queue)
            sender.cancel()
            reader.cancel()
            for outcome in await asyncio.gather(sender, reader, return_exceptions=True):
                if isinstance(outcome, Exception) and not isinstance(outcome, OSError):
                    self._log_internal(caller, outcome)

    async def _send_events(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, caller: Caller, queue: WatchQueue
    ) -> None:
        for reply in self._snapshot():
            await self._send(loop, conn, caller, reply)
        while line := await queue.get():
            await self._send_bytes(loop, conn, caller, line)

    async def _send(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, caller: Caller, reply: msgspec.Struct
    ) -> None:
        await self._send_bytes(loop, conn, caller, p.encode_line(reply))

    async def _send_bytes(
        self, loop: asyncio.AbstractEventLoop, conn: socket.socket, caller: Caller, data: bytes
    ) -> None:
        """Send all of data; raises TimeoutError when the client has not read it within send_timeout_s."""
        try:
            sent = conn.send(data)  # usually all of it: no task, no timer
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            return
        timeout_s = self._limits().send_timeout_s
        try:
            await asyncio.wait_for(loop.sock_sendall(conn, data[sent:]), timeout_s)
        except TimeoutError:
            if self._throttle.allow(("slow", caller.uid)):
                log.warning("disconnected a client of uid %d (pid %d) that read nothing for %.0f s",
                            caller.uid, caller.pid, timeout_s)  # fmt: skip
            raise


async def _discard_input(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    """Read until the peer closes, dropping the bytes and closing any descriptors that come with them."""
    while True:
        try:
            data, fds = await recv_with_fds(loop, conn)
        except RequestTooLarge:
            continue  # recv_with_fds closed them
        _close_all(fds)
        if not data:
            return


def _error(exc: WhisperdError) -> p.Error:
    return p.Error(error=p.ErrorBody(code=exc.code, message=exc.message))
